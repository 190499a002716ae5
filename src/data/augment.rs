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

    /// `to_original` per axis: the mapping is separable, so a crop's original pixels are
    /// (columns[x], rows[y]), computed once per column and row instead of once per pixel.
    pub fn original_columns(&self) -> Vec<u32> {
        (0..self.crop_width).map(|x| self.to_original(x, 0).0).collect()
    }

    pub fn original_rows(&self) -> Vec<u32> {
        (0..self.crop_height).map(|y| self.to_original(0, y).1).collect()
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
    /// The resampled crop before it is copied out (kept to avoid a fresh allocation per sample).
    scratch: Image<'static>,
}

impl Augmenter {
    pub fn new(config: &AugmentConfig) -> Augmenter {
        Augmenter { config: config.clone(), resizer: Resizer::new(), image_filter: FilterType::Bilinear,
            scratch: Image::new(1, 1, PixelType::U8x3) }
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
        let (left, top) = (g.crop_x as f64 * sx, g.crop_y as f64 * sy);
        // min(): the products can overshoot the image edge by a rounding error, which the
        // resizer rejects.
        let window = (left, top, (g.crop_width as f64 * sx).min(w as f64 - left),
            (g.crop_height as f64 * sy).min(h as f64 - top));

        let image = self.resample(rgb, w, h, g.crop_width, g.crop_height, window, g.flipped);
        Augmented { image, label: sample_label(label, &g), geometry }
    }

    /// Resamples the crop window to `out_w` x `out_h`: straight into the returned buffer, or,
    /// when `flipped`, into the scratch image and then copied out mirrored.
    #[allow(clippy::too_many_arguments)]
    fn resample(&mut self, rgb: &[u8], w: u32, h: u32, out_w: u32, out_h: u32,
        window: (f64, f64, f64, f64), flipped: bool) -> Vec<u8> {
        let src = ImageRef::new(w, h, rgb, PixelType::U8x3).expect("buffer matches its size");
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(self.image_filter))
            .crop(window.0, window.1, window.2, window.3);
        if !flipped {
            // Straight into the sample's own buffer.
            let mut image = Image::new(out_w, out_h, PixelType::U8x3);
            self.resizer.resize(&src, &mut image, &options).expect("same pixel types");
            return image.into_vec();
        }
        if self.scratch.width() != out_w || self.scratch.height() != out_h {
            self.scratch = Image::new(out_w, out_h, PixelType::U8x3);
        }
        self.resizer.resize(&src, &mut self.scratch, &options).expect("same pixel types");
        let resampled = self.scratch.buffer();
        let mut image = vec![0u8; resampled.len()];
        mirror_rgb_rows(resampled, &mut image, out_w as usize);
        image
    }
}

/// Copies an HWC RGB image with each row mirrored. Whole blocks of pixels go through a
/// fixed-size reversal the compiler turns into byte shuffles; the few pixels left over at
/// the end of a row that is not a multiple of the block go one by one.
#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn mirror_rgb_rows(src: &[u8], dst: &mut [u8], width: usize) {
    const BLOCK: usize = 16;
    let blocks = width / BLOCK;
    for (src, dst) in src.chunks_exact(width * 3).zip(dst.chunks_exact_mut(width * 3)) {
        // Destination block i holds source pixels [width - 16(i+1), width - 16i) reversed.
        let (dst_blocks, dst_tail) = dst.as_chunks_mut::<{ 3 * BLOCK }>();
        for (i, d) in dst_blocks.iter_mut().enumerate() {
            let start = 3 * (width - BLOCK * (i + 1));
            let s: &[u8; 3 * BLOCK] = src[start..start + 3 * BLOCK].try_into().unwrap();
            for p in 0..BLOCK {
                for c in 0..3 {
                    d[3 * p + c] = s[3 * (BLOCK - 1 - p) + c];
                }
            }
        }
        let left = width - blocks * BLOCK;
        for (p, d) in dst_tail.as_chunks_mut::<3>().0.iter_mut().enumerate() {
            d.copy_from_slice(&src[3 * (left - 1 - p)..3 * (left - p)]);
        }
    }
}

