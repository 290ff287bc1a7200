//! Two-dimensional convolution, `[batch, in, height, width]` with a weight
//! `[out, in, k, k]`, as burn's `conv2d`, with our own autodiff node so that
//! the CPU backend can run its forward and input gradient as the
//! `cpu-kernels` crate's convolutions.
//!
//! burn's CPU backend (burn-flex) reorders the weight and copies the input
//! into another layout on one thread at every call before its parallel
//! part: on SD 1.5's LoRA step a core sat idle about a seventh of the time.
//! The kernels do the same work with every part in parallel (their crate's
//! docs; DEVELOPERS.md, "Speed on the CPU backend").
//!
//! They take f32 tensors with stride 1, no dilation, one group and equal
//! padding below the kernel size: every convolution of the UNet and the VAE
//! but the downsamplers (stride 2), which, like every convolution on wgpu,
//! go to burn's own. A weight's gradient (LoCon trains convolutions) is
//! burn's too.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Cube, Dispatch, DispatchKindConversion, DispatchTensor, Flex};
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::Tensor;

use super::backend::{primitive, wrap};

/// burn's `conv2d` (its arguments and result); on the CPU backend through
/// [`ConvBackend`], whose kernels cover the options (see the module).
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: ConvOptions<2>) -> Tensor<4> {
    if !crate::is_cpu_backend(&x.device()) {
        return burn_conv2d(x, weight, bias, options);
    }
    // The extension takes no optional tensors: no bias is a bias of zeros
    // (untracked, so it gets no gradient), added where the kernels write
    // the output anyway.
    let bias = bias.unwrap_or_else(|| Tensor::zeros([weight.dims()[0]], (&x.device(), x.dtype())));
    Tensor::from_dispatch(Dispatch::conv2d_own_backward(x.into_dispatch(), weight.into_dispatch(), bias.into_dispatch(), options))
}

/// burn's `conv2d` with its own autodiff node (see the module).
#[backend_extension(Flex, Cube, Autodiff)]
pub trait ConvBackend: Backend {
    fn conv2d_own_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self>;
}

impl ConvBackend for Flex {
    fn conv2d_own_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        untracked_forward::<Self>(x, weight, bias, options)
    }
}

impl ConvBackend for Cube {
    fn conv2d_own_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        untracked_forward::<Self>(x, weight, bias, options)
    }
}

fn untracked_forward<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, bias: FloatTensor<B>, options: ConvOptions<2>) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    match cpu::forward(&wrap::<B, 4>(x.clone()), &wrap::<B, 4>(weight.clone()), &wrap::<B, 1>(bias.clone()), &options) {
        Some(out) => primitive::<B, 4>(out),
        None => B::conv2d(x, weight, Some(bias), options),
    }
}

impl<B: ConvBackend, C: CheckpointStrategy> ConvBackend for Autodiff<B, C>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    fn conv2d_own_backward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>, options: ConvOptions<2>) -> FloatTensor<Self> {
        /// The backward's state: the input, the weight, and the options.
        #[derive(Debug)]
        struct ConvBackward;

