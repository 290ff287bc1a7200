//! `native-runner train` and `native-runner cache`: a Dreambooth run from
//! the SimpleTuner-style configs, with progress bars, validation images,
//! checkpoints, metrics, a loss plot and a kohya LoRA.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use trainer_core::config;
use trainer_core::config::training::{ModelType, TrainingConfig};
use trainer_core::data::source::ImageSource;
use trainer_core::models::lora::LoraTargets;
use trainer_core::plan::{plan, Plan, PlanTarget};
use trainer_core::train::run_record::OutputUse;
use trainer_core::train::session::{Progress, Session, SessionOptions};
use trainer_core::train::storage::DiskStorage;
use trainer_core::error::{is_out_of_memory, MEMORY_ADVICE};
use trainer_core::{block_on, Error, Result};

use crate::folder::FolderSource;
use crate::plan_command::{env_lookup, read_text};
use crate::device::{load_model, pick};

#[derive(Args)]
pub struct TrainArgs {
    /// The training config: an env file (config.env, sdxl-env.sh), config.json or config.toml.
    #[arg(long)]
    config: String,
    /// Use this dataloader config instead of the one the training config names.
    #[arg(long)]
    dataloader_config: Option<String>,
    /// The base model (diffusers folder or single .safetensors file); overrides
    /// PRETRAINED_MODEL_NAME_OR_PATH / pretrained_model_name_or_path.
    #[arg(long)]
    model: Option<String>,
    /// For a single-file checkpoint: component configs from this diffusers folder.
    #[arg(long)]
    config_from: Option<String>,
    /// Overrides MAX_NUM_STEPS / max_train_steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// Overrides OUTPUT_DIR / output_dir.
    #[arg(long)]
    output_dir: Option<String>,
    /// Continue from a checkpoint: `latest` or a checkpoint folder.
    #[arg(long)]
    resume: Option<String>,
    /// The output folder holds an earlier run: move its outputs (all but the
    /// caches) to a previous-N folder inside it and start afresh.
    #[arg(long, conflicts_with = "resume")]
    start_over: bool,
    /// auto (a GPU when there is one, else the CPU backend), gpu (wgpu on
    /// the best adapter), cpu-gpu (wgpu on a CPU Vulkan adapter such as
    /// lavapipe) or cpu (burn's CPU backend).
    #[arg(long, default_value = "auto")]
    device: String,
    /// LoRA target layers: attention (to_q, to_k, to_v, to_out.0), all, or a
    /// comma-separated list of to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out.
    #[arg(long, default_value = "attention")]
    lora_targets: String,
    /// Name of the exported LoRA file (without .safetensors).
    #[arg(long, default_value = "burnbooth-lora")]
    output_name: String,
}

fn bar(template: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar
}

/// Configs with the command line's overrides applied.
fn load_configs(args: &TrainArgs) -> Result<(TrainingConfig, config::dataset::DataloaderConfig)> {
    let (mut training, dataloader) = config::load(&args.config, args.dataloader_config.as_deref(), &read_text, &env_lookup)?;
    if let Some(model) = &args.model {
        training.pretrained_model_name_or_path = Some(model.clone());
    }
    if let Some(steps) = args.max_steps {
        training.max_train_steps = Some(steps);
    }
    if let Some(dir) = &args.output_dir {
        training.output_dir = dir.clone();
    }
    Ok((training, dataloader))
}

/// Plans the run (this is where a dataset that cannot fill a batch is
/// caught, before any model is loaded) and opens each dataset's folder.
fn plan_run(training: &TrainingConfig, dataloader: &config::dataset::DataloaderConfig, target: PlanTarget) -> Result<(Plan, Vec<Box<dyn ImageSource>>)> {
    let progress = bar("{msg:>24} [{bar:30}] {pos}/{len} images ({per_sec}, {eta})");
    let open = |dataset: &config::dataset::ImageDatasetConfig| -> Result<Box<dyn ImageSource>> {
        Ok(Box::new(FolderSource::open(&dataset.id, &dataset.instance_data_dir)?))
    };
    let planned = plan(training, dataloader, &open, target, &mut |p| {
        progress.set_message(p.dataset.to_string());
        progress.set_length(p.total as u64);
        progress.set_position(p.done as u64);
    });
    progress.finish_and_clear();
    let planned = planned?;
    let mut sources: Vec<Box<dyn ImageSource>> = Vec::new();
    for dataset in &planned.datasets {
        let config = dataloader.datasets.iter().find(|d| d.id == dataset.id).expect("planned datasets come from the config");
        sources.push(open(config)?);
    }
    Ok((planned, sources))
}

