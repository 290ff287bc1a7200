//! One training run's state and what can be done with it: fill the caches
//! ([`caching`]), take a step ([`step`]), sample and validate
//! ([`validation`]), save, resume and export ([`saving`]). The run loop
//! ([`crate::train::run`]) drives it the same way for the native runner and
//! the browser app; they differ only in the [`Storage`], the image sources
//! and the device.

mod caching;
mod saving;
mod step;
mod validation;

pub use caching::image_tensor;
pub use validation::ValidationImage;

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor};

use super::ema::{self, Ema};
use super::noise::NoiseSchedule;
use super::optimizer::{trainable_values, AdamWSettings, Optimizer, Rule, ToTrainDevice};
use super::storage::{join, Storage};
use crate::config::lycoris::LycorisAlgo;
use crate::config::training::{ModelFamily, ModelType, OptimizerKind, RegularisationMode, TrainingConfig};
use crate::data::source::ImageSource;
use crate::error::{Error, Result};
use crate::lr_schedule::LearningRateSchedule;
use crate::models::clip::ClipTextModel;
use crate::models::lora::{DropoutSource, LoraTargets};
use crate::models::unet::UNet2DConditionModel;
use crate::models::{Family, StableDiffusion};
use crate::plan::{build_samplers, Plan, PlannedBatchSampler};
use crate::rng::SeededRng;
use crate::train::metrics::StepMetrics;
use crate::train::tensor_file::HostTensor;

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
    /// The validation loss, when one was computed after this step (the run loop sets it).
    pub eval_loss: Option<f32>,
    /// Prodigy's step size d after this step (the effective rate is d times `lr`).
    pub prodigy_d: Option<f64>,
}

/// Options that are not part of the SimpleTuner config.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub lora_targets: LoraTargets,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { lora_targets: LoraTargets::attention() }
    }
}

pub struct Session<'a> {
    pub config: TrainingConfig,
    pub plan: Plan,
    pub model: StableDiffusion,
    sources: Vec<Box<dyn ImageSource + 'a>>,
    /// Each dataset's mask folder, when it has masks ([`Session::set_mask_sources`]).
    mask_sources: Vec<Option<Box<dyn ImageSource + 'a>>>,
    /// Each planned image's loss mask on the latent grid, `[dataset][image]`.
    masks: Vec<Vec<Option<HostTensor>>>,
    storage: &'a dyn Storage,
    device: Device,
    train_device: Device,
    noise: NoiseSchedule,
    optimizer: Optimizer,
    /// The moving average of the trained weights (`use_ema`).
    ema: Option<Ema>,
    lr_schedule: LearningRateSchedule,
    main: PlannedBatchSampler,
    prior: Option<PlannedBatchSampler>,
    dropout: Option<DropoutSource>,
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Latent cache entry of each planned image, `[dataset][image]`.
    latent_paths: Vec<Vec<String>>,
    /// Text cache entry by (cache dir, caption).
    text_paths: BTreeMap<(String, String), String>,
    pub metrics: Vec<StepMetrics>,
    /// The base model's tiles of the before/after grid, by prompt: the base
    /// weights never train in a LoRA run, so a grid made at every
    /// validation samples them once.
    base_samples: BTreeMap<String, image::RgbImage>,
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

impl<'a> Session<'a> {
    /// Every trainable tensor's current value (the UNet's, then the trained
    /// text encoders' under their prefixes), flattened.
    fn trainable_values(&self) -> BTreeMap<String, Tensor<1>> {
        let mut values = BTreeMap::new();
        trainable_values(&self.model.unet, "", &mut values);
        for (prefix, encoder) in trained_text_encoders(self.config.train_text_encoder, &self.model) {
            trainable_values(encoder, prefix, &mut values);
        }
        values
    }

