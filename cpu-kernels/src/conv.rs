//! Two-dimensional convolutions with stride 1 and square kernels (every
//! convolution of the UNet and the VAE but their downsamplers) and their
//! input gradient, over contiguous f32 arrays laid out `[batch, channels,
//! height, width]` as burn and PyTorch keep them.
//!
//! Why not burn's: burn's CPU backend reorders the whole weight (to `[out,
//! kh, kw, in]`) and copies the input to channels-last on one thread at
//! every call before its parallel part. On SD 1.5's LoRA step that left a
//! core idle about a seventh of the time (1.4-1.55 of 2 cores busy), the
//! 1280-channel weights being 59 MB each.
//!
//! Here nothing runs on one thread: the input is zero-padded in parallel,
//! then each tile of output rows copies its im2col block (row `c k² + t`
//! holds input channel c shifted by tap t, each image row one contiguous
//! run) and multiplies it by the weight as stored, `[out, in k²]`, writing
//! straight into the output's planes. The input gradient is the same
//! correlation of the output gradient, padded by k − 1 − p, with the
//! kernel flipped and in and out swapped (that weight is reordered once
//! per call, in parallel).

use gemm::Parallelism;

use std::mem::MaybeUninit;

use crate::matrix::{all_threads, for_each, gemm_raw, threads, zeroed, Matrix};

/// Output positions per tile: an im2col block of SD 1.5's 320 channels is
/// then 5.6 MiB, about what burn's CPU backend uses too.
const TILE_COLUMNS: usize = 512;

/// The sizes of one convolution: the input is `[batch, in_channels, height,
/// width]`, the weight `[out_channels, in_channels, kernel, kernel]`, the
/// output `[batch, out_channels, out_height, out_width]`, stride 1, the
/// same `padding` (below `kernel`) on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvDims {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub padding: usize,
}

impl ConvDims {
    pub fn out_height(&self) -> usize {
        self.height + 2 * self.padding + 1 - self.kernel
    }

    pub fn out_width(&self) -> usize {
        self.width + 2 * self.padding + 1 - self.kernel
    }

    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.height * self.width
    }

    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_height() * self.out_width()
    }

    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }

    fn check(&self) {
        let ConvDims { kernel, padding, height, width, .. } = *self;
        assert!(kernel > 0 && padding < kernel, "a {kernel}x{kernel} kernel with padding {padding}: {self:?}");
        assert!(height + 2 * padding >= kernel && width + 2 * padding >= kernel, "the kernel is larger than the padded input: {self:?}");
    }
}