fn summary(plan: &Plan) -> String {
    let images: usize = plan.datasets.iter().map(|d| d.images_used).sum();
    let skipped: usize = plan.datasets.iter().map(|d| d.skipped.len()).sum();
    let mut text = format!(
        "{} datasets, {images} images ({skipped} skipped), {} steps ({:?} stops training), {}; {}",
        plan.datasets.len(),
        plan.max_steps,
        plan.stops_on,
        plan.optimizer.note,
        plan.precision.note
    );
    for warning in &plan.warnings {
        text.push_str(&format!("\nwarning: {warning}"));
    }
    text
}

/// Sets the run up to the point where training can start.
fn open_session<'a>(args: &TrainArgs, storage: &'a DiskStorage) -> Result<Session<'a>> {
    let (training, dataloader) = load_configs(args)?;
    let lora_targets = LoraTargets::parse(&args.lora_targets).map_err(|message| Error::Config { source_name: "--lora-targets".into(), problems: vec![message] })?;
    let picked = pick(&args.device)?;
    eprintln!("{}", picked.reason);
    let device = picked.device.clone();
    let target = PlanTarget { has_bf16: picked.has_bf16(), has_f16: picked.stores_f16() };
    let (plan, sources) = plan_run(&training, &dataloader, target)?;
    eprintln!("plan: {}", summary(&plan));
    let model_path = training.pretrained_model_name_or_path.clone().ok_or_else(|| Error::Config {
        source_name: args.config.clone(),
        problems: vec!["no model: set PRETRAINED_MODEL_NAME_OR_PATH (pretrained_model_name_or_path) or pass --model".into()],
    })?;
    let loading = bar("{spinner} {msg}");
    loading.set_message(format!("loading {model_path}"));
    loading.enable_steady_tick(Duration::from_millis(120));
    let model = load_model(&model_path, args.config_from.as_deref(), &device, plan.precision.weight_dtypes(training.model_type));
    loading.finish_and_clear();
    let model = model?;
    eprintln!("model: {model_path} ({:?})", model.family);
    Session::new(training, plan, model, sources, storage, device, SessionOptions { lora_targets, ..Default::default() })
}

fn fill_caches(session: &mut Session<'_>) -> Result<()> {
    let progress = bar("{msg:>16} [{bar:30}] {pos}/{len} ({per_sec}, {eta})");
    let result = block_on(session.prepare_caches(&mut |p: Progress<'_>| {
        progress.set_message(p.phase.to_string());
        progress.set_length(p.total as u64);
        progress.set_position(p.done as u64);
    }));
    progress.finish_and_clear();
    result?;
    eprintln!("caches ready");
    Ok(())
}

pub fn run_cache(args: TrainArgs) -> Result<()> {
    let storage = DiskStorage;
    let mut session = open_session(&args, &storage)?;
    fill_caches(&mut session)
}

/// One run at a time per output folder: `.burnbooth.lock` in it holds the
/// process id of the run using it, and is removed when the run ends. A lock
/// whose process is gone (a killed run) is taken over.
struct OutputLock {
    path: std::path::PathBuf,
}

impl OutputLock {
    fn acquire(output_dir: &str) -> Result<Self> {
        let io = |e: std::io::Error| Error::Io { path: output_dir.to_string(), message: e.to_string() };
        std::fs::create_dir_all(output_dir).map_err(io)?;
        let path = std::path::Path::new(output_dir).join(".burnbooth.lock");
        loop {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut file) => {
                    std::io::Write::write_all(&mut file, std::process::id().to_string().as_bytes()).map_err(io)?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).ok().and_then(|text| text.trim().parse::<i32>().ok());
                    if let Some(pid) = holder.filter(|pid| process_exists(*pid)) {
                        return Err(Error::Config {
                            source_name: output_dir.to_string(),
                            problems: vec![format!("another run (process {pid}) is using this output folder; wait for it to end or give this run another OUTPUT_DIR")],
                        });
                    }
                    // Left by a run that was killed: take it over.
                    std::fs::remove_file(&path).map_err(io)?;
                }
                Err(e) => return Err(io(e)),
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn process_exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Ctrl-C (SIGINT) and SIGTERM (what `kill`, systemd and job schedulers
/// send) ask the loop to stop after the current step, saving a checkpoint.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for (signal, name) in [(libc::SIGINT, "Ctrl-C"), (libc::SIGTERM, "SIGTERM")] {
        let handler_flag = flag.clone();
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let registered = unsafe { signal_hook_registry::register(signal, move || handler_flag.store(true, Ordering::SeqCst)) };
        if registered.is_err() {
            eprintln!("warning: could not install the {name} handler; {name} will stop without a checkpoint");
        }
    }
    flag
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown panic".into())
}

