//! Attention, softmax(q kᵀ / √d) v over `[batch, heads, tokens, head dim]`,
//! without ever holding all of its scores.
//!
//! The scores of a whole attention are tokens² per head: SD 1.5 at 512 px
//! holds 8 x 4096² x 4 B = 512 MiB per image, SDXL at 1024 px about
//! 11.7 GB over a training step. burn's autodiff keeps every softmax for
//! the backward, and wgpu binds at most `maxStorageBufferBindingSize`
//! (128 MiB on many adapters) per buffer. So:
//!
//! - the forward runs in slices of query rows whose scores fit
//!   [`SLICE_BYTES`] (diffusers' attention slicing), and keeps only the
//!   output and each query row's log-sum-exp of its scores;
//! - its backward, our own autodiff node ([`AttentionBackend`], a burn
//!   backend extension for the CPU backend and every cubecl runtime, the
//!   browser's WebGPU included), recomputes one slice's scores at a time
//!   from that log-sum-exp, as flash attention's backward does: for a
//!   slice of queries, P = exp(S − lse), dV += Pᵀ dO, dS = P ∘ (dO Vᵀ − Δ)
//!   with Δ = rowsum(dO ∘ O), dQ = dS K / √d, dK += dSᵀ Q / √d.
//!
//! On the CPU backend the same forward and backward run as the
//! `cpu-kernels` crate's kernels (blocks of 64 query rows, gemm on strided
//! views, exponentials vectorised for the CPU's SIMD) instead of tensor
//! operations: through burn's operations the exponentials alone, one libm
//! call per score, took a third of the attention's time, and every slice's
//! scores were allocated afresh.
//!
//! On the cubecl backends (wgpu, the browser's WebGPU) they run as three
//! kernels of ours (`cube`: one thread per row, online softmax, no scores
//! in any buffer). The slices of tensor operations remain for what those
//! kernels do not take (other dtypes, very wide heads or long sequences)
//! and as their reference in tests.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Backend, Cube, Dispatch, DispatchKindConversion, DispatchTensor, Flex};
use burn::tensor::Tensor;

use super::backend::{primitive, wrap};

mod cube;

/// The most bytes one slice of attention scores takes (a backward slice
/// holds three such: P, dP and dS). wgpu binds a buffer only up to the
/// adapter's `maxStorageBufferBindingSize`: 128 MiB on lavapipe and many
/// WebGPU adapters.
pub const SLICE_BYTES: usize = 64 << 20;

/// At most this many slices: beyond that the attention would be computed
/// in so many pieces that it would take hours (a 512 px image through a
/// VAE with attention at full resolution: 17 GB of scores). Slices then
/// grow past [`SLICE_BYTES`] and a device that cannot hold them reports
/// running out of memory, with advice.
const MAX_SLICES: usize = 1024;

/// softmax(q kᵀ / √d) v over `[batch, heads, tokens, head dim]`, never
/// holding more scores than one slice of [`SLICE_BYTES`] (see the module).
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    attention_in_slices(q, k, v, SLICE_BYTES)
}

/// [`attention`] with slices of at most `slice_bytes` of scores, through
/// [`AttentionBackend`] (our backward) on every device.
pub fn attention_in_slices(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, slice_bytes: usize) -> Tensor<4> {
    Tensor::from_dispatch(Dispatch::sliced_attention(q.into_dispatch(), k.into_dispatch(), v.into_dispatch(), slice_bytes))
}

/// Attention with its own autodiff node (see the module): the forward keeps
/// the output and the scores' log-sum-exp, the backward recomputes the
/// scores slice by slice.
#[backend_extension(Flex, Cube, Autodiff)]
pub trait AttentionBackend: Backend {
    /// softmax(q kᵀ / √d) v in slices of query rows holding at most
    /// `slice_bytes` of scores each.
    fn sliced_attention(query: FloatTensor<Self>, key: FloatTensor<Self>, value: FloatTensor<Self>, slice_bytes: usize) -> FloatTensor<Self>;
}

