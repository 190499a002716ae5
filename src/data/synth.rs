//! The embedded default benchmark: procedural street scenes written to disk in the GTA5
//! layout (the raw source) and the Cityscapes layout (target train/val), with Cityscapes
//! label ids, so the real readers serve it. The translated source is not drawn here: as in
//! Algorithm 1, it comes from the translation stage (`adamcu translate`, `src/translate/`).
//!
//! The domain shift is built in on purpose (see `datasets/synth.md`): palettes and lighting,
//! texture and sensor noise, blur, camera height, class frequencies, and classes whose source
//! appearance misleads on the target (target sidewalks are coloured like source roads, target
//! terrain like source vegetation, target walls like source buildings), so that labelled
//! target pixels matter.

use crate::config::SynthConfig;
use image::{GrayImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

// Cityscapes label ids used by the generator.
const EGO: u8 = 1;
const ROAD: u8 = 7;
const SIDEWALK: u8 = 8;
const BUILDING: u8 = 11;
const WALL: u8 = 12;
const FENCE: u8 = 13;
const POLE: u8 = 17;
const LIGHT: u8 = 19;
const SIGN: u8 = 20;
const VEGETATION: u8 = 21;
const TERRAIN: u8 = 22;
const SKY: u8 = 23;
const PERSON: u8 = 24;
const RIDER: u8 = 25;
const CAR: u8 = 26;
const TRUCK: u8 = 27;
const BUS: u8 = 28;
const TRAIN: u8 = 31;
const MOTORCYCLE: u8 = 32;
const BICYCLE: u8 = 33;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Domain {
    Source,
    Target,
}

/// How a domain looks and what its streets contain.
struct Style {
    /// Base colour per Cityscapes label id (index = id).
    palette: [[f32; 3]; 34],
    /// Amplitude of smooth texture and of per-pixel sensor noise.
    texture: f32,
    noise: f32,
    /// Box-blur radius in pixels.
    blur: usize,
    /// Horizon position as a fraction of the height (camera height).
    horizon: (f32, f32),
    /// Brightness range of the global illumination.
    brightness: (f32, f32),
    /// Expected objects per image: cars, big vehicles, two-wheelers, persons, poles.
    cars: f32,
    big_vehicles: f32,
    two_wheelers: f32,
    persons: f32,
    poles: f32,
    ego_rows: f32,
}

fn palette(entries: &[(u8, [f32; 3])]) -> [[f32; 3]; 34] {
    let mut p = [[0.0; 3]; 34];
    for &(id, rgb) in entries {
        p[id as usize] = rgb;
    }
    p
}

fn style(domain: Domain) -> Style {
    match domain {
        // Game-like: saturated, clean, sharp, high camera, many cars.
        Domain::Source => Style {
            palette: palette(&[
                (ROAD, [95.0, 92.0, 100.0]),
                (SIDEWALK, [185.0, 160.0, 150.0]),
                (BUILDING, [150.0, 120.0, 95.0]),
                (WALL, [200.0, 190.0, 120.0]),
                (FENCE, [120.0, 150.0, 160.0]),
                (POLE, [60.0, 60.0, 60.0]),
                (LIGHT, [240.0, 200.0, 40.0]),
                (SIGN, [230.0, 40.0, 40.0]),
                (VEGETATION, [60.0, 150.0, 40.0]),
                (TERRAIN, [170.0, 150.0, 70.0]),
                (SKY, [110.0, 170.0, 240.0]),
                (PERSON, [200.0, 60.0, 90.0]),
                (RIDER, [240.0, 120.0, 30.0]),
                (CAR, [30.0, 60.0, 200.0]),
                (TRUCK, [40.0, 110.0, 110.0]),
                (BUS, [220.0, 200.0, 30.0]),
                (TRAIN, [150.0, 40.0, 160.0]),
                (MOTORCYCLE, [20.0, 20.0, 30.0]),
                (BICYCLE, [160.0, 30.0, 40.0]),
                (EGO, [20.0, 20.0, 20.0]),
            ]),
            texture: 0.08,
            noise: 3.0,
            blur: 0,
            horizon: (0.36, 0.44),
            brightness: (0.95, 1.1),
            cars: 3.0,
            big_vehicles: 0.8,
            two_wheelers: 0.6,
            persons: 1.5,
            poles: 3.0,
            ego_rows: 0.0,
        },
        // Camera-like: muted, darker, noisy, blurred, lower camera, more people.
        Domain::Target => Style {
            palette: palette(&[
                // Misleading on purpose: target sidewalk = source road colour, terrain =
                // source vegetation, wall = source building.
                (ROAD, [125.0, 118.0, 110.0]),
                (SIDEWALK, [95.0, 92.0, 100.0]),
                (BUILDING, [105.0, 105.0, 115.0]),
                (WALL, [150.0, 120.0, 95.0]),
                (FENCE, [140.0, 130.0, 120.0]),
                (POLE, [90.0, 90.0, 85.0]),
                (LIGHT, [200.0, 170.0, 80.0]),
                (SIGN, [180.0, 170.0, 60.0]),
                (VEGETATION, [70.0, 100.0, 50.0]),
                (TERRAIN, [60.0, 150.0, 40.0]),
                (SKY, [190.0, 200.0, 210.0]),
                (PERSON, [120.0, 70.0, 80.0]),
                (RIDER, [160.0, 90.0, 60.0]),
                (CAR, [60.0, 70.0, 110.0]),
                (TRUCK, [80.0, 100.0, 90.0]),
                (BUS, [170.0, 150.0, 70.0]),
                (TRAIN, [120.0, 80.0, 120.0]),
                (MOTORCYCLE, [40.0, 40.0, 45.0]),
                (BICYCLE, [120.0, 50.0, 60.0]),
                (EGO, [30.0, 30.0, 35.0]),
            ]),
            texture: 0.14,
            noise: 7.0,
            blur: 1,
            horizon: (0.44, 0.52),
            brightness: (0.75, 1.0),
            cars: 2.0,
            big_vehicles: 0.4,
            two_wheelers: 1.0,
            persons: 3.0,
            poles: 4.0,
            ego_rows: 0.06,
        },
    }
}

/// A label map being painted (Cityscapes ids).
struct Canvas {
    w: i32,
    h: i32,
    ids: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i32, y: i32, id: u8) {
        if x >= 0 && y >= 0 && x < self.w && y < self.h {
            self.ids[(y * self.w + x) as usize] = id;
        }
    }
    fn rect(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, id: u8) {
        for y in y0.max(0)..y1.min(self.h) {
            for x in x0.max(0)..x1.min(self.w) {
                self.ids[(y * self.w + x) as usize] = id;
            }
        }
    }
    fn ellipse(&mut self, cx: f32, cy: f32, rx: f32, ry: f32, id: u8) {
        for y in (cy - ry).floor() as i32..=(cy + ry).ceil() as i32 {
            for x in (cx - rx).floor() as i32..=(cx + rx).ceil() as i32 {
                let (dx, dy) = ((x as f32 - cx) / rx.max(0.5), (y as f32 - cy) / ry.max(0.5));
                if dx * dx + dy * dy <= 1.0 {
                    self.set(x, y, id);
                }
            }
        }
    }
}