/// `[batch, channels, height, width]` zero-padded by `pad` on every side.
struct Padded {
    data: Vec<f32>,
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl Padded {
    fn new(input: &[f32], [batch, channels, height, width]: [usize; 4], pad: usize) -> Padded {
        let (padded_height, padded_width) = (height + 2 * pad, width + 2 * pad);
        let plane = padded_height * padded_width;
        let len = batch * channels * plane;
        if width * height == 0 {
            return Padded { data: zeroed(len), batch, channels, height: padded_height, width: padded_width };
        }
        // Each plane is zeroed and filled by one work item, so that no
        // core zeroes the whole buffer alone first.
        let mut data = Vec::with_capacity(len);
        let planes: Vec<_> = input.chunks_exact(height * width).zip(data.spare_capacity_mut()[..len].chunks_exact_mut(plane)).collect();
        for_each(planes, |_, (source, target)| {
            target.fill(MaybeUninit::new(0.0));
            for (row, target_row) in source.chunks_exact(width).zip(target[pad * padded_width..].chunks_exact_mut(padded_width)) {
                target_row[pad..pad + width].iter_mut().zip(row).for_each(|(target, value)| {
                    target.write(*value);
                });
            }
        });
        // SAFETY: the planes cover the first `len` values, every one written above.
        unsafe { data.set_len(len) };
        Padded { data, batch, channels, height: padded_height, width: padded_width }
    }
}

/// out[b, o, y, x] = Σ_{c, i, j} weight[o, c, i, j] · padded[b, c, y + i, x + j],
/// plus bias[o], with `weight` `[out_channels, channels, kernel, kernel]`:
/// the output is `[batch, out_channels, padded height − k + 1, padded width
/// − k + 1]`.
fn correlate(padded: &Padded, kernel: usize, out_channels: usize, weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let (out_height, out_width) = (padded.height + 1 - kernel, padded.width + 1 - kernel);
    let out_plane = out_height * out_width;
    assert_eq!(out.len(), padded.batch * out_channels * out_plane, "the convolution's output has the wrong size");
    assert_eq!(weight.len(), out_channels * padded.channels * kernel * kernel, "the weight has the wrong size");
    if out.is_empty() {
        return;
    }
    let depth = padded.channels * kernel * kernel;
    if depth == 0 {
        for (index, plane) in out.chunks_exact_mut(out_plane).enumerate() {
            plane.fill(bias.map_or(0.0, |bias| bias[index % out_channels]));
        }
        return;
    }
    let weight = Matrix::new(weight, out_channels, depth);
    // Tiles of whole output rows, at least as many as there are threads
    // where the image has the rows: the lowest levels of SD 1.5's UNet at
    // 512 px (16x16 and 8x8) fit one tile, which would leave a core idle.
    // Where there are fewer tiles than threads all the same, the tiles run
    // one after another, each product split over the threads instead.
    let tiles_wanted_per_image = threads().div_ceil(padded.batch);
    let rows_per_tile = (TILE_COLUMNS / out_width.max(1)).min(out_height.div_ceil(tiles_wanted_per_image)).clamp(1, out_height);
    let tiles_per_image = out_height.div_ceil(rows_per_tile);
    let in_parallel = padded.batch * tiles_per_image >= threads();
    let parallelism = if in_parallel { Parallelism::None } else { all_threads() };
    // Each tile writes its rows of every output channel: a disjoint set of
    // runs of `out`, handed to it as a raw pointer range below.
    let out_base = out.as_mut_ptr() as usize;
    let out_len = out.len();
    let tiles: Vec<(usize, usize)> = (0..padded.batch).flat_map(|image| (0..tiles_per_image).map(move |tile| (image, tile * rows_per_tile))).collect();
    let run = |columns: &mut Vec<f32>, (image, first_row): (usize, usize)| {
        let rows = rows_per_tile.min(out_height - first_row);
        let width = rows * out_width;
        columns.resize(depth * width, 0.0);
        let plane = padded.height * padded.width;
        let channels = &padded.data[image * padded.channels * plane..][..padded.channels * plane];
        // im2col: row (c, i, j) of the block is channel c's rows
        // first_row + i .. + rows, from column j, out_width long each.
        for ((channel, tap), block_row) in (0..padded.channels).flat_map(|c| (0..kernel * kernel).map(move |t| (c, t))).zip(columns.chunks_exact_mut(width)) {
            let (i, j) = (tap / kernel, tap % kernel);
            let source = &channels[channel * plane..][..plane];
            for (row, target) in block_row.chunks_exact_mut(out_width).enumerate() {
                let start = (first_row + i + row) * padded.width + j;
                target.copy_from_slice(&source[start..start + out_width]);
            }
        }
        let first = image * out_channels * out_plane + first_row * out_width;
        assert!(first + (out_channels - 1) * out_plane + width <= out_len, "a tile reaches past the output");
        // SAFETY: this tile's destination, rows first_row.. of every output
        // channel of `image` (out_channels runs of `width` values, one
        // plane apart), lies within `out` (asserted) and is written by no
        // other tile.
        unsafe {
            let first = (out_base as *mut f32).add(first);
            // The bias first; the product adds to it.
            for channel in 0..out_channels {
                std::slice::from_raw_parts_mut(first.add(channel * out_plane), width).fill(bias.map_or(0.0, |bias| bias[channel]));
            }
            gemm_raw(first, out_plane, weight, Matrix::new(columns, depth, width), 1.0, true, parallelism)
        };
    };
    if in_parallel {
        for_each(tiles, run);
    } else {
        let mut columns = Vec::new();
        tiles.into_iter().for_each(|tile| run(&mut columns, tile));
    }
}

/// The convolution of `input` with `weight`, plus `bias` (`[out_channels]`).
pub fn forward(input: &[f32], weight: &[f32], bias: Option<&[f32]>, dims: ConvDims, out: &mut [f32]) {
    dims.check();
    assert_eq!(input.len(), dims.input_len(), "the input is not {dims:?}");
    assert_eq!(weight.len(), dims.weight_len(), "the weight is not {dims:?}");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), dims.out_channels, "the bias is not {dims:?}");
    }
    let padded = Padded::new(input, [dims.batch, dims.in_channels, dims.height, dims.width], dims.padding);
    correlate(&padded, dims.kernel, dims.out_channels, weight, bias, out);
}