impl AttentionBackend for Flex {
    fn sliced_attention(query: FloatTensor<Self>, key: FloatTensor<Self>, value: FloatTensor<Self>, slice_bytes: usize) -> FloatTensor<Self> {
        untracked_forward::<Self>(query, key, value, slice_bytes)
    }
}

impl AttentionBackend for Cube {
    fn sliced_attention(query: FloatTensor<Self>, key: FloatTensor<Self>, value: FloatTensor<Self>, slice_bytes: usize) -> FloatTensor<Self> {
        untracked_forward::<Self>(query, key, value, slice_bytes)
    }
}

fn untracked_forward<B: Backend>(query: FloatTensor<B>, key: FloatTensor<B>, value: FloatTensor<B>, slice_bytes: usize) -> FloatTensor<B>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    let [q, k, v] = [query, key, value].map(wrap::<B, 4>);
    primitive::<B, 4>(forward(q, k, v, slice_bytes, false).0)
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C>
where
    DispatchTensor: DispatchKindConversion<B>,
{
    fn sliced_attention(query: FloatTensor<Self>, key: FloatTensor<Self>, value: FloatTensor<Self>, slice_bytes: usize) -> FloatTensor<Self> {
        /// The backward's state: q, k, v, the output, the log-sum-exp, and
        /// the slice size.
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: Backend> Backward<B, 3> for AttentionBackward
        where
            DispatchTensor: DispatchKindConversion<B>,
        {
            type State = ([FloatTensor<B>; 5], usize);

            fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
                let grad_out = wrap::<B, 4>(grads.consume::<B>(&ops.node));
                let ([q, k, v, out, lse], slice_bytes) = ops.state;
                let [q, k, v, out, lse] = [q, k, v, out, lse].map(wrap::<B, 4>);
                let needed = ops.parents.each_ref().map(Option::is_some);
                let gradients = attention_backward(Saved { q, k, v, out, lse }, grad_out, needed, slice_bytes);
                for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
                    if let (Some(node), Some(gradient)) = (parent, gradient) {
                        grads.register::<B>(node.id, primitive::<B, 4>(gradient));
                    }
                }
            }
        }

        match AttentionBackward.prepare::<C>([query.node(), key.node(), value.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let [q, k, v] = [query, key, value].map(|tensor| wrap::<B, 4>(tensor.into_primitive()));
                let (out, lse) = forward(q.clone(), k.clone(), v.clone(), slice_bytes, true);
                let lse = lse.expect("asked for the log-sum-exp");
                let saved = [q, k, v, out.clone(), lse].map(primitive::<B, 4>);
                prep.finish((saved, slice_bytes), primitive::<B, 4>(out))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::sliced_attention(query.into_primitive(), key.into_primitive(), value.into_primitive(), slice_bytes)),
        }
    }
}

/// Query rows per slice: as many as keep one slice's scores within
/// `slice_bytes`, and at most [`MAX_SLICES`] slices.
fn rows_per_slice(q: &Tensor<4>, keys: usize, slice_bytes: usize) -> usize {
    let [batch, heads, queries, _] = q.dims();
    let row_bytes = batch * heads * keys * q.dtype().size();
    (slice_bytes / row_bytes.max(1)).max(queries.div_ceil(MAX_SLICES)).clamp(1, queries.max(1))
}

/// The query rows `start..start + rows` (clipped to the end).
fn rows(tensor: &Tensor<4>, start: usize, rows: usize) -> Tensor<4> {
    let [batch, heads, length, width] = tensor.dims();
    tensor.clone().slice([0..batch, 0..heads, start..(start + rows).min(length), 0..width])
}

/// The attention's output, in slices of query rows, and when `keep_lse`
/// (for the backward) each query row's log-sum-exp of its scaled scores
/// (`[batch, heads, queries, 1]`); sampling on wgpu is spared its kernels.
fn forward(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, slice_bytes: usize, keep_lse: bool) -> (Tensor<4>, Option<Tensor<4>>) {
    if let Some(result) = cpu::forward(&q, &k, &v, keep_lse) {
        return result;
    }
    if let Some((out, lse)) = cube::forward(&q, &k, &v) {
        return (out, keep_lse.then_some(lse));
    }
    sliced_forward(q, k, v, slice_bytes, keep_lse)
}

