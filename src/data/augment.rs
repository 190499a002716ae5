//! Random scale, crop and horizontal flip of one image/label pair.
//!
//! Scaling follows the usual rule (and the reference loader): the image is resized to
//! `max(crop, size * s)` per axis, then a crop window is drawn. Only the source region under
//! the crop window is resampled (fast_image_resize's crop option): the result equals resizing
//! the whole image and cropping (up to the rounding of the crate's intermediate), at a
//! fraction of the work. Images use a convolution filter;
//! labels are picked nearest-neighbour through `Geometry::to_original`, the same mapping the
//! ledger uses, so a label and the pixel it is charged to can never disagree.

use crate::config::AugmentConfig;
use fast_image_resize::{
    images::{Image, ImageRef},
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
};
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
        Geometry {
            original_width: width,
            original_height: height,
            scaled_width: width,
            scaled_height: height,
            crop_x: 0,
            crop_y: 0,
            crop_width: width,
            crop_height: height,
            flipped: false,
        }
    }

    /// The original-image pixel (x, y) that crop pixel (x, y) was sampled from (nearest).
    pub fn to_original(&self, x: u32, y: u32) -> (u32, u32) {
        self.to_grid(x, y, self.original_width, self.original_height)
    }

    /// The pixel that crop pixel (x, y) falls in when the whole image is laid on a grid of
    /// `width` x `height` (nearest): the original image's own grid gives `to_original`; the
    /// size the set is trained at (`augment.resize`) gives the pixels the network can see,
    /// which is where the annotation budget is counted (docs/algorithm.md).
    pub fn to_grid(&self, x: u32, y: u32, width: u32, height: u32) -> (u32, u32) {
        let x = if self.flipped { self.crop_width - 1 - x } else { x };
        let map = |v: u32, offset: u32, scaled: u32, grid: u32| {
            ((((v + offset) as f64 + 0.5) * grid as f64 / scaled as f64) as u32).min(grid - 1)
        };
        (map(x, self.crop_x, self.scaled_width, width), map(y, self.crop_y, self.scaled_height, height))
    }

    /// The crop window in original-image coordinates: (left, top, width, height).
    pub fn window_in_original(&self) -> (f64, f64, f64, f64) {
        let sx = self.original_width as f64 / self.scaled_width as f64;
        let sy = self.original_height as f64 / self.scaled_height as f64;
        let (left, top) = (self.crop_x as f64 * sx, self.crop_y as f64 * sy);
        // min(): the products can overshoot the image edge by a rounding error, which the
        // resizer rejects.
        (
            left,
            top,
            (self.crop_width as f64 * sx).min(self.original_width as f64 - left),
            (self.crop_height as f64 * sy).min(self.original_height as f64 - top),
        )
    }

    /// `to_original` per axis: the mapping is separable, so a crop's original pixels are
    /// (columns[x], rows[y]), computed once per column and row instead of once per pixel.
    pub fn original_columns(&self) -> Vec<u32> {
        self.grid_columns(self.original_width)
    }

    pub fn original_rows(&self) -> Vec<u32> {
        self.grid_rows(self.original_height)
    }

    /// `to_grid` per axis, as `original_columns` and `original_rows`.
    pub fn grid_columns(&self, width: u32) -> Vec<u32> {
        (0..self.crop_width).map(|x| self.to_grid(x, 0, width, 1).0).collect()
    }

    pub fn grid_rows(&self, height: u32) -> Vec<u32> {
        (0..self.crop_height).map(|y| self.to_grid(0, y, 1, height).1).collect()
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

/// The image filter, and its support radius in fast_image_resize (source pixels either side of
/// a sample at scale 1 and above; downscaling widens it): the rows a two-call resample needs
/// around its window.
const IMAGE_FILTER: FilterType = FilterType::Bilinear;
const IMAGE_FILTER_SUPPORT: f64 = 1.0;

/// Per-thread augmentation state (the resizer keeps scratch buffers between calls).
pub struct Augmenter {
    config: AugmentConfig,
    resizer: Resizer,
    /// Scratch for two-call resamples: the source rows under a crop, resampled to the crop's
    /// width, and (column-major sources) the same before they are transposed.
    resampled_rows: Vec<u8>,
    resampled_columns: Vec<u8>,
}

impl Augmenter {
    pub fn new(config: &AugmentConfig) -> Augmenter {
        Augmenter {
            config: config.clone(),
            resizer: Resizer::new(),
            resampled_rows: Vec::new(),
            resampled_columns: Vec::new(),
        }
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
        Geometry {
            original_width: width,
            original_height: height,
            scaled_width: scaled_w,
            scaled_height: scaled_h,
            crop_x,
            crop_y,
            crop_width: crop_w,
            crop_height: crop_h,
            flipped,
        }
    }

    /// Applies `geometry` to an RGB image (row by row, as decoded) and its label map (both
    /// `width` x `height`).
    pub fn apply(&mut self, rgb: &[u8], label: &[u8], geometry: Geometry) -> Augmented {
        Augmented { image: self.resample(rgb, &geometry), label: sample_label(label, &geometry), geometry }
    }

    /// `apply` for an image stored column by column (a shard's layout, see `shard`); the
    /// label map is row by row as always. The result is the same crop, row by row.
    pub fn apply_column_major(&mut self, columns: &[u8], label: &[u8], geometry: Geometry) -> Augmented {
        Augmented {
            image: self.resample_column_major(columns, &geometry),
            label: sample_label(label, &geometry),
            geometry,
        }
    }

    /// Resamples the crop window of a row-major RGB image to the crop's size, mirrored in
    /// place when the crop is flipped.
    ///
    /// fast_image_resize runs the vertical pass first for u8 images, so its horizontal pass,
    /// which costs about three times more per pixel, makes all of the crop's rows. When the
    /// crop upscales rows (fewer source rows than crop rows), resampling the source rows under
    /// the window horizontally first and then vertically makes fewer of those costly pixels.
    fn resample(&mut self, rgb: &[u8], g: &Geometry) -> Vec<u8> {
        let (w, h, out_w, out_h) = (g.original_width, g.original_height, g.crop_width, g.crop_height);
        let src = ImageRef::new(w, h, rgb, PixelType::U8x3).expect("buffer matches its size");
        let window = g.window_in_original();
        let mut image = Image::new(out_w, out_h, PixelType::U8x3);
        if window.3 < out_h as f64 {
            let rows = SourceRows::under(window, h, out_h);
            let buffer = grown(&mut self.resampled_rows, 3 * (out_w * rows.count) as usize);
            let mut resampled_rows =
                Image::from_slice_u8(out_w, rows.count, buffer, PixelType::U8x3).expect("buffer matches its size");
            // Whole rows, so that this call makes no vertical pass.
            self.resizer
                .resize(
                    &src,
                    &mut resampled_rows,
                    &crop_options((window.0, rows.first as f64, window.2, rows.count as f64)),
                )
                .expect("window inside the image");
            rows.resample_vertically(&mut self.resizer, &resampled_rows, window, &mut image);
        } else {
            self.resizer.resize(&src, &mut image, &crop_options(window)).expect("window inside the image");
        }
        finish(image, g.flipped)
    }

    /// Resamples the crop window of a column-major RGB image. A column-major image's columns
    /// are rows to the resizer, so the horizontal resampling is a vertical pass, three times
    /// cheaper per pixel than the crate's horizontal one: the source rows under the window
    /// are made at the crop's width by a vertical pass on the columns, transposed (cheaper
    /// still) and resampled vertically to the crop's height.
    fn resample_column_major(&mut self, columns: &[u8], g: &Geometry) -> Vec<u8> {
        let (w, h, out_w, out_h) = (g.original_width, g.original_height, g.crop_width, g.crop_height);
        let src = ImageRef::new(h, w, columns, PixelType::U8x3).expect("buffer matches its size");
        let window = g.window_in_original();
        let rows = SourceRows::under(window, h, out_h);
        let bytes = 3 * (out_w * rows.count) as usize;
        let buffer = grown(&mut self.resampled_columns, bytes);
        let mut resampled_columns =
            Image::from_slice_u8(rows.count, out_w, buffer, PixelType::U8x3).expect("buffer matches its size");
        // Whole source rows (the columns' x), so that this call makes only a vertical pass.
        self.resizer
            .resize(
                &src,
                &mut resampled_columns,
                &crop_options((rows.first as f64, window.0, rows.count as f64, window.2)),
            )
            .expect("window inside the image");
        let resampled_rows = grown(&mut self.resampled_rows, bytes);
        transpose_rgb(resampled_columns.buffer(), resampled_rows, rows.count, out_w);
        let resampled_rows =
            ImageRef::new(out_w, rows.count, resampled_rows, PixelType::U8x3).expect("buffer matches its size");
        let mut image = Image::new(out_w, out_h, PixelType::U8x3);
        rows.resample_vertically(&mut self.resizer, &resampled_rows, window, &mut image);
        finish(image, g.flipped)
    }
}

fn crop_options((left, top, width, height): (f64, f64, f64, f64)) -> ResizeOptions {
    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(IMAGE_FILTER)).crop(left, top, width, height)
}

