//! `adamcu pack`: decode a data set once (optionally resizing it) into a memory-mapped shard.

use super::datasets::{Label, Rgb};
use super::shard::ShardWriter;
use super::source::SampleSource;
use anyhow::Result;
use fast_image_resize::{
    images::{Image, ImageRef},
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};
use std::path::Path;

/// Resizes an image (bicubic) and its label map (nearest) to `width` x `height`.
pub fn resize_pair(resizer: &mut Resizer, rgb: &Rgb, label: &Label, width: u32, height: u32) -> (Rgb, Label) {
    let resized = rgb.resized(resizer, width, height, ResizeAlg::Convolution(FilterType::CatmullRom));
    let src = ImageRef::new(label.width, label.height, &label.ids, PixelType::U8).expect("buffer matches its size");
    let mut dst = Image::new(width, height, PixelType::U8);
    resizer.resize(&src, &mut dst, &ResizeOptions::new().resize_alg(ResizeAlg::Nearest)).expect("same pixel types");
    (resized, Label { width, height, ids: dst.into_vec() })
}

/// Packs every sample of `source` into a shard at `path`; `size` = Some((width, height))
/// resizes them first. Returns the number of samples written.
pub fn pack(source: &SampleSource, path: &Path, classes: usize, size: Option<(u32, u32)>) -> Result<usize> {
    let mut writer = ShardWriter::create(path, classes)?;
    let mut resizer = Resizer::new();
    let mut progress = crate::progress::Progress::new("pack", source.len() as u64, 500);
    for i in 0..source.len() {
        let (mut rgb, mut label) = source.load_full(i).map_err(anyhow::Error::msg)?;
        if let Some((w, h)) = size {
            (rgb, label) = resize_pair(&mut resizer, &rgb, &label, w, h);
        }
        writer.add(source.id(i), rgb.width, rgb.height, &rgb.pixels, &label.ids)?;
        progress.tick();
    }
    progress.finish();
    writer.finish()?;
    Ok(source.len())
}
