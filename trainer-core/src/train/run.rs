//! The run loop, one for both hosts: ready the output folder (new run,
//! resume or start over), fill the caches, then step, record metrics,
//! validate, checkpoint and, at the end, export. The native runner and the
//! browser worker drive it through [`RunHost`]; they differ only in how
//! they show progress, how they are asked to pause or stop, and what they
//! do after files were written (the browser mirrors them to its storage).

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::metrics::StepMetrics;
use super::run_record::OutputUse;
use super::session::{Progress, Session, StepReport};
use crate::config::training::ModelType;
use crate::error::{is_out_of_memory, Error, Result, MEMORY_ADVICE};

/// What the host wants after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop after saving a checkpoint (Ctrl-C, SIGTERM, the page's Stop).
    Stop,
}

/// How long steps take, for progress displays.
#[derive(Debug, Clone, Copy)]
pub struct StepTiming {
    /// This step.
    pub seconds: f64,
    /// The mean over this run's steps so far.
    pub per_step: f64,
    /// Time left at that pace.
    pub eta_seconds: f64,
}

/// The host of a run: the command line or the browser worker.
pub trait RunHost {
    /// Seconds on a monotonic clock (the browser has no `Instant`).
    fn now(&self) -> f64;
    /// A line for the user.
    fn note(&mut self, line: &str);
    /// Progress of a phase: "caching latents", "caching text embeddings",
    /// "validation sampling".
    fn progress(&mut self, phase: &str, done: u64, total: u64);
    /// The steps an earlier run recorded, when this one resumes it (for a
    /// loss plot); called once, before caching.
    fn history(&mut self, _earlier: &[StepMetrics]) {}
    /// A step finished and was recorded in the metrics.
    fn stepped(&mut self, report: &StepReport, timing: &StepTiming);
    /// An image for the user was written to `path`: a validation image or
    /// the before/after comparison; `caption` says which.
    fn image_written(&mut self, path: &str, caption: &str);
    /// Whether a before/after grid follows every validation, not only the
    /// run's end: the page shows each in its gallery, so a user watching
    /// sees the subject arrive; a terminal run looks at the files at the end.
    fn comparison_at_each_validation(&self) -> bool {
        false
    }
    /// Files in the output folder changed (after caching, at checkpoints, at
    /// the end): the browser mirrors them to its persistent storage.
    fn saved(&mut self) -> impl Future<Output = Result<()>>;
    /// Between steps: wait here while paused; [`Control::Stop`] ends the run
    /// with a checkpoint. The browser yields to its event loop here.
    fn between_steps(&mut self, step: u64, total: u64) -> impl Future<Output = Control>;
}

/// How a run uses its output folder and what it exports.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub output_use: OutputUse,
    /// `latest` or a checkpoint folder, with [`OutputUse::Resume`].
    pub resume: Option<String>,
    /// The exported LoRA's or full model's name (no extension); `None`:
    /// [`default_export_name`].
    pub export_name: Option<String>,
    /// For a full fine-tune's diffusers folder: the base model's config,
    /// tokenizer and scheduler files by path in its folder; `None` uses the
    /// family's published configs.
    pub source_configs: Option<BTreeMap<String, String>>,
}

/// The name exports get unless the user names them: `burnbooth-lora`
/// (`.safetensors`) for a LoRA, `burnbooth-model` (a diffusers folder and a
/// single file) for a full fine-tune.
pub const fn default_export_name(model_type: ModelType) -> &'static str {
    match model_type {
        ModelType::Lora => "burnbooth-lora",
        ModelType::Full => "burnbooth-model",
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Every step ran: the exports' paths, and the before/after grid's
    /// (a run that wrote a validation image; a full fine-tune only when it
    /// sampled its base tiles before training, not when resumed).
    Finished { exports: Vec<String>, comparison: Option<String> },
    /// Stopped by the host at `step`, with a checkpoint to resume from.
    Stopped { step: u64, checkpoint: String },
}

