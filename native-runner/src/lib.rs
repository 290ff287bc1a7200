//! The native runner's pieces, shared by its binaries and tests.

pub mod bench;
pub mod device;
pub mod folder;
pub mod plan_command;
pub mod sample_command;
pub mod tools_command;
pub mod train_command;

/// mimalloc for every binary and test of the runner. With glibc's malloc a
/// training step spent a quarter of its time in page faults: tensors above
/// its mmap threshold are mapped fresh and unmapped on free, so every
/// activation of every step was zero-filled by the kernel again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's `mi_option_set` (linked through the mimalloc crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Turns off Mesa's Vulkan device-select layer on machines without a
/// display session (no `XDG_RUNTIME_DIR`): to order GPUs it asks the
/// Wayland compositor, and without one libwayland prints "XDG_RUNTIME_DIR
/// is invalid or not set" each time a Vulkan instance is made. Burnbooth
/// picks the adapter itself (`device.rs`), so the layer adds nothing.
/// Honours a `NODEVICE_SELECT` the user set. Call first thing in `main`,
/// before any thread starts.
pub fn quiet_headless_vulkan() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() && std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// Runs `work` as a task of a rayon pool of its own (a thread per core;
/// `RAYON_NUM_THREADS` is respected) and returns its result. The CPU
/// backend's kernels split their work with rayon: called from a thread
/// outside the pool, every parallel section is handed to the pool while
/// the caller sleeps, a wake-up each time and three threads on two cores.
/// Inside the pool the caller is one of the workers (DEVELOPERS.md, "Speed
/// on the CPU backend"). Call it around the whole of `main`.
pub fn on_compute_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(work),
        // No threads to be had: run here, as before.
        Err(_) => work(),
    }
}

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (index 15 in v2
/// and v3; the Rust bindings do not name it).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Keeps freed memory for reuse instead of returning it to the OS 10 ms
/// later (mimalloc's default), which brought the page faults back between
/// a step's forward and backward passes. A training process holds its peak
/// anyway, as PyTorch's caching allocator does. Call first thing in `main`.
pub fn keep_freed_memory() {
    // SAFETY: setting an option is allowed at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