fn count(rng: &mut ChaCha8Rng, mean: f32) -> usize {
    // A small Poisson-like draw: floor(mean) plus one with the fractional probability, jittered.
    let jittered = mean * rng.gen_range(0.5..1.5);
    jittered.floor() as usize + usize::from(rng.gen::<f32>() < jittered.fract())
}

/// Paints the label map of one scene.
fn scene(w: u32, h: u32, style: &Style, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut c = Canvas { w: w as i32, h: h as i32, ids: vec![SKY; (w * h) as usize] };
    let (wf, hf) = (w as f32, h as f32);
    let horizon = (rng.gen_range(style.horizon.0..style.horizon.1) * hf) as i32;
    let vanish_x = wf * rng.gen_range(0.4..0.6);
    let road_half_bottom = wf * rng.gen_range(0.35..0.55);
    let depth = |y: i32| ((y - horizon) as f32 / (hf - horizon as f32)).max(0.0);
    let road_half = |y: i32| road_half_bottom * depth(y) + 1.0;
    let walk_width = |y: i32| 0.45 * road_half(y) + 1.0;

    // Skyline: buildings and trees above the horizon.
    let mut x = 0i32;
    while x < c.w {
        let seg = rng.gen_range(w as i32 / 12..w as i32 / 4).max(4);
        let top = horizon - (hf * rng.gen_range(0.08..0.38)) as i32;
        match rng.gen_range(0..10) {
            0..=5 => c.rect(x, top, x + seg, horizon + 1, BUILDING),
            6..=8 => {
                c.rect(x, top + seg / 3, x + seg, horizon + 1, VEGETATION);
                c.ellipse(
                    (x + seg / 2) as f32,
                    (top + seg / 3) as f32,
                    seg as f32 * 0.6,
                    seg as f32 * 0.45,
                    VEGETATION,
                );
            }
            _ => {}
        }
        x += seg;
    }

    // Ground: road, sidewalks, then terrain / buildings / vegetation beside them.
    let side_kind = [rng.gen_range(0..3), rng.gen_range(0..3)];
    for y in horizon..c.h {
        let (half, walk) = (road_half(y), walk_width(y));
        for xi in 0..c.w {
            let dx = xi as f32 - vanish_x;
            let id = if dx.abs() <= half {
                ROAD
            } else if dx.abs() <= half + walk {
                SIDEWALK
            } else {
                match side_kind[usize::from(dx > 0.0)] {
                    0 => TERRAIN,
                    1 => BUILDING,
                    _ => VEGETATION,
                }
            };
            c.set(xi, y, id);
        }
    }
    // Walls and fences along the outer edge of a sidewalk.
    for side in [-1.0f32, 1.0] {
        if rng.gen::<f32>() < 0.6 {
            let id = if rng.gen() { WALL } else { FENCE };
            let (y0, y1) = (horizon + (hf * 0.05) as i32, c.h);
            for y in y0..y1 {
                let edge = vanish_x + side * (road_half(y) + walk_width(y));
                let height = (3.0 + 10.0 * depth(y)) as i32;
                let thickness = (1.0 + 4.0 * depth(y)) as i32;
                for t in 0..thickness {
                    for dy in 0..height {
                        c.set((edge + side * t as f32) as i32, y - dy, id);
                    }
                }
            }
        }
    }
    // Poles on the sidewalks, some with a traffic light or a sign.
    for _ in 0..count(rng, style.poles) {
        let y = rng.gen_range(horizon + 4..c.h);
        let side = if rng.gen() { -1.0 } else { 1.0 };
        let x = (vanish_x + side * (road_half(y) + 0.5 * walk_width(y))) as i32;
        let height = (4.0 + 45.0 * depth(y)) as i32;
        let width = (1.0 + 2.0 * depth(y)) as i32;
        c.rect(x, y - height, x + width, y, POLE);
        let size = (2.0 + 7.0 * depth(y)) as i32;
        match rng.gen_range(0..3) {
            0 => c.rect(x - size / 2, y - height - size * 2, x + size / 2 + 1, y - height, LIGHT),
            1 => c.rect(x - size, y - height - size, x + size, y - height, SIGN),
            _ => {}
        }
    }
    // Vehicles on the road, farther ones first so nearer ones occlude them.
    let mut vehicles: Vec<(i32, u8)> = Vec::new();
    for _ in 0..count(rng, style.cars) {
        vehicles.push((rng.gen_range(horizon + 3..c.h), CAR));
    }
    for _ in 0..count(rng, style.big_vehicles) {
        let kind = [TRUCK, BUS, BUS, TRAIN][rng.gen_range(0..4)];
        vehicles.push((rng.gen_range(horizon + 3..c.h), kind));
    }
    for _ in 0..count(rng, style.two_wheelers) {
        let kind = if rng.gen() { BICYCLE } else { MOTORCYCLE };
        vehicles.push((rng.gen_range(horizon + 3..c.h), kind));
    }
    vehicles.sort();
    for (y, kind) in vehicles {
        let d = depth(y);
        let x = vanish_x + rng.gen_range(-0.8..0.8) * road_half(y);
        let (vw, vh) = match kind {
            CAR => (60.0 * d + 3.0, 30.0 * d + 2.0),
            TRUCK => (70.0 * d + 4.0, 55.0 * d + 3.0),
            BUS => (85.0 * d + 4.0, 60.0 * d + 3.0),
            TRAIN => (140.0 * d + 6.0, 60.0 * d + 3.0),
            _ => (14.0 * d + 2.0, 14.0 * d + 2.0),
        };
        let (x0, y0) = ((x - vw / 2.0) as i32, (y as f32 - vh) as i32);
        c.rect(x0, y0, (x + vw / 2.0) as i32, y, kind);
        if kind == CAR {
            // A roof narrower than the body.
            c.rect(x0 + (vw * 0.2) as i32, y0 - (vh * 0.4) as i32, (x + vw * 0.3) as i32, y0, CAR);
        }
        if kind == BICYCLE || kind == MOTORCYCLE {
            c.ellipse(x, y0 as f32 - vh * 0.6, vw * 0.25, vh * 0.7, RIDER);
        }
    }
    // Pedestrians on the sidewalks.
    for _ in 0..count(rng, style.persons) {
        let y = rng.gen_range(horizon + 3..c.h);
        let side = if rng.gen() { -1.0 } else { 1.0 };
        let x = vanish_x + side * (road_half(y) + rng.gen_range(0.2..0.8) * walk_width(y));
        let ph = 4.0 + 40.0 * depth(y);
        c.ellipse(x, y as f32 - ph / 2.0, ph * 0.16, ph / 2.0, PERSON);
    }
    // The ego vehicle's bonnet at the bottom (an ignored class, as in Cityscapes).
    let ego = (style.ego_rows * hf) as i32;
    if ego > 0 {
        for y in c.h - ego..c.h {
            let inset = ((c.h - y) as f32 / ego as f32 * wf * 0.15) as i32;
            c.rect(inset, y, c.w - inset, y + 1, EGO);
        }
    }
    c.ids
}