/// `buffer[..len]`, grown first if it is shorter (scratch kept between samples: it only grows).
fn grown(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// The image row by row, mirrored in place when the crop is flipped.
fn finish(image: Image, flipped: bool) -> Vec<u8> {
    let width = image.width() as usize;
    let mut image = image.into_vec();
    if flipped {
        mirror_rgb_rows_in_place(&mut image, width);
    }
    image
}

/// The source rows a crop window's vertical filter reaches.
struct SourceRows {
    first: u32,
    count: u32,
}

impl SourceRows {
    fn under((_, top, _, height): (f64, f64, f64, f64), image_height: u32, out_height: u32) -> SourceRows {
        // The crate widens the filter by the downscale factor (antialiasing).
        let radius = IMAGE_FILTER_SUPPORT * (height / out_height as f64).max(1.0);
        let first = (top - radius).floor().max(0.0);
        let end = (top + height + radius).ceil().min(image_height as f64);
        SourceRows { first: first as u32, count: (end - first) as u32 }
    }

    /// The crop from these rows, already at the crop's width: a vertical pass only. The
    /// filter's reach is inside them, so the result is the one-call resample of the window.
    fn resample_vertically(
        &self,
        resizer: &mut Resizer,
        rows: &impl fast_image_resize::IntoImageView,
        window: (f64, f64, f64, f64),
        image: &mut Image,
    ) {
        let top = window.1 - self.first as f64;
        let width = image.width() as f64;
        resizer
            .resize(rows, image, &crop_options((0.0, top, width, window.3.min(self.count as f64 - top))))
            .expect("window inside the rows");
    }
}

/// Transposes the RGB pixels of an image `width` pixels wide and `height` high: `from` holds
/// them row by row and `to` gets them column by column, or (width and height swapped) back.
pub fn transpose_rgb(from: &[u8], to: &mut [u8], width: u32, height: u32) {
    transpose::transpose(from.as_chunks::<3>().0, to.as_chunks_mut::<3>().0, width as usize, height as usize);
}

/// Mirrors each row of an HWC RGB image in place. Whole blocks of pixels from both ends of a
/// row go through a fixed-size reversal the compiler turns into byte shuffles, and swap places;
/// the fewer than two blocks left in the middle are swapped pixel by pixel.
#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn mirror_rgb_rows_in_place(image: &mut [u8], width: usize) {
    const BLOCK: usize = 16;
    fn reversed(pixels: &[u8]) -> [u8; 3 * BLOCK] {
        let pixels: &[u8; 3 * BLOCK] = pixels.try_into().unwrap();
        std::array::from_fn(|i| pixels[3 * (BLOCK - 1 - i / 3) + i % 3])
    }
    for row in image.chunks_exact_mut(3 * width) {
        // Pixels [left, right) are still to be mirrored.
        let (mut left, mut right) = (0, width);
        while right - left >= 2 * BLOCK {
            let (head, tail) = row.split_at_mut(3 * (right - BLOCK));
            let (head, tail) = (&mut head[3 * left..3 * (left + BLOCK)], &mut tail[..3 * BLOCK]);
            let (new_head, new_tail) = (reversed(tail), reversed(head));
            head.copy_from_slice(&new_head);
            tail.copy_from_slice(&new_tail);
            left += BLOCK;
            right -= BLOCK;
        }
        while right - left >= 2 {
            let (head, tail) = row.split_at_mut(3 * (right - 1));
            head[3 * left..3 * left + 3].swap_with_slice(&mut tail[..3]);
            left += 1;
            right -= 1;
        }
    }
}

