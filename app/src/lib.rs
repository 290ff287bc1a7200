//! Burnbooth in the browser. Two wasm programs share this library: the page
//! (`main.rs`: the Leptos UI, configs and the plan) and the training worker
//! (`worker_main.rs`: the model, the run and the browser's storage). All
//! training code is trainer-core's, the same as the native runner's.

pub mod browser;
pub mod gpu;
pub mod model;
pub mod protocol;
pub mod run;
pub mod worker;
pub mod workspace;
