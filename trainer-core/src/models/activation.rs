//! GELU (erf form) and SiLU with their own backward, as a burn backend
//! extension ([`ActivationBackend`]) so that the CPU backend runs them as
//! the `cpu-kernels` crate's vectorised kernels: burn's CPU backend calls
//! libm's scalar `erff`/`expf` per element, and builds SiLU from a sigmoid
//! and a product whose backward passes add three more (12-14 % of the
//! mid-size UNet's step together, DEVELOPERS.md). Every other backend (wgpu, the browser's WebGPU) runs burn's
//! own operations, as before; the autodiff node is the same for both.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ops::ActivationOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Cube, Dispatch, Flex, TensorMetadata};
use burn::tensor::{DType, Tensor, TensorData};
use cpu_kernels::activation::{activation as cpu_activation, Activation};

/// x Φ(x), Φ the standard normal CDF: PyTorch's `gelu` (not the tanh form).
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::gelu_erf(x.into_dispatch()))
}

/// x σ(x).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(Dispatch::silu_fused(x.into_dispatch()))
}

/// The activations and their backward (`grad ∘ f'(x)`) on one backend.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait ActivationBackend: Backend {
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn gelu_erf_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
    fn silu_fused(x: FloatTensor<Self>) -> FloatTensor<Self>;
    fn silu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// The kernels on f32 values; `None` for other dtypes (burn's operations
/// then run).
fn on_cpu(activation: Activation, x: &FloatTensor<Flex>, grad: Option<&FloatTensor<Flex>>) -> Option<FloatTensor<Flex>> {
    let f32_only = |tensor: &FloatTensor<Flex>| (tensor.dtype() == DType::F32).then(|| tensor.to_contiguous());
    let x = f32_only(x)?;
    let grad = match grad {
        Some(grad) => Some(f32_only(grad)?),
        None => None,
    };
    let grad_values = match &grad {
        Some(grad) => Some(grad.as_slice::<f32>()?),
        None => None,
    };
    let mut out = cpu_kernels::zeroed(x.layout().num_elements());
    cpu_activation(activation, x.as_slice::<f32>()?, grad_values, &mut out);
    Some(<FloatTensor<Flex>>::from_data(TensorData::new(out, x.shape())))
}

impl ActivationBackend for Flex {
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        on_cpu(Activation::Gelu, &x, None).unwrap_or_else(|| Self::gelu(x))
    }

    fn gelu_erf_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        on_cpu(Activation::Gelu, &x, Some(&grad)).unwrap_or_else(|| Self::gelu_backward(x, grad))
    }

    fn silu_fused(x: FloatTensor<Self>) -> FloatTensor<Self> {
        on_cpu(Activation::Silu, &x, None).unwrap_or_else(|| silu_from_ops::<Self>(x))
    }

    fn silu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        on_cpu(Activation::Silu, &x, Some(&grad)).unwrap_or_else(|| silu_backward_from_ops::<Self>(x, grad))
    }
}

impl ActivationBackend for Cube {
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    fn gelu_erf_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }

    fn silu_fused(x: FloatTensor<Self>) -> FloatTensor<Self> {
        silu_from_ops::<Self>(x)
    }

    fn silu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        silu_backward_from_ops::<Self>(x, grad)
    }
}

/// x σ(x) in burn's operations.
fn silu_from_ops<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_mul(x.clone(), B::sigmoid(x))
}

/// grad σ(x) (1 + x (1 − σ(x))) in burn's operations.
fn silu_backward_from_ops<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let s = B::sigmoid(x.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
    let slope = B::float_mul(s, B::float_add_scalar(B::float_mul(x, one_minus_s), 1.0.into()));
    B::float_mul(grad, slope)
}

/// The backward node: keeps x, gives `grad ∘ f'(x)` to x.
#[derive(Debug)]
struct ActivationBackward(Activation);

impl<B: ActivationBackend> Backward<B, 1> for ActivationBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let [parent] = ops.parents;
        if let Some(parent) = parent {
            let grad_x = match self.0 {
                Activation::Gelu => B::gelu_erf_backward(ops.state, grad),
                Activation::Silu => B::silu_fused_backward(ops.state, grad),
            };
            grads.register::<B>(parent.id, grad_x);
        }
    }
}

fn tracked<B: ActivationBackend, C: CheckpointStrategy>(activation: Activation, x: FloatTensor<Autodiff<B, C>>) -> FloatTensor<Autodiff<B, C>> {
    let forward = |x: FloatTensor<B>| match activation {
        Activation::Gelu => B::gelu_erf(x),
        Activation::Silu => B::silu_fused(x),
    };
    match ActivationBackward(activation).prepare::<C>([x.node()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let x = x.into_primitive();
            let out = forward(x.clone());
            prep.finish(x, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.into_primitive())),
    }
}

impl<B: ActivationBackend, C: CheckpointStrategy> ActivationBackend for Autodiff<B, C> {
    fn gelu_erf(x: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked::<B, C>(Activation::Gelu, x)
    }

    /// (Only the inner backend's runs, inside [`ActivationBackward`]; a
    /// second derivative goes through burn's operations.)
    fn gelu_erf_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }

    fn silu_fused(x: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked::<B, C>(Activation::Silu, x)
    }

    fn silu_fused_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        silu_backward_from_ops::<Self>(x, grad)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation;
    use burn::tensor::{Device, DeviceKind, Distribution, Tensor};

    /// On the CPU backend (the kernels) and on wgpu (burn's operations):
    /// GELU and SiLU and their input gradients equal burn's own activations
    /// through burn's autodiff within 1e-5 (CPU) / 1e-3 (wgpu) relative to
    /// each tensor's largest value, on values spread over ±8 and an uneven
    /// output gradient.
    #[test]
    fn activations_match_burns_with_their_gradients() {
        for (name, device, tolerance) in [("flex", Device::flex(), 1e-5), ("wgpu", Device::wgpu(DeviceKind::Cpu), 1e-3)] {
            let device = device.autodiff();
            let x = Tensor::<3>::random([2, 77, 130], Distribution::Normal(0.0, 3.0), &device).require_grad();
            let ramp = Tensor::<3>::ones([2, 77, 130], &device).cumsum(2) / 130.0;
            type Pair = (&'static str, fn(Tensor<3>) -> Tensor<3>, fn(Tensor<3>) -> Tensor<3>);
            let pairs: [Pair; 2] = [("gelu", super::gelu, activation::gelu), ("silu", super::silu, activation::silu)];
            for (what, ours, burns) in pairs {
                let run = |f: fn(Tensor<3>) -> Tensor<3>| {
                    let out = f(x.clone());
                    let grads = (out.clone() * ramp.clone()).sum().backward();
                    [out.without_autodiff(), x.grad(&grads).unwrap()]
                };
                for (part, (expected, actual)) in ["output", "gradient"].iter().zip(run(burns).into_iter().zip(run(ours))) {
                    let scale = expected.clone().abs().max().into_scalar::<f32>();
                    let error = (expected - actual).abs().max().into_scalar::<f32>();
                    assert!(error <= tolerance as f32 * scale, "{name} {what} {part} differs by {error} (largest value {scale})");
                }
            }
        }
    }
}
