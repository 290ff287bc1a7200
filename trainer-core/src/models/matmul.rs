//! The two-dimensional matrix product of the linear layers and LoRA
//! adapters ([`super::layers::project`]), with its own autodiff node so that
//! the CPU backend runs the product and both gradients on every core.
//!
//! burn's CPU backend (burn-flex) runs a product below 192³ multiply-adds on
//! the calling thread alone: every LoRA product, and most linear layers of a
//! small UNet (the mid-size UNet's step kept only 1.2-1.3 of 2 cores busy,
//! DEVELOPERS.md "Speed on the CPU backend"). The `cpu-kernels` crate's
//! [`cpu_kernels::matmul`] splits the output's rows among the threads and
//! reads transposed operands in place. Other backends (wgpu, the browser's
//! WebGPU) and other dtypes keep burn's `matmul`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Cube, Dispatch, Flex};
use burn::tensor::{DType, Tensor, TensorData};

/// `lhs @ rhs`; on the CPU backend through [`MatmulBackend`].
pub fn matmul(lhs: Tensor<2>, rhs: Tensor<2>) -> Tensor<2> {
    if !crate::is_cpu_backend(&lhs.device()) {
        return lhs.matmul(rhs);
    }
    Tensor::from_dispatch(Dispatch::matmul_all_cores(lhs.into_dispatch(), rhs.into_dispatch()))
}

/// The product of two matrices on one backend (see the module).
#[backend_extension(Flex, Cube, Autodiff)]
pub trait MatmulBackend: Backend {
    fn matmul_all_cores(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self>;
}

impl MatmulBackend for Flex {
    fn matmul_all_cores(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        on_cpu(&lhs, &rhs).unwrap_or_else(|| Self::float_matmul(lhs, rhs))
    }
}

impl MatmulBackend for Cube {
    fn matmul_all_cores(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }
}

/// A two-dimensional f32 tensor as the kernels' matrix, read in place
/// (transposed views included); `None` for other dtypes or layouts.
fn as_matrix(tensor: &FloatTensor<Flex>) -> Option<cpu_kernels::Matrix<'_>> {
    let layout = tensor.layout();
    let (&[rows, columns], &[row_stride, column_stride]) = (layout.shape().as_slice(), layout.strides()) else {
        return None;
    };
    if tensor.dtype() != DType::F32 || row_stride < 0 || column_stride < 0 {
        return None;
    }
    let values = &tensor.storage::<f32>()[layout.start_offset()..];
    Some(cpu_kernels::Matrix::strided(values, [rows, columns], [row_stride as usize, column_stride as usize]))
}

fn on_cpu(lhs: &FloatTensor<Flex>, rhs: &FloatTensor<Flex>) -> Option<FloatTensor<Flex>> {
    let (lhs, rhs) = (as_matrix(lhs)?, as_matrix(rhs)?);
    let shape = [lhs.rows(), rhs.columns()];
    Some(<FloatTensor<Flex>>::from_data(TensorData::new(cpu_kernels::matmul(lhs, rhs), shape)))
}

/// The backward node: `grad rhsᵀ` to the left operand, `lhsᵀ grad` to the
/// right one (transposes are views). As burn's own node, it keeps an
/// operand only where the other one's gradient needs it (a frozen weight's
/// input is not kept), through the checkpointer, which may recompute it.
#[derive(Debug)]
struct MatmulBackward;

impl<B: MatmulBackend> Backward<B, 2> for MatmulBackward {
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (lhs, rhs) = ops.state;
        let [lhs_node, rhs_node] = ops.parents;
        if let (Some(node), Some(rhs)) = (lhs_node, rhs) {
            let rhs = checkpointer.retrieve_node_output::<FloatTensor<B>>(rhs);
            grads.register::<B>(node.id, B::matmul_all_cores(grad.clone(), B::float_transpose(rhs)));
        }
        if let (Some(node), Some(lhs)) = (rhs_node, lhs) {
            let lhs = checkpointer.retrieve_node_output::<FloatTensor<B>>(lhs);
            grads.register::<B>(node.id, B::matmul_all_cores(B::float_transpose(lhs), grad));
        }
    }
}

impl<B: MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn matmul_all_cores(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        match MatmulBackward.prepare::<C>([lhs.node(), rhs.node()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                prep.finish((lhs_state, rhs_state), B::matmul_all_cores(lhs.into_primitive(), rhs.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::matmul_all_cores(lhs.into_primitive(), rhs.into_primitive())),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use super::matmul;

    /// Our node against burn's matmul and autodiff on the CPU backend, for
    /// the shapes of a linear layer (many rows, a weight read as the
    /// transposed view of PyTorch's `[out, in]`), a LoRA's rank-4 products,
    /// fewer rows than a block, a single row, and row counts that leave a
    /// last, shorter block: the product and both gradients within 1e-5
    /// relative to each tensor's largest value. The output's gradient is
    /// uneven (a ramp) so that every position counts.
    #[test]
    fn own_node_matches_burns_matmul_and_autodiff() {
        // (rows, inner, columns, right operand stored transposed)
        let cases = [(1024, 64, 64, true), (1024, 64, 4, false), (1024, 4, 64, false), (37, 19, 23, true), (1, 8, 5, false), (333, 130, 7, true)];
        let device = Device::flex().autodiff();
        for (rows, inner, columns, transposed) in cases {
            let lhs = Tensor::<2>::random([rows, inner], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let rhs = match transposed {
                true => Tensor::<2>::random([columns, inner], Distribution::Normal(0.0, 1.0), &device).transpose(),
                false => Tensor::<2>::random([inner, columns], Distribution::Normal(0.0, 1.0), &device),
            }
            .require_grad();
            let run = |product: &dyn Fn(Tensor<2>, Tensor<2>) -> Tensor<2>| {
                let out = product(lhs.clone(), rhs.clone());
                let ramp = Tensor::<2>::ones(out.dims(), &device).cumsum(1);
                let grads = (out.clone() * ramp).sum().backward();
                [out.without_autodiff(), lhs.grad(&grads).unwrap(), rhs.grad(&grads).unwrap()]
            };
            let (expected, actual) = (run(&|a, b| a.matmul(b)), run(&matmul));
            for (what, (expected, actual)) in ["product", "left gradient", "right gradient"].iter().zip(expected.into_iter().zip(actual)) {
                let scale = expected.clone().abs().max().into_scalar::<f32>();
                let error = (expected - actual).abs().max().into_scalar::<f32>();
                assert!(error <= 1e-5 * scale, "{rows} x {inner} x {columns} (transposed {transposed}): {what} differs by {error} (largest {scale})");
            }
        }
    }
}