/// Nearest-neighbour labels taken through `Geometry::to_original` itself, so each training
/// label is exactly the original pixel the ledger will record for it. Output rows that come
/// from the same original row (upscaling) are copied instead of gathered again. The next
/// original row is prefetched while one is gathered: a shard's labels come cold from the page
/// cache, and waiting for them was most of the gather's time.
fn sample_label(label: &[u8], g: &Geometry) -> Vec<u8> {
    let row_gather = RowGather::new(g.original_columns(), g.original_width as usize);
    let (width, original_width) = (g.crop_width as usize, g.original_width as usize);
    let original_row = |row: u32| &label[row as usize * original_width..(row as usize + 1) * original_width];
    let rows = g.original_rows();
    let mut out = vec![0u8; width * g.crop_height as usize];
    for (y, &row) in rows.iter().enumerate() {
        // A repeated row (upscaling) is already in cache: only a new one is worth the hint.
        if let Some(&next) = rows.get(y + 1).filter(|&&next| next != row) {
            prefetch(original_row(next));
        }
        if y > 0 && rows[y - 1] == row {
            out.copy_within((y - 1) * width..y * width, y * width);
        } else {
            row_gather.gather(original_row(row), &mut out[y * width..(y + 1) * width]);
        }
    }
    out
}

/// Asks the CPU to start bringing `bytes` into its caches (a hint: it neither waits nor faults).
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch only hints the cache; SSE is part of every x86_64 CPU.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr() as *const i8) };
    }
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
        let shuffles = xs
            .chunks_exact(Self::BLOCK)
            .map(|block| {
                let base = *block.iter().min().unwrap() as usize;
                let last = *block.iter().max().unwrap() as usize;
                let fits = last < base + 16 && base + 16 <= row_len;
                fits.then(|| {
                    (base, std::array::from_fn(|j| if j < Self::BLOCK { (block[j] as usize - base) as u8 } else { 0 }))
                })
            })
            .collect();
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
                        let picked = _mm_shuffle_epi8(
                            _mm_loadu_si128(stretch.as_ptr() as *const __m128i),
                            _mm_loadu_si128(offsets.as_ptr() as *const __m128i),
                        );
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
