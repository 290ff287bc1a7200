//! The page: pick a model, the configs and the photos, see the plan,
//! train a LoRA on WebGPU (in the worker) and download it.

mod chart;
mod panels;
mod ui;

use burnbooth_app::protocol::ToWorker;
use leptos::prelude::*;

use panels::{ConfigPanel, DatasetsPanel, ModelPanel, PlanPanel, ToolsPanel, TrainPanel};
use ui::{send, start_worker, Ui};

fn main() {
    burnbooth_app::run_static_constructors();
    // Panics become readable console errors (and the page's error banner,
    // see index.html) instead of a bare `unreachable`.
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

#[component]
fn App() -> impl IntoView {
    let ui = Ui::new();
    if let Err(e) = start_worker(ui) {
        ui.run.error.set(Some(format!("could not start the training worker: {e}")));
    }

    view! {
        <header>
            <div class="brand"><span class="logo">"◆"</span>" Burnbooth"</div>
            <div class="tagline">"Teach Stable Diffusion your subject, in this tab, on your GPU."</div>
            <div id="gpu-status" class="pill" class:ok=move || ui.gpu_ok.get() == Some(true) class:bad=move || ui.gpu_ok.get() == Some(false)>
                {move || ui.gpu.get()}
            </div>
        </header>
        <Show when=move || ui.gpu_ok.get() == Some(false)>
            <div class="card warn">
                <p>"Without WebGPU you can still try Burnbooth on the CPU (hundreds of times slower)."</p>
                <button on:click=move |_| send(&ToWorker::Device { cpu: true }, Vec::new())>"Use the CPU instead"</button>
            </div>
        </Show>
        <div id="error" class="banner" class:hidden=move || ui.run.error.get().is_none()>
            {move || ui.run.error.get().unwrap_or_default()}
        </div>
        <main>
            <ModelPanel ui=ui />
            <ConfigPanel ui=ui />
            <DatasetsPanel ui=ui />
            <PlanPanel ui=ui />
            <TrainPanel ui=ui />
            <ToolsPanel ui=ui />
        </main>
        <footer>{move || ui.run.saved.get()}</footer>
    }
}
