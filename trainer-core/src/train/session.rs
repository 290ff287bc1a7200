//! One training run: caches, the step loop, validation, checkpoints and
//! exports. The native runner and the browser app drive the same session;
//! they differ only in the [`Storage`], the image sources and the device.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use super::cache::{self, CachedLatents, CachedText};
use super::checkpoint::{self, Checkpoint, RunState};
use super::checkpointing::backward_in_stages;
use super::export;
use super::metrics::{self, StepMetrics};
use super::noise::NoiseSchedule;
use super::optimizer::{frozen_on, AdamW, AdamWSettings, ToTrainDevice};
use super::run_record::{self, OutputUse, RunRecord};
use super::storage::{join, Storage};
use super::tensor_file::HostTensor;
use crate::config::training::{ModelFamily, ModelType, Optimizer, RegularisationMode, TrainingConfig};
use crate::data::preprocess::prepare;
use crate::data::sampler::Batch;
use crate::data::source::ImageSource;
use crate::error::{Error, Result};
use crate::models::lora::{DropoutSource, LoraTargets};
use crate::models::clip::ClipTextModel;
use crate::models::unet::AddedConditions;
use crate::models::{Family, StableDiffusion};
use crate::pipeline::{a1111_parameters, gaussian_noise, png_with_parameters, to_rgb8, GenerateRequest, Generated};
use crate::plan::{build_samplers, Plan, PlannedSampler};
use crate::rng::SeededRng;
use crate::schedule::LearningRateSchedule;
use crate::schedulers::SamplerKind;

/// Progress of a long phase (caching, validation sampling).
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub phase: &'a str,
    pub done: usize,
    pub total: usize,
    /// Entries that had to be computed (the rest came from the cache).
    pub computed: usize,
}

/// What one optimizer step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub epoch: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f32,
}

/// Options that are not part of the SimpleTuner config.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub lora_targets: LoraTargets,
    /// The validation sampler (diffusers' scripts use DPM-Solver++).
    pub validation_sampler: SamplerKind,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { lora_targets: LoraTargets::attention(), validation_sampler: SamplerKind::DpmPp2m }
    }
}

pub struct Session<'a> {
    pub config: TrainingConfig,
    pub plan: Plan,
    pub model: StableDiffusion,
    sources: Vec<Box<dyn ImageSource + 'a>>,
    storage: &'a dyn Storage,
    device: Device,
    train_device: Device,
    noise: NoiseSchedule,
    optimizer: AdamW,
    lr_schedule: LearningRateSchedule,
    main: PlannedSampler,
    prior: Option<PlannedSampler>,
    dropout: Option<DropoutSource>,
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Latent cache entry of each planned image, `[dataset][image]`.
    latent_paths: Vec<Vec<String>>,
    /// Text cache entry by (cache dir, caption).
    text_paths: BTreeMap<(String, String), String>,
    pub metrics: Vec<StepMetrics>,
    /// Runs between checkpoint files (tests kill the process there).
    pub checkpoint_hook: Box<dyn Fn() + 'a>,
    /// What the last [`resume`](Self::resume) could not restore exactly.
    pub resume_notes: Vec<String>,
}

/// Where the text encoder's tensors are named in checkpoints and optimizer state.
const TEXT_ENCODER_PREFIX: &str = "text_encoder.";
const TEXT_ENCODER_2_PREFIX: &str = "text_encoder_2.";

/// The text encoders: SDXL has two.
type TextEncoders = (ClipTextModel, Option<ClipTextModel>);

/// The model's text encoders, each with the prefix its tensors carry in
/// checkpoints and optimizer state (none unless they train).
fn trained_text_encoders(train: bool, model: &StableDiffusion) -> Vec<(&'static str, &ClipTextModel)> {
    if !train {
        return Vec::new();
    }
    let mut all = vec![(TEXT_ENCODER_PREFIX, &model.text_encoder)];
    all.extend(model.text_encoder_2.as_ref().map(|e| (TEXT_ENCODER_2_PREFIX, e)));
    all
}

/// Replaces each trained text encoder by `update(prefix, encoder)`.
fn update_text_encoders(train: bool, model: &mut StableDiffusion, mut update: impl FnMut(&'static str, ClipTextModel) -> Result<ClipTextModel>) -> Result<()> {
    if !train {
        return Ok(());
    }
    model.text_encoder = update(TEXT_ENCODER_PREFIX, model.text_encoder.clone())?;
    if let Some(encoder) = model.text_encoder_2.clone() {
        model.text_encoder_2 = Some(update(TEXT_ENCODER_2_PREFIX, encoder)?);
    }
    Ok(())
}

/// What one batch feeds the UNet.
struct BatchInputs {
    latents: Tensor<4>,
    context: Tensor<3>,
    /// The base text encoder's context (the same as `context` unless the text encoder trains).
    base_context: Tensor<3>,
    /// SDXL's pooled embedding and size ids.
    added: Option<AddedConditions>,
    /// The same with the base encoder's pooled embedding.
    base_added: Option<AddedConditions>,
}

/// One UNet pass of a training step: its inputs and what its prediction
/// is compared with.
struct Regression {
    noisy: Tensor<4>,
    t_values: Vec<f32>,
    context: Tensor<3>,
    added: Option<AddedConditions>,
    target: Tensor<4>,
    /// Min-SNR-γ weight per batch item, `[batch, 1]`.
    weights: Option<Tensor<2>>,
    /// Multiplies the loss (`prior_loss_weight` for the class batch).
    factor: f64,
}

impl Regression {
    /// The mean (weighted) squared error of `prediction`, times `factor`.
    fn loss(&self, prediction: Tensor<4>) -> Tensor<1> {
        let batch = prediction.dims()[0];
        let per_sample = (prediction - self.target.clone()).square().reshape([batch as i32, -1]).mean_dim(1);
        let loss = match &self.weights {
            Some(weights) => (per_sample * weights.clone()).mean(),
            None => per_sample.mean(),
        };
        if self.factor == 1.0 {
            loss
        } else {
            loss * self.factor
        }
    }
}

/// A NaN or infinite loss stops the run before the weights change.
fn check_finite(loss: f32, step: u64) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    Err(Error::Training {
        step,
        message: format!("the loss is {loss}; the weights were not updated and the last checkpoint is intact. Lower the learning rate or check the data"),
    })
}