/// [`forward`] as tensor operations on slices of query rows: the path of
/// dtypes and head widths the kernels do not take, and their reference in
/// tests.
fn sliced_forward(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, slice_bytes: usize, keep_lse: bool) -> (Tensor<4>, Option<Tensor<4>>) {
    let [.., queries, head_dim] = q.dims();
    let q = q * (head_dim as f64).powf(-0.5);
    let k_t = k.swap_dims(2, 3);
    let step = rows_per_slice(&q, k_t.dims()[3], slice_bytes);
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for start in (0..queries).step_by(step) {
        let scores = rows(&q, start, step).matmul(k_t.clone());
        let max = scores.clone().max_dim(3);
        let exp = (scores - max.clone()).exp();
        let sum = exp.clone().sum_dim(3);
        if keep_lse {
            lses.push(max + sum.clone().log());
        }
        outs.push(exp.matmul(v.clone()) / sum);
    }
    (Tensor::cat(outs, 2), keep_lse.then(|| Tensor::cat(lses, 2)))
}

fn accumulate(sum: &mut Option<Tensor<4>>, term: Tensor<4>) {
    *sum = Some(match sum.take() {
        Some(sum) => sum + term,
        None => term,
    });
}

/// What the forward kept for the backward.
struct Saved {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    out: Tensor<4>,
    lse: Tensor<4>,
}

/// The gradients of q, k and v (those `needed`) from the output's, the
/// scores recomputed one slice of query rows at a time (see the module).
fn attention_backward(saved: Saved, grad_out: Tensor<4>, needed: [bool; 3], slice_bytes: usize) -> [Option<Tensor<4>>; 3] {
    if let Some(gradients) = cpu::backward(&saved, &grad_out, needed) {
        return gradients;
    }
    if let Some(gradients) = cube::backward(&saved, &grad_out, needed) {
        return gradients;
    }
    sliced_backward(saved, grad_out, needed, slice_bytes)
}

/// [`attention_backward`] as tensor operations on slices of query rows
/// (see [`sliced_forward`]).
fn sliced_backward(saved: Saved, grad_out: Tensor<4>, needed: [bool; 3], slice_bytes: usize) -> [Option<Tensor<4>>; 3] {
    let Saved { q, k, v, out, lse } = saved;
    let [.., queries, head_dim] = q.dims();
    let scale = (head_dim as f64).powf(-0.5);
    let q = q * scale;
    let (k_t, v_t) = (k.clone().swap_dims(2, 3), v.swap_dims(2, 3));
    // Δ = rowsum(dO ∘ O), the softmax backward's per-row term.
    let delta = (grad_out.clone() * out).sum_dim(3);
    let step = rows_per_slice(&q, k_t.dims()[3], slice_bytes);
    let (mut grad_q, mut grad_k, mut grad_v) = (Vec::new(), None::<Tensor<4>>, None::<Tensor<4>>);
    for start in (0..queries).step_by(step) {
        let (q_rows, grad_rows) = (rows(&q, start, step), rows(&grad_out, start, step));
        let p = (q_rows.clone().matmul(k_t.clone()) - rows(&lse, start, step)).exp();
        if needed[2] {
            accumulate(&mut grad_v, p.clone().swap_dims(2, 3).matmul(grad_rows.clone()));
        }
        if !(needed[0] || needed[1]) {
            continue;
        }
        let grad_scores = p * (grad_rows.matmul(v_t.clone()) - rows(&delta, start, step));
        if needed[0] {
            grad_q.push(grad_scores.clone().matmul(k.clone()) * scale);
        }
        if needed[1] {
            accumulate(&mut grad_k, grad_scores.swap_dims(2, 3).matmul(q_rows));
        }
    }
    [needed[0].then(|| Tensor::cat(grad_q, 2)), grad_k, grad_v]
}

