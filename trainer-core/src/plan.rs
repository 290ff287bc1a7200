//! What a training run would do, computed from the configs and the dataset
//! files without loading a model: images used and skipped (with reasons),
//! buckets, captions, batches, steps and the limit that stops training.
//!
//! The same code runs natively and in the browser; files come through
//! [`ImageSource`], so nothing here touches the filesystem.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use burn::tensor::DType;
use serde::Serialize;

use crate::config::dataset::{CaptionStrategy, DataloaderConfig, ImageDatasetConfig};
use crate::config::training::{ModelFamily, ModelType, Optimizer, RegularisationMode, TrainingConfig};
use crate::data::batch_sampler::{BatchSampler, BatchSamplerBucket, BatchSamplerDataset, BatchSamplerSettings};
use crate::data::captions::captions_for;
use crate::data::geometry::{bucket_key, ImageGeometry, Size, Sizer};
use crate::data::preprocess::decode_oriented;
use crate::data::probe::probe;
use crate::data::source::{discover, extension, ImageSource};
use crate::error::{Error, Result};
use crate::lr_schedule::LearningRateSchedule;
use crate::rng::SeededRng;

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
    pub caption_strategy: CaptionStrategy,
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
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopsOn {
    MaxSteps,
    Epochs,
}

#[derive(Debug, Clone, Serialize)]
pub struct OptimizerPlan {
    pub name: Optimizer,
    pub state_dtype: &'static str,
    pub betas: [f64; 2],
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
    pub precision: PrecisionPlan,
    /// The text encoder's peak learning rate when its LoRA adapters train.
    pub text_encoder_lr: Option<f64>,
    pub lr_schedule: LearningRateSchedule,
    pub regularisation_mode: RegularisationMode,
    pub warnings: Vec<String>,
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

