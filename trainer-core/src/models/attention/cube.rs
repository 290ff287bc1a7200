//! The cubecl backends' path (wgpu natively, WebGPU in the browser):
//! attention's forward and backward as three kernels of our own, flash
//! attention's formulas (see the parent module) on one thread per query row
//! (dQ: also per query row; dK and dV: per key row) that walks the other
//! side's rows in the tensors directly: the threads of a workgroup read the
//! same row at the same time, which caches serve. No scores are ever
//! written to a buffer, and a layer's attention is one dispatch forward and
//! two backward instead of a dozen tensor operations per slice.
//!
//! The loops over a row's width are unrolled (`#[unroll]`, the width is a
//! compile-time constant per kernel): the row then lives in registers, and
//! each thread runs one loop iteration per token. That matters on
//! lavapipe: llvmpipe counts every loop iteration of an invocation against
//! one limit of 65,535 and silently leaves the loops beyond it (measured:
//! a 64-wide head over 500 keys came out wrong with rolled loops, right
//! unrolled).
//!
//! f32 heads up to [`MAX_WIDTH`] wide over at most [`MAX_TOKENS`] tokens;
//! anything else takes the sliced tensor operations. q, k and v are made
//! contiguous first.

use burn::backend::tensor::FloatTensor;
use burn::backend::Cube;
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};

use super::Saved;

/// Threads per workgroup: one row each.
const ROWS: u32 = 64;

/// A score below any real one. Finite: WGSL has no infinity literal.
const NO_SCORE: f32 = -1.0e30;

/// The widest head the kernels take: SD's are 40 to 160 wide, SDXL's 64;
/// the VAE's single 512-wide head (sampling only) would unroll into very
/// long kernels.
const MAX_WIDTH: usize = 256;

/// The most tokens a thread walks: below llvmpipe's 65,535 loop iterations
/// per invocation (see the module). SDXL at 2048 px has 16,384 tokens at
/// its first attention level.
const MAX_TOKENS: usize = 60_000;

/// The kernels; cubecl's `Tensor` is theirs, burn's is the rest of the file's.
mod kernels {
    use cubecl::prelude::*;

    use super::NO_SCORE;

