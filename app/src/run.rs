//! The training run in the tab: the run loop the native runner drives too
//! ([`run::run`]), with a yield to the browser between steps, so the page
//! stays responsive. Outputs go to memory and are mirrored to OPFS
//! after caching and at every checkpoint, so a closed tab resumes.

use std::cell::Cell;

use trainer_core::config::dataset::DataloaderConfig;
use trainer_core::config::training::{ModelType, TrainingConfig};
use trainer_core::pipeline::{png_with_parameters, to_rgb8, GenerateRequest};
use trainer_core::schedulers::SamplerKind;
use trainer_core::train::metrics::StepMetrics;
use trainer_core::train::run::{self, Control, RunEnd, RunHost, RunOptions, StepTiming};
use trainer_core::train::run_record::{self, OutputUse};
use trainer_core::train::session::{Session, SessionOptions, StepReport};
use trainer_core::train::{checkpoint, storage::Storage};

use crate::browser::{now_ms, opfs, sleep, try_lock};
use crate::protocol::FromWorker;
use crate::worker::post;
use crate::workspace::{self, storage};

/// The exported LoRA's name (the native runner's default).
pub const LORA_NAME: &str = run::default_export_name(ModelType::Lora);

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
    /// A [`prepare`] is under way; Train waits for it.
    static PREPARING: Cell<bool> = const { Cell::new(false) };
}

/// Whether a [`prepare`] is under way.
pub fn preparing() -> bool {
    PREPARING.with(Cell::get)
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

/// Free browser storage a run needs to start. A LoRA run's caches and
/// checkpoints fit in it; a run that needs more (a full fine-tune of a real
/// model) meets a quota error at a save, which stops it with the checkpoints
/// saved before kept and the unsaved files retried at the next save.
const STORAGE_HEADROOM_MB: f64 = 100.0;

/// The Web Lock a run holds on its output folder (tests/e2e/app.mjs takes it too).
pub fn output_lock_name(output_dir: &str) -> String {
    format!("burnbooth-output:{}", output_dir.trim_end_matches('/'))
}

/// Runs (or resumes) training until done or stopped; returns how it ended.
/// A folder with checkpoints resumes from the latest; one that holds an
/// earlier run without any moves it aside (previous-N, nothing is lost).
pub async fn train(view: RunView) -> Result<String, String> {
    if preparing() {
        // The discarded step compiles what this run's first step would.
        view.progress("finishing the GPU kernels' preparation", 0, 1);
        while preparing() {
            sleep(100).await;
        }
    }
    let started = now_ms();
    view.restore().await?;
    let (training, dataloader) = workspace::load_configs().map_err(|e| e.to_string())?;
    // One run per output folder across this browser's tabs (they share its storage).
    let Some(_lock) = try_lock(&output_lock_name(&training.output_dir)).await? else {
        return Err(format!("another tab of this browser is training into the output folder {}: stop it there or wait until it ends", training.output_dir));
    };
    view.note(opfs::prepare(STORAGE_HEADROOM_MB).await?);
    view.progress("loading the model", 0, 1);
    sleep(0).await;
    let output_dir = training.output_dir.clone();
    let mut session = open_session(training, &dataloader)?;
    view.note(format!("model loaded in {:.1} s", (now_ms() - started) / 1000.0));
    let has_checkpoints = !checkpoint::list(storage(), &output_dir).map_err(|e| e.to_string())?.is_empty();
    let output_use = if has_checkpoints {
        OutputUse::Resume
    } else if run_record::holds_a_run(storage(), &output_dir).map_err(|e| e.to_string())? {
        OutputUse::StartOver
    } else {
        OutputUse::New
    };
    let options = RunOptions {
        output_use,
        resume: has_checkpoints.then(|| "latest".to_string()),
        export_name: None,
        source_configs: workspace::with(|w| w.model.as_ref().and_then(|m| m.source_configs())),
    };
    let mut host = BrowserHost { view, output_dir, total: session.total_steps(), first_step: None };
    let end = run::run(&mut session, &mut host, &options).await;
    workspace::with(|w| w.session = Some(session));
    match end.map_err(|e| e.to_string())? {
        RunEnd::Finished { .. } => Ok("finished".to_string()),
        RunEnd::Stopped { step, .. } => Ok(format!("stopped at step {step}; Train continues from there")),
    }
}

/// The session for the worker's configs, the model loaded and the
/// adapters attached; nothing in the output folder touched yet.
fn open_session(training: TrainingConfig, dataloader: &DataloaderConfig) -> Result<Session<'static>, String> {
    let (plan, sources, masks) = workspace::plan_run(&training, dataloader).map_err(|e| e.to_string())?;
    let (model, device) = workspace::load_model(Some(plan.precision.weight_dtypes(training.model_type)))?;
    let mut session = Session::new(training, plan, model, sources, storage(), device, SessionOptions::default()).map_err(|e| e.to_string())?;
    session.set_mask_sources(masks).map_err(|e| e.to_string())?;
    Ok(session)
}