/// Runs (or resumes) training until done or stopped.
pub async fn run(session: &mut Session<'_>, host: &mut impl RunHost, options: &RunOptions) -> Result<RunEnd> {
    let started = host.now();
    for note in session.begin(options.output_use, options.resume.as_deref())? {
        host.note(&note);
    }
    host.history(&session.metrics);
    fill_caches(session, host).await?;
    host.saved().await?;
    // The before/after grid comes with validation: only a run that validated samples it.
    let mut validated = false;
    // The step of the last grid sampled after a validation, and its path.
    let mut grid: Option<(u64, String)> = None;
    if session.config.validation_on_startup && session.step == 0 {
        // The base model's image at step 0 (SimpleTuner's validation_on_startup).
        validated = validate(session, host).await?;
    }
    if session.sample_base_tiles(&mut |p| host.progress("comparison sampling (base model)", p.done as u64, p.total as u64)).await? {
        host.note("sampled the base model's comparison tiles (a full fine-tune overwrites its weights)");
    }

    let total = session.total_steps();
    let first_step = session.step;
    let loop_started = host.now();
    while !session.is_done() {
        if host.between_steps(session.step, total).await == Control::Stop {
            let checkpoint = session.save_checkpoint().await?;
            session.write_loss_plot()?;
            host.saved().await?;
            return Ok(RunEnd::Stopped { step: session.step, checkpoint });
        }
        let step_started = host.now();
        let mut report = guarded_step(session).await?;
        if session.eval_due() {
            report.eval_loss = session.evaluate().await?;
            if let Some(loss) = report.eval_loss {
                host.note(&format!("validation loss at step {}: {loss:.5} (held-out images; the training loss was {:.5})", report.step, report.loss));
            }
        }
        let now = host.now();
        session.record(&report, now - loop_started)?;
        if report.step == first_step + 1 {
            // Mostly kernel compilation on a GPU: worth knowing apart from the steady pace.
            host.note(&format!("first step took {:.1} s ({:.1} s after the run began)", now - step_started, now - started));
        }
        let per_step = (now - loop_started) / (report.step - first_step) as f64;
        let timing = StepTiming { seconds: now - step_started, per_step, eta_seconds: per_step * (total - report.step) as f64 };
        host.stepped(&report, &timing);
        if session.validation_due() && validate(session, host).await? {
            validated = true;
            if host.comparison_at_each_validation() {
                grid = compare(session, host).await?.map(|path| (session.step, path));
            }
        }
        if session.checkpoint_due() && !session.is_done() {
            let path = session.save_checkpoint().await?;
            session.write_loss_plot()?;
            host.note(&format!("checkpoint {path}"));
            host.saved().await?;
        }
    }
    let steps_run = session.step - first_step;
    if steps_run > 0 {
        let seconds = host.now() - loop_started;
        host.note(&format!("trained {steps_run} steps in {seconds:.1} s ({:.2} s/step)", seconds / steps_run as f64));
    }
    let checkpoint = session.save_checkpoint().await?;
    host.note(&format!("checkpoint {checkpoint}"));
    let plot = session.write_loss_plot()?;
    host.note(&format!("loss plot {plot}, metrics {}", session.output_path("metrics.jsonl")));
    let name = options.export_name.as_deref().unwrap_or(default_export_name(session.config.model_type));
    let exports = match session.config.model_type {
        ModelType::Lora => {
            let path = session.export_lora(name).await?;
            host.note(&format!("LoRA (kohya format) {path}"));
            let mut paths = vec![path];
            if let Some(ema) = session.export_lora_ema(name).await? {
                host.note(&format!("LoRA of the EMA weights (use_ema) {ema}"));
                paths.push(ema);
            }
            paths
        }
        ModelType::Full => {
            if session.config.ema.is_some() {
                host.note("the full fine-tune is exported with its EMA weights (use_ema), as SimpleTuner does");
            }
            let (folder, single) = session.export_full(name, options.source_configs.as_ref()).await?;
            host.note(&format!("full fine-tune: diffusers folder {folder}"));
            host.note(&format!("full fine-tune: single-file checkpoint {single}"));
            vec![folder, single]
        }
    };
    let comparison = match grid {
        // The last validation's grid shows these weights already.
        Some((step, path)) if step == session.step => Some(path),
        _ if validated => compare(session, host).await?,
        _ => None,
    };
    host.saved().await?;
    Ok(RunEnd::Finished { exports, comparison })
}

/// Samples the before/after grid of the weights as they are and shows it;
/// returns its path (`None` where there is no grid: a resumed full fine-tune).
async fn compare(session: &mut Session<'_>, host: &mut impl RunHost) -> Result<Option<String>> {
    let grid = session.comparison(&mut |p| host.progress("comparison sampling", p.done as u64, p.total as u64)).await?;
    let Some((path, _)) = grid else { return Ok(None) };
    host.note(&format!("comparison grid {path}: base model left, trained right, same seed; rows: validation prompt, class prompt"));
    host.image_written(&path, &format!("base model | trained (step {})", session.step));
    Ok(Some(path))
}

pub async fn fill_caches(session: &mut Session<'_>, host: &mut impl RunHost) -> Result<()> {
    let started = host.now();
    let mut computed = (0, 0);
    session
        .prepare_caches(&mut |p: Progress<'_>| {
            let phase = if p.phase == "masks" { "loss masks".to_string() } else { format!("caching {}", p.phase) };
            host.progress(&phase, p.done as u64, p.total as u64);
            match p.phase {
                "latents" => computed.0 = p.computed,
                "text embeddings" => computed.1 = p.computed,
                _ => {}
            }
        })
        .await?;
    host.note(&format!(
        "caches ready in {:.1} s: {} latent(s) and {} text embedding(s) computed, the rest reused",
        host.now() - started,
        computed.0,
        computed.1
    ));
    Ok(())
}

/// Writes the validation images (when there is a validation prompt); returns whether it did.
async fn validate(session: &mut Session<'_>, host: &mut impl RunHost) -> Result<bool> {
    let written = session.validate(&mut |p| host.progress("validation sampling", p.done as u64, p.total as u64)).await?;
    for image in &written {
        host.note(&format!("validation image {}", image.path));
        host.image_written(&image.path, &image.caption);
    }
    Ok(!written.is_empty())
}

/// One step, with a panic inside burn or the device (natively: an
/// allocation failure is a panic) turned into an error that names the step
/// and, when memory ran out, says what to change. On wasm32 panics abort,
/// so there this only passes the step's result on.
async fn guarded_step(session: &mut Session<'_>) -> Result<StepReport> {
    let step = session.step + 1;
    match CatchPanic(Box::pin(session.train_step())).await {
        Ok(result) => result,
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            let message = if is_out_of_memory(&message) { format!("{MEMORY_ADVICE}. ({message})") } else { message };
            Err(Error::Training { step, message: format!("{message}; the last checkpoint is intact") })
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()));
    text.unwrap_or_else(|| "unknown panic".into())
}

/// A future whose panics come back as `Err` (what `catch_unwind` does for
/// a closure).
struct CatchPanic<F: Future>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}
