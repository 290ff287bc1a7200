//! Training: caches, noise and loss, LoRA, the optimizer, the EMA, checkpoints,
//! validation, metrics and exports. [`session::Session`] holds a run's state;
//! [`run::run`] is the loop both hosts drive.

pub mod cache;
pub mod checkpoint;
pub mod ema;
pub mod export;
pub mod full_export;
pub mod metrics;
pub mod noise;
pub mod optimizer;
pub mod recompute;
pub mod run;
pub mod run_record;
pub mod session;
pub mod storage;
pub mod tensor_file;
