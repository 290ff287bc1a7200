//! The training run in the tab: the same [`Session`] as the native runner,
//! driven step by step with a yield to the browser between steps, so the
//! page stays responsive. Outputs go to memory and are mirrored to OPFS
//! after caching and at every checkpoint, so a closed tab resumes.

use std::cell::Cell;

use trainer_core::config::training::ModelType;
use trainer_core::pipeline::{png_with_parameters, to_rgb8, GenerateRequest};
use trainer_core::schedulers::SamplerKind;
use trainer_core::train::checkpoint;
use trainer_core::train::session::{Session, SessionOptions};
use trainer_core::train::storage::Storage;

use crate::browser::{now_ms, opfs, sleep};
use crate::protocol::FromWorker;
use crate::workspace::{self, storage};
use crate::worker::post;

/// The name of the exported LoRA (as the native runner's default).
pub const LORA_NAME: &str = "burnbooth-lora";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Idle,
    Running,
    Paused,
    Stopping,
}

thread_local! {
    /// Set by the page's Pause/Resume/Stop messages, read between steps.
    static STATE: Cell<RunState> = const { Cell::new(RunState::Idle) };
}

pub fn state() -> RunState {
    STATE.with(Cell::get)
}

pub fn set_state(state: RunState) {
    STATE.with(|s| s.set(state));
}

/// Tells the page about the run (the worker posts messages).
#[derive(Clone, Copy)]
pub struct RunView;

impl RunView {
    pub fn note(&self, line: impl Into<String>) {
        post(&FromWorker::Note(line.into()), Vec::new());
    }

    pub fn progress(&self, phase: &str, done: u64, total: u64) {
        post(&FromWorker::Progress { phase: phase.to_string(), done, total }, Vec::new());
    }

    /// Lists the run's files (not the caches) for download.
    pub fn refresh_outputs(&self, output_dir: &str) {
        let prefix = format!("{}/", output_dir.trim_end_matches('/'));
        let mut files: Vec<String> = storage().paths().into_iter().filter(|p| p.starts_with(&prefix) && !p.contains("/cache/")).collect();
        // The LoRA first, then the rest by name.
        files.sort_by_key(|p| (!p.ends_with(&format!("{LORA_NAME}.safetensors")), p.clone()));
        post(&FromWorker::Outputs(files), Vec::new());
    }

    /// Reads what earlier visits saved in OPFS, once per worker.
    pub async fn restore(&self) -> Result<(), String> {
        if workspace::with(|w| w.restored) {
            return Ok(());
        }
        opfs::load_into(storage()).await?;
        workspace::with(|w| w.restored = true);
        saved_summary();
        Ok(())
    }
}

/// Tells the page what the browser's storage holds.
fn saved_summary() {
    let paths = storage().paths();
    let checkpoints = paths.iter().filter(|p| p.ends_with("/state.json") && p.contains("/checkpoints/checkpoint-")).count();
    let caches = paths.iter().filter(|p| p.contains("/cache/")).count();
    post(&FromWorker::Saved(format!("Saved in this browser: {} files ({checkpoints} checkpoint(s), {caches} cache entries)", paths.len())), Vec::new());
}

async fn sync(view: &RunView) -> Result<(), String> {
    let written = opfs::sync(storage()).await?;
    if written > 0 {
        view.note(format!("saved {written} file(s) to the browser's storage"));
        saved_summary();
    }
    Ok(())
}

