//! Matrix products on strided views of f32 slices, and running work items
//! on every core.

use std::mem::MaybeUninit;

use gemm::{gemm, Parallelism};

#[cfg(target_arch = "x86_64")]
use crate::product;

/// A matrix read in place: element (i, j) is `data[i * row_stride + j *
/// column_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) columns: usize,
    pub(crate) row_stride: usize,
    pub(crate) column_stride: usize,
}

impl<'a> Matrix<'a> {
    /// `rows` x `columns`, stored row after row.
    pub(crate) fn new(data: &'a [f32], rows: usize, columns: usize) -> Self {
        assert_eq!(data.len(), rows * columns, "not a {rows} x {columns} matrix");
        Matrix { data, rows, columns, row_stride: columns, column_stride: 1 }
    }

    /// `rows` x `columns`, row i starting at `data[i * row_stride]`.
    pub(crate) fn with_row_stride(data: &'a [f32], rows: usize, columns: usize, row_stride: usize) -> Self {
        assert!(columns <= row_stride && data.len() >= rows * row_stride, "not a {rows} x {columns} matrix with rows {row_stride} apart");
        Matrix { data, rows, columns, row_stride, column_stride: 1 }
    }

    /// `rows` x `columns`, element (i, j) at `data[i * row_stride + j *
    /// column_stride]`: any view of a two-dimensional tensor with
    /// non-negative strides.
    pub fn strided(data: &'a [f32], [rows, columns]: [usize; 2], [row_stride, column_stride]: [usize; 2]) -> Self {
        let last = (rows.max(1) - 1) * row_stride + (columns.max(1) - 1) * column_stride;
        assert!(
            rows * columns == 0 || last < data.len(),
            "a {rows} x {columns} matrix with strides {row_stride}, {column_stride} reaches past its {} values",
            data.len()
        );
        Matrix { data, rows, columns, row_stride, column_stride }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn columns(&self) -> usize {
        self.columns
    }

    /// The transpose, read in place.
    pub fn t(self) -> Self {
        Matrix { rows: self.columns, columns: self.rows, row_stride: self.column_stride, column_stride: self.row_stride, ..self }
    }
}

/// `out` (`lhs.rows` x `rhs.columns`, row i at `out[i * out_stride]`) =
/// `scale` lhs rhs, added to what `out` holds when `accumulate`.
/// Single-threaded products with a short side whose right-hand side has
/// contiguous rows are [`product`]'s where the CPU has AVX-512; the others
/// are gemm's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn multiply(out: &mut [f32], out_stride: usize, lhs: Matrix, rhs: Matrix, scale: f32, accumulate: bool, parallelism: Parallelism) {
    assert_eq!(lhs.columns, rhs.rows, "matrix product of mismatched shapes");
    assert!(rhs.columns <= out_stride && out.len() >= lhs.rows * out_stride, "product's destination is too small");
    #[cfg(target_arch = "x86_64")]
    {
        // gemm's packing and blocking pay for themselves when both the
        // shared dimension and the output's width are long (a
        // convolution's); every product of the attention has one of them
        // at most a head dim (SD's go up to 160) or a block of 64 rows.
        let short = lhs.columns <= 160 || rhs.columns <= 160;
        if short && matches!(parallelism, Parallelism::None) && rhs.column_stride == 1 && product::available() {
            let operands = product::Operands {
                m: lhs.rows,
                n: rhs.columns,
                k: lhs.columns,
                a: lhs.data,
                a_rows: lhs.row_stride,
                a_columns: lhs.column_stride,
                b: rhs.data,
                ldb: rhs.row_stride,
                scale,
                accumulate,
            };
            return product::multiply(out, out_stride, &operands);
        }
    }
    // SAFETY: Matrix's constructors and the asserts above keep every
    // element gemm reads or writes within the three slices.
    unsafe { gemm_raw(out.as_mut_ptr(), out_stride, lhs, rhs, scale, accumulate, parallelism) }
}

