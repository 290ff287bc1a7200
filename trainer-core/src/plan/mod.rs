//! What a training run would do, computed from the configs and the dataset
//! files without loading a model: images used and skipped (with reasons),
//! buckets, captions, batches, steps and the limit that stops training.
//!
//! The same code runs natively and in the browser; files come through
//! [`ImageSource`], so nothing here touches the filesystem.

use burn::tensor::DType;
use serde::Serialize;

use crate::config::dataset::{CaptionShuffle, CaptionStrategy, DataloaderConfig, ImageDatasetConfig};
use crate::config::lycoris::LycorisAlgo;
use crate::config::training::{EmaSettings, ModelFamily, ModelType, OptimizerKind, RegularisationMode, TrainingConfig};
use crate::data::geometry::{ImageGeometry, Size};
use crate::data::source::ImageSource;
use crate::error::{Error, Result};
use crate::lr_schedule::LearningRateSchedule;

mod batches;
mod dataset;
mod describe;

use batches::simulate;
pub use batches::{build_samplers, PlannedBatchSampler};
pub use dataset::{plan_dataset, MAX_ASPECT_RATIO};
pub use describe::describe;

/// Simulating more batches than this to find where training stops is refused.
const MAX_SIMULATED_BATCHES: u64 = 50_000_000;

#[derive(Debug, Clone, Serialize)]
pub struct PlannedImage {
    pub path: String,
    pub original_size: Size,
    pub target_size: Size,
    pub intermediary_size: Size,
    /// The size resized to before cropping, where it differs from the
    /// intermediary size (the target_downsample_size path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resize_size: Option<Size>,
    /// (top, left) of the crop in the resized image.
    pub crop_offset: [u32; 2],
    pub aspect_bucket: String,
    pub caption: String,
    /// All caption variants, when the text file has several lines.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub caption_variants: Vec<String>,
    /// Its loss mask's path in the mask folder (masked loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
}

impl PlannedImage {
    /// The full geometry for preprocessing.
    pub fn geometry(&self) -> ImageGeometry {
        ImageGeometry {
            original_size: self.original_size,
            target_size: self.target_size,
            intermediary_size: self.intermediary_size,
            resize_size: self.resize_size.unwrap_or(self.intermediary_size),
            crop_offset: self.crop_offset,
            aspect_bucket: self.aspect_bucket.parse().unwrap_or(1.0),
        }
    }