pub fn run(args: TrainArgs) -> Result<()> {
    let storage = DiskStorage;
    let mut session = open_session(&args, &storage)?;
    if let Ok(delay) = std::env::var("BURNBOOTH_TEST_CHECKPOINT_PAUSE_MS") {
        // Tests kill the process while a checkpoint is half written.
        let delay = Duration::from_millis(delay.parse().unwrap_or(0));
        session.checkpoint_hook = Box::new(move || std::thread::sleep(delay));
    }
    let _lock = OutputLock::acquire(&session.config.output_dir)?;
    let resume = if args.start_over { None } else { args.resume.clone().or_else(|| session.config.resume_from_checkpoint.clone()) };
    let output_use = match (&resume, args.start_over) {
        (Some(_), _) => OutputUse::Resume,
        (None, true) => OutputUse::StartOver,
        (None, false) => OutputUse::New,
    };
    for note in session.begin(output_use, resume.as_deref())? {
        eprintln!("{note}");
    }
    fill_caches(&mut session)?;

    let interrupted = interrupt_flag();
    let total = session.total_steps();
    let progress = bar("train [{bar:30}] {pos}/{len} steps {msg} ({per_sec}, ETA {eta})");
    progress.set_length(total);
    progress.set_position(session.step);
    let started = Instant::now();
    let first_step = session.step;
    while !session.is_done() {
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| block_on(session.train_step())));
        let report = match step {
            Ok(Ok(report)) => report,
            Ok(Err(error)) => {
                progress.abandon();
                return Err(error);
            }
            Err(payload) => {
                progress.abandon();
                let message = panic_message(payload.as_ref());
                let message = if is_out_of_memory(&message) { format!("{MEMORY_ADVICE}. ({message})") } else { message };
                return Err(Error::Training { step: session.step + 1, message: format!("{message}; the last checkpoint is intact") });
            }
        };
        session.record(&report, started.elapsed().as_secs_f64())?;
        progress.set_position(report.step);
        progress.set_message(format!("loss {:.4} lr {:.2e}", report.loss, report.lr));
        if session.validation_due() {
            progress.suspend(|| validate(&mut session))?;
        }
        if session.checkpoint_due() && !session.is_done() {
            let path = block_on(session.save_checkpoint())?;
            progress.println(format!("checkpoint {path}"));
        }
        if interrupted.load(Ordering::SeqCst) {
            progress.abandon();
            let path = block_on(session.save_checkpoint())?;
            session.write_loss_plot()?;
            eprintln!("interrupted: saved {path}; continue with --resume latest");
            return Ok(());
        }
    }
    progress.finish_and_clear();
    let steps_run = session.step - first_step;
    if steps_run > 0 {
        eprintln!("trained {steps_run} steps in {:.1} s ({:.2} s/step)", started.elapsed().as_secs_f64(), started.elapsed().as_secs_f64() / steps_run as f64);
    }
    let checkpoint = block_on(session.save_checkpoint())?;
    eprintln!("checkpoint {checkpoint}");
    let plot = session.write_loss_plot()?;
    eprintln!("loss plot {plot}, metrics {}", session.output_path("metrics.jsonl"));
    match session.config.model_type {
        ModelType::Lora => {
            let path = block_on(session.export_lora(&args.output_name))?;
            eprintln!("LoRA (kohya format) {path}");
        }
        ModelType::Full => {
            let configs = source_configs(&session, &args)?;
            let (folder, single) = block_on(session.export_full(&args.output_name, configs.as_ref()))?;
            eprintln!("full fine-tune: diffusers folder {folder}");
            eprintln!("full fine-tune: single-file checkpoint {single}");
        }
    }
    Ok(())
}

fn validate(session: &mut Session<'_>) -> Result<()> {
    let progress = bar("validation [{bar:30}] {pos}/{len} steps");
    let result = block_on(session.validate(&mut |p| {
        progress.set_length(p.total as u64);
        progress.set_position(p.done as u64);
    }));
    progress.finish_and_clear();
    if let Some((path, _)) = result? {
        eprintln!("validation image {path}");
    }
    Ok(())
}

/// The config, tokenizer and scheduler files of the model's diffusers folder
/// (from `--config-from` for a single-file model), for the exported folder.
fn source_configs(session: &Session<'_>, args: &TrainArgs) -> Result<Option<std::collections::BTreeMap<String, String>>> {
    let model = session.config.pretrained_model_name_or_path.clone().unwrap_or_default();
    let folder = match &args.config_from {
        Some(folder) => std::path::PathBuf::from(folder),
        None if std::path::Path::new(&model).is_dir() => std::path::PathBuf::from(&model),
        None => return Ok(None),
    };
    let mut files = std::collections::BTreeMap::new();
    let mut names = vec!["model_index.json".to_string(), "unet/config.json".into(), "vae/config.json".into(), "scheduler/scheduler_config.json".into()];
    // SDXL's second encoder and tokenizer come along when the folder has them.
    for (encoder, tokenizer) in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")] {
        names.push(format!("{encoder}/config.json"));
        for file in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"] {
            names.push(format!("{tokenizer}/{file}"));
        }
    }
    for name in names {
        let path = folder.join(&name);
        if path.is_file() {
            files.insert(name, read_text(&path.display().to_string())?);
        }
    }
    Ok(Some(files))
}