    /// softmax(q kᵀ/√d) v for one query row per thread, key by key (online
    /// softmax: the running sum and output are rescaled when a score raises
    /// the running maximum). Writes each row's output and log-sum-exp.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        out: &mut Tensor<f32>,
        lse: &mut Tensor<f32>,
        scale: f32,
        queries: u32,
        keys: u32,
        #[comptime] head_dim: usize,
        #[comptime] value_dim: usize,
    ) {
        let queries = queries as usize;
        let keys = keys as usize;
        let head = CUBE_POS_Y as usize;
        let row = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
        if row >= queries {
            terminate!();
        }

        let mut query = Array::<f32>::new(head_dim);
        let q_base = (head * queries + row) * head_dim;
        #[unroll]
        for d in 0..head_dim {
            query[d] = q[q_base + d] * scale;
        }
        let mut acc = Array::<f32>::new(value_dim);
        #[unroll]
        for d in 0..value_dim {
            acc[d] = 0.0;
        }
        let mut running_max = f32::new(NO_SCORE);
        let mut sum = 0.0f32;
        for j in 0..keys {
            let k_base = (head * keys + j) * head_dim;
            let mut dot = 0.0f32;
            #[unroll]
            for d in 0..head_dim {
                dot += query[d] * k[k_base + d];
            }
            if dot > running_max {
                let correction = (running_max - dot).exp();
                sum *= correction;
                #[unroll]
                for d in 0..value_dim {
                    acc[d] *= correction;
                }
                running_max = dot;
            }
            let p = (dot - running_max).exp();
            sum += p;
            let v_base = (head * keys + j) * value_dim;
            #[unroll]
            for d in 0..value_dim {
                acc[d] += p * v[v_base + d];
            }
        }

        let out_base = (head * queries + row) * value_dim;
        #[unroll]
        for d in 0..value_dim {
            out[out_base + d] = acc[d] / sum;
        }
        lse[head * queries + row] = running_max + sum.ln();
    }

    /// dQ = Σⱼ dSᵢⱼ kⱼ/√d for one query row per thread, with dS = P ∘ (dO vᵀ − Δ)
    /// and P = exp(q kᵀ/√d − lse) recomputed key by key. Also writes each
    /// row's Δ = dO · O, which the dK/dV kernel needs.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grad_query_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        out: &Tensor<f32>,
        grad_out: &Tensor<f32>,
        lse: &Tensor<f32>,
        grad_q: &mut Tensor<f32>,
        delta: &mut Tensor<f32>,
        scale: f32,
        queries: u32,
        keys: u32,
        #[comptime] head_dim: usize,
        #[comptime] value_dim: usize,
    ) {
        let queries = queries as usize;
        let keys = keys as usize;
        let head = CUBE_POS_Y as usize;
        let row = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
        if row >= queries {
            terminate!();
        }

        let mut query = Array::<f32>::new(head_dim);
        let mut grad = Array::<f32>::new(head_dim);
        let q_base = (head * queries + row) * head_dim;
        #[unroll]
        for d in 0..head_dim {
            query[d] = q[q_base + d] * scale;
            grad[d] = 0.0;
        }
        let mut grad_row = Array::<f32>::new(value_dim);
        let out_base = (head * queries + row) * value_dim;
        let mut row_delta = 0.0f32;
        #[unroll]
        for d in 0..value_dim {
            grad_row[d] = grad_out[out_base + d];
            row_delta += grad_row[d] * out[out_base + d];
        }
        let row_lse = lse[head * queries + row];

        for j in 0..keys {
            let k_base = (head * keys + j) * head_dim;
            let v_base = (head * keys + j) * value_dim;
            let mut score = 0.0f32;
            #[unroll]
            for d in 0..head_dim {
                score += query[d] * k[k_base + d];
            }
            let mut grad_p = 0.0f32;
            #[unroll]
            for d in 0..value_dim {
                grad_p += grad_row[d] * v[v_base + d];
            }
            let grad_score = (score - row_lse).exp() * (grad_p - row_delta);
            #[unroll]
            for d in 0..head_dim {
                grad[d] += grad_score * k[k_base + d];
            }
        }

        #[unroll]
        for d in 0..head_dim {
            grad_q[q_base + d] = grad[d] * scale;
        }
        delta[head * queries + row] = row_delta;
    }

    /// dK = Σᵢ dSᵢⱼ qᵢ/√d and dV = Σᵢ Pᵢⱼ dOᵢ for one key row per thread,
    /// query by query, from the log-sum-exps and Δs.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grad_key_value_kernel(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        v: &Tensor<f32>,
        grad_out: &Tensor<f32>,
        lse: &Tensor<f32>,
        delta: &Tensor<f32>,
        grad_k: &mut Tensor<f32>,
        grad_v: &mut Tensor<f32>,
        scale: f32,
        queries: u32,
        keys: u32,
        #[comptime] head_dim: usize,
        #[comptime] value_dim: usize,
    ) {
        let queries = queries as usize;
        let keys = keys as usize;
        let head = CUBE_POS_Y as usize;
        let row = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
        if row >= keys {
            terminate!();
        }

        let mut key = Array::<f32>::new(head_dim);
        let mut grad_key = Array::<f32>::new(head_dim);
        let k_base = (head * keys + row) * head_dim;
        #[unroll]
        for d in 0..head_dim {
            key[d] = k[k_base + d] * scale;
            grad_key[d] = 0.0;
        }
        let mut value = Array::<f32>::new(value_dim);
        let mut grad_value = Array::<f32>::new(value_dim);
        let v_base = (head * keys + row) * value_dim;
        #[unroll]
        for d in 0..value_dim {
            value[d] = v[v_base + d];
            grad_value[d] = 0.0;
        }

        for i in 0..queries {
            let q_base = (head * queries + i) * head_dim;
            let g_base = (head * queries + i) * value_dim;
            let mut score = 0.0f32;
            #[unroll]
            for d in 0..head_dim {
                score += q[q_base + d] * key[d];
            }
            let p = (score - lse[head * queries + i]).exp();
            let mut grad_p = 0.0f32;
            #[unroll]
            for d in 0..value_dim {
                let grad_o = grad_out[g_base + d];
                grad_value[d] += p * grad_o;
                grad_p += grad_o * value[d];
            }
            let grad_score = p * (grad_p - delta[head * queries + i]);
            #[unroll]
            for d in 0..head_dim {
                grad_key[d] += grad_score * q[q_base + d];
            }
        }

        #[unroll]
        for d in 0..head_dim {
            grad_k[k_base + d] = grad_key[d] * scale;
        }
        #[unroll]
        for d in 0..value_dim {
            grad_v[v_base + d] = grad_value[d];
        }
    }
}

/// The tensor's contiguous f32 primitive on a cubecl backend; `None` for
/// another backend or dtype.
fn on_cube(tensor: &Tensor<4>) -> Option<CubeTensor> {
    let primitive: FloatTensor<Cube> = tensor.clone().try_into_primitive::<Cube>().ok()?;
    (primitive.dtype == DType::F32).then(|| into_contiguous(primitive))
}

