//! The CPU backend's own kernels on plain f32 slices, where burn's CPU
//! backend is slow: attention ([`attention`], re-exported here), stride-1
//! convolutions and their input gradient ([`conv`]), GELU/SiLU with
//! their gradients ([`activation`]), matrix products on all cores
//! ([`matmul`]) and LoRA dropout's masks ([`dropout`]).
//!
//! Its own crate so that it is compiled optimised in every profile: the
//! workspace's dev profile keeps trainer-core at opt-level 1, where loops
//! are not vectorised (Cargo.toml).

pub mod activation;
pub mod attention;
pub mod conv;
pub mod dropout;
mod matrix;
#[cfg(target_arch = "x86_64")]
mod product;

pub use attention::{backward, forward, Dims, Gradients, BLOCK_ROWS};
pub use matrix::{matmul, zeroed, Matrix};

/// A deterministic spread of values in [-1, 1), for the kernels' tests.
#[cfg(test)]
fn test_values(length: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1 << 23) as f32 - 1.0
        })
        .collect()
}
