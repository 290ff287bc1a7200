//! The browser app's entry point. For now a landing page that links the
//! shared core into the wasm build (so the browser build is checked in CI);
//! training in the tab is being built (see the README).

use leptos::prelude::*;

fn main() {
    // Panics become readable console errors instead of `unreachable`.
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(App);
}

#[component]
fn App() -> impl IntoView {
    let vocabulary = trainer_core::models::tokenizer::ClipTokenizer::standard(trainer_core::models::tokenizer::END_OF_TEXT)
        .map(|t| format!("{} tokens", t.vocab_size()))
        .unwrap_or_else(|e| format!("error: {e}"));
    view! {
        <main>
            <h1>"Burnbooth"</h1>
            <p>"Dreambooth training for Stable Diffusion, in your browser on WebGPU."</p>
            <p>"The in-browser trainer is under construction. The native runner already plans datasets and samples images; see the README."</p>
            <p class="status">"Core linked; bundled CLIP vocabulary: " {vocabulary}</p>
        </main>
    }
}
