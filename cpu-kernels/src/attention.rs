//! Attention: softmax(q kᵀ / √d) v over contiguous f32 arrays laid out
//! `[heads, tokens, width]` (batch and heads flattened), with the backward
//! that recomputes the scores. trainer-core's `models::attention`
//! uses it for the CPU backend (its module docs give the formulas).
//!
//! - The forward keeps, besides the output, each query row's log-sum-exp
//!   of its scaled scores; the backward recomputes each block's scores from
//!   it instead of keeping them. Neither holds more scores than
//!   [`BLOCK_ROWS`] query rows by all keys (twice, in the backward) per
//!   thread.
//! - The products are [`product`](crate::product)'s register tiles on CPUs
//!   with AVX-512 (kᵀ and vᵀ copied once per head so that their rows are
//!   contiguous), elsewhere gemm's on strided views; the softmax runs on
//!   each block while it is in cache.
//! - The exponentials are a polynomial vectorised for the widest SIMD the
//!   CPU has (AVX-512, AVX2, or the baseline), not one libm call per score:
//!   through burn's tensor operations they took a third of the attention.

use gemm::Parallelism;

use crate::matrix::{for_each, multiply, zeroed, Matrix};

/// Query rows per block: 64 rows of SD 1.5's 4096 keys at 512 px are 1 MiB
/// of scores, which stays in a core's L2 while the softmax runs on it (and
/// a multiple of every tile height in [`product`]).
pub const BLOCK_ROWS: usize = 64;

/// The sizes of one attention: `q` is `[heads, queries, head_dim]`, `k`
/// `[heads, keys, head_dim]`, `v` `[heads, keys, value_dim]`, the output
/// `[heads, queries, value_dim]` and the log-sum-exp `[heads, queries]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
    pub value_dim: usize,
}

impl Dims {
    fn scale(&self) -> f32 {
        (self.head_dim as f32).powf(-0.5)
    }

    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        let Dims { heads, queries, keys, head_dim, value_dim } = *self;
        assert!(keys > 0 && head_dim > 0 && value_dim > 0, "attention without keys or widths: {self:?}");
        assert_eq!(q.len(), heads * queries * head_dim, "q is not {self:?}");
        assert_eq!(k.len(), heads * keys * head_dim, "k is not {self:?}");
        assert_eq!(v.len(), heads * keys * value_dim, "v is not {self:?}");
    }

    /// One head's q, k, kᵀ and v.
    fn head<'a>(&self, q: &'a [f32], k: &'a [f32], k_t: &'a Transposed, v: &'a [f32], head: usize) -> Head<'a> {
        let Dims { queries, keys, head_dim, value_dim, .. } = *self;
        Head {
            q: &q[head * queries * head_dim..][..queries * head_dim],
            k: &k[head * keys * head_dim..][..keys * head_dim],
            k_t: k_t.head(head),
            v: &v[head * keys * value_dim..][..keys * value_dim],
            dims: *self,
        }
    }
}

/// One head's q, k and v, and k transposed.
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    k_t: Matrix<'a>,
    v: &'a [f32],
    dims: Dims,
}

impl Head<'_> {
    /// `scores` (`rows` x keys, rows [`padded_row`]`(keys)` apart) =
    /// q[first..first + rows] kᵀ / √d.
    fn scores(&self, first: usize, rows: usize, scores: &mut [f32], parallelism: Parallelism) {
        let Dims { keys, head_dim, .. } = self.dims;
        let q_rows = Matrix::new(&self.q[first * head_dim..][..rows * head_dim], rows, head_dim);
        debug_assert_eq!((self.k_t.rows, self.k_t.columns), (head_dim, keys));
        multiply(scores, padded_row(keys), q_rows, self.k_t, self.dims.scale(), false, parallelism);
    }
}

/// The row stride for rows of `length` values that a product reads or
/// writes together: an odd number of 64-byte lines. A product's tile
/// touches several rows at once, all one stride apart; with a stride of an
/// even number of lines they share the L1 cache's sets (SD 1.5's 4096 keys:
/// every row in the same set), evict each other and the tile waits on L2.
fn padded_row(length: usize) -> usize {
    let lines = length.div_ceil(16);
    16 * if lines.is_multiple_of(2) { lines + 1 } else { lines }
}

/// `[heads, rows, columns]` as `[heads, columns, rows]` with each new row
/// padded to [`Transposed::row_stride`]: the right-hand sides of q kᵀ and
/// dO vᵀ, read with unit stride (see [`product`]).
struct Transposed {
    data: Vec<f32>,
    row_stride: usize,
    rows: usize,
    columns: usize,
}