/// Renders the appearance of a label map in a style.
fn render(ids: &[u8], w: u32, h: u32, style: &Style, rng: &mut ChaCha8Rng) -> RgbImage {
    let brightness = rng.gen_range(style.brightness.0..style.brightness.1);
    // Per-image colour variation per class (instances look alike within an image).
    let jitter: Vec<[f32; 3]> =
        (0..34).map(|_| [rng.gen_range(-12.0..12.0), rng.gen_range(-12.0..12.0), rng.gen_range(-12.0..12.0)]).collect();
    // 6.28, not TAU: every seeded data set already generated depends on this exact value.
    #[allow(clippy::approx_constant)]
    let waves: Vec<(f32, f32, f32)> =
        (0..34).map(|_| (rng.gen_range(0.05..0.4), rng.gen_range(0.05..0.4), rng.gen_range(0.0..6.28))).collect();
    let mut pixels = vec![0f32; (w * h * 3) as usize];
    for y in 0..h {
        // Light falls off toward the top and bottom edges.
        let light = brightness * (1.0 - 0.15 * ((y as f32 / h as f32) - 0.5).abs());
        for x in 0..w {
            let id = ids[(y * w + x) as usize] as usize;
            let (fx, fy, phase) = waves[id];
            let texture = 1.0 + style.texture * ((x as f32 * fx + phase).sin() * (y as f32 * fy).cos());
            for ch in 0..3 {
                let v = (style.palette[id][ch] + jitter[id][ch]) * texture * light;
                pixels[((y * w + x) * 3 + ch as u32) as usize] = v;
            }
        }
    }
    if style.blur > 0 {
        pixels = box_blur(&pixels, w as usize, h as usize, style.blur);
    }
    let bytes =
        pixels.iter().map(|&v| (v + rng.gen_range(-1.0f32..1.0) * style.noise * 1.7).clamp(0.0, 255.0) as u8).collect();
    RgbImage::from_raw(w, h, bytes).expect("buffer matches the size")
}

