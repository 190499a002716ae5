//! Random scale, crop and horizontal flip of one image/label pair.
//!
//! Scaling follows the usual rule (and the reference loader): the image is resized to
//! `max(crop, size * s)` per axis, then a crop window is drawn. Only the source region under
//! the crop window is resampled (fast_image_resize's crop option): the result equals resizing
//! the whole image and cropping, at a fraction of the work. Images use a convolution filter;
//! labels are picked nearest-neighbour through `Geometry::to_original`, the same mapping the
//! ledger uses, so a label and the pixel it is charged to can never disagree.

use crate::config::AugmentConfig;
use fast_image_resize::{images::{Image, ImageRef}, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rand::Rng;

/// Where a crop came from, so a training pixel maps back to its original-image pixel
/// (the ledger records bought labels in original coordinates).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub original_width: u32,
    pub original_height: u32,
    /// Size of the (virtual) scaled image the crop was taken from.
    pub scaled_width: u32,
    pub scaled_height: u32,
    pub crop_x: u32,
    pub crop_y: u32,
    pub crop_width: u32,
    pub crop_height: u32,
    pub flipped: bool,
}

impl Geometry {
    /// The identity geometry of an unaugmented image.
    pub fn identity(width: u32, height: u32) -> Geometry {
        Geometry { original_width: width, original_height: height, scaled_width: width,
            scaled_height: height, crop_x: 0, crop_y: 0, crop_width: width, crop_height: height,
            flipped: false }
    }

    /// The original-image pixel (x, y) that crop pixel (x, y) was sampled from (nearest).
    pub fn to_original(&self, x: u32, y: u32) -> (u32, u32) {
        let x = if self.flipped { self.crop_width - 1 - x } else { x };
        let map = |v: u32, offset: u32, scaled: u32, original: u32| {
            ((((v + offset) as f64 + 0.5) * original as f64 / scaled as f64) as u32).min(original - 1)
        };
        (map(x, self.crop_x, self.scaled_width, self.original_width),
         map(y, self.crop_y, self.scaled_height, self.original_height))
    }
}

/// One augmented sample: RGB bytes (HWC), training ids, and its geometry. Normalisation to
/// floats happens on the device (`data::normalise`): the loader moves 4x fewer bytes and the
/// CPU stays free for decoding.
#[derive(Debug, Clone)]
pub struct Augmented {
    pub image: Vec<u8>,
    pub label: Vec<u8>,
    pub geometry: Geometry,
}

/// Per-thread augmentation state (the resizer keeps scratch buffers between calls).
pub struct Augmenter {
    config: AugmentConfig,
    resizer: Resizer,
    image_filter: FilterType,
}

impl Augmenter {
    pub fn new(config: &AugmentConfig) -> Augmenter {
        Augmenter { config: config.clone(), resizer: Resizer::new(), image_filter: FilterType::Bilinear }
    }

    /// Draws the random geometry for an image of `width` x `height`.
    pub fn draw_geometry(&self, width: u32, height: u32, rng: &mut impl Rng) -> Geometry {
        let c = &self.config;
        let (base_w, base_h) = if c.resize[0] > 0 { (c.resize[1], c.resize[0]) } else { (width, height) };
        let s = if c.scale[0] < c.scale[1] { rng.gen_range(c.scale[0]..=c.scale[1]) } else { c.scale[0] };
        let (crop_h, crop_w) = (c.crop[0], c.crop[1]);
        let scaled_w = crop_w.max((base_w as f32 * s) as u32);
        let scaled_h = crop_h.max((base_h as f32 * s) as u32);
        let crop_x = rng.gen_range(0..=scaled_w - crop_w);
        let crop_y = rng.gen_range(0..=scaled_h - crop_h);
        let flipped = c.flip && rng.gen_bool(0.5);
        Geometry { original_width: width, original_height: height, scaled_width: scaled_w,
            scaled_height: scaled_h, crop_x, crop_y, crop_width: crop_w, crop_height: crop_h, flipped }
    }

    /// Applies `geometry` to an RGB image and its label map (both `width` x `height`).
    pub fn apply(&mut self, rgb: &[u8], label: &[u8], geometry: Geometry) -> Augmented {
        let g = geometry;
        let (w, h) = (g.original_width, g.original_height);
        // The crop window in original-image coordinates.
        let sx = w as f64 / g.scaled_width as f64;
        let sy = h as f64 / g.scaled_height as f64;
        let window = (g.crop_x as f64 * sx, g.crop_y as f64 * sy, g.crop_width as f64 * sx,
            g.crop_height as f64 * sy);

        let mut image = self.resample(rgb, PixelType::U8x3, w, h, g.crop_width, g.crop_height, window,
            ResizeAlg::Convolution(self.image_filter));
        if g.flipped {
            flip_rgb_rows(&mut image, g.crop_width as usize);
        }
        Augmented { image, label: sample_label(label, &g), geometry }
    }

    #[allow(clippy::too_many_arguments)]
    fn resample(&mut self, pixels: &[u8], pixel_type: PixelType, w: u32, h: u32, out_w: u32,
        out_h: u32, window: (f64, f64, f64, f64), alg: ResizeAlg) -> Vec<u8> {
        let src = ImageRef::new(w, h, pixels, pixel_type).expect("buffer matches its size");
        let mut dst = Image::new(out_w, out_h, pixel_type);
        let options = ResizeOptions::new().resize_alg(alg).crop(window.0, window.1, window.2, window.3);
        self.resizer.resize(&src, &mut dst, &options).expect("same pixel types");
        dst.into_vec()
    }
}

/// Mirrors each row of an HWC RGB image in place.
fn flip_rgb_rows(rgb: &mut [u8], width: usize) {
    for row in rgb.chunks_exact_mut(width * 3) {
        row.as_chunks_mut::<3>().0.reverse();
    }
}

/// Nearest-neighbour labels taken through `Geometry::to_original` itself, so each training
/// label is exactly the original pixel the ledger will record for it.
fn sample_label(label: &[u8], g: &Geometry) -> Vec<u8> {
    let xs: Vec<usize> = (0..g.crop_width).map(|x| g.to_original(x, 0).0 as usize).collect();
    let mut out = Vec::with_capacity((g.crop_width * g.crop_height) as usize);
    for y in 0..g.crop_height {
        let row = g.to_original(0, y).1 as usize * g.original_width as usize;
        out.extend(xs.iter().map(|&x| label[row + x]));
    }
    out
}