/// The CPU backend's path: [`forward`] and [`attention_backward`] as the
/// `cpu-kernels` kernels on the tensors' f32 values; `None` for tensors
/// of another backend or dtype, which take the tensor operations.
mod cpu {
    use burn::backend::tensor::FloatTensor;
    use burn::backend::Flex;
    use burn::tensor::{DType, Tensor, TensorData};
    use cpu_kernels::{Dims, Gradients};

    use super::Saved;

    /// The tensor as contiguous f32 values on the CPU backend.
    fn on_cpu(tensor: &Tensor<4>) -> Option<FloatTensor<Flex>> {
        let primitive = tensor.clone().try_into_primitive::<Flex>().ok()?;
        (primitive.dtype() == DType::F32).then(|| primitive.to_contiguous())
    }

    fn tensor(values: Vec<f32>, shape: [usize; 4]) -> Tensor<4> {
        Tensor::from_primitive::<Flex>(<FloatTensor<Flex>>::from_data(TensorData::new(values, shape)))
    }

    fn dims(q: &Tensor<4>, v: &Tensor<4>) -> Option<Dims> {
        let [batch, heads, queries, head_dim] = q.dims();
        let [.., keys, value_dim] = v.dims();
        (keys > 0 && head_dim > 0 && value_dim > 0).then_some(Dims { heads: batch * heads, queries, keys, head_dim, value_dim })
    }

    pub(super) fn forward(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, keep_lse: bool) -> Option<(Tensor<4>, Option<Tensor<4>>)> {
        let dims = dims(q, v)?;
        let [q_values, k_values, v_values] = [q, k, v].map(on_cpu);
        let (q_values, k_values, v_values) = (q_values?, k_values?, v_values?);
        let mut out = cpu_kernels::zeroed(dims.heads * dims.queries * dims.value_dim);
        let mut lse = keep_lse.then(|| cpu_kernels::zeroed(dims.heads * dims.queries));
        cpu_kernels::forward(q_values.as_slice()?, k_values.as_slice()?, v_values.as_slice()?, dims, &mut out, lse.as_deref_mut());
        let [batch, heads, queries, _] = q.dims();
        Some((tensor(out, [batch, heads, queries, dims.value_dim]), lse.map(|lse| tensor(lse, [batch, heads, queries, 1]))))
    }

    pub(super) fn backward(saved: &Saved, grad_out: &Tensor<4>, needed: [bool; 3]) -> Option<[Option<Tensor<4>>; 3]> {
        let dims = dims(&saved.q, &saved.v)?;
        let [q, k, v, out, lse, grad_out] = [&saved.q, &saved.k, &saved.v, &saved.out, &saved.lse, grad_out].map(on_cpu);
        let (q, k, v, out, lse, grad_out) = (q?, k?, v?, out?, lse?, grad_out?);
        let Dims { heads, queries, keys, head_dim, value_dim } = dims;
        let zeros = |needed: bool, length: usize| needed.then(|| cpu_kernels::zeroed(heads * length));
        let (mut grad_q, mut grad_k, mut grad_v) =
            (zeros(needed[0], queries * head_dim), zeros(needed[1], keys * head_dim), zeros(needed[2], keys * value_dim));
        let gradients = Gradients { q: grad_q.as_deref_mut(), k: grad_k.as_deref_mut(), v: grad_v.as_deref_mut() };
        cpu_kernels::backward(q.as_slice()?, k.as_slice()?, v.as_slice()?, out.as_slice()?, lse.as_slice()?, grad_out.as_slice()?, dims, gradients);
        let [batch, heads, ..] = saved.q.dims();
        Some([
            grad_q.map(|values| tensor(values, [batch, heads, queries, head_dim])),
            grad_k.map(|values| tensor(values, [batch, heads, keys, head_dim])),
            grad_v.map(|values| tensor(values, [batch, heads, keys, value_dim])),
        ])
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::softmax;
    use burn::tensor::{Device, DeviceKind, Distribution, Tensor};

    use super::{attention, attention_in_slices, sliced_backward, sliced_forward, Saved};

    /// burn's autodiff through the textbook formula: the reference.
    fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
        let head_dim = q.dims()[3];
        softmax((q * (head_dim as f64).powf(-0.5)).matmul(k.swap_dims(2, 3)), 3).matmul(v)
    }

