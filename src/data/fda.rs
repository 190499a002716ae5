//! FDA on the loader threads (Yang and Soatto, CVPR 2020, Eq. 1; `translate::fda` has the
//! method and its libtorch engine): the swap on rustfft, and `OnlineFda`, the source loader's
//! restyle for `translate.fda_mode = "online"`. The window is defined here for both engines.

use super::datasets::Rgb;
use super::error::DataError;
use crate::config::{FdaWindow, TranslateConfig};
use rustfft::{num_complex::Complex32, Fft, FftPlanner};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The window's half-extent in rows and columns for an image of `height` x `width`.
pub fn window(beta: f64, height: i64, width: i64, shape: FdaWindow) -> (i64, i64) {
    match shape {
        FdaWindow::PerSide => ((beta * height as f64).floor() as i64, (beta * width as f64).floor() as i64),
        FdaWindow::Square => {
            let b = (beta * height.min(width) as f64).floor() as i64;
            (b, b)
        }
    }
}

/// The window's half-extent as swapped: below the Nyquist row and column, whose Hermitian
/// partners are themselves.
pub fn swapped_window(beta: f64, height: i64, width: i64, shape: FdaWindow) -> (i64, i64) {
    let (bh, bw) = window(beta, height, width, shape);
    (bh.min((height - 1) / 2), bw.min((width - 1) / 2))
}

/// FDA of images of one size on rustfft: the full complex spectrum of each channel (a pass of
/// row FFTs, a transpose, a pass of column FFTs), the window's amplitudes replaced, and back.
/// The plans are made once per size and shared by the loader threads.
pub struct Swap {
    height: usize,
    width: usize,
    /// The window's half-extent in rows and columns (`swapped_window`).
    window: (usize, usize),
    rows: Arc<dyn Fft<f32>>,
    rows_inverse: Arc<dyn Fft<f32>>,
    columns: Arc<dyn Fft<f32>>,
    columns_inverse: Arc<dyn Fft<f32>>,
}

impl Swap {
    pub fn new(height: u32, width: u32, beta: f64, shape: FdaWindow) -> Swap {
        let (h, w) = (height as usize, width as usize);
        let (bh, bw) = swapped_window(beta, h as i64, w as i64, shape);
        let mut planner = FftPlanner::new();
        Swap {
            height: h,
            width: w,
            window: (bh as usize, bw as usize),
            rows: planner.plan_fft_forward(w),
            rows_inverse: planner.plan_fft_inverse(w),
            columns: planner.plan_fft_forward(h),
            columns_inverse: planner.plan_fft_inverse(h),
        }
    }

    /// The cells of the window in the column-major spectrum (column u holds frequencies
    /// (0..H, u)): rows and columns within the half-extent of zero frequency, either side
    /// (the spectrum wraps), so the set is its own Hermitian mirror.
    fn cells(&self) -> impl Iterator<Item = usize> + '_ {
        let (h, w) = (self.height, self.width);
        let (bh, bw) = self.window;
        // bh < h / 2 and bw < w / 2 (`swapped_window`): the two sides never meet.
        (0..=bw).chain(w - bw..w).flat_map(move |u| (0..=bh).chain(h - bh..h).map(move |v| u * h + v))
    }

    /// Channel `c` of an RGB image's spectrum, column-major.
    fn spectrum(&self, rgb: &Rgb, c: usize) -> Vec<Complex32> {
        let (h, w) = (self.height, self.width);
        let mut rows: Vec<Complex32> =
            rgb.pixels.iter().skip(c).step_by(3).map(|&v| Complex32::new(v as f32, 0.0)).collect();
        self.rows.process(&mut rows);
        let mut columns = vec![Complex32::default(); h * w];
        transpose::transpose(&rows, &mut columns, w, h);
        self.columns.process(&mut columns);
        columns
    }

    /// What a swap puts into a source image of this size: the window's amplitudes of each
    /// channel of `target`, resampled (bilinear) to this size first if it differs.
    pub fn target_amplitudes(&self, target: &Rgb) -> Vec<f32> {
        let resized;
        let target = if (target.width as usize, target.height as usize) == (self.width, self.height) {
            target
        } else {
            let alg = fast_image_resize::ResizeAlg::Convolution(fast_image_resize::FilterType::Bilinear);
            resized =
                target.resized(&mut fast_image_resize::Resizer::new(), self.width as u32, self.height as u32, alg);
            &resized
        };
        (0..3)
            .flat_map(|c| {
                let spectrum = self.spectrum(target, c);
                self.cells().map(|i| spectrum[i].norm()).collect::<Vec<_>>()
            })
            .collect()
    }

    /// `source` (this size) with the window's amplitudes of each channel set to `amplitudes`
    /// (`target_amplitudes`), its phase kept; rounded and clamped to bytes.
    pub fn apply(&self, source: &Rgb, amplitudes: &[f32]) -> Rgb {
        assert_eq!((source.width as usize, source.height as usize), (self.width, self.height), "FDA at its size");
        let (h, w) = (self.height, self.width);
        let per_channel = amplitudes.len() / 3;
        let mut pixels = vec![0u8; h * w * 3];
        let mut rows = vec![Complex32::default(); h * w];
        for c in 0..3 {
            let mut columns = self.spectrum(source, c);
            for (i, &a) in self.cells().zip(&amplitudes[c * per_channel..(c + 1) * per_channel]) {
                let z = columns[i];
                let r = z.norm();
                // polar(a, angle(z)); angle(0) = 0, as libtorch's.
                columns[i] = if r > 0.0 { z * (a / r) } else { Complex32::new(a, 0.0) };
            }
            self.columns_inverse.process(&mut columns);
            transpose::transpose(&columns, &mut rows, h, w);
            self.rows_inverse.process(&mut rows);
            let scale = 1.0 / (h * w) as f32;
            for (p, z) in pixels.iter_mut().skip(c).step_by(3).zip(&rows) {
                *p = (z.re * scale).round().clamp(0.0, 255.0) as u8;
            }
        }
        Rgb { width: source.width, height: source.height, pixels }
    }
}