fn empty(like: &CubeTensor, shape: [usize; 4]) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), Shape::new(shape), DType::F32)
}

fn tensor(primitive: CubeTensor) -> Tensor<4> {
    Tensor::from_primitive::<Cube>(primitive)
}

/// The attention's sizes, from q and v; `None` where the kernels do not
/// apply.
struct Dims {
    batch: usize,
    heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
    value_dim: usize,
}

impl Dims {
    fn of(q: &Tensor<4>, v: &Tensor<4>) -> Option<Self> {
        let [batch, heads, queries, head_dim] = q.dims();
        let [.., keys, value_dim] = v.dims();
        let tokens = 1..=MAX_TOKENS;
        let widths = 1..=MAX_WIDTH;
        // Offsets are 32-bit, and the heads are the grid's second dimension.
        let offsets_fit = u32::try_from(batch * heads * queries.max(keys) * head_dim.max(value_dim)).is_ok();
        let heads_fit = batch * heads <= u16::MAX as usize;
        let applies = tokens.contains(&queries) && tokens.contains(&keys) && widths.contains(&head_dim) && widths.contains(&value_dim);
        (applies && offsets_fit && heads_fit).then_some(Dims { batch, heads, queries, keys, head_dim, value_dim })
    }

    /// `[batch, heads, rows, width]`: a tensor of the attention's heads.
    fn shape(&self, rows: usize, width: usize) -> [usize; 4] {
        [self.batch, self.heads, rows, width]
    }

    /// The scores' scale, 1/√d.
    fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }

    /// Workgroups of [`ROWS`] threads over `rows` rows of every head.
    fn grid(&self, rows: usize) -> (CubeCount, CubeDim) {
        (CubeCount::Static((rows as u32).div_ceil(ROWS), (self.batch * self.heads) as u32, 1), CubeDim::new_1d(ROWS))
    }
}

/// The output and each query row's log-sum-exp (`[batch, heads, queries,
/// 1]`), or `None` where the kernels do not apply.
pub(super) fn forward(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Option<(Tensor<4>, Tensor<4>)> {
    let dims = Dims::of(q, v)?;
    let (query, key, value) = (on_cube(q)?, on_cube(k)?, on_cube(v)?);
    let out = empty(&query, dims.shape(dims.queries, dims.value_dim));
    let lse = empty(&query, dims.shape(dims.queries, 1));
    let (count, dim) = dims.grid(dims.queries);
    kernels::forward_kernel::launch(
        &query.client.clone(),
        count,
        dim,
        query.into_tensor_arg(),
        key.into_tensor_arg(),
        value.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        dims.scale(),
        dims.queries as u32,
        dims.keys as u32,
        dims.head_dim,
        dims.value_dim,
    );
    Some((tensor(out), tensor(lse)))
}

/// The q, k and v gradients (each where `needed`), or `None` where the
/// kernels do not apply.
pub(super) fn backward(saved: &Saved, grad_out: &Tensor<4>, needed: [bool; 3]) -> Option<[Option<Tensor<4>>; 3]> {
    let dims = Dims::of(&saved.q, &saved.v)?;
    let [q, k, v, out, lse, grad_out] = [&saved.q, &saved.k, &saved.v, &saved.out, &saved.lse, grad_out].map(on_cube);
    let (q, k, v, out, lse, grad_out) = (q?, k?, v?, out?, lse?, grad_out?);
    let client = q.client.clone();

    // Δ comes out of the dQ kernel, so it runs even when q needs no gradient.
    let grad_q = empty(&q, dims.shape(dims.queries, dims.head_dim));
    let delta = empty(&q, dims.shape(dims.queries, 1));
    let (count, dim) = dims.grid(dims.queries);
    kernels::grad_query_kernel::launch(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        grad_out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        grad_q.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dims.scale(),
        dims.queries as u32,
        dims.keys as u32,
        dims.head_dim,
        dims.value_dim,
    );
    if !(needed[1] || needed[2]) {
        return Some([needed[0].then(|| tensor(grad_q)), None, None]);
    }
    let grad_k = empty(&q, dims.shape(dims.keys, dims.head_dim));
    let grad_v = empty(&q, dims.shape(dims.keys, dims.value_dim));
    let (count, dim) = dims.grid(dims.keys);
    kernels::grad_key_value_kernel::launch(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        grad_out.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        grad_k.clone().into_tensor_arg(),
        grad_v.clone().into_tensor_arg(),
        dims.scale(),
        dims.queries as u32,
        dims.keys as u32,
        dims.head_dim,
        dims.value_dim,
    );
    Some([needed[0].then(|| tensor(grad_q)), needed[1].then(|| tensor(grad_k)), needed[2].then(|| tensor(grad_v))])
}