    /// The largest difference between two tensors relative to the
    /// expected one's largest value, which must be within `tolerance`.
    fn assert_close(expected: &Tensor<4>, actual: Tensor<4>, tolerance: f64, what: &str) {
        let scale = expected.clone().abs().max().into_scalar::<f32>();
        let error = (expected.clone() - actual).abs().max().into_scalar::<f32>();
        assert!(error <= tolerance as f32 * scale, "{what} differs by {error} (largest value {scale})");
    }

    /// Self- and cross-attention shapes, odd lengths, head sizes 8 to 160.
    /// On the CPU backend: one block of 64 query rows and several, heads in
    /// parallel or each product split over the threads. On wgpu (lavapipe),
    /// our kernels: one workgroup of 64 rows and several (the last one part
    /// idle), and rows walked over 700 keys or 600 queries, past the loop
    /// limit that llvmpipe enforces on kernels whose width loops are not
    /// unrolled (see `cube`).
    const SHAPES: [([usize; 4], usize); 8] = [
        ([2, 3, 20, 8], 11),
        ([1, 8, 77, 40], 77),
        ([1, 2, 129, 64], 129),
        ([2, 1, 33, 8], 7),
        ([1, 1, 70, 16], 65),
        ([1, 2, 50, 160], 19),
        ([1, 1, 40, 64], 700),
        ([1, 1, 600, 64], 30),
    ];

    /// The output, and the q, k and v gradients of a sum weighted unevenly
    /// (a ramp over the query rows, so that every row's term counts), from
    /// burn's autodiff through `attend`.
    fn output_and_gradients(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>, attend: &dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>) -> [Tensor<4>; 4] {
        let out = attend(q.clone(), k.clone(), v.clone());
        let ramp = Tensor::<4>::ones(out.dims(), &out.device()).cumsum(2);
        let grads = (out.clone() * ramp).sum().backward();
        [out.without_autodiff(), q.grad(&grads).unwrap(), k.grad(&grads).unwrap(), v.grad(&grads).unwrap()]
    }

    /// [`SHAPES`] through our node (the CPU backend's kernels, wgpu's
    /// kernels; asked for in one slice and several, which only the sliced
    /// path uses): the output and the q, k and v gradients equal burn's
    /// autodiff through the formula within 1e-4 relative on the CPU backend
    /// and 1e-3 on wgpu (lavapipe), relative to each tensor's largest value.
    #[test]
    fn own_backward_matches_autodiff_through_the_formula() {
        for (name, device, tolerance) in [("flex", Device::flex(), 1e-4), ("wgpu", Device::wgpu(DeviceKind::Cpu), 1e-3)] {
            let device = device.autodiff();
            for ([batch, heads, queries, head_dim], keys) in SHAPES {
                let input = |length: usize| Tensor::<4>::random([batch, heads, length, head_dim], Distribution::Normal(0.0, 1.0), &device).require_grad();
                let (q, k, v) = (input(queries), input(keys), input(keys));
                let expected = output_and_gradients(&q, &k, &v, &reference);
                let row_bytes = batch * heads * keys * 4;
                for slice_bytes in [usize::MAX, 6 * row_bytes] {
                    let actual = output_and_gradients(&q, &k, &v, &|q, k, v| attention_in_slices(q, k, v, slice_bytes));
                    for (what, (expected, actual)) in ["output", "q gradient", "k gradient", "v gradient"].iter().zip(expected.iter().zip(actual)) {
                        assert_close(expected, actual, tolerance, &format!("{name} {queries}x{keys} head dim {head_dim}, slices of {slice_bytes} B: {what}"));
                    }
                }
            }
        }
    }