/// gemm's `out = scale lhs rhs (+ out)` on a raw destination, row i at
/// `out + i * out_stride`.
///
/// # Safety
/// Every element (i, j), i < lhs.rows, j < rhs.columns, of the destination
/// must be valid for reads and writes, and touched by no one else during the
/// call.
pub(crate) unsafe fn gemm_raw(out: *mut f32, out_stride: usize, lhs: Matrix, rhs: Matrix, scale: f32, accumulate: bool, parallelism: Parallelism) {
    assert_eq!(lhs.columns, rhs.rows, "matrix product of mismatched shapes");
    let stride = |value: usize| value as isize;
    // SAFETY: lhs and rhs lie within their slices (Matrix's constructors);
    // the destination is the caller's promise.
    unsafe {
        gemm(
            lhs.rows,
            rhs.columns,
            lhs.columns,
            out,
            1,
            stride(out_stride),
            accumulate,
            lhs.data.as_ptr(),
            stride(lhs.column_stride),
            stride(lhs.row_stride),
            rhs.data.as_ptr(),
            stride(rhs.column_stride),
            stride(rhs.row_stride),
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Runs `work` on every item, on all cores where there are threads, with a
/// scratch buffer per thread.
pub(crate) fn for_each<T: Send>(items: Vec<T>, work: impl Fn(&mut Vec<f32>, T) + Send + Sync) {
    #[cfg(not(target_arch = "wasm32"))]
    if items.len() > 1 {
        use rayon::prelude::*;
        items.into_par_iter().for_each_init(Vec::new, work);
        return;
    }
    // One item runs here: from a thread outside rayon's pool, handing it
    // to the pool would cost a wake-up and a wait.
    let mut scratch = Vec::new();
    items.into_iter().for_each(|item| work(&mut scratch, item));
}

/// The product `lhs rhs`, `lhs.rows` x `rhs.columns` row after row, on
/// all cores. burn's CPU backend runs a product below 192³
/// multiply-adds on the calling thread alone, which is most of the linear
/// layers of a small UNet and every LoRA product; here blocks of the
/// output's rows go to the threads (each block a register-tile or gemm
/// product, [`multiply`]), and a product with too few rows for that is
/// gemm's, split by gemm.
pub fn matmul(lhs: Matrix, rhs: Matrix) -> Vec<f32> {
    /// Rows per block are a multiple of this (the register tiles' height).
    const ROW_STEP: usize = 16;
    /// Below this many multiply-adds (a few microseconds' work) a product
    /// runs where it is called: waking another thread costs about as much.
    const SMALL: usize = 1 << 18;
    assert_eq!(lhs.columns, rhs.rows, "matrix product of a {} x {} and a {} x {} matrix", lhs.rows, lhs.columns, rhs.rows, rhs.columns);
    let (rows, columns) = (lhs.rows, rhs.columns);
    let mut out = zeroed(rows * columns);
    if out.is_empty() {
        return out;
    }
    if rows * columns * lhs.columns < SMALL {
        multiply(&mut out, columns, lhs, rhs, 1.0, false, Parallelism::None);
        return out;
    }
    // Two blocks per thread, so that a core slowed by a neighbour's work
    // does not hold the other back for half the product.
    let block_rows = rows.div_ceil(2 * threads()).next_multiple_of(ROW_STEP);
    if block_rows >= rows {
        multiply(&mut out, columns, lhs, rhs, 1.0, false, all_threads());
        return out;
    }
    let blocks: Vec<_> = out.chunks_mut(block_rows * columns).enumerate().collect();
    for_each(blocks, |_, (index, block)| {
        let first = index * block_rows;
        let lhs_rows = Matrix { data: &lhs.data[first * lhs.row_stride..], rows: block.len() / columns, ..lhs };
        multiply(block, columns, lhs_rows, rhs, 1.0, false, Parallelism::None);
    });
    out
}

/// `len` zeros, written by all cores: a single core zeroing the buffers
/// of a step's convolutions and products left the other idle.
pub fn zeroed(len: usize) -> Vec<f32> {
    /// Values per work item: 256 KiB.
    const CHUNK: usize = 1 << 16;
    let mut values = Vec::with_capacity(len);
    let chunks: Vec<_> = values.spare_capacity_mut()[..len].chunks_mut(CHUNK).collect();
    for_each(chunks, |_, chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the chunks cover the first `len` values, every one written above.
    unsafe { values.set_len(len) };
    values
}

/// How many threads [`for_each`] runs items on.
pub(crate) fn threads() -> usize {
    #[cfg(not(target_arch = "wasm32"))]
    return rayon::current_num_threads();
    #[cfg(target_arch = "wasm32")]
    return 1;
}

/// gemm's parallelism for a product that runs alone: split over the
/// threads where there are several.
pub(crate) fn all_threads() -> Parallelism {
    #[cfg(not(target_arch = "wasm32"))]
    return Parallelism::Rayon(0);
    #[cfg(target_arch = "wasm32")]
    return Parallelism::None;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// `matmul` against the definition in f64 on every path: products
    /// small enough to run in place, blocks of rows with a shorter last
    /// block, too few rows for blocks (gemm splits), operands stored
    /// transposed (a linear layer's weight, the input of a weight's
    /// gradient), an inner dimension of zero, and no rows.
    #[test]
    fn matmul_matches_the_definition() {
        // (rows, inner, columns, left stored transposed, right stored transposed)
        let cases = [
            (7, 5, 3, false, false),
            (1024, 64, 64, false, true),
            (333, 130, 7, true, false),
            (20, 4000, 300, false, false),
            (1000, 4, 96, false, false),
            (96, 1000, 4, true, false),
            (50, 0, 9, false, false),
            (0, 6, 9, false, false),
        ];
        for (seed, (rows, inner, columns, lhs_transposed, rhs_transposed)) in cases.into_iter().enumerate() {
            let (a, b) = (values(rows * inner, seed as u32), values(inner * columns, 100 + seed as u32));
            let lhs = match lhs_transposed {
                true => Matrix::strided(&a, [rows, inner], [1, rows]),
                false => Matrix::strided(&a, [rows, inner], [inner, 1]),
            };
            let rhs = match rhs_transposed {
                true => Matrix::strided(&b, [inner, columns], [1, inner]),
                false => Matrix::strided(&b, [inner, columns], [columns, 1]),
            };
            let at = |m: &Matrix, i: usize, j: usize| m.data[i * m.row_stride + j * m.column_stride] as f64;
            let out = matmul(lhs, rhs);
            assert_eq!(out.len(), rows * columns);
            for i in 0..rows {
                for j in 0..columns {
                    let expected: f64 = (0..inner).map(|k| at(&lhs, i, k) * at(&rhs, k, j)).sum();
                    let error = (out[i * columns + j] as f64 - expected).abs();
                    assert!(
                        error <= 1e-5 * (inner as f64).sqrt().max(1.0),
                        "{rows} x {inner} x {columns} at ({i}, {j}): {} instead of {expected}",
                        out[i * columns + j]
                    );
                }
            }
        }
    }

    #[test]
    fn zeroed_is_all_zeros_at_every_length() {
        for length in [0, 1, 1000, (1 << 16) + 3, 5 << 16] {
            // Memory the allocator is likely to hand out again, not zero.
            drop(vec![1.0f32; length]);
            let values = zeroed(length);
            assert_eq!(values.len(), length);
            assert!(values.iter().all(|value| *value == 0.0), "a non-zero value in zeroed({length})");
        }
    }

    #[test]
    #[should_panic(expected = "reaches past")]
    fn a_strided_matrix_must_lie_within_its_values() {
        Matrix::strided(&[0.0; 11], [3, 4], [4, 1]);
    }
}
