//! What the user has picked and typed (model, configs, dataset files), and
//! the run built from it. One per page; the UI keeps only display state in
//! signals and reaches this through [`with`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::OnceLock;

use burn::tensor::{DType, Device};
use trainer_core::config::dataset::{DataloaderConfig, ImageDatasetConfig};
use trainer_core::config::training::TrainingConfig;
use trainer_core::data::source::{ImageSource, MemorySource, RandomAccess};
use trainer_core::models::{StableDiffusion, WeightDtypes};
use trainer_core::plan::{plan, Plan, PlanTarget};
use trainer_core::train::session::Session;
use trainer_core::train::storage::MemoryStorage;
use trainer_core::{config, Error, Result};

use crate::gpu::AdapterSummary;
use crate::model::PickedModel;

/// The device training runs on.
#[derive(Clone)]
pub enum Compute {
    WebGpu(Device, AdapterSummary),
    /// burn's CPU backend compiled to wasm (no WebGPU): slow but works.
    Cpu(Device),
}

impl Compute {
    pub fn device(&self) -> &Device {
        match self {
            Self::WebGpu(device, _) | Self::Cpu(device) => device,
        }
    }

    /// Where the adapter has `shader-f16`, frozen weights are stored in f16
    /// (half the memory, and the largest tensor fits the adapter's buffers
    /// sooner); everything is still computed in f32.
    pub fn has_f16(&self) -> bool {
        matches!(self, Self::WebGpu(_, summary) if summary.shader_f16)
    }

    /// Storage dtypes for sampling and the tools.
    pub fn inference_dtypes(&self) -> WeightDtypes {
        if self.has_f16() {
            WeightDtypes::all(DType::F16)
        } else {
            WeightDtypes::default()
        }
    }
}

#[derive(Default)]
pub struct Workspace {
    pub compute: Option<Compute>,
    pub model: Option<Rc<PickedModel>>,
    /// (file name, text) of the training config.
    pub training: Option<(String, String)>,
    pub dataloader: Option<(String, String)>,
    /// Other files the training config names (lycoris_config,
    /// user_prompt_library), by file name.
    pub side_files: BTreeMap<String, String>,
    /// Picked files per dataset id.
    pub sources: BTreeMap<String, Rc<MemorySource>>,
    /// The current run (kept after training for sampling).
    pub session: Option<Session<'static>>,
    /// OPFS has been read into [`storage`] on this page.
    pub restored: bool,
}

thread_local! {
    static WORKSPACE: RefCell<Workspace> = RefCell::new(Workspace::default());
}

/// Runs `f` on the page's workspace. Never hold it across an `await`.
pub fn with<T>(f: impl FnOnce(&mut Workspace) -> T) -> T {
    WORKSPACE.with(|w| f(&mut w.borrow_mut()))
}

fn compute() -> std::result::Result<Compute, String> {
    with(|w| w.compute.clone()).ok_or_else(|| "no compute device yet: wait for the GPU check at the top of the page".to_string())
}

/// Loads the picked model onto the compute device, storing weights in
/// `dtypes` (a run's plan decides; `None`: as sampling and the tools do).
pub fn load_model(dtypes: Option<WeightDtypes>) -> std::result::Result<(StableDiffusion, Device), String> {
    let compute = compute()?;
    let picked = with(|w| w.model.clone()).ok_or("pick a model first")?;
    let dtypes = dtypes.unwrap_or_else(|| compute.inference_dtypes());
    let model = picked.load(compute.device(), dtypes).map_err(|e| e.to_string())?;
    Ok((model, compute.device().clone()))
}

/// Where runs write: memory, mirrored to the Origin Private File System.
pub fn storage() -> &'static MemoryStorage {
    static STORAGE: OnceLock<MemoryStorage> = OnceLock::new();
    STORAGE.get_or_init(MemoryStorage::default)
}

/// A dataset's picked files, shared between the plan and the run.
pub struct SharedSource(pub Rc<MemorySource>);

impl ImageSource for SharedSource {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn list(&self) -> Result<Vec<String>> {
        self.0.list()
    }
    fn open(&self, path: &str) -> Result<Box<dyn RandomAccess + '_>> {
        self.0.open(path)
    }
    fn exists(&self, path: &str) -> bool {
        self.0.exists(path)
    }
}

/// The imported configs as the page sends them to the worker (Prepare,
/// Train).
pub struct ImportedConfigs {
    /// (file name, text).
    pub training: (String, String),
    /// (file name, text).
    pub dataloader: (String, String),
    /// By file name.
    pub side_files: BTreeMap<String, String>,
}

/// `None` until both configs are there.
pub fn imported_configs() -> Option<ImportedConfigs> {
    with(|w| Some(ImportedConfigs { training: w.training.clone()?, dataloader: w.dataloader.clone()?, side_files: w.side_files.clone() }))
}