impl<'a> Session<'a> {
    /// Sets a run up: the UNet goes to the training device (autodiff), LoRA adapters are attached
    /// or the whole UNet is made trainable. `sources[i]` gives the files of
    /// `plan.datasets[i]`.
    pub fn new(
        config: TrainingConfig,
        plan: Plan,
        mut model: StableDiffusion,
        sources: Vec<Box<dyn ImageSource + 'a>>,
        storage: &'a dyn Storage,
        device: Device,
        options: SessionOptions,
    ) -> Result<Self> {
        if sources.len() != plan.datasets.len() {
            return Err(Error::Training { step: 0, message: format!("{} image sources for {} datasets", sources.len(), plan.datasets.len()) });
        }
        let configured = match config.model_family {
            ModelFamily::Sd1x => Family::Sd1,
            ModelFamily::Sd2x => Family::Sd2,
            ModelFamily::Sdxl => Family::Sdxl,
        };
        if configured != model.family {
            return Err(Error::Config {
                source_name: config.source_name.clone(),
                problems: vec![format!(
                    "model_family is {} but the model is {:?}: set MODEL_FAMILY (model_family) to match the model",
                    config.model_family_name(),
                    model.family
                )],
            });
        }
        if config.regularisation_mode == RegularisationMode::ParentPrediction && config.model_type == ModelType::Full
            && plan.datasets.iter().any(|d| d.is_regularisation_data)
        {
            return Err(Error::Config {
                source_name: config.source_name.clone(),
                problems: vec!["regularisation_mode parent_prediction needs LoRA training (the base model's prediction is the adapter switched off); use prior_preservation or mixed for full fine-tuning".into()],
            });
        }
        // Gradient checkpointing works by stage (train::checkpointing), not per operation.
        let train_device = device.clone().autodiff();
        let noise = NoiseSchedule::new(&model.configs.scheduler, config.prediction_type);
        let full = config.model_type == ModelType::Full;
        let unet = model.unet.clone();
        let mut unet = unet.map(&mut ToTrainDevice { device: &train_device, trainable: full });
        let dropout = (!full && config.lora_dropout > 0.0).then(|| DropoutSource::new(config.lora_dropout));
        if !full {
            let mut attached = 0;
            for layer in unet.lora_layers_mut() {
                if options.lora_targets.matches(&layer.path) {
                    layer.attach(config.lora_rank as usize, config.lora_alpha, config.seed, dropout.clone(), &train_device);
                    attached += 1;
                }
            }
            if attached == 0 {
                return Err(Error::Config {
                    source_name: config.source_name.clone(),
                    problems: vec![format!("no UNet layer matches the LoRA targets {:?}", options.lora_targets.suffixes)],
                });
            }
        }
        model.unet = unet;
        if config.train_text_encoder {
            if full {
                return Err(Error::Config { source_name: config.source_name.clone(), problems: vec!["train_text_encoder needs LoRA training".into()] });
            }
            // Both encoders for SDXL; the second's adapters draw their own initial values.
            let attach = |encoder: &ClipTextModel, seed: u64| -> Result<ClipTextModel> {
                let mut encoder = encoder.clone().map(&mut ToTrainDevice { device: &train_device, trainable: false });
                let mut attached = 0;
                for layer in encoder.lora_layers_mut() {
                    if options.lora_targets.matches_text(&layer.path) {
                        layer.attach(config.lora_rank as usize, config.lora_alpha, seed, dropout.clone(), &train_device);
                        attached += 1;
                    }
                }
                if attached == 0 {
                    return Err(Error::Config { source_name: config.source_name.clone(), problems: vec!["train_text_encoder: no text-encoder layer to adapt".into()] });
                }
                Ok(encoder)
            };
            model.text_encoder = attach(&model.text_encoder, config.seed)?;
            if let Some(encoder) = &model.text_encoder_2 {
                model.text_encoder_2 = Some(attach(encoder, SeededRng::derived(config.seed, "text-encoder-2").next_u64())?);
            }
        }
        let bf16 = config.optimizer == Optimizer::AdamwBf16 && plan.optimizer.state_dtype == "bf16";
        if bf16 {
            model.unet = model.unet.map(&mut CastTrainable { dtype: burn::tensor::DType::BF16, device: &train_device });
            model.text_encoder = model.text_encoder.map(&mut CastTrainable { dtype: burn::tensor::DType::BF16, device: &train_device });
            model.text_encoder_2 = model.text_encoder_2.map(|e| e.map(&mut CastTrainable { dtype: burn::tensor::DType::BF16, device: &train_device }));
        }
        let optimizer = AdamW::new(AdamWSettings {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            epsilon: config.adam_epsilon,
            weight_decay: config.adam_weight_decay,
            max_grad_norm: config.max_grad_norm,
            bf16,
        });
        let (main, prior) = build_samplers(&plan.datasets, &config);
        Ok(Self {
            lr_schedule: plan.lr_schedule.clone(),
            config,
            plan,
            model,
            sources,
            storage,
            device,
            train_device,
            noise,
            optimizer,
            main,
            prior,
            dropout,
            step: 0,
            epoch: 1,
            latent_paths: Vec::new(),
            text_paths: BTreeMap::new(),
            metrics: Vec::new(),
            checkpoint_hook: Box::new(|| {}),
            resume_notes: Vec::new(),
        })
    }