    let optimizer = optimizer_plan(training, target);
    Ok(Plan {
        model_family: training.model_family,
        model_type: training.model_type,
        model: training.pretrained_model_name_or_path.clone(),
        output_dir: training.output_dir.clone(),
        seed: training.seed,
        datasets,
        train_batch_size: training.train_batch_size,
        gradient_accumulation_steps: training.gradient_accumulation_steps,
        steps_per_epoch: schedule.steps_per_epoch,
        max_steps: schedule.total_steps,
        stops_on: schedule.stops_on,
        epochs: schedule.final_epoch,
        max_train_steps: training.max_train_steps,
        num_train_epochs: training.num_train_epochs,
        optimizer,
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

fn optimizer_plan(training: &TrainingConfig, target: PlanTarget) -> OptimizerPlan {
    let (state_dtype, note) = match (training.optimizer, target.has_bf16) {
        (Optimizer::AdamwBf16, true) => ("bf16", "AdamW with bf16 weights and state, stochastic rounding".to_string()),
        (Optimizer::AdamwBf16, false) => ("f32", "adamw_bf16 requested, but this backend has no bf16: AdamW with f32 weights and state".to_string()),
        (Optimizer::Adamw, _) => ("f32", "AdamW with f32 state".to_string()),
    };
    OptimizerPlan {
        name: training.optimizer,
        state_dtype,
        betas: [training.adam_beta1, training.adam_beta2],
        weight_decay: training.adam_weight_decay,
        epsilon: training.adam_epsilon,
        max_grad_norm: training.max_grad_norm,
        note,
    }
}

/// A sampler over some of the plan's datasets; `datasets[i]` is the plan
/// index of the sampler's dataset `i`.
pub struct PlannedBatchSampler {
    pub sampler: BatchSampler,
    pub datasets: Vec<usize>,
}

/// The samplers a run draws from: one over every dataset, or under
/// `prior_preservation` one over the instance datasets (it sets the pace:
/// steps and epochs) and one over the class (regularisation) datasets.
pub fn build_samplers(datasets: &[DatasetPlan], training: &TrainingConfig) -> (PlannedBatchSampler, Option<PlannedBatchSampler>) {
    let settings = BatchSamplerSettings {
        seed: training.seed,
        sampling: training.data_backend_sampling,
        caption_dropout_probability: training.caption_dropout_probability,
    };
    let make = |indices: Vec<usize>, label: &str| {
        let mut settings = settings;
        if !label.is_empty() {
            settings.seed = SeededRng::derived(training.seed, label).next_u64();
        }
        PlannedBatchSampler { sampler: BatchSampler::new(indices.iter().map(|&i| sampler_dataset(&datasets[i])).collect(), settings), datasets: indices }
    };
    let has_class_data = datasets.iter().any(|d| d.is_regularisation_data);
    let has_instance_data = datasets.iter().any(|d| !d.is_regularisation_data);
    if training.regularisation_mode == RegularisationMode::PriorPreservation && has_class_data && has_instance_data {
        let instance: Vec<usize> = (0..datasets.len()).filter(|&i| !datasets[i].is_regularisation_data).collect();
        let class: Vec<usize> = (0..datasets.len()).filter(|&i| datasets[i].is_regularisation_data).collect();
        (make(instance, ""), Some(make(class, "prior-sampler")))
    } else {
        (make((0..datasets.len()).collect(), ""), None)
    }
}

fn sampler_dataset(plan: &DatasetPlan) -> BatchSamplerDataset {
    let mut index_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, image) in plan.images.iter().enumerate() {
        index_of.entry(image.aspect_bucket.as_str()).or_default().push(index);
    }
    BatchSamplerDataset {
        id: plan.id.clone(),
        buckets: plan
            .buckets
            .iter()
            .map(|b| BatchSamplerBucket { key: b.aspect_bucket.clone(), images: index_of.remove(b.aspect_bucket.as_str()).unwrap_or_default() })
            .collect(),
        repeats: plan.repeats,
        probability: plan.probability,
        ignore_epochs: plan.ignore_epochs,
        batch_size: plan.train_batch_size,
        caption_variants: plan.images.iter().map(|i| i.caption_variants.len().max(1) as u32).collect(),
    }
}

struct Schedule {
    steps_per_epoch: u64,
    total_steps: u64,
    stops_on: StopsOn,
    final_epoch: u64,
}

/// Runs the sampler forward (indices only, no pixels) to find the epoch
/// length and which limit stops training.
fn simulate(training: &TrainingConfig, mut sampler: BatchSampler) -> Result<Schedule> {
    let accumulation = training.gradient_accumulation_steps.max(1) as u64;
    let max_batches = training.max_train_steps.map(|s| s * accumulation);
    if !sampler.epochs_can_end() && max_batches.is_none() {
        return Err(Error::Config {
            source_name: training.source_name.clone(),
            problems: vec!["every dataset has ignore_epochs, so epochs never end: set max_train_steps (MAX_NUM_STEPS)".into()],
        });
    }
    let mut batches = 0u64;
    let mut first_epoch_batches: Option<u64> = None;
    let mut epochs_done = 0u64;
    let mut stop: Option<(u64, StopsOn, u64)> = None;
    while stop.is_none() || (first_epoch_batches.is_none() && sampler.epochs_can_end()) {
        if batches >= MAX_SIMULATED_BATCHES {
            break;
        }
        let Some(batch) = sampler.next_batch() else { break };
        batches += 1;
        if batch.ends_epoch {
            epochs_done += 1;
            first_epoch_batches.get_or_insert(batches);
            if stop.is_none() && training.num_train_epochs == Some(epochs_done) {
                stop = Some((batches, StopsOn::Epochs, batch.epoch));
            }
        }
        if stop.is_none() && max_batches == Some(batches) {
            stop = Some((batches, StopsOn::MaxSteps, batch.epoch));
        }
    }
    let Some((stop_batches, stops_on, final_epoch)) = stop else {
        return Err(Error::Config {
            source_name: training.source_name.clone(),
            problems: vec![format!("training would not stop within {MAX_SIMULATED_BATCHES} batches; set max_train_steps")],
        });
    };
    Ok(Schedule {
        steps_per_epoch: first_epoch_batches.unwrap_or(batches).div_ceil(accumulation),
        total_steps: stop_batches.div_ceil(accumulation),
        stops_on,
        final_epoch,
    })
}

/// Plans one dataset: discovery, headers, sizes, captions and buckets.
pub fn plan_dataset(
    training: &TrainingConfig,
    dataset: &ImageDatasetConfig,
    source: &dyn ImageSource,
    progress: &mut dyn FnMut(PlanProgress<'_>),
) -> Result<DatasetPlan> {
    let discovery = discover(source)?;
    let mut skipped: Vec<SkippedFile> = discovery
        .other_files
        .iter()
        .map(|path| SkippedFile {
            path: path.clone(),
            reason: match extension(path) {
                Some(ext) => format!("not an image file (.{ext}); images must be png, jpg, jpeg, webp or bmp"),
                None => "not an image file (no extension)".into(),
            },
        })
        .collect();
    let mut notes = Vec::new();
    let sizer_settings = dataset.geometry.clone();
    let mut sizer = Sizer::new(sizer_settings);
    let total = discovery.images.len();

    // Headers, minimum size and captions.
    let mut candidates: Vec<(String, [u32; 2], Vec<String>)> = Vec::new();
    let mut with_alpha = 0;
    for (done, path) in discovery.images.iter().enumerate() {
        if done.is_multiple_of(256) {
            progress(PlanProgress { dataset: &dataset.id, done, total });
        }
        let info = {
            let mut file = source.open(path)?;
            probe(file.as_mut(), training.max_image_pixels)?
        };
        let info = match info {
            Ok(info) => info,
            Err(reason) => {
                skipped.push(SkippedFile { path: path.clone(), reason });
                continue;
            }
        };
        if info.suspect_truncated {
            // The end of the file looks wrong: only a full decode can tell.
            if let Err(reason) = source.read(path).map_err(|e| e.to_string()).and_then(|bytes| decode_oriented(&bytes, training.max_image_pixels)) {
                skipped.push(SkippedFile { path: path.clone(), reason: format!("truncated or corrupt: {reason}") });
                continue;
            }
        }
        let original = info.oriented_size();
        if let Err(reason) = sizer.check_minimum_size(original).and_then(|()| check_aspect(dataset, original)) {
            skipped.push(SkippedFile { path: path.clone(), reason });
            continue;
        }
        match captions_for(dataset, source, path) {
            Ok(captions) => candidates.push((path.clone(), original, captions)),
            Err(reason) => {
                skipped.push(SkippedFile { path: path.clone(), reason });
                continue;
            }
        }
        if info.may_have_alpha {
            with_alpha += 1;
        }
    }
    progress(PlanProgress { dataset: &dataset.id, done: total, total });
    if with_alpha > 0 {
        notes.push(format!("{with_alpha} image(s) may have transparency: it is composited on white"));
    }

    if let Some(limit) = dataset.max_num_samples {
        if candidates.len() > limit {
            // A subset that depends only on the dataset id, like SimpleTuner's.
            let mut order: Vec<usize> = (0..candidates.len()).collect();
            SeededRng::derived(0, &format!("max_num_samples/{}", dataset.id)).shuffle(&mut order);
            let keep: std::collections::BTreeSet<usize> = order[..limit].iter().copied().collect();
            let mut kept = Vec::new();
            for (index, candidate) in candidates.into_iter().enumerate() {
                if keep.contains(&index) {
                    kept.push(candidate);
                } else {
                    skipped.push(SkippedFile { path: candidate.0, reason: format!("not among the max_num_samples ({limit}) chosen") });
                }
            }
            candidates = kept;
        }
    }

    // Sizes and buckets.
    let mut images = Vec::new();
    for (path, original, captions) in candidates {
        let mut rng = SeededRng::derived(training.seed, &format!("crop/{}/{path}", dataset.id));
        let geometry = sizer.geometry(original, &mut rng);
        let key = bucket_key(geometry.aspect_bucket);
        if let Some(min) = dataset.minimum_aspect_ratio {
            if geometry.aspect_bucket < min {
                skipped.push(SkippedFile { path, reason: format!("aspect bucket {key} is below minimum_aspect_ratio {min}") });
                continue;
            }
        }
        if let Some(max) = dataset.maximum_aspect_ratio {
            if geometry.aspect_bucket > max {
                skipped.push(SkippedFile { path, reason: format!("aspect bucket {key} is above maximum_aspect_ratio {max}") });
                continue;
            }
        }
        let resize_size = (geometry.resize_size != geometry.intermediary_size).then_some(geometry.resize_size);
        images.push(PlannedImage {
            path,
            original_size: geometry.original_size,
            target_size: geometry.target_size,
            intermediary_size: geometry.intermediary_size,
            resize_size,
            crop_offset: geometry.crop_offset,
            aspect_bucket: key,
            caption: captions[0].clone(),
            caption_variants: if captions.len() > 1 { captions } else { Vec::new() },
        });
    }
    skipped.sort_by(|a, b| a.path.cmp(&b.path));

    if images.is_empty() {
        let mut message = format!("no usable image in {} ({} image file(s) found", source.describe(), total);
        if !skipped.is_empty() {
            let reasons: Vec<String> = skipped.iter().take(3).map(|s| format!("{}: {}", s.path, s.reason)).collect();
            message.push_str(&format!("; skipped: {}{}", reasons.join("; "), if skipped.len() > 3 { "; ..." } else { "" }));
        }
        message.push(')');
        return Err(Error::Dataset { dataset: dataset.id.clone(), message });
    }

    let buckets = bucket_plans(training, dataset, &images, &mut notes)?;
    let batches_per_epoch = buckets.iter().map(|b| b.batches_per_epoch).sum();
    Ok(DatasetPlan {
        id: dataset.id.clone(),
        folder: dataset.instance_data_dir.clone(),
        is_regularisation_data: dataset.is_regularisation_data,
        caption_strategy: dataset.caption_strategy,
        repeats: dataset.repeats,
        probability: dataset.probability,
        ignore_epochs: dataset.ignore_epochs,
        train_batch_size: dataset.train_batch_size,
        images_found: total,
        images_used: images.len(),
        images,
        skipped,
        buckets,
        batches_per_epoch,
        cache_dir_vae: dataset.cache_dir_vae.clone(),
        text_embeds: dataset.text_embeds.clone(),
        text_cache_dir: String::new(),
        notes,
    })
}

/// Groups images by bucket (in ascending aspect order) and checks each
/// bucket can fill a batch.
/// How far from square an image may be (long edge over short edge) when the
/// dataset sets no `minimum_aspect_ratio` / `maximum_aspect_ratio`. Beyond
/// it the bucket's short edge rounds to nothing (a 4x1200 image rounds to
/// aspect 0.0) or its long edge to many times the resolution.
pub const MAX_ASPECT_RATIO: f64 = 8.0;

/// Refuses images too far from square to bucket.
fn check_aspect(dataset: &ImageDatasetConfig, [width, height]: [u32; 2]) -> std::result::Result<(), String> {
    let aspect = width as f64 / height as f64;
    let lowest = dataset.minimum_aspect_ratio.unwrap_or(1.0 / MAX_ASPECT_RATIO).max(1.0 / 64.0);
    let highest = dataset.maximum_aspect_ratio.unwrap_or(MAX_ASPECT_RATIO).min(64.0);
    if aspect < lowest || aspect > highest {
        let ratio = if aspect < 1.0 { format!("1:{:.0}", 1.0 / aspect) } else { format!("{aspect:.0}:1") };
        return Err(format!(
            "extreme aspect ratio: {width}x{height} is {ratio}, outside {lowest:.3} to {highest:.3} (width over height); set minimum_aspect_ratio / maximum_aspect_ratio to allow it"
        ));
    }
    Ok(())
}

fn bucket_plans(training: &TrainingConfig, dataset: &ImageDatasetConfig, images: &[PlannedImage], notes: &mut Vec<String>) -> Result<Vec<BucketPlan>> {
    let mut by_key: BTreeMap<String, (f64, Size, usize)> = BTreeMap::new();
    for image in images {
        let entry = by_key.entry(image.aspect_bucket.clone()).or_insert((image.aspect_bucket.parse().unwrap_or(1.0), image.target_size, 0));
        entry.2 += 1;
    }
    let mut buckets: Vec<(String, f64, Size, usize)> = by_key.into_iter().map(|(k, (a, s, n))| (k, a, s, n)).collect();
    buckets.sort_by(|a, b| a.1.total_cmp(&b.1));

    let batch_size = dataset.train_batch_size.max(1) as u64;
    let effective_batch = batch_size * training.gradient_accumulation_steps.max(1) as u64;
    let passes = dataset.repeats as u64 + 1;
    let mut problems = Vec::new();
    for (key, _, _, count) in &buckets {
        let samples = *count as u64 * passes;
        if samples >= effective_batch {
            continue;
        }
        let repeats_needed = effective_batch.div_ceil(*count as u64) - 1;
        let images_needed = effective_batch.div_ceil(passes) - *count as u64;
        let advice = format!(
            "set repeats to at least {repeats_needed}, add {images_needed} more image(s) of that shape, or lower train_batch_size / gradient_accumulation_steps"
        );
        if training.allow_dataset_oversubscription {
            notes.push(format!(
                "bucket {key} has {count} image(s), fewer than a batch of {effective_batch}: its batches repeat images (allow_dataset_oversubscription); to avoid that, {advice}"
            ));
        } else {
            problems.push(format!(
                "bucket {key} has {count} image(s) x {passes} pass(es) = {samples} sample(s), fewer than train_batch_size x gradient_accumulation_steps = {effective_batch}: {advice} (or set allow_dataset_oversubscription)"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Dataset { dataset: dataset.id.clone(), message: problems.join("; ") });
    }
    Ok(buckets
        .into_iter()
        .map(|(key, _, target_size, count)| BucketPlan {
            aspect_bucket: key,
            target_size,
            images: count,
            batches_per_epoch: (count as u64).div_ceil(batch_size) * passes,
        })
        .collect())
}

/// A config value as it is spelled in config files (`sd1x`, `adamw_bf16`).
fn config_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// The plan as a person reads it (the native runner's `plan` and the
/// browser app show this same text).
pub fn describe(plan: &Plan) -> String {
    let mut out = String::new();
    let model = plan.model.as_deref().unwrap_or("(no model set)");
    let _ = writeln!(out, "Burnbooth plan: {} {} training of {model}", config_name(&plan.model_family), config_name(&plan.model_type));
    let _ = writeln!(out, "Output: {}   seed: {}", plan.output_dir, plan.seed);
    for dataset in &plan.datasets {
        let role = if dataset.is_regularisation_data { "  [regularisation]" } else { "" };
        let _ = writeln!(out, "\nDataset '{}'{role}", dataset.id);
        let _ = writeln!(out, "  folder: {}", dataset.folder);
        let _ = writeln!(out, "  images: {} found, {} used, {} skipped", dataset.images_found, dataset.images_used, dataset.skipped.len());
        let _ = writeln!(
            out,
            "  repeats {}, probability {}, batch size {}, captions: {}{}",
            dataset.repeats,
            dataset.probability,
            dataset.train_batch_size,
            config_name(&dataset.caption_strategy),
            if dataset.ignore_epochs { ", ignore_epochs (does not hold epochs open)" } else { "" }
        );
        let _ = writeln!(out, "  buckets:");
        for bucket in &dataset.buckets {
            let _ = writeln!(
                out,
                "    {:>6}  {:>4}x{:<4}  {:>5} image(s)  {:>6} batch(es)/epoch",
                bucket.aspect_bucket, bucket.target_size[0], bucket.target_size[1], bucket.images, bucket.batches_per_epoch
            );
        }
        let _ = writeln!(out, "  batches per epoch: {}", dataset.batches_per_epoch);
        let mut examples: Vec<&str> = Vec::new();
        for image in &dataset.images {
            if !examples.contains(&image.caption.as_str()) {
                examples.push(&image.caption);
            }
            if examples.len() == 3 {
                break;
            }
        }
        let _ = writeln!(out, "  example captions: {}", examples.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", "));
        for note in &dataset.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        if !dataset.skipped.is_empty() {
            let _ = writeln!(out, "  skipped:");
            for file in &dataset.skipped {
                let _ = writeln!(out, "    {}: {}", file.path, file.reason);
            }
        }
    }
    let _ = writeln!(out, "\nSteps per epoch: {}", plan.steps_per_epoch);
    let stop = match plan.stops_on {
        StopsOn::MaxSteps => format!("max_train_steps ({}) stops training, in epoch {}", plan.max_steps, plan.epochs),
        StopsOn::Epochs => format!("training stops when epoch {} ends", plan.epochs),
    };
    let _ = writeln!(out, "Total steps: {}  ({stop})", plan.max_steps);
    let _ = writeln!(out, "Batch: {} x {} accumulation step(s)", plan.train_batch_size, plan.gradient_accumulation_steps);
    let _ = writeln!(out, "Optimizer: {} ({})", config_name(&plan.optimizer.name), plan.optimizer.note);
    let _ = writeln!(out, "Weights: {}", plan.precision.note);
    if let Some(lr) = plan.text_encoder_lr {
        let _ = writeln!(out, "Text encoder: LoRA adapters train too (peak learning rate {lr:e}, same schedule); captions are encoded every step");
    }
    let s = &plan.lr_schedule;
    let _ = writeln!(
        out,
        "Learning rate: {}, {:e} -> {:e} over {} steps (warmup {}); at 0/25/50/75/100%: {}",
        config_name(&s.kind),
        s.learning_rate,
        s.at(s.total_steps),
        s.total_steps,
        s.warmup_steps,
        [0.0, 0.25, 0.5, 0.75, 1.0].iter().map(|f| format!("{:.3e}", s.at((s.total_steps as f64 * f) as u64))).collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(out, "Regularisation mode: {}", config_name(&plan.regularisation_mode));
    for warning in &plan.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}
