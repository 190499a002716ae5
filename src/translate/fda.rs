//! Fourier domain adaptation (Yang and Soatto, CVPR 2020, Eq. 1): the source image keeps its
//! phase spectrum, and the low frequencies of its amplitude spectrum are replaced by those of a
//! target image. With the spectrum centred, the replaced window is M_beta = 1 on
//! [-beta H, beta H] x [-beta W, beta W] (the paper's definition, `FdaWindow::PerSide`); the
//! authors' code takes floor(beta min(H, W)) on both axes (`FdaWindow::Square`).
//!
//! Two engines of the same swap: `transfer` here, on libtorch's FFT (`fft_rfft2`), which runs
//! on the device like the networks (the offline write-out), and `data::fda::Swap` on rustfft,
//! which runs on the loader threads beside decoding (`translate.fda_mode = "online"`); the
//! window is defined there for both. `adamcu bench translate` times both, and a test checks
//! that they agree. Both work on 0-255 values, as the authors' code does: on a zero-centred
//! scale the DC term's sign is the phase, and a source darker than mid-grey would keep its
//! sign against a brighter target's mean.

use crate::config::FdaWindow;
pub use crate::data::fda::{swapped_window, window};
use tch::{Kind, Tensor};

/// `source` [N, 3, H, W] (0-255 values, as the module says) with the low-frequency amplitudes of
/// `target` (same size). The window is symmetric about zero frequency, as M_beta: rows
/// 0..=bh and H-bh..H, columns 0..=bw of the half spectrum (the other half is the Hermitian
/// mirror). The authors' slices (0:b and H-b:H) take one row fewer above zero than below, so
/// column 0 stops being Hermitian and the inverse transform discards part of the swap; ours
/// keeps it exact. The DC term is always swapped: the result has the target's per-channel mean.
pub fn transfer(source: &Tensor, target: &Tensor, beta: f64, shape: FdaWindow) -> Tensor {
    let size = source.size();
    let (h, w) = (size[2], size[3]);
    let (bh, bw) = swapped_window(beta, h, w, shape);
    let spectrum = source.to_kind(Kind::Float).fft_rfft2(None::<&[i64]>, [-2, -1], "backward");
    let target_amplitude = target.to_kind(Kind::Float).fft_rfft2(None::<&[i64]>, [-2, -1], "backward").abs();
    let amplitude = spectrum.abs();
    let phase = spectrum.angle();
    let swap = |first_row: i64, rows: i64| {
        let mut window = amplitude.narrow(2, first_row, rows).narrow(3, 0, bw + 1);
        window.copy_(&target_amplitude.narrow(2, first_row, rows).narrow(3, 0, bw + 1));
    };
    swap(0, bh + 1);
    if bh > 0 {
        swap(h - bh, bh);
    }
    Tensor::polar(&amplitude, &phase).fft_irfft2(Some([h, w].as_slice()), [-2, -1], "backward")
}
