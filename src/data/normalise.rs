//! Network input from loader bytes: `(rgb / 255 - mean) / std`, NCHW float.
//!
//! On CUDA it runs as tensor ops on the device (4x fewer bytes cross PCIe and the loader
//! threads stay free for decoding). On the CPU one fused pass (deinterleave, convert,
//! multiply-add), compiled for AVX2/FMA where the CPU has it, is several times faster than the
//! equivalent chain of tensor ops.

use crate::config::AugmentConfig;
use tch::{Device, Kind, Tensor};

pub struct Normaliser {
    /// Per channel: input = byte * scale + shift.
    scale_values: [f32; 3],
    shift_values: [f32; 3],
    /// The same map as tensors shaped [1, 3, 1, 1] on the device (CUDA path).
    scale: Tensor,
    shift: Tensor,
    device: Device,
}

impl Normaliser {
    pub fn new(config: &AugmentConfig, device: Device) -> Normaliser {
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * config.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| -config.mean[c] / config.std[c]);
        let shape = [1i64, 3, 1, 1];
        Normaliser {
            scale_values: scale,
            shift_values: shift,
            scale: Tensor::from_slice(&scale).view(shape).to_device(device),
            shift: Tensor::from_slice(&shift).view(shape).to_device(device),
            device,
        }
    }

    /// [B, H, W, 3] u8 -> [B, 3, H, W] f32 on the device.
    pub fn to_input(&self, images: &Tensor) -> Tensor {
        if self.device.is_cuda() {
            let images =
                crate::torch_ext::to_device_async(images, self.device).permute([0, 3, 1, 2]).to_kind(Kind::Float);
            return (images * &self.scale + &self.shift).contiguous();
        }
        let images = images.to_device(Device::Cpu).contiguous();
        let size = images.size();
        self.bytes_to_input(crate::torch_ext::cpu_data::<u8>(&images), size[0], size[1], size[2])
    }

    /// `to_input` on the CPU straight from a loader's HWC bytes (`batch` images of
    /// `height` x `width`), without first copying them into a tensor.
    pub fn bytes_to_input(&self, bytes: &[u8], batch: i64, height: i64, width: i64) -> Tensor {
        let plane = (height * width) as usize;
        assert_eq!(bytes.len(), 3 * plane * batch as usize, "{batch} RGB images of {width}x{height}");
        let mut out = Tensor::empty([batch, 3, height, width], (Kind::Float, Device::Cpu));
        // SAFETY: `out` was just created here and is not shared yet.
        let floats = unsafe { crate::torch_ext::cpu_data_mut::<f32>(&mut out) };
        for (image, out) in bytes.chunks_exact(3 * plane).zip(floats.chunks_exact_mut(3 * plane)) {
            hwc_bytes_to_chw_floats(image, out, self.scale_values, self.shift_values);
        }
        out
    }
}

/// One HWC RGB byte image to CHW floats, `byte * scale + shift` per channel. Pixels go in
/// fixed-size blocks so the compiler turns the deinterleave into vector shuffles.
#[multiversion::multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn hwc_bytes_to_chw_floats(image: &[u8], out: &mut [f32], scale: [f32; 3], shift: [f32; 3]) {
    const BLOCK: usize = 16;
    let plane = out.len() / 3;
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    let (pixels, tail) = image.as_chunks::<{ 3 * BLOCK }>();
    let (r_blocks, r_tail) = r.as_chunks_mut::<BLOCK>();
    let (g_blocks, g_tail) = g.as_chunks_mut::<BLOCK>();
    let (b_blocks, b_tail) = b.as_chunks_mut::<BLOCK>();
    for (((px, r), g), b) in pixels.iter().zip(r_blocks).zip(g_blocks).zip(b_blocks) {
        for i in 0..BLOCK {
            r[i] = px[3 * i] as f32 * scale[0] + shift[0];
            g[i] = px[3 * i + 1] as f32 * scale[1] + shift[1];
            b[i] = px[3 * i + 2] as f32 * scale[2] + shift[2];
        }
    }
    for (i, px) in tail.as_chunks::<3>().0.iter().enumerate() {
        r_tail[i] = px[0] as f32 * scale[0] + shift[0];
        g_tail[i] = px[1] as f32 * scale[1] + shift[1];
        b_tail[i] = px[2] as f32 * scale[2] + shift[2];
    }
}