    /// Puts the EMA weights in the model in place of the trained ones,
    /// which it returns for [`put_back`](Self::put_back) (`None` without an EMA yet).
    fn put_ema_weights(&mut self) -> Option<(UNet2DConditionModel, TextEncoders)> {
        let ema = self.ema.as_ref().filter(|e| !e.is_empty())?;
        let unet = ema.averaged(self.model.unet.clone(), "", &self.train_device);
        let (mut text, mut text_2) = (self.model.text_encoder.clone(), self.model.text_encoder_2.clone());
        if self.config.train_text_encoder {
            text = ema.averaged(text, TEXT_ENCODER_PREFIX, &self.train_device);
            text_2 = text_2.map(|e| ema.averaged(e, TEXT_ENCODER_2_PREFIX, &self.train_device));
        }
        let trained_unet = std::mem::replace(&mut self.model.unet, unet);
        Some((trained_unet, self.replace_text_encoders((text, text_2))))
    }

    /// Puts back the weights [`put_ema_weights`](Self::put_ema_weights) took out.
    fn put_back(&mut self, (unet, text): (UNet2DConditionModel, TextEncoders)) {
        self.model.unet = unet;
        self.replace_text_encoders(text);
    }

    /// The EMA weights by key, on the host (`None` without EMA).
    pub async fn ema_tensors(&self) -> Result<Option<BTreeMap<String, super::tensor_file::HostTensor>>> {
        match &self.ema {
            Some(ema) => Ok(Some(ema.state().await?.into_iter().map(|(k, v)| (k[ema::CHECKPOINT_PREFIX.len()..].to_string(), v)).collect())),
            None => Ok(None),
        }
    }

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
        if config.regularisation_mode == RegularisationMode::ParentPrediction
            && config.model_type == ModelType::Full
            && plan.datasets.iter().any(|d| d.is_regularisation_data)
        {
            return Err(Error::Config {
                source_name: config.source_name.clone(),
                problems: vec!["regularisation_mode parent_prediction needs LoRA training (the base model's prediction is the adapter switched off); use prior_preservation or mixed for full fine-tuning".into()],
            });
        }
        // Gradient checkpointing works by stage (train::recompute), not per operation.
        let train_device = device.clone().autodiff();
        let noise = NoiseSchedule::new(&model.configs.scheduler, config.prediction_type);
        let full = config.model_type == ModelType::Full;
        let unet = model.unet.clone();
        let mut unet = unet.map(&mut ToTrainDevice { device: &train_device, trainable: full });
        let dropout = (!full && config.lora_dropout > 0.0).then(|| DropoutSource::new(config.lora_dropout));
        if config.lycoris_config.is_some() && config.lycoris.is_none() {
            return Err(Error::Config {
                source_name: config.source_name.clone(),
                problems: vec!["lora_type lycoris: the lycoris_config file was not read (load the config with config::load)".into()],
            });
        }
        if config.lycoris.is_some() && config.train_text_encoder {
            return Err(Error::Config {
                source_name: config.source_name.clone(),
                problems: vec!["train_text_encoder with lora_type lycoris is not supported yet: LyCORIS adapters here adapt the UNet".into()],
            });
        }
        if let (false, Some(lycoris)) = (full, &config.lycoris) {
            let mut attached = 0;
            let (layers, convs) = unet.adaptable_mut();
            for layer in layers {
                let Some(target) = lycoris.target_for(&layer.path) else { continue };
                match target.algo {
                    LycorisAlgo::Lokr => layer.attach_lokr(lycoris, target.factor, config.seed, &train_device),
                    LycorisAlgo::Locon => {
                        let (rank, alpha) = lycoris.locon_rank_alpha(1);
                        layer.attach(rank, alpha, config.seed, None, &train_device);
                    }
                }
                attached += 1;
            }
            // LoKr adapts Linear layers only (the config refuses LoKr on convolution classes).
            for conv in convs {
                if lycoris.target_for(&conv.path).is_some_and(|t| t.algo == LycorisAlgo::Locon) {
                    let (rank, alpha) = lycoris.locon_rank_alpha(conv.dims()[2]);
                    conv.attach(rank, alpha, config.seed, &train_device);
                    attached += 1;
                }
            }
            if attached == 0 {
                return Err(Error::Config {
                    source_name: config.source_name.clone(),
                    problems: vec!["lycoris_config's apply_preset adapts no UNet layer".into()],
                });
            }
        } else if !full {
            let mut attached = 0;
            for layer in unet.lora_layers_mut() {
                if options.lora_targets.matches(&layer.path) {
                    layer.attach(config.lora_rank as usize, config.lora_alpha, config.seed, dropout.clone(), &train_device);
                    if config.use_dora {
                        layer.enable_dora();
                    }
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
            // Both encoders for SDXL: every weight trains in a full
            // fine-tune; in a LoRA run they get adapters, the second's
            // drawing their own initial values.
            let train_encoder = |encoder: &ClipTextModel, seed: u64| -> Result<ClipTextModel> {
                let mut encoder = encoder.clone().map(&mut ToTrainDevice { device: &train_device, trainable: full });
                if full {
                    return Ok(encoder);
                }
                let mut attached = 0;
                for layer in encoder.lora_layers_mut() {
                    if options.lora_targets.matches_text(&layer.path) {
                        layer.attach(config.lora_rank as usize, config.lora_alpha, seed, dropout.clone(), &train_device);
                        if config.use_dora {
                            layer.enable_dora();
                        }
                        attached += 1;
                    }
                }
                if attached == 0 {
                    return Err(Error::Config {
                        source_name: config.source_name.clone(),
                        problems: vec!["train_text_encoder: no text-encoder layer to adapt".into()],
                    });
                }
                Ok(encoder)
            };
            model.text_encoder = train_encoder(&model.text_encoder, config.seed)?;
            if let Some(encoder) = &model.text_encoder_2 {
                model.text_encoder_2 = Some(train_encoder(encoder, SeededRng::derived(config.seed, "text-encoder-2").next_u64())?);
            }
        }
        let bf16 = config.optimizer == OptimizerKind::AdamwBf16 && plan.optimizer.state_dtype == "bf16";
        if bf16 {
            model.unet = model.unet.map(&mut CastTrainable { dtype: burn::tensor::DType::BF16, device: &train_device });
            model.text_encoder = model.text_encoder.map(&mut CastTrainable { dtype: burn::tensor::DType::BF16, device: &train_device });
            model.text_encoder_2 = model.text_encoder_2.map(|e| e.map(&mut CastTrainable { dtype: burn::tensor::DType::BF16, device: &train_device }));
        }
        let rule = match config.optimizer {
            OptimizerKind::Adamw | OptimizerKind::AdamwBf16 => Rule::AdamW(AdamWSettings {
                beta1: config.adam_beta1,
                beta2: config.adam_beta2,
                epsilon: config.adam_epsilon,
                weight_decay: config.adam_weight_decay,
                bf16,
            }),
            OptimizerKind::Prodigy => Rule::Prodigy(config.prodigy.unwrap_or_default()),
            OptimizerKind::Adafactor => Rule::Adafactor(config.adafactor.unwrap_or_default()),
        };
        let optimizer = Optimizer::new(rule, config.max_grad_norm);
        let (main, prior) = build_samplers(&plan.datasets, &config);
        let ema = config.ema.map(Ema::new);
        Ok(Self {
            lr_schedule: plan.lr_schedule,
            config,
            plan,
            model,
            sources,
            mask_sources: Vec::new(),
            masks: Vec::new(),
            storage,
            device,
            train_device,
            noise,
            optimizer,
            ema,
            main,
            prior,
            dropout,
            step: 0,
            epoch: 1,
            latent_paths: Vec::new(),
            text_paths: BTreeMap::new(),
            metrics: Vec::new(),
            base_samples: BTreeMap::new(),
            checkpoint_hook: Box::new(|| {}),
            resume_notes: Vec::new(),
        })
    }

    /// The mask folders of the datasets that have masks, `[dataset]` in the
    /// plan's order (`None` for a dataset without): the host opens them as
    /// it opens datasets, by the mask dataset's id and folder.
    pub fn set_mask_sources(&mut self, sources: Vec<Option<Box<dyn ImageSource + 'a>>>) -> Result<()> {
        for (d, dataset) in self.plan.datasets.iter().enumerate() {
            if let Some(masks) = &dataset.masks {
                if sources.get(d).is_none_or(Option::is_none) {
                    return Err(Error::Dataset {
                        dataset: dataset.id.clone(),
                        message: format!("its mask folder '{}' ({}) was not opened", masks.folder, masks.id),
                    });
                }
            }
        }
        self.mask_sources = sources;
        Ok(())
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
