//! gemm's (the CPU backend's matrix multiply) throughput at square and
//! attention-shaped products, against the core's FMA peak: the ceiling of
//! every matrix product on the CPU backend; then `cpu_kernels::matmul` at
//! the linear layers' shapes. Compare with PyTorch's
//! `torch.mm` on 2 threads (DEVELOPERS.md, "Speed on the CPU backend").
//!   cargo run --release -p cpu-kernels --features x86-v4 --example bench_gemm
//! (without `x86-v4` gemm has only its AVX2 kernels: half the speed on an
//! AVX-512 CPU, and not what the trainer runs)
use gemm::Parallelism;
use std::time::Instant;

/// GFLOP/s of the fastest of 8 products `m x k` by `k x n`, all row-major.
fn gflops(m: usize, n: usize, k: usize, parallelism: Parallelism) -> f64 {
    let (lhs, rhs, mut dst) = (vec![0.5f32; m * k], vec![0.25f32; k * n], vec![0.0f32; m * n]);
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let start = Instant::now();
        // SAFETY: the three buffers hold m x k, k x n and m x n values, read
        // and written with the row-major strides given.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.as_ptr(),
                1,
                k as isize,
                rhs.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// Microseconds of the median of 200 `cpu_kernels::matmul` calls, the
/// linear layers' and LoRA adapters' product on the CPU backend (the left
/// operand read transposed when `transposed`, as a weight's gradient does).
fn matmul_micros(m: usize, n: usize, k: usize, transposed: bool) -> f64 {
    let (lhs, rhs) = (vec![0.5f32; m * k], vec![0.25f32; k * n]);
    let lhs = match transposed {
        true => cpu_kernels::Matrix::strided(&lhs, [m, k], [1, m]),
        false => cpu_kernels::Matrix::strided(&lhs, [m, k], [k, 1]),
    };
    let rhs = cpu_kernels::Matrix::strided(&rhs, [k, n], [n, 1]);
    let mut times: Vec<f64> = (0..200)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(cpu_kernels::matmul(lhs, rhs));
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    println!("2048^3, all threads: {:.0} GFLOP/s", gflops(2048, 2048, 2048, Parallelism::Rayon(0)));
    for (m, n, k) in [(2048, 2048, 2048), (512, 512, 512), (4096, 320, 320), (64, 4096, 40), (64, 40, 4096)] {
        println!("{m}x{k} by {k}x{n}, one thread: {:.0} GFLOP/s", gflops(m, n, k, Parallelism::None));
    }
    // The mid-size UNet's linear layers and LoRA products (forward, and a
    // weight's gradient xᵀ g), and SD 1.5's largest linear layer.
    for (m, n, k, transposed) in [(1024, 64, 64, false), (1024, 4, 64, false), (64, 64, 1024, true), (256, 128, 128, false), (4096, 1280, 320, false)] {
        println!("matmul {m}x{k} by {k}x{n}{}: {:.1} µs", if transposed { " (left transposed)" } else { "" }, matmul_micros(m, n, k, transposed));
    }
}