impl Transposed {
    fn new(x: &[f32], heads: usize, rows: usize, columns: usize) -> Self {
        let row_stride = padded_row(rows);
        let mut data = zeroed(heads * columns * row_stride);
        if rows * columns > 0 {
            for (x, out) in x.chunks_exact(rows * columns).zip(data.chunks_exact_mut(columns * row_stride)).take(heads) {
                for (row, values) in x.chunks_exact(columns).enumerate() {
                    for (column, value) in values.iter().enumerate() {
                        out[column * row_stride + row] = *value;
                    }
                }
            }
        }
        Transposed { data, row_stride, rows: columns, columns: rows }
    }

    /// One head's transpose.
    fn head(&self, head: usize) -> Matrix<'_> {
        let size = self.rows * self.row_stride;
        let data = &self.data[head * size..][..size];
        Matrix { data, rows: self.rows, columns: self.columns, row_stride: self.row_stride, column_stride: 1 }
    }
}

/// The CPU's widest vector instructions, found once per call.
#[derive(Clone, Copy)]
pub(crate) enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

impl Simd {
    pub(crate) fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }

    /// `row[j] = exp(row[j] - shift)`; returns the new values' sum.
    fn exp_shifted(self, row: &mut [f32], shift: f32) -> f32 {
        match self {
            // SAFETY: detect() found the instructions these are compiled for.
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => unsafe { exp_shifted_avx512(row, shift) },
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => unsafe { exp_shifted_avx2(row, shift) },
            Simd::Baseline => exp_shifted(row, shift),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_shifted_avx512(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted(row, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_avx2(row: &mut [f32], shift: f32) -> f32 {
    exp_shifted(row, shift)
}

/// Independent partial sums, so that the compiler may keep them in one
/// vector register (a single running sum would have to be added in order).
const LANES: usize = 16;

#[inline(always)]
fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    let mut sums = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (value, sum) in chunk.iter_mut().zip(&mut sums) {
            *value = exp(*value - shift);
            *sum += *value;
        }
    }
    let mut total: f32 = sums.iter().sum();
    for value in chunks.into_remainder() {
        *value = exp(*value - shift);
        total += *value;
    }
    total
}

/// The row's largest value (NaNs are passed over here; the exponential
/// then carries them into the output).
fn row_max(row: &[f32]) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (value, max) in chunk.iter().zip(&mut maxima) {
            *max = if *value > *max { *value } else { *max };
        }
    }
    chunks.remainder().iter().chain(&maxima).fold(f32::NEG_INFINITY, |max, &value| if value > max { value } else { max })
}

/// eˣ within 2 ulp for x in [-87, 88] (Cephes' expf: x = n ln 2 + r with
/// |r| ≤ ln 2 / 2, a degree-7 polynomial for eʳ, 2ⁿ put in the exponent
/// bits). Outside that range the input is clamped: softmax's shifted scores
/// are at most 0, and e⁻⁸⁷ ≈ 1.6e-38 is as good as 0 next to the row's 1.
/// NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Adding and subtracting 1.5 x 2²³ rounds to the nearest integer with
    // additions only, which vectorise on every target.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n_plus_round = x * std::f32::consts::LOG2_E + ROUND;
    let n = n_plus_round - ROUND;
    // ln 2 in two parts, so that r keeps its precision.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e_r = p * (r * r) + r + 1.0;
    // n sits in the low bits of n + ROUND's mantissa (ROUND's bits are
    // 0x4B40_0000): 2ⁿ's exponent field, n + 127, without a float-to-int
    // conversion (and without overflow checks, which stop vectorisation).
    let biased = n_plus_round.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127);
    e_r * f32::from_bits(biased << 23)
}