/// The worker takes the configs the page sent.
pub fn set_imported_configs(configs: ImportedConfigs) {
    with(|w| {
        w.training = Some(configs.training);
        w.dataloader = Some(configs.dataloader);
        w.side_files = configs.side_files;
    });
}

/// Reads the configs as the native runner does. The training config and
/// the side files are known by their file names; every other path read
/// (the dataloader config the training config names) gets the imported
/// dataloader config.
pub fn load_configs() -> Result<(TrainingConfig, DataloaderConfig)> {
    let (training, dataloader, side_files) = with(|w| (w.training.clone(), w.dataloader.clone(), w.side_files.clone()));
    let Some((training_name, training_text)) = training else {
        return Err(Error::Config { source_name: "training config".into(), problems: vec!["import or write a training config first".into()] });
    };
    let read = |path: &str| -> Result<String> {
        if path == training_name {
            return Ok(training_text.clone());
        }
        if let Some(text) = side_files.get(file_name(path)) {
            return Ok(text.clone());
        }
        match &dataloader {
            Some((_, text)) => Ok(text.clone()),
            None => Err(Error::Io { path: path.to_string(), message: "import this dataloader config (the training config names it)".into() }),
        }
    };
    config::load(&training_name, None, &read, &|_| None)
}

/// The last part of a path (picked files keep their folder in front).
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Imported config files by role, each `(name, text)`; side files by file name.
pub struct SortedConfigs {
    pub training: Option<(String, String)>,
    pub dataloader: Option<(String, String)>,
    pub side: Vec<(String, String)>,
}

/// Sorts imported config files: a JSON array is a dataloader config; a
/// file whose name another imported file or the training config already
/// there (`current_training`) mentions is a side file (a lycoris_config, a
/// prompt library); the rest is the training config.
pub fn sort_config_files(files: Vec<(String, String)>, current_training: &str) -> SortedConfigs {
    let (mut training, mut dataloader, mut side) = (None, None, Vec::new());
    let mentioned = |name: &str| {
        let name = file_name(name);
        current_training.contains(name) || files.iter().any(|(other, text)| file_name(other) != name && text.contains(name))
    };
    for (name, text) in &files {
        if name.ends_with(".json") && text.trim_start().starts_with('[') {
            dataloader = Some((name.clone(), text.clone()));
        } else if mentioned(name) {
            side.push((file_name(name).to_string(), text.clone()));
        } else {
            training = Some((name.clone(), text.clone()));
        }
    }
    SortedConfigs { training, dataloader, side }
}

/// Each planned dataset's files.
pub type ImageSources = Vec<Box<dyn ImageSource>>;
/// Each planned dataset's mask files, when it has masks.
pub type MaskSources = Vec<Option<Box<dyn ImageSource>>>;

/// Plans with the picked files, exactly as `native-runner plan` does.
pub fn plan_run(training: &TrainingConfig, dataloader: &DataloaderConfig) -> Result<(Plan, ImageSources, MaskSources)> {
    let sources = with(|w| w.sources.clone());
    let open = |dataset: &ImageDatasetConfig| -> Result<Box<dyn ImageSource>> {
        match sources.get(&dataset.id) {
            Some(source) => Ok(Box::new(SharedSource(source.clone()))),
            None => Err(Error::Dataset {
                dataset: dataset.id.clone(),
                message: format!("no files picked: pick the folder '{}' (instance_data_dir) or drop its images on the dataset", dataset.instance_data_dir),
            }),
        }
    };
    // WebGPU stores no bf16; the wasm CPU backend is planned the same way.
    let has_f16 = compute().map(|c| c.has_f16()).unwrap_or(false);
    let plan = plan(training, dataloader, &open, PlanTarget { has_bf16: false, has_f16 }, &mut |_| {})?;
    let run_sources = plan.datasets.iter().map(|d| Box::new(SharedSource(sources[&d.id].clone())) as Box<dyn ImageSource>).collect();
    let mask_sources = trainer_core::plan::open_mask_sources(&plan, dataloader, &open)?;
    Ok((plan, run_sources, mask_sources))
}

/// Sets a training config value in env-file text (`KEY=value`), replacing
/// the line that sets it or appending one.
pub fn env_set(text: &str, key: &str, value: &str) -> String {
    let quoted = if value.contains(' ') || value.contains('#') { format!("\"{}\"", value.replace('"', "\\\"")) } else { value.to_string() };
    let line = format!("{key}={quoted}");
    let mut found = false;
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            let bare = l.trim_start().strip_prefix("export ").unwrap_or(l.trim_start());
            if bare.starts_with(&format!("{key}=")) {
                found = true;
                line.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        lines.push(line);
    }
    lines.join("\n") + "\n"
}

/// A value set in env-file text, unquoted.
pub fn env_get(text: &str, key: &str) -> Option<String> {
    text.lines().rev().find_map(|l| {
        let bare = l.trim_start().strip_prefix("export ").unwrap_or(l.trim_start());
        bare.strip_prefix(&format!("{key}=")).map(|v| v.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}