fn box_blur(pixels: &[f32], w: usize, h: usize, r: usize) -> Vec<f32> {
    let mut out = vec![0f32; pixels.len()];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..3 {
                let (mut sum, mut n) = (0.0, 0.0);
                for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                    for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                        sum += pixels[(yy * w + xx) * 3 + ch];
                        n += 1.0;
                    }
                }
                out[(y * w + x) * 3 + ch] = sum / n;
            }
        }
    }
    out
}

fn write_png<P>(image: &image::ImageBuffer<P, Vec<u8>>, path: &Path) -> anyhow::Result<()>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    image.save(path).map_err(|e| anyhow::anyhow!("{}: cannot write PNG: {e}", path.display()))
}

/// Paths of the generated benchmark below `root`.
pub struct SynthLayout {
    pub source: PathBuf,
    pub target: PathBuf,
}

impl SynthLayout {
    pub fn new(root: &Path) -> SynthLayout {
        SynthLayout { source: root.join("source"), target: root.join("target") }
    }
}

/// Seed of one image: the same (config seed, domain, index) always draws the same scene.
fn image_rng(seed: u64, stream: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (stream << 56) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Writes the benchmark; skips it when a complete one with the same settings is there.
pub fn generate(config: &SynthConfig) -> anyhow::Result<SynthLayout> {
    let layout = SynthLayout::new(&config.root);
    let stamp = config.root.join("synth.json");
    // The stamp records the settings that shape the data (not where it lives).
    let settings = serde_json::to_string_pretty(&SynthConfig { root: PathBuf::new(), ..config.clone() })?;
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(settings.as_str()) {
        return Ok(layout);
    }
    // A new benchmark replaces the old one whole, and with it the translation of its source
    // (`source_translated/`: written by the translation stage, or by versions of this
    // generator before it, which drew a translated copy themselves).
    for dir in [&layout.source, &layout.target, &config.root.join("source_translated")] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("{}: cannot remove the old benchmark: {e}", dir.display()))?;
        }
    }
    let (w, h) = (config.width, config.height);
    let total = config.source_images + config.target_train_images + config.target_val_images;
    let progress = std::sync::Mutex::new(crate::progress::Progress::new("datasets synth", total as u64, 500));
    let tick = || progress.lock().expect("no panic while held").tick();
    let source_style = style(Domain::Source);
    let target_style = style(Domain::Target);
    (0..config.source_images).into_par_iter().try_for_each(|i| -> anyhow::Result<()> {
        let name = format!("{:05}.png", i + 1);
        let mut rng = image_rng(config.seed, 1, i);
        let ids = scene(w, h, &source_style, &mut rng);
        write_png(&render(&ids, w, h, &source_style, &mut rng), &layout.source.join("images").join(&name))?;
        write_png(&GrayImage::from_raw(w, h, ids).unwrap(), &layout.source.join("labels").join(&name))?;
        tick();
        Ok(())
    })?;
    let splits = [("train", config.target_train_images, 2u64), ("val", config.target_val_images, 3u64)];
    for (split, n, stream) in splits {
        (0..n).into_par_iter().try_for_each(|i| -> anyhow::Result<()> {
            let stem = format!("synthcity_000000_{:06}", i + 1);
            let mut rng = image_rng(config.seed, stream, i);
            let ids = scene(w, h, &target_style, &mut rng);
            let image = render(&ids, w, h, &target_style, &mut rng);
            write_png(
                &image,
                &layout
                    .target
                    .join("leftImg8bit")
                    .join(split)
                    .join("synthcity")
                    .join(format!("{stem}_leftImg8bit.png")),
            )?;
            write_png(
                &GrayImage::from_raw(w, h, ids).unwrap(),
                &layout.target.join("gtFine").join(split).join("synthcity").join(format!("{stem}_gtFine_labelIds.png")),
            )?;
            tick();
            Ok(())
        })?;
    }
    progress.into_inner().expect("no panic while held").finish();
    std::fs::write(&stamp, settings)?;
    Ok(layout)
}