/// The output, and when `lse` is given each query row's log-sum-exp of
/// its scaled scores (what [`backward`] needs).
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, out: &mut [f32], lse: Option<&mut [f32]>) {
    dims.check(q, k, v);
    let Dims { heads, queries, keys, value_dim, .. } = dims;
    assert_eq!(out.len(), heads * queries * value_dim, "output is not {dims:?}");
    if heads * queries == 0 {
        return;
    }
    let lse_heads = per_head(lse, heads, queries, "log-sum-exp");
    // One work item per block of query rows; each writes only its rows.
    let mut items = Vec::new();
    for ((head, out_head), lse_head) in out.chunks_mut(queries * value_dim).enumerate().zip(lse_heads) {
        let mut lse_blocks = lse_head.map(|lse| lse.chunks_mut(BLOCK_ROWS));
        for (block, out_rows) in out_head.chunks_mut(BLOCK_ROWS * value_dim).enumerate() {
            let lse_rows = lse_blocks.as_mut().and_then(Iterator::next);
            items.push((head, block * BLOCK_ROWS, out_rows, lse_rows));
        }
    }
    let simd = Simd::detect();
    let k_t = Transposed::new(k, heads, keys, dims.head_dim);
    for_each(items, |scores, (head, first, out_rows, mut lse_rows)| {
        let head = dims.head(q, k, &k_t, v, head);
        let rows = out_rows.len() / value_dim;
        let stride = padded_row(keys);
        scores.resize(rows * stride, 0.0);
        head.scores(first, rows, scores, Parallelism::None);
        let mut inverse_sums = [0.0f32; BLOCK_ROWS];
        for (row, scores) in scores.chunks_exact_mut(stride).map(|row| &mut row[..keys]).enumerate() {
            let max = row_max(scores);
            let sum = simd.exp_shifted(scores, max);
            inverse_sums[row] = 1.0 / sum;
            if let Some(lse) = lse_rows.as_deref_mut() {
                lse[row] = max + sum.ln();
            }
        }
        let (rows_scores, values) = (Matrix::with_row_stride(scores, rows, keys, stride), Matrix::new(head.v, keys, value_dim));
        multiply(out_rows, value_dim, rows_scores, values, 1.0, false, Parallelism::None);
        for (out_row, inverse_sum) in out_rows.chunks_exact_mut(value_dim).zip(inverse_sums) {
            out_row.iter_mut().for_each(|value| *value *= inverse_sum);
        }
    });
}

/// The gradients [`backward`] writes: q's `[heads, queries, head_dim]`,
/// k's `[heads, keys, head_dim]`, v's `[heads, keys, value_dim]`; those not
/// needed are `None`.
pub struct Gradients<'a> {
    pub q: Option<&'a mut [f32]>,
    pub k: Option<&'a mut [f32]>,
    pub v: Option<&'a mut [f32]>,
}