/// Gets the planned run ready before Train: fills the caches (Train reuses
/// them) and runs one training step in a session that is then dropped,
/// so that the step's GPU kernels are compiled (on WebGPU each pipeline is
/// compiled on the GPU process's one thread when first used: about 30 s of
/// the tiny model's first step on SwiftShader, DEVELOPERS.md). Nothing is
/// written to the output folder and nothing is saved to OPFS here. A Train
/// pressed during caching skips the step; during the step it waits.
pub async fn prepare(view: RunView) -> Result<(), String> {
    PREPARING.with(|p| p.set(true));
    let result = prepare_inner(&view).await;
    PREPARING.with(|p| p.set(false));
    result
}

async fn prepare_inner(view: &RunView) -> Result<(), String> {
    let started = now_ms();
    view.restore().await?;
    let (training, dataloader) = workspace::load_configs().map_err(|e| e.to_string())?;
    view.progress("preparing: loading the model", 0, 1);
    sleep(0).await;
    let output_dir = training.output_dir.clone();
    let mut session = open_session(training, &dataloader)?;
    let mut host = BrowserHost { view: RunView, output_dir, total: session.total_steps(), first_step: None };
    run::fill_caches(&mut session, &mut host).await.map_err(|e| e.to_string())?;
    if state() != RunState::Idle {
        // Train was pressed: it starts now, from these caches.
        return Ok(());
    }
    view.progress("preparing GPU kernels (one training step, discarded)", 0, 1);
    sleep(0).await;
    session.train_step().await.map_err(|e| e.to_string())?;
    let kernels = crate::gpu::kernels_created().map(|n| format!(" ({n} kernels)")).unwrap_or_default();
    view.note(format!(
        "GPU kernels ready in {:.1} s{kernels}: caches filled and one training step at the planned size compiled and discarded",
        (now_ms() - started) / 1000.0
    ));
    view.progress("ready to train", 1, 1);
    Ok(())
}

/// The page's view of a run: messages to the page, Pause/Stop read between
/// steps, outputs mirrored to OPFS whenever files were written.
struct BrowserHost {
    view: RunView,
    output_dir: String,
    total: u64,
    /// The step this visit's training began at.
    first_step: Option<u64>,
}

impl RunHost for BrowserHost {
    fn now(&self) -> f64 {
        now_ms() / 1000.0
    }

    fn note(&mut self, line: &str) {
        self.view.note(line);
    }

    fn progress(&mut self, phase: &str, done: u64, total: u64) {
        self.view.progress(phase, done, total);
    }

    fn history(&mut self, earlier: &[StepMetrics]) {
        post(&FromWorker::Losses(earlier.iter().map(|m| (m.step, m.loss)).collect()), Vec::new());
    }

    fn stepped(&mut self, report: &StepReport, timing: &StepTiming) {
        let first = *self.first_step.get_or_insert(report.step - 1);
        if report.step > first + 1 && report.step <= first + 5 {
            // The first steps compile kernels; these show when steps settle.
            self.view.note(format!("step {} took {:.1} s", report.step, timing.seconds));
        }
        let stats = format!(
            "step {}/{}  loss {:.4}  lr {:.2e}  {:.2} it/s  ETA {}",
            report.step,
            self.total,
            report.loss,
            report.lr,
            1.0 / timing.per_step,
            duration(timing.eta_seconds)
        );
        post(&FromWorker::Step { step: report.step, loss: report.loss, stats }, Vec::new());
        self.view.progress("training", report.step, self.total);
    }

    fn image_written(&mut self, path: &str, caption: &str) {
        match storage().read(path) {
            Ok(Some(bytes)) => post(&FromWorker::Validation { caption: caption.to_string() }, vec![bytes]),
            _ => self.view.note(format!("validation image {path} could not be read back")),
        }
    }

    fn comparison_at_each_validation(&self) -> bool {
        true
    }

    async fn saved(&mut self) -> trainer_core::Result<()> {
        sync(&self.view).await.map_err(|message| trainer_core::Error::Io { path: "the browser's storage (OPFS)".into(), message })?;
        self.view.refresh_outputs(&self.output_dir);
        Ok(())
    }

    async fn between_steps(&mut self, step: u64, total: u64) -> Control {
        self.total = total;
        loop {
            // Let Pause/Stop messages in.
            sleep(0).await;
            match state() {
                RunState::Stopping => return Control::Stop,
                RunState::Paused => {
                    self.view.progress("paused", step, total);
                    sleep(200).await;
                }
                _ => return Control::Continue,
            }
        }
    }
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
            let generated =
                model.generate(&request, None, &device, &mut |done, total| view.progress("sampling", done as u64, total as u64)).map_err(|e| e.to_string())?;
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
