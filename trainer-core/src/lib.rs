//! Burnbooth's core, shared by the native runner and the browser app.
//!
//! - [`config`]: SimpleTuner-compatible training and dataloader configs,
//!   parsed into typed settings once, at the edge.
//! - [`data`]: image sources, header probes, sizing and crops, captions,
//!   preprocessing and the batch sampler.
//! - [`plan`]: what a training run would do, computed without loading a model.
//! - [`models`]: the SD 1.x/2.x/SDXL components, their configs and loaders.
//! - [`pipeline`]: text to image; [`schedulers`]: the sampling schedulers
//!   (DDIM, Euler, DPM-Solver++); [`lr_schedule`]: the learning-rate schedule.
//! - [`train`]: a run's session (caches, steps, validation, checkpoints,
//!   exports) and the run loop both hosts drive ([`train::run`]).
//! - [`tools`]: the rare-token finder and the regularisation-set generator.
//!
//! Nothing here touches the filesystem directly: files come through the
//! [`data::source::ImageSource`] and [`train::storage::Storage`] traits, so
//! the same code runs in a browser tab. DEVELOPERS.md ("Architecture") has
//! the layers and how data flows through them.

pub mod config;
pub mod data;
pub mod error;
pub mod fuzz_targets;
pub mod lr_schedule;
pub mod models;
pub mod pipeline;
pub mod plan;
pub mod rng;
pub mod schedulers;
pub mod tools;
pub mod train;

pub use error::{Error, Result};

/// Whether `device` is burn's CPU backend (with or without autodiff) rather
/// than a cubecl device (wgpu, WebGPU). Cheap enough to ask on every layer.
pub fn is_cpu_backend(device: &burn::tensor::Device) -> bool {
    use burn::backend::DispatchDevice;
    match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        _ => false,
    }
}

/// Runs one of the core's async operations to completion. The core reads
/// tensors back asynchronously (the browser cannot block on the GPU); native
/// callers simply wait.
#[cfg(not(target_arch = "wasm32"))]
pub use pollster::block_on;
