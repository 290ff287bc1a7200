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

/// Runs the module's static constructors; call it once, first in `main`.
///
/// cubecl registers its IR dialects from static constructors (`inventory`).
/// When nothing in a module calls `__wasm_call_ctors`, wasm-ld takes it for
/// a command, entered once, and runs every constructor again at the top of
/// every export: each call from JavaScript into wasm (every WebGPU object
/// handed to wasm is one) ran all of them, about half the worker's time in
/// a training step. Calling it here makes the linker leave the exports
/// alone (DEVELOPERS.md, "Headless Chromium").
pub fn run_static_constructors() {
    #[cfg(target_family = "wasm")]
    {
        extern "C" {
            fn __wasm_call_ctors();
        }
        // SAFETY: wasm-ld's own function; called once, before anything
        // reads what the constructors register.
        unsafe { __wasm_call_ctors() }
    }
}

/// How many times the module's static constructors have run, counted by
/// one of them: 1 after [`run_static_constructors`], more if the linker
/// went back to running them at every export (the self-test checks).
pub fn static_constructor_runs() -> u32 {
    constructor_count::RUNS.load(std::sync::atomic::Ordering::Relaxed)
}

mod constructor_count {
    use std::sync::atomic::{AtomicU32, Ordering};

    pub static RUNS: AtomicU32 = AtomicU32::new(0);

    extern "C" fn count() {
        RUNS.fetch_add(1, Ordering::Relaxed);
    }

    // The same mechanism `inventory` uses: wasm-ld calls every function
    // in `.init_array` from `__wasm_call_ctors`.
    #[cfg(target_family = "wasm")]
    #[used]
    #[link_section = ".init_array"]
    static COUNT: extern "C" fn() = count;
}
