//! The attention's matrix products on AVX-512 without packing.
//!
//! Every product of the attention has one short side (the head dim, or a
//! block's 64 query rows) and a right-hand side whose rows are contiguous
//! (`Kᵀ` and `Vᵀ` are copied once per head so that they are). gemm packs
//! both operands on every call, which at these shapes cost as much as a
//! fifth of the attention (`perf` on `examples/bench_attention`), and its
//! edge kernels handle the head dim's 40 or 8 columns. Here a register tile
//! of up to 16 rows by up to 64 columns (four vectors, the last one masked)
//! runs down the whole shared dimension, reading the left operand's
//! elements in place as broadcasts and the right operand's rows as vectors.
//! x86-64 only (elsewhere the attention's products are gemm's).

use std::arch::x86_64::*;

/// `c` (row-major, row stride `ldc`) = `scale` a b, added to what `c` holds
/// when `accumulate`. a is `m` x `k`, element (i, p) at
/// `a[i * a_rows + p * a_columns]`; b is `k` x `n`, row-major with row
/// stride `ldb`.
pub(crate) struct Operands<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: &'a [f32],
    pub a_rows: usize,
    pub a_columns: usize,
    pub b: &'a [f32],
    pub ldb: usize,
    pub scale: f32,
    pub accumulate: bool,
}

impl Operands<'_> {
    /// Panics unless every element read or written lies in its slice.
    fn check(&self, c: &[f32], ldc: usize) {
        let last = |rows: usize, row_stride: usize, columns: usize, column_stride: usize| (rows - 1) * row_stride + (columns - 1) * column_stride;
        if self.m == 0 || self.n == 0 {
            return;
        }
        assert!(c.len() > last(self.m, ldc, self.n, 1), "product's destination is too short");
        if self.k > 0 {
            assert!(self.a.len() > last(self.m, self.a_rows, self.k, self.a_columns), "product's left operand is too short");
            assert!(self.b.len() > last(self.k, self.ldb, self.n, 1), "product's right operand is too short");
        }
    }
}

/// Whether [`multiply`] can run here.
pub(crate) fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// Computes the product; call only where [`available`] said so.
pub(crate) fn multiply(c: &mut [f32], ldc: usize, ops: &Operands) {
    assert!(available(), "the AVX-512 product called on a CPU without AVX-512");
    ops.check(c, ldc);
    if ops.m == 0 || ops.n == 0 {
        return;
    }
    if ops.k == 0 {
        // An empty sum: nothing is read from a or b.
        if !ops.accumulate {
            c.chunks_mut(ldc).take(ops.m).for_each(|row| row[..ops.n].fill(0.0));
        }
        return;
    }
    // SAFETY: AVX-512F is present (asserted), and check() bounded every
    // address the tiles read or write.
    unsafe { multiply_avx512(c.as_mut_ptr(), ldc, ops) }
}

/// Panels of up to 64 columns (four vectors, the last one masked to the
/// columns left), each with the tile height that keeps 16-24 accumulators
/// in the 32 vector registers.
#[target_feature(enable = "avx512f")]
unsafe fn multiply_avx512(c: *mut f32, ldc: usize, ops: &Operands) {
    let mut first_column = 0;
    while first_column < ops.n {
        let width = (ops.n - first_column).min(64);
        let vectors = width.div_ceil(16);
        let last_mask = ((1u32 << (width - 16 * (vectors - 1))) - 1) as __mmask16;
        // SAFETY (all four): the tiles stay inside the m x n destination,
        // as bounded by the caller.
        unsafe {
            match vectors {
                1 => panel::<16, 1>(c, ldc, ops, first_column, last_mask),
                2 => panel::<8, 2>(c, ldc, ops, first_column, last_mask),
                3 => panel::<8, 3>(c, ldc, ops, first_column, last_mask),
                _ => panel::<4, 4>(c, ldc, ops, first_column, last_mask),
            }
        }
        first_column += width;
    }
}

/// Columns `first_column..` (NV vectors) of every row, MR rows at a time,
/// the rows left over one at a time.
#[inline(always)]
unsafe fn panel<const MR: usize, const NV: usize>(c: *mut f32, ldc: usize, ops: &Operands, first_column: usize, last_mask: __mmask16) {
    let mut row = 0;
    // SAFETY: rows row..row + MR (or row) are below m, columns within n.
    unsafe {
        while row + MR <= ops.m {
            tile::<MR, NV>(c, ldc, ops, row, first_column, last_mask);
            row += MR;
        }
        while row < ops.m {
            tile::<1, NV>(c, ldc, ops, row, first_column, last_mask);
            row += 1;
        }
    }
}