/// q's, k's and v's gradients from the output's (`grad_out`), given the
/// forward's output and log-sum-exp: for each block of query rows,
/// P = exp(S − lse), dV += Pᵀ dO, dS = P ∘ (dO Vᵀ − Δ) with
/// Δ = rowsum(dO ∘ O), dQ = dS K / √d, dK += dSᵀ Q / √d.
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &[f32], k: &[f32], v: &[f32], out: &[f32], lse: &[f32], grad_out: &[f32], dims: Dims, grads: Gradients) {
    dims.check(q, k, v);
    let Dims { heads, queries, keys, head_dim, value_dim } = dims;
    assert_eq!(out.len(), heads * queries * value_dim, "output is not {dims:?}");
    assert_eq!(grad_out.len(), out.len(), "output gradient is not {dims:?}");
    assert_eq!(lse.len(), heads * queries, "log-sum-exp is not {dims:?}");
    if queries == 0 {
        // No query attends to anything: k and v had no effect.
        grads.k.into_iter().chain(grads.v).for_each(|gradient| gradient.fill(0.0));
        return;
    }
    let (grad_q, grad_k, grad_v) = (
        per_head(grads.q, heads, queries * head_dim, "q's gradient"),
        per_head(grads.k, heads, keys * head_dim, "k's gradient"),
        per_head(grads.v, heads, keys * value_dim, "v's gradient"),
    );
    let items: Vec<_> = grad_q.into_iter().zip(grad_k).zip(grad_v).enumerate().map(|(head, ((q, k), v))| (head, q, k, v)).collect();
    // Heads run in parallel; with fewer heads than threads, gemm splits
    // each product over the threads instead.
    #[cfg(not(target_arch = "wasm32"))]
    let parallelism = if heads < rayon::current_num_threads() { Parallelism::Rayon(0) } else { Parallelism::None };
    #[cfg(target_arch = "wasm32")]
    let parallelism = Parallelism::None;
    let (simd, scale) = (Simd::detect(), dims.scale());
    let (k_t, v_t) = (Transposed::new(k, heads, keys, head_dim), Transposed::new(v, heads, keys, value_dim));
    for_each(items, |scratch, (head, mut grad_q, mut grad_k, mut grad_v)| {
        let this = dims.head(q, k, &k_t, v, head);
        let v_t = v_t.head(head);
        let (out, grad_out, lse) = (
            &out[head * queries * value_dim..][..queries * value_dim],
            &grad_out[head * queries * value_dim..][..queries * value_dim],
            &lse[head * queries..][..queries],
        );
        // Δ = rowsum(dO ∘ O).
        let delta: Vec<f32> =
            out.chunks_exact(value_dim).zip(grad_out.chunks_exact(value_dim)).map(|(o, d)| o.iter().zip(d).map(|(o, d)| o * d).sum()).collect();
        let stride = padded_row(keys);
        let block_scores = BLOCK_ROWS.min(queries) * stride;
        scratch.resize(2 * block_scores, 0.0);
        let (p, grad_scores) = scratch.split_at_mut(block_scores);
        for first in (0..queries).step_by(BLOCK_ROWS) {
            let rows = BLOCK_ROWS.min(queries - first);
            let accumulate = first > 0;
            let (p, grad_scores) = (&mut p[..rows * stride], &mut grad_scores[..rows * stride]);
            let grad_out_rows = &grad_out[first * value_dim..][..rows * value_dim];
            this.scores(first, rows, p, parallelism);
            for (row, scores) in p.chunks_exact_mut(stride).map(|row| &mut row[..keys]).enumerate() {
                simd.exp_shifted(scores, lse[first + row]);
            }
            let p = Matrix::with_row_stride(p, rows, keys, stride);
            let grad_out_rows = Matrix::new(grad_out_rows, rows, value_dim);
            if let Some(grad_v) = grad_v.as_deref_mut() {
                // dV (+)= Pᵀ dO.
                multiply(grad_v, value_dim, p.t(), grad_out_rows, 1.0, accumulate, parallelism);
            }
            if grad_q.is_none() && grad_k.is_none() {
                continue;
            }
            // dP = dO Vᵀ, then dS = P ∘ (dP − Δ) in its place.
            multiply(grad_scores, stride, grad_out_rows, v_t, 1.0, false, parallelism);
            for ((grad_row, p_row), delta) in grad_scores.chunks_exact_mut(stride).zip(p.data.chunks_exact(stride)).zip(&delta[first..first + rows]) {
                grad_row[..keys].iter_mut().zip(&p_row[..keys]).for_each(|(grad, p)| *grad = p * (*grad - delta));
            }
            let grad_scores = Matrix::with_row_stride(grad_scores, rows, keys, stride);
            if let Some(grad_q) = grad_q.as_deref_mut() {
                // dQ = dS K / √d, this block's rows.
                multiply(
                    &mut grad_q[first * head_dim..][..rows * head_dim],
                    head_dim,
                    grad_scores,
                    Matrix::new(this.k, keys, head_dim),
                    scale,
                    false,
                    parallelism,
                );
            }
            if let Some(grad_k) = grad_k.as_deref_mut() {
                // dK (+)= dSᵀ Q / √d.
                let q_rows = Matrix::new(&this.q[first * head_dim..][..rows * head_dim], rows, head_dim);
                multiply(grad_k, head_dim, grad_scores.t(), q_rows, scale, accumulate, parallelism);
            }
        }
    });
}

/// An output (a gradient, the log-sum-exp) cut into its heads' parts; all
/// `None` when it is not asked for.
fn per_head<'a>(output: Option<&'a mut [f32]>, heads: usize, length: usize, what: &str) -> Vec<Option<&'a mut [f32]>> {
    match output {
        Some(output) => {
            assert_eq!(output.len(), heads * length, "{what} holds {} values, not {heads} heads x {length}", output.len());
            output.chunks_mut(length.max(1)).map(Some).collect()
        }
        None => (0..heads).map(|_| None).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0.0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (ours, std) = (exp(x), x.exp());
            worst = worst.max(((ours - std) / std).abs());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 2e-38);
    }

    #[test]
    fn every_simd_level_computes_the_same_exponentials() {
        let row: Vec<f32> = (0..1000).map(|i| -30.0 + 0.037 * i as f32).collect();
        let mut expected = row.clone();
        let expected_sum = exp_shifted(&mut expected, 2.5);
        let mut levels = vec![Simd::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                levels.push(Simd::Avx512);
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                levels.push(Simd::Avx2);
            }
        }
        for simd in levels {
            let mut actual = row.clone();
            let sum = simd.exp_shifted(&mut actual, 2.5);
            assert!((sum - expected_sum).abs() <= 1e-6 * expected_sum);
            for (a, e) in actual.iter().zip(&expected) {
                assert!((a - e).abs() <= 1e-6 * e.abs(), "{a} vs {e}");
            }
        }
    }

    #[test]
    fn row_max_finds_the_largest_in_any_position() {
        for length in [1, 15, 16, 17, 40] {
            for at in 0..length {
                let mut row = vec![-1.0f32; length];
                row[at] = 3.0;
                assert_eq!(row_max(&row), 3.0);
            }
        }
    }
}
