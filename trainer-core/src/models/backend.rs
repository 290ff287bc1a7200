//! Moving tensors between burn's dispatch (`Tensor`) and one backend's
//! primitives, for our backend extensions (attention, convolution).

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, DispatchKindConversion, DispatchTensor};
use burn::tensor::Tensor;

/// A backend primitive as a tensor of that backend (no autodiff).
pub(super) fn wrap<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<D>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    Tensor::from_primitive::<B>(primitive)
}

/// The tensor's primitive on backend `B`, which computed it.
pub(super) fn primitive<B: Backend, const D: usize>(tensor: Tensor<D>) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    tensor.try_into_primitive::<B>().expect("an extension computes on its inputs' backend")
}