    /// Every caption variant (at least one).
    pub fn captions(&self) -> Vec<String> {
        if self.caption_variants.is_empty() {
            vec![self.caption.clone()]
        } else {
            self.caption_variants.clone()
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedFile {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketPlan {
    pub aspect_bucket: String,
    pub target_size: Size,
    pub images: usize,
    pub batches_per_epoch: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetPlan {
    pub id: String,
    pub folder: String,
    pub is_regularisation_data: bool,
    /// Held out for the validation loss; never sampled for training.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_eval: bool,
    pub caption_strategy: CaptionStrategy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_shuffle: Option<CaptionShuffle>,
    pub repeats: u32,
    pub probability: f64,
    pub ignore_epochs: bool,
    pub train_batch_size: u32,
    pub images_found: usize,
    pub images_used: usize,
    pub images: Vec<PlannedImage>,
    pub skipped: Vec<SkippedFile>,
    pub buckets: Vec<BucketPlan>,
    pub batches_per_epoch: u64,
    pub cache_dir_vae: String,
    /// The id of the text-embeds dataset captions are cached in.
    pub text_embeds: String,
    /// That dataset's cache folder.
    pub text_cache_dir: String,
    /// Its loss masks (masked loss), paired with the images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masks: Option<MaskPlan>,
    pub notes: Vec<String>,
}

/// An image dataset's loss masks: which images have one.
#[derive(Debug, Clone, Serialize)]
pub struct MaskPlan {
    /// The mask dataset's id (the host opens its folder like a dataset's).
    pub id: String,
    pub folder: String,
    /// Images with a mask (each [`PlannedImage::mask`] names its file).
    pub paired: usize,
    /// Images without one: they train on the whole image.
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopsOn {
    MaxSteps,
    Epochs,
}

#[derive(Debug, Clone, Serialize)]
pub struct OptimizerPlan {
    pub name: OptimizerKind,
    pub state_dtype: &'static str,
    /// Adam's betas (none for Adafactor, whose decay follows the step count).
    pub betas: Option<[f64; 2]>,
    pub weight_decay: f64,
    pub epsilon: f64,
    pub max_grad_norm: f64,
    pub note: String,
}

/// How the model's weights are stored during the run.
#[derive(Debug, Clone, Serialize)]
pub struct PrecisionPlan {
    /// Weights that do not train (the whole base model for LoRA; VAE and
    /// text encoder for full fine-tunes): "f16" or "f32".
    pub frozen_weights: &'static str,
    pub note: String,
}

impl PrecisionPlan {
    /// The storage dtype of each component's weight matrices.
    pub fn weight_dtypes(&self, model_type: ModelType) -> crate::models::WeightDtypes {
        let frozen = if self.frozen_weights == "f16" { DType::F16 } else { DType::F32 };
        crate::models::WeightDtypes { unet: if model_type == ModelType::Full { DType::F32 } else { frozen }, vae: frozen, text_encoder: frozen }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model_family: ModelFamily,
    pub model_type: ModelType,
    pub model: Option<String>,
    pub output_dir: String,
    pub seed: u64,
    pub datasets: Vec<DatasetPlan>,
    pub train_batch_size: u32,
    pub gradient_accumulation_steps: u32,
    /// Optimizer steps in the first epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps the run will take.
    pub max_steps: u64,
    pub stops_on: StopsOn,
    /// The epoch in which training stops (1-based).
    pub epochs: u64,
    pub max_train_steps: Option<u64>,
    pub num_train_epochs: Option<u64>,
    pub optimizer: OptimizerPlan,
    /// The moving average of the trained weights (`use_ema`).
    pub ema: Option<EmaSettings>,
    /// What a LoRA run trains: LoRA (and DoRA) or LoKr, with its settings.
    pub adapters: Option<String>,
    /// When and on what the validation loss is computed (eval datasets).
    pub validation_loss: Option<String>,
    pub precision: PrecisionPlan,
    /// The text encoder's peak learning rate when its LoRA adapters train.
    pub text_encoder_lr: Option<f64>,
    pub lr_schedule: LearningRateSchedule,
    pub regularisation_mode: RegularisationMode,
    pub warnings: Vec<String>,
}

/// The host opens a mask folder as it opens a dataset's, by id and folder:
/// this is the mask dataset dressed as one.
fn mask_folder_as_dataset(dataset: &ImageDatasetConfig, mask: &crate::config::dataset::MaskDatasetConfig) -> ImageDatasetConfig {
    ImageDatasetConfig { id: mask.id.clone(), instance_data_dir: mask.instance_data_dir.clone(), mask: None, ..dataset.clone() }
}

/// Opens the mask folder of each planned dataset that has masks, in the
/// plan's order, for [`crate::train::session::Session::set_mask_sources`].
pub fn open_mask_sources(
    plan: &Plan,
    dataloader: &DataloaderConfig,
    open_source: &dyn Fn(&ImageDatasetConfig) -> Result<Box<dyn ImageSource>>,
) -> Result<Vec<Option<Box<dyn ImageSource>>>> {
    let mut sources = Vec::new();
    for planned in &plan.datasets {
        let dataset = dataloader.datasets.iter().find(|d| d.id == planned.id).expect("planned datasets come from the config");
        sources.push(match (&planned.masks, &dataset.mask) {
            (Some(_), Some(mask)) => Some(open_source(&mask_folder_as_dataset(dataset, mask))?),
            _ => None,
        });
    }
    Ok(sources)
}

/// Finds each planned image's mask in the mask dataset's folder: the same
/// relative path (as SimpleTuner requires), else the same path with
/// another image extension (a PNG mask for a JPEG photo).
fn pair_masks(
    plan: &mut DatasetPlan,
    mask: &crate::config::dataset::MaskDatasetConfig,
    dataset: &ImageDatasetConfig,
    open_source: &dyn Fn(&ImageDatasetConfig) -> Result<Box<dyn ImageSource>>,
) -> Result<()> {
    let source = open_source(&mask_folder_as_dataset(dataset, mask))?;
    let files: std::collections::BTreeSet<String> = crate::data::source::discover(source.as_ref())?.images.into_iter().collect();
    let by_stem: std::collections::BTreeMap<&str, &String> = files.iter().filter_map(|f| f.rsplit_once('.').map(|(stem, _)| (stem, f))).collect();
    let (mut paired, mut missing) = (0, Vec::new());
    for image in &mut plan.images {
        let stem = image.path.rsplit_once('.').map_or(image.path.as_str(), |(stem, _)| stem);
        image.mask = files.get(&image.path).or_else(|| by_stem.get(stem).copied()).cloned();
        match image.mask {
            Some(_) => paired += 1,
            None => missing.push(image.path.clone()),
        }
    }
    if paired == 0 {
        return Err(Error::Dataset {
            dataset: plan.id.clone(),
            message: format!(
                "its mask dataset '{}' ({}) has no mask for any of its {} images; a mask has the image's relative path (or another image extension)",
                mask.id,
                source.describe(),
                plan.images.len()
            ),
        });
    }
    plan.masks = Some(MaskPlan { id: mask.id.clone(), folder: mask.instance_data_dir.clone(), paired, missing });
    Ok(())
}

/// Progress of a long plan, for progress bars.
#[derive(Debug, Clone, Copy)]
pub struct PlanProgress<'a> {
    pub dataset: &'a str,
    pub done: usize,
    pub total: usize,
}

/// What the plan needs to know about where training will run.
#[derive(Debug, Clone, Copy)]
pub struct PlanTarget {
    /// The backend stores bf16 tensors (for adamw_bf16).
    pub has_bf16: bool,
    /// The backend stores f16 tensors and f16 is worth it there (a GPU:
    /// WebGPU with `shader-f16`, native wgpu), for frozen base weights.
    pub has_f16: bool,
}

/// Plans a run. `open_source` gives the files of a dataset (a folder walk
/// natively, picked files in the browser).
pub fn plan(
    training: &TrainingConfig,
    dataloader: &DataloaderConfig,
    open_source: &dyn Fn(&ImageDatasetConfig) -> Result<Box<dyn ImageSource>>,
    target: PlanTarget,
    progress: &mut dyn FnMut(PlanProgress<'_>),
) -> Result<Plan> {
    let mut warnings: Vec<String> = training.warnings.iter().chain(&dataloader.warnings).cloned().collect();
    let mut datasets = Vec::new();
    let mut problems = Vec::new();
    for dataset in &dataloader.datasets {
        let source = match open_source(dataset) {
            Ok(source) => source,
            Err(Error::Dataset { dataset, message }) => {
                problems.push(format!("dataset '{dataset}': {message}"));
                continue;
            }
            Err(other) => return Err(other),
        };
        match plan_dataset(training, dataset, source.as_ref(), progress) {
            Ok(mut plan) => {
                if let Some(mask) = &dataset.mask {
                    match pair_masks(&mut plan, mask, dataset, open_source) {
                        Ok(()) => {}
                        Err(Error::Dataset { dataset, message }) => {
                            problems.push(format!("dataset '{dataset}': {message}"));
                            continue;
                        }
                        Err(other) => return Err(other),
                    }
                }
                plan.text_cache_dir = dataloader
                    .text_embeds
                    .iter()
                    .find(|t| t.id == plan.text_embeds)
                    .or_else(|| dataloader.text_embeds.iter().find(|t| t.default))
                    .map(|t| t.cache_dir.clone())
                    .unwrap_or_else(|| crate::config::dataset::resolve_path("cache/text", Some(&training.output_dir)));
                datasets.push(plan)
            }
            Err(Error::Dataset { dataset, message }) => problems.push(format!("dataset '{dataset}': {message}")),
            Err(other) => return Err(other),
        }
    }
    if !problems.is_empty() {
        return Err(Error::Config { source_name: training.data_backend_config.clone(), problems });
    }

    let eval_ids: Vec<String> = datasets.iter().filter(|d| d.is_eval).map(|d| d.id.clone()).collect();
    if eval_ids.len() == datasets.len() {
        return Err(Error::Config {
            source_name: training.data_backend_config.clone(),
            problems: vec!["every dataset is an eval dataset: nothing to train on".into()],
        });
    }
    match (eval_ids.is_empty(), training.eval_steps_interval) {
        (false, None) => {
            warnings.push(format!("eval dataset(s) {} are held out, but eval_steps_interval is not set: no validation loss is computed", eval_ids.join(", ")))
        }
        (true, Some(_)) => warnings.push("eval_steps_interval is set but no dataset has dataset_type eval: no validation loss is computed".into()),
        _ => {}
    }
    let (main, _) = build_samplers(&datasets, training);
    let schedule = simulate(training, main.sampler)?;
    if let (Some(_), Some(epochs)) = (training.max_train_steps, training.num_train_epochs) {
        let which = match schedule.stops_on {
            StopsOn::MaxSteps => format!("max_train_steps ({}) comes first", schedule.total_steps),
            StopsOn::Epochs => format!("{epochs} epochs end after {} steps", schedule.total_steps),
        };
        warnings.push(format!("both max_train_steps and num_train_epochs are set: training stops at whichever comes first; {which}"));
    }
    if training.regularisation_mode == RegularisationMode::PriorPreservation && !datasets.iter().any(|d| d.is_regularisation_data) {
        warnings.push("regularisation_mode is prior_preservation but no dataset has is_regularisation_data: true".into());
    }

    let validation_loss = training.eval_steps_interval.filter(|_| !eval_ids.is_empty()).map(|every| {
        let images: usize = datasets.iter().filter(|d| d.is_eval).map(|d| d.images.len()).sum();
        format!(
            "every {every} steps on {} of the {images} held-out image(s) of {} at {} timesteps each",
            (training.num_eval_images as usize).min(images),
            eval_ids.join(", "),
            training.eval_timesteps
        )
    });
    let optimizer = optimizer_plan(training, target);
    Ok(Plan {
        model_family: training.model_family,
        model_type: training.model_type,
        model: training.pretrained_model_name_or_path.clone(),
        output_dir: training.output_dir.clone(),
        seed: training.seed,
        datasets,
        train_batch_size: training.dataset_options.train_batch_size,
        gradient_accumulation_steps: training.gradient_accumulation_steps,
        steps_per_epoch: schedule.steps_per_epoch,
        max_steps: schedule.total_steps,
        stops_on: schedule.stops_on,
        epochs: schedule.final_epoch,
        max_train_steps: training.max_train_steps,
        num_train_epochs: training.num_train_epochs,
        optimizer,
        ema: training.ema,
        adapters: adapter_summary(training),
        validation_loss,
        precision: precision_plan(training, target),
        text_encoder_lr: training.train_text_encoder.then(|| training.text_encoder_lr.unwrap_or(training.learning_rate)),
        lr_schedule: LearningRateSchedule::from_config(training, schedule.total_steps),
        regularisation_mode: training.regularisation_mode,
        warnings,
    })
}

fn precision_plan(training: &TrainingConfig, target: PlanTarget) -> PrecisionPlan {
    let frozen = match training.model_type {
        ModelType::Lora => "the base model",
        ModelType::Full if training.train_text_encoder => "the VAE (the UNet and text encoder train in f32)",
        ModelType::Full => "the VAE and text encoder (the UNet trains in f32)",
    };
    let (frozen_weights, note) = if training.mixed_precision == "no" {
        ("f32", format!("mixed_precision=no: {frozen} in f32"))
    } else if target.has_f16 {
        ("f16", format!("{frozen} stored in f16 (half the memory), computed in f32"))
    } else {
        ("f32", format!("{frozen} in f32 (this backend has no f16 storage worth using: a CPU, or WebGPU without shader-f16)"))
    };
    PrecisionPlan { frozen_weights, note }
}

fn adapter_summary(training: &TrainingConfig) -> Option<String> {
    if training.model_type != ModelType::Lora {
        return None;
    }
    Some(match &training.lycoris {
        Some(lycoris) => {
            let targets: Vec<String> = lycoris
                .targets
                .iter()
                .map(|t| match t.algo {
                    LycorisAlgo::Lokr => format!("LoKr on {} (factor {})", t.suffixes.join(", "), t.factor),
                    LycorisAlgo::Locon => format!("LoCon on {}", t.suffixes.join(", ")),
                })
                .collect();
            let mut summary = format!("LyCORIS {}; linear_dim {}, linear_alpha {}", targets.join("; "), lycoris.linear_dim, lycoris.linear_alpha);
            if lycoris.uses(LycorisAlgo::Locon) {
                summary += &format!(", conv_dim {}, conv_alpha {} (convolutions wider than 1x1)", lycoris.conv_dim, lycoris.conv_alpha);
            }
            if lycoris.uses(LycorisAlgo::Lokr) {
                summary += &format!(", full_matrix {}, multiplier {}", lycoris.full_matrix, lycoris.multiplier);
            }
            summary
        }
        None => format!(
            "LoRA rank {}, alpha {}, dropout {}{}",
            training.lora_rank,
            training.lora_alpha,
            training.lora_dropout,
            if training.use_dora { ", DoRA (a learned magnitude per output feature)" } else { "" }
        ),
    })
}

fn optimizer_plan(training: &TrainingConfig, target: PlanTarget) -> OptimizerPlan {
    let adam = (Some([training.adam_beta1, training.adam_beta2]), training.adam_weight_decay, training.adam_epsilon);
    let ((betas, weight_decay, epsilon), state_dtype, note) = match (training.optimizer, target.has_bf16) {
        (OptimizerKind::AdamwBf16, true) => (adam, "bf16", "AdamW with bf16 weights and state, stochastic rounding".to_string()),
        (OptimizerKind::AdamwBf16, false) => (adam, "f32", "adamw_bf16 requested, but this backend has no bf16: AdamW with f32 weights and state".to_string()),
        (OptimizerKind::Adamw, _) => (adam, "f32", "AdamW with f32 state".to_string()),
        (OptimizerKind::Prodigy, _) => {
            let p = training.prodigy.unwrap_or_default();
            let adapting = if p.prodigy_steps > 0 { format!(", d adapts for {} steps", p.prodigy_steps) } else { String::new() };
            let note = format!(
                "Prodigy with f32 state: step size d from d0 {} (d_coef {}, bias correction {}, safeguard warmup {}{adapting}) times the learning rate {}",
                p.d0, p.d_coef, p.use_bias_correction, p.safeguard_warmup, training.learning_rate
            );
            ((Some([p.beta1, p.beta2]), p.weight_decay, p.epsilon), "f32", note)
        }
        (OptimizerKind::Adafactor, _) => {
            let a = training.adafactor.unwrap_or_default();
            let note = format!(
                "Adafactor (torch) with factored f32 state: steps of min(lr, 1/sqrt(t)) times the weights' RMS, update RMS clipped at {}",
                a.clip_threshold
            );
            ((None, a.weight_decay, a.epsilon1), "f32", note)
        }
    };
    OptimizerPlan { name: training.optimizer, state_dtype, betas, weight_decay, epsilon, max_grad_norm: training.max_grad_norm, note }
}