/// Runs (or resumes) training until done or stopped; returns how it ended.
pub async fn train(view: RunView) -> Result<String, String> {
    let started = now_ms();
    view.restore().await?;
    let (training, dataloader) = workspace::load_configs().map_err(|e| e.to_string())?;
    let (plan, sources) = workspace::plan_run(&training, &dataloader).map_err(|e| e.to_string())?;
    view.progress("loading the model", 0, 1);
    sleep(0).await;
    let (model, device) = workspace::load_model(Some(plan.precision.weight_dtypes(training.model_type)))?;
    let output_dir = training.output_dir.clone();
    let mut session = Session::new(training, plan, model, sources, storage(), device, SessionOptions::default()).map_err(|e| e.to_string())?;
    if !checkpoint::list(storage(), &output_dir).map_err(|e| e.to_string())?.is_empty() {
        let path = session.resume("latest").map_err(|e| e.to_string())?;
        post(&FromWorker::Losses(session.metrics.iter().map(|m| (m.step, m.loss)).collect()), Vec::new());
        view.note(format!("resumed from {path} at step {}", session.step));
    }
    view.note(format!("model loaded in {:.1} s", (now_ms() - started) / 1000.0));

    let caching = now_ms();
    let mut computed = (0, 0);
    session
        .prepare_caches(&mut |p| {
            view.progress(&format!("caching {}", p.phase), p.done as u64, p.total as u64);
            if p.phase == "latents" {
                computed.0 = p.computed;
            } else {
                computed.1 = p.computed;
            }
        })
        .await
        .map_err(|e| e.to_string())?;
    view.note(format!("caches ready in {:.1} s: {} latent(s) and {} text embedding(s) computed, the rest reused", (now_ms() - caching) / 1000.0, computed.0, computed.1));
    sync(&view).await?;

    let total = session.total_steps();
    let first_step = session.step;
    let loop_started = now_ms();
    while !session.is_done() {
        match state() {
            RunState::Stopping => break,
            RunState::Paused => {
                view.progress("paused", session.step, total);
                sleep(200).await;
                continue;
            }
            _ => {}
        }
        let step_started = now_ms();
        let report = session.train_step().await.map_err(|e| e.to_string())?;
        let seconds = (now_ms() - step_started) / 1000.0;
        if report.step == first_step + 1 {
            view.note(format!("first step took {seconds:.1} s ({:.1} s after pressing Train)", (now_ms() - started) / 1000.0));
        } else if report.step <= first_step + 5 {
            // The first steps compile kernels; these show when steps settle.
            view.note(format!("step {} took {seconds:.1} s", report.step));
        }
        session.record(&report, (now_ms() - loop_started) / 1000.0).map_err(|e| e.to_string())?;
        let done = report.step - first_step;
        let per_step = (now_ms() - loop_started) / 1000.0 / done as f64;
        let eta = per_step * (total - report.step) as f64;
        let stats = format!("step {}/{total}  loss {:.4}  lr {:.2e}  {:.2} it/s  ETA {}", report.step, report.loss, report.lr, 1.0 / per_step, duration(eta));
        post(&FromWorker::Step { step: report.step, loss: report.loss, stats }, Vec::new());
        view.progress("training", report.step, total);
        if session.validation_due() {
            validate(&view, &mut session).await?;
        }
        if session.checkpoint_due() && !session.is_done() {
            let path = session.save_checkpoint().await.map_err(|e| e.to_string())?;
            session.write_loss_plot().map_err(|e| e.to_string())?;
            view.note(format!("checkpoint {path}"));
            sync(&view).await?;
            view.refresh_outputs(&output_dir);
        }
        // Let Pause/Stop messages in.
        sleep(0).await;
    }
    let path = session.save_checkpoint().await.map_err(|e| e.to_string())?;
    view.note(format!("checkpoint {path}"));
    session.write_loss_plot().map_err(|e| e.to_string())?;
    let phase = if session.is_done() {
        if session.config.model_type == ModelType::Lora {
            let lora = session.export_lora(LORA_NAME).await.map_err(|e| e.to_string())?;
            view.note(format!("LoRA (kohya format) {lora}"));
        }
        "finished".to_string()
    } else {
        format!("stopped at step {}; Train continues from there", session.step)
    };
    sync(&view).await?;
    view.refresh_outputs(&output_dir);
    workspace::with(|w| w.session = Some(session));
    Ok(phase)
}

async fn validate(view: &RunView, session: &mut Session<'static>) -> Result<(), String> {
    let result = session.validate(&mut |p| view.progress("validation sampling", p.done as u64, p.total as u64)).await.map_err(|e| e.to_string())?;
    if let Some((path, _)) = result {
        let bytes = storage().read(&path).map_err(|e| e.to_string())?.ok_or("validation image vanished")?;
        view.note(format!("validation image {path}"));
        post(&FromWorker::Validation { caption: format!("step {}", session.step) }, vec![bytes]);
    }
    Ok(())
}

/// Generates an image with the trained weights (or the base model when
/// `with_lora` is off or nothing was trained yet); returns a PNG.
pub async fn sample(view: RunView, request: GenerateRequest, with_lora: bool) -> Result<Vec<u8>, String> {
    let mut session = workspace::with(|w| w.session.take());
    let result = match session.as_mut() {
        Some(session) => {
            let image = session.sample_with(&request, with_lora, &mut |p| view.progress("sampling", p.done as u64, p.total as u64)).await;
            image.map_err(|e| e.to_string())
        }
        None => {
            let (model, device) = workspace::load_model(None)?;
            let generated = model
                .generate(&request, None, &device, &mut |done, total| view.progress("sampling", done as u64, total as u64))
                .map_err(|e| e.to_string())?;
            to_rgb8(generated.image).await.map_err(|e| e.to_string())
        }
    };
    if let Some(session) = session {
        workspace::with(|w| w.session = Some(session));
    }
    let image = result?;
    let parameters = trainer_core::pipeline::a1111_parameters(&request, "burnbooth", &[("LoRA", with_lora.to_string())]);
    png_with_parameters(&image, &parameters).map_err(|e| e.to_string())
}

pub fn request(prompt: String, steps: usize, seed: u64, size: usize) -> GenerateRequest {
    GenerateRequest { prompt, negative_prompt: String::new(), steps, guidance: 7.5, sampler: SamplerKind::DpmPp2m, seed, width: size, height: size }
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}
