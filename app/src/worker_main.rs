//! The training worker's entry point (see `worker.rs`).

fn main() {
    burnbooth_app::run_static_constructors();
    console_error_panic_hook::set_once();
    burnbooth_app::worker::start();
}
