//! Burnbooth's core, shared by the native runner and the browser app.
//!
//! - [`config`]: SimpleTuner-compatible training and dataloader configs.
//! - [`data`]: image discovery, sizing, captions, preprocessing and the batch sampler.
//! - [`plan`]: what a training run would do, computed without loading a model.
//!
//! Nothing here touches the filesystem directly: files come through the
//! [`data::source::ImageSource`] trait, so the same code runs in a browser tab.

pub mod config;
pub mod data;
pub mod models;
pub mod error;
pub mod fuzz_targets;
pub mod pipeline;
pub mod plan;
pub mod rng;
pub mod schedule;
pub mod schedulers;
pub mod tools;
pub mod train;

pub use error::{Error, Result};

/// Whether `device` is burn's CPU backend rather than a cubecl device
/// (wgpu, WebGPU). Only cubecl devices allocate from memory pools, which is
/// what tells them apart through burn's device API.
pub fn is_cpu_backend(device: &burn::tensor::Device) -> bool {
    device.memory_pool_usage().is_none()
}

/// Runs one of the core's async operations to completion. The core reads
/// tensors back asynchronously (the browser cannot block on the GPU); native
/// callers simply wait.
#[cfg(not(target_arch = "wasm32"))]
pub use pollster::block_on;