    /// The tensor-operation path that wgpu's kernels replaced stays right
    /// (other dtypes and very wide heads still take it): on wgpu, in one
    /// slice and several, its output and gradients equal burn's autodiff
    /// through the formula within 1e-3 relative.
    #[test]
    fn sliced_path_matches_autodiff_through_the_formula() {
        let device = Device::wgpu(DeviceKind::Cpu).autodiff();
        for ([batch, heads, queries, head_dim], keys) in SHAPES {
            let input = |length: usize| Tensor::<4>::random([batch, heads, length, head_dim], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let (q, k, v) = (input(queries), input(keys), input(keys));
            let expected = output_and_gradients(&q, &k, &v, &reference);
            let [q, k, v] = [q, k, v].map(Tensor::without_autodiff);
            for slice_bytes in [usize::MAX, 6 * batch * heads * keys * 4] {
                let (out, lse) = sliced_forward(q.clone(), k.clone(), v.clone(), slice_bytes, true);
                let ramp = Tensor::<4>::ones(out.dims(), &out.device()).cumsum(2);
                let saved = Saved { q: q.clone(), k: k.clone(), v: v.clone(), out: out.clone(), lse: lse.unwrap() };
                let [grad_q, grad_k, grad_v] = sliced_backward(saved, ramp, [true; 3], slice_bytes).map(Option::unwrap);
                for (what, (expected, actual)) in
                    ["output", "q gradient", "k gradient", "v gradient"].iter().zip(expected.iter().zip([out, grad_q, grad_k, grad_v]))
                {
                    assert_close(expected, actual, 1e-3, &format!("{queries}x{keys} head dim {head_dim}, slices of {slice_bytes} B: {what}"));
                }
            }
        }
    }

    /// Only the inputs that need a gradient get one: cross-attention with
    /// a frozen context (k and v untracked) back-propagates into q alone,
    /// on the CPU backend and through wgpu's kernels (which then skip the
    /// dK/dV kernel).
    #[test]
    fn untracked_inputs_get_no_gradient() {
        for (name, device, tolerance) in [("flex", Device::flex(), 1e-5), ("wgpu", Device::wgpu(DeviceKind::Cpu), 1e-3)] {
            let device = device.autodiff();
            let q = Tensor::<4>::random([1, 2, 9, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
            let k = Tensor::<4>::random([1, 2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<4>::random([1, 2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
            let grads = attention_in_slices(q.clone(), k.clone(), v.clone(), 64).sum().backward();
            let expected = reference(q.clone(), k.clone(), v.clone()).sum().backward();
            assert!(k.grad(&grads).is_none() && v.grad(&grads).is_none(), "{name}: a frozen input got a gradient");
            assert_close(&q.grad(&expected).unwrap(), q.grad(&grads).unwrap(), tolerance, &format!("{name}: q gradient"));
        }
    }

    /// Without autodiff (sampling, caching) the CPU backend's kernels in
    /// blocks of query rows and wgpu's forward kernel, without the
    /// log-sum-exp: self- and cross-attention shapes, odd lengths, head
    /// sizes 8, 40, 64 and 512 (the VAE's one head) give the formula's
    /// output within 1e-5 relative (1e-3 on wgpu).
    #[test]
    fn untracked_attention_matches_the_formula() {
        let shapes = [([2, 3, 20, 8], 11), ([1, 8, 257, 40], 77), ([1, 5, 1000, 64], 1000), ([2, 2, 999, 8], 999), ([1, 1, 300, 512], 300)];
        for (name, device, tolerance) in [("flex", Device::flex(), 1e-5), ("wgpu", Device::wgpu(DeviceKind::Cpu), 1e-3)] {
            for ([batch, heads, queries, head_dim], keys) in shapes {
                let input = |length: usize| Tensor::<4>::random([batch, heads, length, head_dim], Distribution::Normal(0.0, 1.0), &device);
                let (q, k, v) = (input(queries), input(keys), input(keys));
                let expected = reference(q.clone(), k.clone(), v.clone());
                assert_close(&expected, attention(q, k, v), tolerance, &format!("{name} {queries}x{keys} head dim {head_dim}: attention"));
            }
        }
    }
}
