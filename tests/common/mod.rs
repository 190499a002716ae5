//! Fixture helpers: small data sets written in the real layouts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A 2-colour RGB image whose colour depends on the label (so alignment can be checked).
pub fn write_rgb(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y))).save(path).unwrap();
}

/// An 8-bit grayscale label PNG (GTA5 / Cityscapes / Synscapes label ids).
pub fn write_label8(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)])).save(path).unwrap();
}

/// A 16-bit RGBA label PNG with the class id in the first channel (SYNTHIA's GT/LABELS).
pub fn write_label16_synthia(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u16) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Sixteen);
    let mut writer = encoder.write_header().unwrap();
    let mut data = Vec::new();
    for y in 0..h {
        for x in 0..w {
            // id in R; G holds an instance id (must be ignored); B, A arbitrary.
            for v in [f(x, y), 1234, 0, 65535] {
                data.extend_from_slice(&v.to_be_bytes());
            }
        }
    }
    writer.write_image_data(&data).unwrap();
}

/// Label id pattern: vertical stripes of road (7), car (26), sky (23), unlabeled (0).
pub fn stripes(x: u32, _y: u32) -> u8 {
    [7u8, 26, 23, 0][(x / 4 % 4) as usize]
}

pub fn colour_of(id: u8) -> [u8; 3] {
    [id.wrapping_mul(7), 255 - id, id.wrapping_mul(3)]
}

/// A GTA5-layout set of `n` frames of `w` x `h`.
pub fn gta5(root: &Path, n: usize, w: u32, h: u32) {
    for i in 1..=n {
        let name = format!("{i:05}.png");
        write_rgb(&root.join("images").join(&name), w, h, |x, y| colour_of(stripes(x, y)));
        write_label8(&root.join("labels").join(&name), w, h, stripes);
    }
}

/// A Cityscapes-layout split with one city.
pub fn cityscapes(root: &Path, split: &str, n: usize, w: u32, h: u32) {
    for i in 1..=n {
        let stem = format!("aachen_000000_{i:06}");
        write_rgb(&root.join(format!("leftImg8bit/{split}/aachen/{stem}_leftImg8bit.png")), w, h, |x, y| {
            colour_of(stripes(x, y))
        });
        write_label8(&root.join(format!("gtFine/{split}/aachen/{stem}_gtFine_labelIds.png")), w, h, stripes);
    }
}

/// The embedded default's config over a small synthetic set written under `dir`:
/// frames of `size` (width, height), `counts` (source, target train, target val) images,
/// crops of the whole frame, a tiny backbone.
pub fn synthetic_config(dir: &Path, size: (u32, u32), counts: (usize, usize, usize)) -> adamcu::config::Config {
    use adamcu::config::{Config, DatasetConfig, DatasetKind};
    let data = dir.join("data");
    let mut c = Config::from_toml_str(&std::fs::read_to_string("pipelines/synth.toml").unwrap()).unwrap();
    c.run.runs_dir = dir.join("runs");
    c.synth.root = data.clone();
    (c.synth.width, c.synth.height) = size;
    (c.synth.source_images, c.synth.target_train_images, c.synth.target_val_images) = counts;
    c.data.source = Some(DatasetConfig::at(DatasetKind::Gta5, data.join("source")));
    c.data.target = Some(DatasetConfig {
        split: Some(adamcu::config::Split::Train),
        ..DatasetConfig::at(DatasetKind::Cityscapes, data.join("target"))
    });
    c.data.target_val = Some(DatasetConfig {
        split: Some(adamcu::config::Split::Val),
        ..DatasetConfig::at(DatasetKind::Cityscapes, data.join("target"))
    });
    c.augment.crop = [size.1, size.0];
    c.model.tiny_width = 8;
    // The raw source as it is; `translated_by_a_tiny_cyclegan` adds Algorithm 1's line 1.
    c.translate.method = adamcu::config::TranslateMethod::None;
    adamcu::data::synth::generate(&c.synth).unwrap();
    c
}

/// Makes `synthetic_config`'s source the translated one: a tiny CycleGAN (ngf 4, one block,
/// ndf 4, 2 layers, 16x32 crops, 2 epochs) writes it to `data/source_translated` when a job
/// starts.
pub fn translated_by_a_tiny_cyclegan(c: &mut adamcu::config::Config) {
    use adamcu::config::{DatasetConfig, DatasetKind, TranslateMethod};
    let data = c.synth.root.clone();
    c.data.source = Some(DatasetConfig {
        labels_kind: Some(DatasetKind::Gta5),
        labels_root: Some(data.join("source")),
        ..DatasetConfig::at(DatasetKind::Translated, data.join("source_translated"))
    });
    c.translate.method = TranslateMethod::Cyclegan;
    (c.translate.generator_width, c.translate.generator_blocks) = (4, 1);
    (c.translate.discriminator_width, c.translate.discriminator_layers) = (4, 2);
    (c.translate.load_size, c.translate.crop) = ([0, 0], [16, 32]);
    (c.translate.epochs, c.translate.epochs_decay, c.translate.checkpoint_every) = (1, 1, 5);
}

/// A tiny daemon config (64x32 frames, metrics off, checkpoints every 7 steps).
pub fn tiny_daemon_config(dir: &Path, name: &str, iterations: usize) -> adamcu::config::Config {
    let mut c = synthetic_config(dir, (64, 32), (6, 6, 2));
    c.run.name = name.into();
    c.run.threads = 1; // bit-exact replays after a resume
    c.model.aspp_dilations = vec![1, 2];
    c.model.projection_dim = 16;
    (c.train.batch_source, c.train.batch_target) = (2, 2);
    c.train.source_iterations = 10;
    c.train.log_every = 5;
    c.train.checkpoint_every = 7;
    c.train.keep_checkpoints = 2;
    c.active.budget = 0.1;
    c.active.iterations = iterations;
    c.metrics.listen = String::new();
    c
}

pub fn write_config(dir: &Path, config: &adamcu::config::Config) -> std::path::PathBuf {
    let path = dir.join(format!("{}.toml", config.run.name));
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The Python that has torch: $ADAMCU_PYTHON, else the virtualenv scripts/setup-libtorch.sh
/// made (LIBTORCH is its site-packages/torch), else python3.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("ADAMCU_PYTHON") {
        return python.into();
    }
    if let Some(libtorch) = std::env::var_os("LIBTORCH") {
        let venv_python = Path::new(&libtorch).join("../../../../bin/python");
        if venv_python.exists() {
            return venv_python;
        }
    }
    "python3".into()
}

/// Tests draw from torch's one global generator: a test that draws from it holds this lock, so
/// that its seed gives it the same numbers whatever runs beside it.
pub fn global_generator() -> std::sync::MutexGuard<'static, ()> {
    static GLOBAL_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    GLOBAL_GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
