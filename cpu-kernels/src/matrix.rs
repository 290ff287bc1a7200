//! Matrix products on strided views of f32 slices, and running work items
//! on every core.

use gemm::{gemm, Parallelism};

#[cfg(target_arch = "x86_64")]
use crate::product;

/// A matrix read in place: element (i, j) is `data[i * row_stride + j *
/// column_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Matrix<'a> {
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

    /// The transpose, read in place.
    pub(crate) fn t(self) -> Self {
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
    {
        use rayon::prelude::*;
        items.into_par_iter().for_each_init(Vec::new, work);
    }
    #[cfg(target_arch = "wasm32")]
    {
        let mut scratch = Vec::new();
        items.into_iter().for_each(|item| work(&mut scratch, item));
    }
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