/// One MR x (16 NV) tile of the destination, accumulated in registers over
/// the whole shared dimension.
#[inline(always)]
unsafe fn tile<const MR: usize, const NV: usize>(c: *mut f32, ldc: usize, ops: &Operands, row: usize, column: usize, last_mask: __mmask16) {
    let mask = |v: usize| if v + 1 == NV { last_mask } else { 0xffff };
    // SAFETY: a, b and c are read and written within the bounds check()
    // proved, the last vector masked to the columns that exist.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let a = ops.a.as_ptr().add(row * ops.a_rows);
        let b = ops.b.as_ptr().add(column);
        for p in 0..ops.k {
            let b_row = b.add(p * ops.ldb);
            let mut b_vectors = [_mm512_setzero_ps(); NV];
            for (v, b_vector) in b_vectors.iter_mut().enumerate() {
                *b_vector = _mm512_maskz_loadu_ps(mask(v), b_row.add(16 * v));
            }
            let a_column = a.add(p * ops.a_columns);
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let a_value = _mm512_set1_ps(*a_column.add(r * ops.a_rows));
                for (acc, b_vector) in acc_row.iter_mut().zip(&b_vectors) {
                    *acc = _mm512_fmadd_ps(a_value, *b_vector, *acc);
                }
            }
        }
        let scale = _mm512_set1_ps(ops.scale);
        for (r, acc_row) in acc.iter().enumerate() {
            let c_row = c.add((row + r) * ldc + column);
            for (v, acc) in acc_row.iter().enumerate() {
                let out = c_row.add(16 * v);
                let value = match ops.accumulate {
                    true => _mm512_fmadd_ps(*acc, scale, _mm512_maskz_loadu_ps(mask(v), out)),
                    false => _mm512_mul_ps(*acc, scale),
                };
                _mm512_mask_storeu_ps(out, mask(v), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product in f64, for comparison.
    fn reference(ops: &Operands, c: &[f32], ldc: usize) -> Vec<f64> {
        let mut out = vec![0.0; ops.m * ops.n];
        for i in 0..ops.m {
            for j in 0..ops.n {
                let sum: f64 = (0..ops.k).map(|p| ops.a[i * ops.a_rows + p * ops.a_columns] as f64 * ops.b[p * ops.ldb + j] as f64).sum();
                let before = if ops.accumulate { c[i * ldc + j] as f64 } else { 0.0 };
                out[i * ops.n + j] = before + ops.scale as f64 * sum;
            }
        }
        out
    }

    #[test]
    fn products_of_every_tile_shape_match_f64() {
        if !available() {
            eprintln!("no AVX-512 here: nothing to test");
            return;
        }
        let fill = |n: usize, seed: u32| {
            (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5).collect::<Vec<f32>>()
        };
        // Columns in every panel width and tail; rows with and without a
        // remainder; a transposed left operand; accumulation.
        for (m, n, k) in [(64, 40, 77), (77, 8, 64), (5, 1, 3), (17, 16, 9), (64, 150, 40), (33, 200, 8), (16, 48, 1), (3, 33, 0)] {
            for transposed in [false, true] {
                for accumulate in [false, true] {
                    let a = fill(m * k, 1);
                    let (a_rows, a_columns) = if transposed { (1, m) } else { (k, 1) };
                    let (ldb, ldc) = (n + 3, n + 5);
                    let b = fill(k * ldb, 2);
                    let mut c = fill(m * ldc, 3);
                    let ops = Operands { m, n, k, a: &a, a_rows, a_columns, b: &b, ldb, scale: 0.75, accumulate };
                    let expected = reference(&ops, &c, ldc);
                    let padding: Vec<f32> = c.iter().enumerate().filter(|(i, _)| i % ldc >= n).map(|(_, v)| *v).collect();
                    multiply(&mut c, ldc, &ops);
                    for i in 0..m {
                        for j in 0..n {
                            let (got, want) = (c[i * ldc + j] as f64, expected[i * n + j]);
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{m}x{n}x{k} transposed {transposed} accumulate {accumulate}: ({i}, {j}) {got} vs {want}"
                            );
                        }
                    }
                    let after: Vec<f32> = c.iter().enumerate().filter(|(i, _)| i % ldc >= n).map(|(_, v)| *v).collect();
                    assert_eq!(padding, after, "{m}x{n}x{k}: the product wrote outside its columns");
                }
            }
        }
    }
}