        impl<B: Backend> Backward<B, 3> for ConvBackward
        where
            DispatchTensor: DispatchKindConversion<B>,
        {
            type State = (FloatTensor<B>, FloatTensor<B>, ConvOptions<2>);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad_out = grads.consume::<B>(&ops.node);
                let (x, weight, options) = ops.state;
                let [x_node, weight_node, bias_node] = ops.parents;
                let [x_tensor, weight_tensor, grad_tensor] = [&x, &weight, &grad_out].map(|primitive| wrap::<B, 4>(primitive.clone()));
                if let Some(node) = x_node {
                    let gradient = match cpu::input_gradient(&x_tensor, &weight_tensor, &grad_tensor, &options) {
                        Some(gradient) => primitive::<B, 4>(gradient),
                        None => B::conv2d_x_backward(x.clone(), weight.clone(), grad_out.clone(), options.clone()),
                    };
                    grads.register::<B>(node.id, gradient);
                }
                if let Some(node) = weight_node {
                    // Only LoCon trains a convolution's weight: burn's.
                    grads.register::<B>(node.id, B::conv2d_weight_backward(x, weight, grad_out, options));
                }
                if let Some(node) = bias_node {
                    let channels = grad_tensor.dims()[1];
                    grads.register::<B>(node.id, primitive::<B, 1>(grad_tensor.sum_dim(0).sum_dim(2).sum_dim(3).reshape([channels])));
                }
            }
        }

        match ConvBackward.prepare::<C>([x.node(), weight.node(), bias.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (x, weight) = (x.into_primitive(), weight.into_primitive());
                let state = (x.clone(), weight.clone(), options.clone());
                prep.finish(state, B::conv2d_own_backward(x, weight, bias.into_primitive(), options))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d_own_backward(x.into_primitive(), weight.into_primitive(), bias.into_primitive(), options)),
        }
    }
}

/// The CPU backend's path: the `cpu-kernels` convolutions on the tensors'
/// f32 values; `None` for tensors of another backend or dtype and for
/// options the kernels do not cover, which take burn's convolution.
mod cpu {
    use burn::backend::tensor::FloatTensor;
    use burn::backend::Flex;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{DType, Tensor, TensorData};
    use cpu_kernels::conv::{self, ConvDims};

    /// The tensor's f32 values on the CPU backend, contiguous.
    fn on_cpu<const D: usize>(tensor: &Tensor<D>) -> Option<FloatTensor<Flex>> {
        let primitive = tensor.clone().try_into_primitive::<Flex>().ok()?;
        (primitive.dtype() == DType::F32).then(|| primitive.to_contiguous())
    }

    fn tensor(values: Vec<f32>, shape: [usize; 4]) -> Tensor<4> {
        Tensor::from_primitive::<Flex>(<FloatTensor<Flex>>::from_data(TensorData::new(values, shape)))
    }

    /// The sizes, when the kernels cover these options: stride 1, no
    /// dilation, one group, a square kernel, equal padding below its size.
    fn dims(x: &Tensor<4>, weight: &Tensor<4>, options: &ConvOptions<2>) -> Option<ConvDims> {
        let [batch, in_channels, height, width] = x.dims();
        let [out_channels, weight_in, kernel, kernel_width] = weight.dims();
        let [(top, bottom), (left, right)] = options.padding;
        let plain = options.stride == [1, 1] && options.dilation == [1, 1] && options.groups == 1;
        let square = kernel == kernel_width && weight_in == in_channels && top == bottom && left == right && top == left;
        let fits = top < kernel && height + 2 * top >= kernel && width + 2 * top >= kernel;
        (plain && square && fits).then_some(ConvDims { batch, in_channels, out_channels, height, width, kernel, padding: top })
    }

    fn out_shape(dims: &ConvDims) -> [usize; 4] {
        [dims.batch, dims.out_channels, dims.out_height(), dims.out_width()]
    }

    pub(super) fn forward(x: &Tensor<4>, weight: &Tensor<4>, bias: &Tensor<1>, options: &ConvOptions<2>) -> Option<Tensor<4>> {
        let dims = dims(x, weight, options)?;
        let (x, weight, bias) = (on_cpu(x)?, on_cpu(weight)?, on_cpu(bias)?);
        let mut out = cpu_kernels::zeroed(dims.output_len());
        conv::forward(x.as_slice()?, weight.as_slice()?, Some(bias.as_slice()?), dims, &mut out);
        Some(tensor(out, out_shape(&dims)))
    }

    pub(super) fn input_gradient(x: &Tensor<4>, weight: &Tensor<4>, grad_out: &Tensor<4>, options: &ConvOptions<2>) -> Option<Tensor<4>> {
        let dims = dims(x, weight, options)?;
        let (weight, grad_out) = (on_cpu(weight)?, on_cpu(grad_out)?);
        let mut grad_x = cpu_kernels::zeroed(dims.input_len());
        conv::input_gradient(grad_out.as_slice()?, weight.as_slice()?, dims, &mut grad_x);
        Some(tensor(grad_x, x.dims()))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Distribution, Tensor};