/// A target image (its index) resampled to a width and height.
type TargetAtSize = (usize, u32, u32);

/// FDA in the source loader (`translate.fda_mode = "online"`): each sample drawn is swapped
/// with a target train image chosen by its draw and `translate.seed`, so every epoch pairs a
/// source image with another target, as the authors' training loop does per batch. The
/// target's window amplitudes are kept per (target, size): a few kilobytes each, and each
/// load then costs one source spectrum and its inverse.
pub struct OnlineFda {
    targets: Vec<PathBuf>,
    beta: f64,
    shape: FdaWindow,
    seed: u64,
    swaps: Mutex<HashMap<(u32, u32), Arc<Swap>>>,
    amplitudes: Mutex<HashMap<TargetAtSize, Arc<Vec<f32>>>>,
}

impl OnlineFda {
    pub fn new(targets: Vec<PathBuf>, config: &TranslateConfig) -> OnlineFda {
        assert!(!targets.is_empty(), "online FDA needs target images");
        OnlineFda {
            targets,
            beta: config.fda_beta,
            shape: config.fda_window,
            seed: config.seed,
            swaps: Default::default(),
            amplitudes: Default::default(),
        }
    }

    fn swap_for(&self, width: u32, height: u32) -> Arc<Swap> {
        let mut swaps = self.swaps.lock().expect("no panics while held");
        swaps
            .entry((width, height))
            .or_insert_with(|| Arc::new(Swap::new(height, width, self.beta, self.shape)))
            .clone()
    }

    fn amplitudes_of(&self, target: usize, swap: &Swap) -> Result<Arc<Vec<f32>>, DataError> {
        let key = (target, swap.width as u32, swap.height as u32);
        if let Some(a) = self.amplitudes.lock().expect("no panics while held").get(&key) {
            return Ok(a.clone());
        }
        // Computed outside the lock (two threads may both compute one: the same values).
        let image = super::datasets::decode_image(&self.targets[target])?;
        let a = Arc::new(swap.target_amplitudes(&image));
        self.amplitudes.lock().expect("no panics while held").insert(key, a.clone());
        Ok(a)
    }
}

impl super::source::Restyle for OnlineFda {
    fn restyle(&self, image: &Rgb, draw: u64) -> Result<Rgb, DataError> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let swap = self.swap_for(image.width, image.height);
        with_drawn_target(&mut rng, self.targets.len(), |k| Ok(swap.apply(image, &self.amplitudes_of(k, &swap)?)))
    }
}

/// FDA's choice of a target image for one source, offline and online: `swap` with target
/// `rng.gen_range(0..targets)`; a target it cannot read is named and another drawn, up to
/// 16 draws (or one per target), and the last error is returned if none could be read.
pub fn with_drawn_target<T>(
    rng: &mut impl rand::Rng,
    targets: usize,
    mut swap: impl FnMut(usize) -> Result<T, DataError>,
) -> Result<T, DataError> {
    let mut last_error = None;
    for _ in 0..targets.min(16) {
        match swap(rng.gen_range(0..targets)) {
            Ok(out) => return Ok(out),
            Err(e) => {
                tracing::warn!("{e}: an FDA target image skipped");
                last_error = Some(e);
            }
        }
    }
    Err(last_error.expect("at least one draw"))
}
