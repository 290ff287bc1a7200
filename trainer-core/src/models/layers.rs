//! The weighted layers of the models: Linear, Conv2d and Embedding, with the
//! parameter names PyTorch uses (`weight`, `bias`).
//!
//! Their weights may be stored in a narrower dtype than the activations
//! (frozen base weights in f16 halve the model's memory): every use casts
//! the weight to the input's dtype, so the arithmetic keeps the
//! activations' precision and only storage shrinks. burn's own layers need
//! both operands in one dtype, which is why the models use these.

use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Int, Tensor};

use super::conv::conv2d;
use super::matmul::matmul;

/// `t` in `dtype` (no copy when it already is).
pub fn in_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(dtype)
    }
}

/// `x @ weight` over `x`'s last dimension (`weight` is `[in, out]`), as one
/// two-dimensional product of all of `x`'s rows. burn's `linear` keeps a
/// batch of one as a batched product and reshapes the weight to `[1, in,
/// out]` for it, which copies the loaded weights (transposed views of
/// PyTorch's `[out, in]`) at every call: 3.5 % of the mid-size UNet's step
/// on the CPU backend, and one more kernel per layer on wgpu. On the CPU
/// backend the product runs on every core ([`super::matmul`]).
pub fn project<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims.iter().product::<usize>() / d_in.max(1);
    dims[D - 1] = weight.dims()[1];
    matmul(x.reshape([rows, d_in]), weight).reshape(dims)
}

/// `nn.Linear`; the weight is kept in burn's `[in, out]` layout.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let y = project(x, in_dtype(self.weight.val(), dtype));
        match &self.bias {
            Some(bias) => y + in_dtype(bias.val(), dtype).unsqueeze(),
            None => y,
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.val().dims()
    }
}

/// `nn.Conv2d` with square kernels, equal padding on every side, no groups.
#[derive(Module, Debug)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub stride: usize,
    #[module(skip)]
    pub padding: usize,
}

impl Conv2d {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let dtype = x.dtype();
        let options = ConvOptions::new([self.stride; 2], [self.padding; 2], [1, 1], 1);
        conv2d(x, in_dtype(self.weight.val(), dtype), self.bias.as_ref().map(|b| in_dtype(b.val(), dtype)), options)
    }
}

/// `nn.Embedding`. Activations start here, in f32 whatever the storage.
#[derive(Module, Debug)]
pub struct Embedding {
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        in_dtype(embedding(self.weight.val(), ids), DType::F32)
    }
}

/// Bytes the module's parameters take in memory, in their storage dtypes.
pub fn stored_bytes<M: Module>(module: &M) -> usize {
    struct Count(usize);
    impl burn::module::ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = param.val();
            self.0 += tensor.dims().iter().product::<usize>() * tensor.dtype().size();
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}
