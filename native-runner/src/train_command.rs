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
use trainer_core::train::run::{self, Control, RunEnd, RunHost, RunOptions, StepTiming};
use trainer_core::train::run_record::OutputUse;
use trainer_core::train::session::{Session, SessionOptions, StepReport};
use trainer_core::train::storage::DiskStorage;
use trainer_core::{block_on, Error, Result};

use crate::device::{load_model, pick};
use crate::folder::FolderSource;
use crate::plan_command::{env_lookup, read_text};

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
    /// Name of the exports (without .safetensors): burnbooth-lora for a
    /// LoRA, burnbooth-model for a full fine-tune unless given.
    #[arg(long)]
    output_name: Option<String>,
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
fn plan_run(training: &TrainingConfig, dataloader: &config::dataset::DataloaderConfig, target: PlanTarget) -> Result<(Plan, ImageSources, MaskSources)> {
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
    let masks = trainer_core::plan::open_mask_sources(&planned, dataloader, &open)?;
    Ok((planned, sources, masks))
}

/// Each planned dataset's folder.
type ImageSources = Vec<Box<dyn ImageSource>>;
/// Each planned dataset's mask folder, when it has masks.
type MaskSources = Vec<Option<Box<dyn ImageSource>>>;

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
    let lora_targets =
        LoraTargets::parse(&args.lora_targets).map_err(|message| Error::Config { source_name: "--lora-targets".into(), problems: vec![message] })?;
    let picked = pick(&args.device)?;
    eprintln!("{}", picked.reason);
    let device = picked.device.clone();
    let target = PlanTarget { has_bf16: picked.has_bf16(), has_f16: picked.stores_f16() };
    let (plan, sources, masks) = plan_run(&training, &dataloader, target)?;
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
    let mut session = Session::new(training, plan, model, sources, storage, device, SessionOptions { lora_targets })?;
    session.set_mask_sources(masks)?;
    Ok(session)
}

pub fn run_cache(args: TrainArgs) -> Result<()> {
    let storage = DiskStorage;
    let mut session = open_session(&args, &storage)?;
    let mut host = CliHost::default();
    block_on(run::fill_caches(&mut session, &mut host))
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
                            problems: vec![format!(
                                "another run (process {pid}) is using this output folder; wait for it to end or give this run another OUTPUT_DIR"
                            )],
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
/// send) ask the loop to stop after the current step, saving a checkpoint;
/// the handler says so at once, since the step may be followed by minutes
/// of validation sampling. A second signal ends the process there:
/// checkpoints and exports are written to temporary names and renamed, so
/// only the steps since the last checkpoint are lost.
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    for (signal, name) in [(libc::SIGINT, "Ctrl-C"), (libc::SIGTERM, "SIGTERM")] {
        let handler_flag = flag.clone();
        let handler = move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(128 + signal) };
            }
            let message = b"\nstopping: a checkpoint is saved once the step or image under way is done; Ctrl-C again quits at once\n";
            // SAFETY: write(2) to stderr is async-signal-safe; the buffer is static.
            let _ = unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
        };
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
        let registered = unsafe { signal_hook_registry::register(signal, handler) };
        if registered.is_err() {
            eprintln!("warning: could not install the {name} handler; {name} will stop without a checkpoint");
        }
    }
    flag
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
    let source_configs = match session.config.model_type {
        ModelType::Full => source_configs(&session, &args)?,
        ModelType::Lora => None,
    };
    let options = RunOptions { output_use, resume, export_name: args.output_name.clone(), source_configs };
    let mut host = CliHost::default();
    let end = block_on(run::run(&mut session, &mut host, &options));
    host.clear();
    match end? {
        RunEnd::Stopped { checkpoint, .. } => eprintln!("interrupted: saved {checkpoint}; continue with --resume latest"),
        RunEnd::Finished { exports, comparison } => where_to_look(&session, &exports, comparison.as_deref()),
    }
    Ok(())
}

