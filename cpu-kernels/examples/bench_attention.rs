//! Forward + backward time of the kernels at the UNets' attention shapes
//! (batch 1, 8 heads: the mid-size UNet's and SD 1.5's at 512 px), the
//! fastest of several runs (on a shared machine the others carry other
//! load). `--with-torch` prints PyTorch's scaled_dot_product_attention at
//! the same shapes (scripts/bench_attention_torch.py, `python3` on PATH):
//!   cargo run --release -p cpu-kernels --features x86-v4 --example bench_attention -- --with-torch
use cpu_kernels::{backward, forward, Dims, Gradients};
use std::time::Instant;

const SHAPES: [(usize, usize, usize); 8] =
    [(1024, 8, 1024), (1024, 8, 77), (256, 16, 256), (256, 16, 77), (64, 32, 64), (4096, 40, 4096), (4096, 40, 77), (1024, 80, 1024)];

fn main() {
    println!("queries head_dim keys: forward + backward (forward alone)");
    for (queries, head_dim, keys) in SHAPES {
        let dims = Dims { heads: 8, queries, keys, head_dim, value_dim: head_dim };
        // Deterministic values in [-0.5, 0.5).
        let fill = |n: usize, seed: u32| {
            (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5).collect::<Vec<f32>>()
        };
        let (q, k, v) = (fill(8 * queries * head_dim, 1), fill(8 * keys * head_dim, 2), fill(8 * keys * head_dim, 3));
        let grad_out = fill(8 * queries * head_dim, 4);
        let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; 8 * queries]);
        let (mut grad_q, mut grad_k, mut grad_v) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let mut best = (f64::INFINITY, f64::INFINITY);
        for run in 0..if queries >= 4096 { 8 } else { 32 } {
            let start = Instant::now();
            forward(&q, &k, &v, dims, &mut out, Some(&mut lse));
            let forward_time = start.elapsed().as_secs_f64();
            let grads = Gradients { q: Some(&mut grad_q), k: Some(&mut grad_k), v: Some(&mut grad_v) };
            backward(&q, &k, &v, &out, &lse, &grad_out, dims, grads);
            let total = start.elapsed().as_secs_f64();
            if run >= 2 && total < best.0 {
                best = (total, forward_time);
            }
        }
        println!("{queries} {head_dim} {keys} {:.2} ms (forward {:.2} ms)", best.0 * 1e3, best.1 * 1e3);
    }
    if std::env::args().any(|arg| arg == "--with-torch") {
        println!("PyTorch (2 threads):");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench_attention_torch.py");
        let shapes = SHAPES.iter().map(|(q, d, k)| format!("{q},{d},{k}"));
        match std::process::Command::new("python3").arg(script).args(shapes).status() {
            Ok(status) if status.success() => {}
            _ => eprintln!("the PyTorch side failed (python3 with torch on PATH?)"),
        }
    }
}
