//! LoRA dropout's masks made where the tensor lives. A mask is
//! `cpu_kernels::dropout::DropoutMask`'s counter-based hash of each
//! element's index: the CPU backend fills it on all cores; the cubecl
//! backends (wgpu, the browser's WebGPU) run the same hash in a kernel, so
//! no mask is drawn on the host and uploaded at every adapted layer and
//! forward pass (LoRA on SDXL's attention at 1024 px: 546 M values, 2.2 GB,
//! a forward pass, which gradient checkpointing runs twice). The same key
//! gives the same mask on every device.

use burn::backend::tensor::FloatTensor;
use burn::backend::Cube;
use burn::tensor::{DType, Tensor, TensorData};
use burn_cubecl::ops::numeric::empty_device_dtype;
use cpu_kernels::dropout::DropoutMask;
use cubecl::prelude::CubeDim;

/// The kernel; cubecl's `Tensor` is its own.
mod kernel {
    use cubecl::prelude::*;

    /// `cpu_kernels::dropout::lowbias32`, in cubecl (u32 products wrap).
    #[cube]
    fn lowbias32(value: u32) -> u32 {
        let mut x = value;
        x ^= x >> 16u32;
        x *= 0x7feb_352du32;
        x ^= x >> 15u32;
        x *= 0x846c_a68bu32;
        x ^= x >> 16u32;
        x
    }

    /// `DropoutMask::value` for one element per thread.
    #[cube(launch)]
    pub(super) fn mask_kernel(mask: &mut Tensor<f32>, key_low: u32, key_high: u32, threshold: u32, keep_scale: f32) {
        if ABSOLUTE_POS >= mask.len() {
            terminate!();
        }
        let index = ABSOLUTE_POS as u32;
        let hash = lowbias32(lowbias32(lowbias32(index ^ key_low) ^ key_high) ^ key_low);
        mask[ABSOLUTE_POS] = select(hash < threshold, 0.0f32, keep_scale);
    }
}

/// The mask `mask` in `like`'s shape, on its device and in its dtype
/// (without autodiff: a constant to multiply by).
pub fn mask_like<const D: usize>(like: &Tensor<D>, mask: DropoutMask) -> Tensor<D> {
    let like = like.clone().without_autodiff();
    let dtype = like.dtype();
    let on_device = on_cube(&like, mask).unwrap_or_else(|| {
        let mut values = cpu_kernels::zeroed(like.shape().num_elements());
        mask.fill(&mut values);
        Tensor::from_data(TensorData::new(values, like.shape()), &like.device())
    });
    if dtype == DType::F32 {
        on_device
    } else {
        on_device.cast(dtype)
    }
}

/// The kernel's mask on a cubecl device; `None` on another backend.
fn on_cube<const D: usize>(like: &Tensor<D>, mask: DropoutMask) -> Option<Tensor<D>> {
    let primitive: FloatTensor<Cube> = like.clone().try_into_primitive::<Cube>().ok()?;
    let elements = like.shape().num_elements();
    u32::try_from(elements).ok()?;
    let out = empty_device_dtype(primitive.client.clone(), primitive.device.clone(), like.shape(), DType::F32);
    let dim = CubeDim::new(&out.client, elements);
    let count = cubecl::calculate_cube_count_elemwise(&out.client, elements, dim);
    let (key_low, key_high) = mask.key_halves();
    kernel::mask_kernel::launch(&out.client, count, dim, out.clone().into_tensor_arg(), key_low, key_high, mask.threshold, mask.keep_scale);
    Some(Tensor::from_primitive::<Cube>(out))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, DeviceKind, Tensor};
    use cpu_kernels::dropout::DropoutMask;

    /// The wgpu kernel's mask (lavapipe) equals the CPU backend's bit for
    /// bit, for a shape whose element count is no multiple of a workgroup,
    /// and the multiplication by it drops about the share asked for.
    #[test]
    fn every_device_makes_the_same_mask() {
        let shape = [2, 333, 77];
        let mask = DropoutMask::new(0xfeed_beef_0123_4567, 0.25);
        let masks = [Device::flex(), Device::wgpu(DeviceKind::Cpu)]
            .map(|device| super::mask_like(&Tensor::<3>::zeros(shape, &device.autodiff()), mask).into_data().try_into_vec::<f32>().unwrap());
        assert_eq!(masks[0], masks[1], "the CPU backend's and wgpu's masks differ");
        let dropped = masks[0].iter().filter(|&&v| v == 0.0).count() as f64 / masks[0].len() as f64;
        assert!((dropped - 0.25).abs() < 0.01, "dropped {dropped}");
        assert!(masks[0].iter().enumerate().all(|(i, &v)| v == mask.value(i as u32)));
    }
}