/// The run's last lines: what to look at and how to use what it made.
fn where_to_look(session: &Session<'_>, exports: &[String], comparison: Option<&str>) {
    let config = &session.config;
    eprintln!("\nLook at:");
    if let Some(grid) = comparison {
        eprintln!("  {grid}: the base model (left) and the trained weights (right) from the same seed");
    }
    eprintln!("  {}: the loss by step; {}/: the validation images", session.output_path("loss.png"), session.output_path("validation"));
    // The validation settings, so that the command draws the grid's trained picture.
    let request = session.validation_request(config.validation_prompt.clone().unwrap_or_else(|| "a photo of sks dog".into()));
    let negative = match request.negative_prompt.as_str() {
        "" => String::new(),
        text => format!(" --negative-prompt \"{text}\""),
    };
    let settings = format!(
        "--prompt \"{}\"{negative} --width {} --height {} --steps {} --guidance {} --sampler {} --seed {} --out sample.png",
        request.prompt,
        request.width,
        request.height,
        request.steps,
        request.guidance,
        request.sampler.name(),
        request.seed
    );
    match (config.model_type, exports.first()) {
        (ModelType::Lora, Some(lora)) => {
            let model = config.pretrained_model_name_or_path.as_deref().unwrap_or("<the base model>");
            eprintln!("Use the LoRA: native-runner sample --model {model} --lora {lora} {settings}");
            eprintln!("  ComfyUI, A1111 and Forge load it as it is: put it in their models/Lora folder.");
        }
        (ModelType::Full, Some(folder)) => {
            eprintln!("Use the model: native-runner sample --model {folder} {settings}");
            eprintln!("  The single file {folder}.safetensors loads in ComfyUI, A1111 and Forge as a checkpoint.");
        }
        (_, None) => {}
    }
}

/// The terminal's view of a run: one progress bar for the phase under way
/// (caching, training, validation sampling) and notes printed above it.
struct CliHost {
    clock: Instant,
    bar: Option<(String, ProgressBar)>,
    /// Set by Ctrl-C or SIGTERM; installed at the first step, so that
    /// before it (planning, loading, caching) they end the process at once.
    interrupted: Option<Arc<AtomicBool>>,
}

impl Default for CliHost {
    fn default() -> Self {
        Self { clock: Instant::now(), bar: None, interrupted: None }
    }
}

impl CliHost {
    /// The bar for `phase`, replacing another phase's.
    fn bar_for(&mut self, phase: &str, template: &str) -> &ProgressBar {
        if self.bar.as_ref().is_none_or(|(current, _)| current != phase) {
            self.clear();
            self.bar = Some((phase.to_string(), bar(template)));
        }
        &self.bar.as_ref().expect("just set").1
    }

    fn clear(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl RunHost for CliHost {
    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    fn note(&mut self, line: &str) {
        match &self.bar {
            // Printed whether or not stderr is a terminal (a hidden bar's println is not).
            Some((_, bar)) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn progress(&mut self, phase: &str, done: u64, total: u64) {
        let bar = self.bar_for(phase, "{msg:>24} [{bar:30}] {pos}/{len} ({per_sec}, {eta})");
        bar.set_message(phase.to_string());
        bar.set_length(total);
        bar.set_position(done);
    }

    fn stepped(&mut self, report: &StepReport, timing: &StepTiming) {
        let bar = self.bar_for("train", "train [{bar:30}] {pos}/{len} steps {msg}");
        bar.set_position(report.step);
        bar.set_message(format!("loss {:.4} lr {:.2e} ({:.2} s/step, ETA {:.0} s)", report.loss, report.lr, timing.per_step, timing.eta_seconds));
    }

    fn image_written(&mut self, _path: &str, _caption: &str) {}

    async fn saved(&mut self) -> Result<()> {
        Ok(())
    }

    async fn between_steps(&mut self, step: u64, total: u64) -> Control {
        let interrupted = self.interrupted.get_or_insert_with(interrupt_flag).clone();
        let bar = self.bar_for("train", "train [{bar:30}] {pos}/{len} steps {msg}");
        bar.set_length(total);
        bar.set_position(step);
        if interrupted.load(Ordering::SeqCst) {
            Control::Stop
        } else {
            Control::Continue
        }
    }
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
    for name in trainer_core::train::full_export::source_config_paths() {
        let path = folder.join(&name);
        if path.is_file() {
            files.insert(name, read_text(&path.display().to_string())?);
        }
    }
    Ok(Some(files))
}