/// The input's gradient from the output's.
pub fn input_gradient(grad_out: &[f32], weight: &[f32], dims: ConvDims, grad_input: &mut [f32]) {
    dims.check();
    assert_eq!(grad_out.len(), dims.output_len(), "the output gradient is not {dims:?}");
    assert_eq!(weight.len(), dims.weight_len(), "the weight is not {dims:?}");
    assert_eq!(grad_input.len(), dims.input_len(), "the input gradient is not {dims:?}");
    let ConvDims { in_channels, out_channels, kernel: k, .. } = dims;
    let shape = [dims.batch, out_channels, dims.out_height(), dims.out_width()];
    let padded = Padded::new(grad_out, shape, k - 1 - dims.padding);
    // flipped[c, o, i, j] = weight[o, c, k − 1 − i, k − 1 − j], one input
    // channel's block per work item.
    let mut flipped = zeroed(weight.len());
    let taps = k * k;
    let blocks: Vec<_> = flipped.chunks_mut((out_channels * taps).max(1)).enumerate().collect();
    for_each(blocks, |_, (c, block)| {
        for (o, target) in block.chunks_exact_mut(taps).enumerate() {
            let source = &weight[(o * in_channels + c) * taps..][..taps];
            target.iter_mut().zip(source.iter().rev()).for_each(|(target, source)| *target = *source);
        }
    });
    correlate(&padded, k, in_channels, &flipped, None, grad_input);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// Calls `visit(output, input, weight)` with the indices of every
    /// product weight · input in the definition's sums.
    fn each_product(dims: ConvDims, mut visit: impl FnMut(usize, usize, usize)) {
        let ConvDims { batch, in_channels, out_channels, height, width, kernel, padding } = dims;
        let (out_height, out_width) = (dims.out_height(), dims.out_width());
        for b in 0..batch {
            for o in 0..out_channels {
                for y in 0..out_height {
                    for x in 0..out_width {
                        for c in 0..in_channels {
                            for i in 0..kernel {
                                for j in 0..kernel {
                                    let (row, column) = ((y + i) as isize - padding as isize, (x + j) as isize - padding as isize);
                                    if row < 0 || column < 0 || row >= height as isize || column >= width as isize {
                                        continue;
                                    }
                                    let at_output = ((b * out_channels + o) * out_height + y) * out_width + x;
                                    let at_input = ((b * in_channels + c) * height + row as usize) * width + column as usize;
                                    visit(at_output, at_input, ((o * in_channels + c) * kernel + i) * kernel + j);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The definition, one sum per output value, in f64.
    fn reference(input: &[f32], weight: &[f32], bias: Option<&[f32]>, dims: ConvDims) -> Vec<f64> {
        let plane = dims.out_height() * dims.out_width();
        let mut out: Vec<f64> = (0..dims.output_len()).map(|at| bias.map_or(0.0, |bias| bias[at / plane % dims.out_channels] as f64)).collect();
        each_product(dims, |at_output, at_input, at_weight| out[at_output] += weight[at_weight] as f64 * input[at_input] as f64);
        out
    }

    fn assert_close(actual: &[f32], expected: &[f64], what: &str, dims: ConvDims) {
        assert_eq!(actual.len(), expected.len());
        let scale = expected.iter().fold(0.0f64, |max, value| max.max(value.abs())).max(1e-30);
        for (index, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!((*a as f64 - e).abs() <= 1e-5 * scale, "{what} of {dims:?} at {index}: {a} instead of {e} (largest {scale})");
        }
    }

    /// Shapes with 1x1 and 3x3 kernels, padding 0 and 1, batch 1 and 3,
    /// odd sizes, fewer rows than threads, a single channel.
    const SHAPES: [ConvDims; 6] = [
        ConvDims { batch: 1, in_channels: 4, out_channels: 6, height: 9, width: 7, kernel: 3, padding: 1 },
        ConvDims { batch: 3, in_channels: 5, out_channels: 2, height: 5, width: 11, kernel: 3, padding: 1 },
        ConvDims { batch: 2, in_channels: 3, out_channels: 4, height: 6, width: 6, kernel: 3, padding: 0 },
        ConvDims { batch: 2, in_channels: 7, out_channels: 3, height: 4, width: 5, kernel: 1, padding: 0 },
        ConvDims { batch: 1, in_channels: 1, out_channels: 1, height: 1, width: 1, kernel: 3, padding: 1 },
        ConvDims { batch: 1, in_channels: 16, out_channels: 24, height: 40, width: 33, kernel: 3, padding: 1 },
    ];

    #[test]
    fn forward_matches_the_definition() {
        for (seed, dims) in SHAPES.into_iter().enumerate() {
            let (input, weight, bias) = (values(dims.input_len(), seed as u32), values(dims.weight_len(), 100 + seed as u32), values(dims.out_channels, 200));
            let mut out = vec![f32::NAN; dims.output_len()];
            forward(&input, &weight, Some(&bias), dims, &mut out);
            assert_close(&out, &reference(&input, &weight, Some(&bias), dims), "output", dims);
        }
    }

    /// The input's gradient of Σ out ∘ g by the definition, in f64: every
    /// product w · x in the output's sums sends g · w to x.
    fn reference_input_gradient(weight: &[f32], grad_out: &[f32], dims: ConvDims) -> Vec<f64> {
        let mut grad_input = vec![0.0; dims.input_len()];
        each_product(dims, |at_output, at_input, at_weight| grad_input[at_input] += grad_out[at_output] as f64 * weight[at_weight] as f64);
        grad_input
    }

    #[test]
    fn input_gradient_matches_the_definition() {
        for (seed, dims) in SHAPES.into_iter().enumerate() {
            let seed = seed as u32;
            let (weight, grad_out) = (values(dims.weight_len(), 100 + seed), values(dims.output_len(), 300 + seed));
            let expected_input = reference_input_gradient(&weight, &grad_out, dims);
            let mut grad_input = vec![f32::NAN; dims.input_len()];
            input_gradient(&grad_out, &weight, dims, &mut grad_input);
            assert_close(&grad_input, &expected_input, "input gradient", dims);
        }
    }

    /// No input channels: the output is the bias.
    #[test]
    fn without_input_channels_the_output_is_the_bias() {
        let dims = ConvDims { batch: 2, in_channels: 0, out_channels: 3, height: 2, width: 2, kernel: 3, padding: 1 };
        let mut out = vec![f32::NAN; dims.output_len()];
        forward(&[], &[], Some(&[1.0, 2.0, 3.0]), dims, &mut out);
        assert_eq!(out, [[1.0; 4], [2.0; 4], [3.0; 4], [1.0; 4], [2.0; 4], [3.0; 4]].concat());
    }
}