/// Nearest-neighbour labels taken through `Geometry::to_original` itself, so each training
/// label is exactly the original pixel the ledger will record for it. Output rows that come
/// from the same original row (upscaling) are copied instead of gathered again.
fn sample_label(label: &[u8], g: &Geometry) -> Vec<u8> {
    let row_gather = RowGather::new(g.original_columns(), g.original_width as usize);
    let width = g.crop_width as usize;
    let mut out = vec![0u8; width * g.crop_height as usize];
    let mut previous_row = None;
    for (y, row) in g.original_rows().into_iter().enumerate() {
        let row = row as usize;
        if previous_row == Some(row) {
            out.copy_within((y - 1) * width..y * width, y * width);
        } else {
            let source = &label[row * g.original_width as usize..(row + 1) * g.original_width as usize];
            row_gather.gather(source, &mut out[y * width..(y + 1) * width]);
        }
        previous_row = Some(row);
    }
    out
}

/// `out[i] = row[xs[i]]` for every row of a crop (the same `xs` each time), planned once per
/// crop: wherever 8 consecutive outputs come from a 16-byte stretch of the row (any scale
/// above 1/2), one byte shuffle makes all 8. A byte gather is otherwise one load per pixel,
/// which made label sampling a fifth of the shard loader's time.
struct RowGather {
    xs: Vec<u32>,
    /// Per block of 8 outputs: where its 16-byte stretch starts and each output's offset in
    /// it, or None where the stretch is too wide or runs past the row's end.
    shuffles: Vec<Option<(usize, [u8; 16])>>,
}

impl RowGather {
    const BLOCK: usize = 8;

    fn new(xs: Vec<u32>, row_len: usize) -> RowGather {
        // A mirrored crop's xs run backwards, so the stretch starts at the block's smallest x.
        let shuffles = xs.chunks_exact(Self::BLOCK).map(|block| {
            let base = *block.iter().min().unwrap() as usize;
            let last = *block.iter().max().unwrap() as usize;
            let fits = last < base + 16 && base + 16 <= row_len;
            fits.then(|| (base, std::array::from_fn(|j| if j < Self::BLOCK { (block[j] as usize - base) as u8 } else { 0 })))
        }).collect();
        RowGather { xs, shuffles }
    }

    fn gather(&self, row: &[u8], out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("ssse3") {
            // SAFETY: the CPU has SSSE3 (checked above).
            return unsafe { self.gather_ssse3(row, out) };
        }
        for (o, &x) in out.iter_mut().zip(&self.xs) {
            *o = row[x as usize];
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "ssse3")]
    fn gather_ssse3(&self, row: &[u8], out: &mut [u8]) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_shuffle_epi8, _mm_storel_epi64};
        let (blocks, tail) = out.as_chunks_mut::<{ Self::BLOCK }>();
        for (k, (block, shuffle)) in blocks.iter_mut().zip(&self.shuffles).enumerate() {
            match shuffle {
                Some((base, offsets)) => {
                    let stretch: &[u8; 16] = row[*base..*base + 16].try_into().unwrap();
                    // SAFETY: unaligned loads of two 16-byte arrays and an 8-byte store into an
                    // 8-byte array; SSSE3 is enabled for this function.
                    unsafe {
                        let picked = _mm_shuffle_epi8(_mm_loadu_si128(stretch.as_ptr() as *const __m128i),
                            _mm_loadu_si128(offsets.as_ptr() as *const __m128i));
                        _mm_storel_epi64(block.as_mut_ptr() as *mut __m128i, picked);
                    }
                }
                None => {
                    for (o, &x) in block.iter_mut().zip(&self.xs[k * Self::BLOCK..]) {
                        *o = row[x as usize];
                    }
                }
            }
        }
        let done = blocks.len() * Self::BLOCK;
        for (o, &x) in tail.iter_mut().zip(&self.xs[done..]) {
            *o = row[x as usize];
        }
    }
}