    pub fn output_path(&self, name: &str) -> String {
        join(&self.config.output_dir, name)
    }

    pub fn total_steps(&self) -> u64 {
        self.plan.max_steps
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.plan.max_steps
    }

    /// Encodes every image and caption that is not cached yet.
    pub async fn prepare_caches(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Result<()> {
        let total_images: usize = self.plan.datasets.iter().map(|d| d.images.len()).sum();
        let mut resizer = fast_image_resize::Resizer::new();
        let (mut done, mut computed) = (0, 0);
        self.latent_paths = Vec::new();
        for (d, dataset) in self.plan.datasets.iter().enumerate() {
            let mut paths = Vec::new();
            for image in &dataset.images {
                let bytes = self.sources[d].read(&image.path)?;
                let geometry = image.geometry();
                let [width, height] = geometry.target_size.map(|side| side as usize);
                let tiling = self.model.encode_tiling(&self.device, height, width);
                // Tiled latents differ slightly from whole ones: their cache entries do too.
                let vae_identity = match tiling {
                    Some(tiling) => format!("{}+tiles{}", self.model.fingerprints.vae, tiling.tile_sample_size),
                    None => self.model.fingerprints.vae.clone(),
                };
                let key = cache::latent_key(&bytes, &geometry, &vae_identity);
                let path = cache::entry_path(&dataset.cache_dir_vae, &key);
                if !self.storage.exists(&path)? {
                    let pixels = prepare(&bytes, &geometry, &mut resizer)
                        .map_err(|reason| Error::Image { path: format!("{}/{}", dataset.folder, image.path), reason })?;
                    let distribution = self.model.vae.encode_tiled(image_tensor(&pixels, &self.device), &self.model.configs.vae, tiling);
                    // A device failure names the image being encoded.
                    let at_image = |error: Error| match error {
                        Error::Io { message, .. } => Error::Io { path: format!("{}/{}", dataset.folder, image.path), message: format!("encoding its latents: {message}") },
                        other => other,
                    };
                    let entry = CachedLatents {
                        mean: HostTensor::from_batch_item(distribution.mean).await.map_err(at_image)?,
                        logvar: HostTensor::from_batch_item(distribution.logvar).await.map_err(at_image)?,
                    };
                    entry.write(self.storage, &path, &format!("{}/{}", dataset.folder, image.path))?;
                    computed += 1;
                }
                paths.push(path);
                done += 1;
                progress(Progress { phase: "latents", done, total: total_images, computed });
            }
            self.latent_paths.push(paths);
        }

        let mut captions: Vec<(String, String)> = Vec::new();
        for dataset in &self.plan.datasets {
            for image in &dataset.images {
                for caption in image.captions() {
                    captions.push((dataset.text_cache_dir.clone(), caption));
                }
            }
            if self.config.caption_dropout_probability > 0.0 {
                captions.push((dataset.text_cache_dir.clone(), String::new()));
            }
        }
        captions.sort();
        captions.dedup();
        // The cache holds the base encoder's output (resumed runs carry trained adapters).
        let base = self.inference_text_encoders(false);
        let trained = self.replace_text_encoders(base);
        let result = self.cache_text_embeddings(&captions, progress).await;
        self.replace_text_encoders(trained);
        result
    }

    /// Puts `encoders` in the model; returns the ones it held.
    fn replace_text_encoders(&mut self, encoders: TextEncoders) -> TextEncoders {
        (std::mem::replace(&mut self.model.text_encoder, encoders.0), std::mem::replace(&mut self.model.text_encoder_2, encoders.1))
    }

    /// The text encoders for inference: with or without the trained
    /// adapters, off the autodiff device when they train.
    fn inference_text_encoders(&self, with_lora: bool) -> TextEncoders {
        let prepare = |encoder: &ClipTextModel| {
            let encoder = if with_lora { encoder.clone() } else { encoder.without_lora() };
            if self.config.train_text_encoder {
                encoder.valid()
            } else {
                encoder
            }
        };
        (prepare(&self.model.text_encoder), self.model.text_encoder_2.as_ref().map(prepare))
    }

    async fn cache_text_embeddings(&mut self, captions: &[(String, String)], progress: &mut dyn FnMut(Progress<'_>)) -> Result<()> {
        let (mut done, mut computed) = (0, 0);
        for (dir, caption) in captions {
            let key = cache::text_key(caption, 0, &self.model.fingerprints.text());
            let path = cache::entry_path(dir, &key);
            if !self.storage.exists(&path)? {
                let conditioning = self.model.encode_conditioning(&[caption.as_str()], &self.device)?;
                let pooled = match conditioning.pooled {
                    Some(pooled) => Some(HostTensor::from_batch_item(pooled).await?),
                    None => None,
                };
                let entry = CachedText { hidden: HostTensor::from_batch_item(conditioning.context).await?, pooled };
                cache::write_text(self.storage, &path, &entry, caption)?;
                computed += 1;
            }
            self.text_paths.insert((dir.clone(), caption.clone()), path);
            done += 1;
            progress(Progress { phase: "text embeddings", done, total: captions.len(), computed });
        }
        Ok(())
    }

    /// Latents and text context of one batch, on the training device. The
    /// context is the cached base encoder's, or, when the text encoder
    /// trains, its output now (with gradients); `BatchInputs::base_context`
    /// is always the base encoder's (parent predictions).
    fn batch_inputs(&self, batch: &Batch, sampler: &PlannedSampler, rng: &mut SeededRng) -> Result<BatchInputs> {
        let d = sampler.datasets[batch.dataset];
        let dataset = &self.plan.datasets[d];
        let mut latents = Vec::new();
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        let mut time_ids = Vec::new();
        let mut captions = Vec::new();
        for sample in &batch.samples {
            let path = &self.latent_paths[d][sample.image];
            let cached = CachedLatents::read(self.storage, path)?
                .ok_or_else(|| Error::Io { path: path.clone(), message: "latent cache entry vanished during training".into() })?;
            let (mean, logvar) = cached.to_tensors(&self.device)?;
            let eps = gaussian_noise(mean.dims(), rng, &self.device);
            latents.push(mean + (logvar * 0.5).exp() * eps);
            let image = &dataset.images[sample.image];
            let caption = if sample.drop_caption {
                String::new()
            } else {
                image.captions().into_iter().nth(sample.caption_variant as usize).unwrap_or_default()
            };
            let text_path = self.text_paths.get(&(dataset.text_cache_dir.clone(), caption.clone())).ok_or_else(|| Error::Training {
                step: self.step,
                message: format!("caption '{caption}' has no text-embedding cache entry"),
            })?;
            let text = cache::read_text(self.storage, text_path)?
                .ok_or_else(|| Error::Io { path: text_path.clone(), message: "text cache entry vanished during training".into() })?;
            let batched = |t: HostTensor| HostTensor { shape: [vec![1], t.shape].concat(), values: t.values };
            contexts.push(batched(text.hidden).to_tensor::<3>(&self.device)?);
            if self.model.unet.needs_added_conditions() {
                let entry = text.pooled.ok_or_else(|| Error::Io { path: text_path.clone(), message: "an SDXL text cache entry needs 'pooled'; delete it".into() })?;
                pooled.push(batched(entry).to_tensor::<2>(&self.device)?);
                // SDXL's size conditioning: original size, crop top-left, target size, (h, w) order.
                let g = image.geometry();
                let [ow, oh] = g.original_size;
                let [top, left] = g.crop_offset;
                let [tw, th] = g.target_size;
                time_ids.push([oh, ow, top, left, th, tw].map(|v| v as f32));
            }
            captions.push(caption);
        }
        let mut added = (!pooled.is_empty()).then(|| AddedConditions { pooled: frozen_on(Tensor::cat(pooled, 0), &self.train_device), time_ids });
        let base_added = added.clone();
        let vae = &self.model.configs.vae;
        let latents = (Tensor::cat(latents, 0) - vae.shift_factor.unwrap_or(0.0)) * vae.scaling_factor;
        let base_context = frozen_on(Tensor::cat(contexts, 0), &self.train_device);
        let context = if self.config.train_text_encoder {
            let captions: Vec<&str> = captions.iter().map(String::as_str).collect();
            let conditioning = self.model.encode_conditioning(&captions, &self.train_device)?;
            if let (Some(added), Some(pooled)) = (added.as_mut(), conditioning.pooled) {
                added.pooled = pooled;
            }
            conditioning.context
        } else {
            base_context.clone()
        };
        Ok(BatchInputs { latents: frozen_on(latents, &self.train_device), context, base_context, added, base_added })
    }

    /// One batch's noisy latents, timesteps and regression target. `parent`
    /// replaces the target by the base model's prediction; `weighted`
    /// applies min-SNR-γ.
    fn regression(&self, inputs: BatchInputs, rng: &mut SeededRng, parent: bool, weighted: bool) -> Regression {
        let BatchInputs { latents, context, base_context, added, base_added } = inputs;
        let shape = latents.dims();
        let batch = shape[0];
        let mut noise = frozen_on(gaussian_noise(shape, rng, &self.device), &self.train_device);
        if self.config.offset_noise && self.config.noise_offset > 0.0 && rng.next_f64() < self.config.noise_offset_probability {
            let offset = gaussian_noise([batch, shape[1], 1, 1], rng, &self.device) * self.config.noise_offset;
            noise = noise + frozen_on(offset, &self.train_device);
        }
        let timesteps: Vec<usize> = (0..batch).map(|_| rng.below(self.noise.num_timesteps() as u64) as usize).collect();
        let t_values: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let noisy = self.noise.add_noise(latents.clone(), noise.clone(), &timesteps);
        let target = if parent {
            if let Some(dropout) = &self.dropout {
                dropout.stop();
            }
            let base = self.model.unet.without_lora();
            let prediction = base.forward_with(noisy.clone().detach(), &t_values, base_context.detach(), base_added.as_ref()).detach();
            if let Some(dropout) = &self.dropout {
                dropout.start_step(self.config.seed, self.step, rng.next_u64());
            }
            prediction
        } else {
            self.noise.target(latents, noise, &timesteps)
        };
        let weights = match (weighted, self.config.snr_gamma) {
            (true, Some(gamma)) if gamma > 0.0 => {
                let weights: Vec<f32> = timesteps.iter().map(|&t| self.noise.min_snr_weight(t, gamma) as f32).collect();
                Some(frozen_on(Tensor::<2>::from_data(TensorData::new(weights, [batch, 1]), &self.device), &self.train_device))
            }
            _ => None,
        };
        Regression { noisy, t_values, context, added, target, weights, factor: 1.0 }
    }

    /// One optimizer step (with gradient accumulation). Fails with a
    /// message on a NaN or infinite loss, before the weights are touched.
    pub async fn train_step(&mut self) -> Result<StepReport> {
        let accumulation = self.config.gradient_accumulation_steps.max(1) as u64;
        let scale = 1.0 / accumulation as f64;
        let mut loss_sum = 0.0f32;
        for micro in 0..accumulation {
            let mut rng = SeededRng::derived(self.config.seed, &format!("step/{}/{micro}", self.step));
            if let Some(dropout) = &self.dropout {
                dropout.start_step(self.config.seed, self.step, micro);
            }
            let batch = self.main.sampler.next_batch().ok_or_else(|| Error::Training { step: self.step, message: "the datasets ran out of batches".into() })?;
            self.epoch = batch.epoch;
            let is_class_batch = self.plan.datasets[self.main.datasets[batch.dataset]].is_regularisation_data;
            let inputs = self.batch_inputs(&batch, &self.main, &mut rng)?;
            let parent = is_class_batch && self.config.regularisation_mode == RegularisationMode::ParentPrediction && self.config.model_type == ModelType::Lora;
            let mut terms = vec![self.regression(inputs, &mut rng, parent, !parent)];
            if self.prior.is_some() {
                let prior = self.prior.as_mut().expect("checked");
                let class_batch = prior.sampler.next_batch().ok_or_else(|| Error::Training { step: self.step, message: "the class datasets ran out of batches".into() })?;
                let prior = self.prior.as_ref().expect("checked");
                let inputs = self.batch_inputs(&class_batch, prior, &mut rng)?;
                // The prior term is never SNR-weighted (train_dreambooth.py).
                let mut term = self.regression(inputs, &mut rng, false, false);
                term.factor = self.config.prior_loss_weight;
                terms.push(term);
            }
            let value = match self.micro_batch_backward(terms, scale).await {
                Ok(value) => value,
                Err(error) => {
                    self.optimizer.discard_gradients();
                    return Err(error);
                }
            };
            loss_sum += value;
        }
        let lr = self.lr_schedule.at(self.step);
        let grad_norm = self.optimizer.begin_step();
        // Read the norm before the update: a NaN or infinite gradient with a
        // finite loss would otherwise turn every weight into NaN (the clip
        // factor multiplies them all).
        let grad_norm = match grad_norm {
            Some(norm) => norm
                .into_scalar_async::<f32>()
                .await
                .map_err(|e| Error::Training { step: self.step + 1, message: crate::error::device_failure("the gradient norm", e) })?,
            None => 0.0,
        };
        if !grad_norm.is_finite() {
            self.optimizer.discard_step();
            return Err(Error::Training {
                step: self.step + 1,
                message: format!(
                    "the gradient norm is {grad_norm} (the loss was {}); the weights were not updated and the last checkpoint is intact. Lower the learning rate or check the data",
                    loss_sum / accumulation as f32
                ),
            });
        }
        self.model.unet = self.optimizer.apply(self.model.unet.clone(), "", lr, &self.train_device);
        // The schedule scales both rates alike (diffusers' parameter groups).
        let text_lr = self.config.text_encoder_lr.map_or(lr, |rate| lr * rate / self.config.learning_rate);
        let (optimizer, train_device) = (&mut self.optimizer, &self.train_device);
        update_text_encoders(self.config.train_text_encoder, &mut self.model, |prefix, encoder| Ok(optimizer.apply(encoder, prefix, text_lr, train_device)))?;
        self.step += 1;
        if let Some(dropout) = &self.dropout {
            dropout.stop();
        }
        Ok(StepReport { step: self.step, epoch: self.epoch, loss: loss_sum / accumulation as f32, lr, grad_norm })
    }

    /// Back-propagates the sum of `terms`' losses (one UNet pass each),
    /// adding the gradients, times `scale`, to the optimizer's. With
    /// gradient checkpointing each pass goes stage by stage
    /// ([`backward_in_stages`]). Returns the loss; a NaN or infinite loss
    /// is an error.
    async fn micro_batch_backward(&mut self, terms: Vec<Regression>, scale: f64) -> Result<f32> {
        let step = self.step + 1;
        let read = |loss: Tensor<1>| async move {
            loss.into_scalar_async::<f32>().await.map_err(|e| Error::Training { step, message: crate::error::device_failure("the loss", e) })
        };
        let (optimizer, model, train_text) = (&mut self.optimizer, &self.model, self.config.train_text_encoder);
        let mut collect = |grads: &mut burn::tensor::Gradients| {
            optimizer.accumulate(&model.unet, "", grads, scale);
            for (prefix, encoder) in trained_text_encoders(train_text, model) {
                optimizer.accumulate(encoder, prefix, grads, scale);
            }
        };
        let checkpointing = self.config.gradient_checkpointing;
        let mut losses = Vec::with_capacity(terms.len());
        for term in terms {
            if let Some(dropout) = &self.dropout {
                dropout.begin_forward();
            }
            losses.push(if checkpointing {
                backward_in_stages(&model.unet, term.noisy.clone(), &term.t_values, term.context.clone(), term.added.as_ref(), &self.train_device, &|prediction| term.loss(prediction), &mut collect)
            } else {
                term.loss(model.unet.forward_with(term.noisy.clone(), &term.t_values, term.context.clone(), term.added.as_ref()))
            });
        }
        let loss = losses.into_iter().reduce(|sum, loss| sum + loss).expect("at least one term");
        let value = read(loss.clone()).await?;
        // Without checkpointing this is checked before the backward pass; with
        // it the gradients are already collected and the caller discards them.
        check_finite(value, step)?;
        if !checkpointing {
            collect(&mut loss.backward());
        }
        Ok(value)
    }

    /// Records a step in `metrics.jsonl` and redraws `loss.png`.
    pub fn record(&mut self, report: &StepReport, seconds: f64) -> Result<()> {
        let entry = StepMetrics { step: report.step, epoch: report.epoch, loss: report.loss, lr: report.lr, grad_norm: report.grad_norm, time: seconds };
        self.storage.append(&self.output_path("metrics.jsonl"), (serde_json::to_string(&entry).expect("serialises") + "\n").as_bytes())?;
        self.metrics.push(entry);
        Ok(())
    }

    pub fn write_loss_plot(&self) -> Result<String> {
        let path = self.output_path("loss.png");
        self.storage.write(&path, &metrics::png_bytes(&metrics::loss_plot(&self.metrics, 640, 360)))?;
        Ok(path)
    }

    pub fn validation_due(&self) -> bool {
        let every = self.config.validation_step_interval;
        self.config.validation_prompt.is_some() && every > 0 && self.step % every == 0
    }

    pub fn checkpoint_due(&self) -> bool {
        let every = self.config.checkpoint_step_interval;
        every > 0 && self.step % every == 0
    }

    /// The validation image size: `validation_resolution` or the first bucket's size.
    fn validation_size(&self) -> (usize, usize) {
        let text = self.config.validation_resolution.trim();
        let parsed = match text.split_once('x') {
            Some((w, h)) => w.trim().parse().ok().zip(h.trim().parse().ok()),
            None => text.parse::<f64>().ok().filter(|v| *v > 16.0).map(|v| (v as usize, v as usize)),
        };
        parsed.unwrap_or_else(|| {
            let size = self.plan.datasets.iter().flat_map(|d| d.buckets.first()).next().map(|b| b.target_size);
            size.map(|s| (s[0] as usize, s[1] as usize)).unwrap_or((512, 512))
        })
    }

    /// Samples the validation prompt with the current weights and writes
    /// `validation/step-<N>.png` (with its parameters). Returns the path and image.
    pub async fn validate(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Option<(String, RgbImage)>> {
        let Some(prompt) = self.config.validation_prompt.clone() else { return Ok(None) };
        let (width, height) = self.validation_size();
        let request = GenerateRequest {
            prompt,
            negative_prompt: self.config.validation_negative_prompt.clone(),
            steps: self.config.validation_num_inference_steps.max(1) as usize,
            guidance: self.config.validation_guidance,
            sampler: SamplerKind::DpmPp2m,
            seed: self.config.validation_seed.unwrap_or(self.config.seed),
            width,
            height,
        };
        let image = self.sample(&request, progress).await?;
        let parameters = a1111_parameters(&request, self.plan.model.as_deref().unwrap_or("model"), &[("Burnbooth step", self.step.to_string())]);
        let path = self.output_path(&format!("validation/step-{:06}.png", self.step));
        self.storage.write(&path, &png_with_parameters(&image, &parameters)?)?;
        Ok(Some((path, image)))
    }

    /// Generates with the current weights (adapters on, dropout off).
    pub fn generate(&mut self, request: &GenerateRequest, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Generated> {
        if let Some(dropout) = &self.dropout {
            dropout.stop();
        }
        let inference = self.model.unet.valid();
        let trained = std::mem::replace(&mut self.model.unet, inference);
        let inference_text = self.inference_text_encoders(true);
        let trained_text = self.replace_text_encoders(inference_text);
        let result = self.model.generate(request, None, &self.device, &mut |done, total| progress(Progress { phase: "sampling", done, total, computed: done }));
        self.model.unet = trained;
        self.replace_text_encoders(trained_text);
        result
    }

    /// Samples with the trained adapters, or with the base model (`with_lora` off).
    pub async fn sample_with(&mut self, request: &GenerateRequest, with_lora: bool, progress: &mut dyn FnMut(Progress<'_>)) -> Result<RgbImage> {
        if with_lora {
            return self.sample(request, progress).await;
        }
        let base_unet = self.model.unet.without_lora();
        let trained_unet = std::mem::replace(&mut self.model.unet, base_unet);
        let base_text = (self.model.text_encoder.without_lora(), self.model.text_encoder_2.as_ref().map(ClipTextModel::without_lora));
        let trained_text = self.replace_text_encoders(base_text);
        let result = self.sample(request, progress).await;
        self.model.unet = trained_unet;
        self.replace_text_encoders(trained_text);
        result
    }

    pub async fn sample(&mut self, request: &GenerateRequest, progress: &mut dyn FnMut(Progress<'_>)) -> Result<RgbImage> {
        to_rgb8(self.generate(request, progress)?.image).await
    }

    /// Saves a checkpoint (atomically) and prunes old ones.
    pub async fn save_checkpoint(&self) -> Result<String> {
        let checkpoint = Checkpoint {
            path: String::new(),
            state: RunState {
                step: self.step,
                epoch: self.epoch,
                sampler: self.main.sampler.state().clone(),
                prior_sampler: self.prior.as_ref().map(|p| p.sampler.state().clone()),
                model_type: format!("{:?}", self.config.model_type),
                lora_rank: (self.config.model_type == ModelType::Lora).then_some(self.config.lora_rank),
            },
            trainable: self.trainable_tensors().await?,
            optimizer: self.optimizer.state().await?,
        };
        checkpoint::save(self.storage, &self.config.output_dir, &checkpoint, self.config.checkpoints_total_limit, self.checkpoint_hook.as_ref())
    }

    /// The trainable tensors by module path; the text encoders' start with
    /// `text_encoder.` and `text_encoder_2.`.
    async fn trainable_tensors(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut all = checkpoint::trainable_tensors(&self.model.unet).await?;
        for (prefix, encoder) in trained_text_encoders(self.config.train_text_encoder, &self.model) {
            for (name, tensor) in checkpoint::trainable_tensors(encoder).await? {
                all.insert(format!("{prefix}{name}"), tensor);
            }
        }
        Ok(all)
    }

    /// Continues from a checkpoint (`latest` or a path): weights, moments,
    /// step, sampler positions; metrics after that step are dropped.
    /// What this run trains, how and on what, for the output folder's record.
    pub fn run_record(&self) -> RunRecord {
        let c = &self.config;
        let mut adapters = BTreeMap::from([("model_type".to_string(), format!("{:?}", c.model_type))]);
        if c.model_type == ModelType::Lora {
            let layers: Vec<&str> = self.model.unet.adapted_layers().iter().map(|l| l.path.as_str()).collect();
            adapters.insert("lora_rank".into(), c.lora_rank.to_string());
            adapters.insert("lora_alpha".into(), c.lora_alpha.to_string());
            adapters.insert("LoRA target layers".into(), format!("{} layers, {}", layers.len(), &RunRecord::content_hash(&layers)[..12]));
            adapters.insert("train_text_encoder".into(), c.train_text_encoder.to_string());
        }
        let datasets = self.plan.datasets.iter().map(|d| (d.id.clone(), RunRecord::content_hash(&d.images))).collect();
        let model = serde_json::to_value(&self.model.fingerprints).expect("fingerprints serialise");
        RunRecord::new(model, adapters, serde_json::to_value(c).expect("configs serialise"), datasets)
    }

    /// Readies the output folder and records this run in it: a new run
    /// into a folder that holds one is refused, `StartOver` moves the old
    /// outputs aside, and resuming (`resume`: `latest` or a checkpoint)
    /// checks the folder's record, refusing a changed model or adapter
    /// layout. Returns what to tell the user (what changed, where old
    /// outputs went, which checkpoint was resumed).
    pub fn begin(&mut self, output_use: OutputUse, resume: Option<&str>) -> Result<Vec<String>> {
        let output_dir = self.config.output_dir.clone();
        let mut notes = run_record::clean_interrupted_writes(self.storage, &output_dir)?;
        if let Some(aside) = run_record::prepare_output(self.storage, &output_dir, output_use)? {
            notes.push(format!("the earlier run's outputs were moved to {aside}"));
        }
        let record = self.run_record();
        if let (Some(which), OutputUse::Resume) = (resume, output_use) {
            if let Some(earlier) = run_record::read(self.storage, &output_dir)? {
                match record.compare(&earlier) {
                    Ok(changes) => notes.extend(changes.into_iter().map(|c| format!("since the run began: {c}"))),
                    Err(problems) => {
                        return Err(Error::Config {
                            source_name: join(&output_dir, run_record::RUN_RECORD),
                            problems: problems.into_iter().map(|p| format!("cannot resume: {p}")).collect(),
                        })
                    }
                }
            }
            let path = self.resume(which)?;
            notes.push(format!("resumed from {path} at step {}", self.step));
            notes.extend(self.resume_notes.iter().cloned());
        }
        run_record::write(self.storage, &output_dir, &record)?;
        Ok(notes)
    }

    pub fn resume(&mut self, which: &str) -> Result<String> {
        let path = checkpoint::resolve(self.storage, &self.config.output_dir, which)?;
        let saved = checkpoint::load(self.storage, &path)?;
        // The UNet's tensors, and the text encoders' by prefix.
        let mut unet = BTreeMap::new();
        let mut text: BTreeMap<&str, BTreeMap<String, HostTensor>> = BTreeMap::new();
        for (name, tensor) in saved.trainable.clone() {
            match [TEXT_ENCODER_PREFIX, TEXT_ENCODER_2_PREFIX].into_iter().find(|p| name.starts_with(p)) {
                Some(prefix) => text.entry(prefix).or_default().insert(name[prefix.len()..].to_string(), tensor),
                None => unet.insert(name, tensor),
            };
        }
        if !text.is_empty() && !self.config.train_text_encoder {
            return Err(Error::Config {
                source_name: path,
                problems: vec!["this checkpoint trained the text encoder; set train_text_encoder to resume it".into()],
            });
        }
        self.model.unet = checkpoint::restore_trainable(self.model.unet.clone(), &unet, &self.train_device, &path)?;
        let train_device = &self.train_device;
        update_text_encoders(self.config.train_text_encoder, &mut self.model, |prefix, encoder| {
            checkpoint::restore_trainable(encoder, &text.remove(prefix).unwrap_or_default(), train_device, &path)
        })?;
        self.optimizer.load_state(&saved.optimizer, saved.state.step, &self.device)?;
        let mut misfits = Vec::new();
        misfits.extend(self.main.sampler.restore(saved.state.sampler.clone()).err());
        if let (Some(prior), Some(state)) = (self.prior.as_mut(), saved.state.prior_sampler.clone()) {
            misfits.extend(prior.sampler.restore(state).err());
        }
        self.resume_notes = misfits.into_iter().map(|m| format!("{m}: the data order starts a new pass (the step count goes on)")).collect();
        self.step = saved.state.step;
        self.epoch = saved.state.epoch;
        let metrics_path = self.output_path("metrics.jsonl");
        let kept = match self.storage.read(&metrics_path)? {
            Some(bytes) => metrics::parse_jsonl(&String::from_utf8_lossy(&bytes), self.step),
            None => Vec::new(),
        };
        self.storage.write(&metrics_path, metrics::to_jsonl(&kept).as_bytes())?;
        self.metrics = kept;
        Ok(path)
    }

    /// Writes the trained LoRA in kohya format; returns its path.
    pub async fn export_lora(&self, name: &str) -> Result<String> {
        let c = &self.config;
        let extra = BTreeMap::from([
            ("ss_output_name".to_string(), name.to_string()),
            ("ss_steps".to_string(), self.step.to_string()),
            ("ss_epoch".to_string(), self.epoch.to_string()),
            ("ss_learning_rate".to_string(), c.learning_rate.to_string()),
            ("ss_lr_scheduler".to_string(), format!("{:?}", c.lr_scheduler).to_lowercase()),
            ("ss_optimizer".to_string(), format!("{:?}", c.optimizer).to_lowercase()),
            ("ss_seed".to_string(), c.seed.to_string()),
            ("ss_training_comment".to_string(), "trained with Burnbooth".to_string()),
            ("ss_sd_model_name".to_string(), self.plan.model.clone().unwrap_or_default()),
            ("modelspec.title".to_string(), name.to_string()),
            ("burnbooth.regularisation_mode".to_string(), format!("{:?}", c.regularisation_mode)),
            ("burnbooth.lora_dropout".to_string(), c.lora_dropout.to_string()),
        ]);
        let bytes = export::kohya_file(&self.model, &extra).await?;
        let path = self.output_path(&format!("{name}.safetensors"));
        self.storage.write(&path, &bytes)?;
        Ok(path)
    }

    /// Writes a full fine-tune as a diffusers folder `<output>/<name>/` (the
    /// configs come from `configs`, the source folder's files by name, or
    /// are the family's published ones) and the single-file checkpoint
    /// `<output>/<name>.safetensors`. Returns both paths.
    pub async fn export_full(&self, name: &str, configs: Option<&BTreeMap<String, String>>) -> Result<(String, String)> {
        let dir = self.output_path(name);
        // Written beside the old export and swapped in whole: a run killed
        // mid-export leaves the previous export as it was
        // (run_record::clean_interrupted_writes tidies up at the next start).
        let partial = format!("{dir}{}", run_record::PARTIAL);
        self.storage.remove_all(&partial)?;
        super::full_export::write_diffusers_folder(&self.model, self.storage, &partial, configs, self.checkpoint_hook.as_ref()).await?;
        let old = format!("{dir}{}", run_record::REPLACED);
        if self.storage.exists(&dir)? {
            self.storage.remove_all(&old)?;
            self.storage.rename(&dir, &old)?;
        }
        self.storage.rename(&partial, &dir)?;
        self.storage.remove_all(&old)?;
        let path = self.output_path(&format!("{name}.safetensors"));
        self.storage.write(&path, &super::full_export::single_file_checkpoint(&self.model).await?)?;
        Ok((dir, path))
    }
}

/// Casts trainable parameters (adamw_bf16 keeps them in bf16).
struct CastTrainable<'a> {
    dtype: burn::tensor::DType,
    device: &'a Device,
}

impl ModuleMapper for CastTrainable<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !param.val().is_require_grad() {
            return param;
        }
        let (dtype, device) = (self.dtype, self.device);
        param.map(|t| super::optimizer::trainable_on(t.without_autodiff().cast(dtype), device))
    }
}

/// RGB pixels to a `[1, 3, H, W]` tensor in [-1, 1].
pub fn image_tensor(image: &RgbImage, device: &Device) -> Tensor<4> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let plane = width * height;
    let mut values = vec![0f32; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            values[c * plane + i] = pixel[c] as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(values, [1, 3, height, width]), device)
}