    use super::conv2d;

    /// Our node against burn's conv2d and autodiff on the CPU backend: 3x3
    /// with padding 1 and 0, 1x1 (the kernels), stride 2 (burn's own
    /// convolution and gradients under our node), with and without bias,
    /// batch 1 and 2, odd sizes: output and the input, weight and bias
    /// gradients within 1e-4 relative to each tensor's largest value. The
    /// output's gradient is uneven (a ramp) so that every position counts.
    #[test]
    fn own_node_matches_burns_convolution_and_autodiff() {
        // ([batch, in, height, width], out, kernel, stride, padding, bias)
        let cases = [
            ([1, 5, 9, 7], 6, 3, 1, 1, true),
            ([2, 3, 6, 11], 4, 3, 1, 0, false),
            ([2, 7, 5, 4], 3, 1, 1, 0, true),
            ([1, 4, 9, 9], 5, 3, 2, 1, true),
            ([1, 32, 20, 17], 16, 3, 1, 1, true),
        ];
        let device = Device::flex().autodiff();
        {
            for (shape, out_channels, kernel, stride, padding, with_bias) in cases {
                let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
                let weight = Tensor::<4>::random([out_channels, shape[1], kernel, kernel], Distribution::Normal(0.0, 0.3), &device).require_grad();
                let bias = with_bias.then(|| Tensor::<1>::random([out_channels], Distribution::Normal(0.0, 1.0), &device).require_grad());
                let options = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
                let run = |convolve: &dyn Fn(Tensor<4>, Tensor<4>, Option<Tensor<1>>, ConvOptions<2>) -> Tensor<4>| {
                    let out = convolve(x.clone(), weight.clone(), bias.clone(), options.clone());
                    let ramp = Tensor::<4>::ones(out.dims(), &device).cumsum(3);
                    let grads = (out.clone() * ramp).sum().backward();
                    let bias_grad = bias.as_ref().map(|bias| bias.grad(&grads).unwrap().reshape([1, 1, 1, out_channels]));
                    [Some(out.without_autodiff()), Some(x.grad(&grads).unwrap()), Some(weight.grad(&grads).unwrap()), bias_grad]
                };
                let (expected, actual) = (run(&burn_conv2d), run(&conv2d));
                for (what, (expected, actual)) in ["output", "input gradient", "weight gradient", "bias gradient"].iter().zip(expected.into_iter().zip(actual))
                {
                    let (Some(expected), Some(actual)) = (expected, actual) else { continue };
                    let scale = expected.clone().abs().max().into_scalar::<f32>();
                    let error = (expected - actual).abs().max().into_scalar::<f32>();
                    assert!(
                        error <= 1e-4 * scale,
                        "{shape:?} -> {out_channels}, {kernel}x{kernel} stride {stride} padding {padding}: {what} differs by {error} (largest {scale})"
                    );
                }
            }
        }
    }

    /// Without autodiff (sampling, caching) the same output as burn's.
    #[test]
    fn untracked_convolution_matches_burns() {
        let device = Device::flex();
        let x = Tensor::<4>::random([2, 6, 13, 10], Distribution::Normal(0.0, 1.0), &device);
        let weight = Tensor::<4>::random([8, 6, 3, 3], Distribution::Normal(0.0, 0.3), &device);
        let bias = Tensor::<1>::random([8], Distribution::Normal(0.0, 1.0), &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let expected = burn_conv2d(x.clone(), weight.clone(), Some(bias.clone()), options.clone());
        let actual = conv2d(x, weight, Some(bias), options);
        let scale = expected.clone().abs().max().into_scalar::<f32>();
        let error = (expected - actual).abs().max().into_scalar::<f32>();
        assert!(error <= 1e-5 * scale, "differs by {error} (largest {scale})");
    }
}
