//! One optimizer step: a batch's inputs from the caches, the noise and
//! regression target of each UNet pass (the instance batch, the prior
//! batch), the loss terms, backward (staged under gradient checkpointing)
//! and the update, with the non-finite checks that keep a bad step from
//! touching the weights.

use burn::tensor::{Tensor, TensorData};

use super::{trained_text_encoders, update_text_encoders, Session, StepReport};
use crate::config::training::{ModelType, RegularisationMode};
use crate::data::batch_sampler::{Batch, Sample};
use crate::error::{Error, Result};
use crate::models::unet::AddedConditions;
use crate::pipeline::gaussian_noise;
use crate::rng::SeededRng;
use crate::train::cache::{self, CachedLatents};
use crate::train::noise::regression_loss;
use crate::train::optimizer::frozen_on;
use crate::train::recompute::backward_in_stages;
use crate::train::tensor_file::HostTensor;

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
    /// Loss masks on the latent grid, `[batch, 1, h, w]`, when the dataset has masks.
    mask: Option<Tensor<4>>,
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
    /// Weighs each latent cell's squared error (masked loss).
    mask: Option<Tensor<4>>,
}

impl Regression {
    /// The mean (weighted, masked) squared error of `prediction`, times `factor`.
    fn loss(&self, prediction: Tensor<4>) -> Tensor<1> {
        let loss = regression_loss(prediction, self.target.clone(), self.mask.clone(), self.weights.clone());
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

impl Session<'_> {
    /// Latents and text context of one batch, on the training device. The
    /// context is the cached base encoder's, or, when the text encoder
    /// trains, its output now (with gradients); `BatchInputs::base_context`
    /// is always the base encoder's (parent predictions).
    fn batch_inputs(&self, d: usize, batch: &Batch, rng: &mut SeededRng) -> Result<BatchInputs> {
        let dataset = &self.plan.datasets[d];
        let mut latents = Vec::new();
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        let mut time_ids = Vec::new();
        let mut captions = Vec::new();
        let masked = self.masks.get(d).is_some_and(|m| !m.is_empty());
        let mut masks = Vec::new();
        for sample in &batch.samples {
            let path = &self.latent_paths[d][sample.image];
            let cached = CachedLatents::read(self.storage, path)?
                .ok_or_else(|| Error::Io { path: path.clone(), message: "latent cache entry vanished during training".into() })?;
            let (mean, logvar) = cached.to_tensors(&self.device)?;
            let eps = gaussian_noise(mean.dims(), rng, &self.device);
            latents.push(mean + (logvar * 0.5).exp() * eps);
            let image = &dataset.images[sample.image];
            let caption =
                if sample.drop_caption { String::new() } else { image.captions().into_iter().nth(sample.caption_variant as usize).unwrap_or_default() };
            let text_path = self
                .text_paths
                .get(&(dataset.text_cache_dir.clone(), caption.clone()))
                .ok_or_else(|| Error::Training { step: self.step, message: format!("caption '{caption}' has no text-embedding cache entry") })?;
            let text = cache::read_text(self.storage, text_path)?
                .ok_or_else(|| Error::Io { path: text_path.clone(), message: "text cache entry vanished during training".into() })?;
            let batched = |t: HostTensor| HostTensor { shape: [vec![1], t.shape].concat(), values: t.values };
            contexts.push(batched(text.hidden).to_tensor::<3>(&self.device)?);
            if self.model.unet.needs_added_conditions() {
                let entry =
                    text.pooled.ok_or_else(|| Error::Io { path: text_path.clone(), message: "an SDXL text cache entry needs 'pooled'; delete it".into() })?;
                pooled.push(batched(entry).to_tensor::<2>(&self.device)?);
                // SDXL's size conditioning: original size, crop top-left, target size, (h, w) order.
                let g = image.geometry();
                let [ow, oh] = g.original_size;
                let [top, left] = g.crop_offset;
                let [tw, th] = g.target_size;
                time_ids.push([oh, ow, top, left, th, tw].map(|v| v as f32));
            }
            captions.push(caption);
            if masked {
                // An image without a mask trains on all of it.
                let [_, _, height, width] = latents.last().expect("pushed above").dims();
                let mask = match &self.masks[d][sample.image] {
                    Some(mask) => HostTensor { shape: [vec![1], mask.shape.clone()].concat(), values: mask.values.clone() }.to_tensor::<4>(&self.device)?,
                    None => Tensor::<4>::ones([1, 1, height, width], &self.device),
                };
                masks.push(mask);
            }
        }
        let mask = (!masks.is_empty()).then(|| frozen_on(Tensor::cat(masks, 0), &self.train_device));
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
        Ok(BatchInputs { latents: frozen_on(latents, &self.train_device), context, base_context, added, base_added, mask })
    }

    /// One batch's noisy latents, timesteps and regression target. `parent`
    /// replaces the target by the base model's prediction; `weighted`
    /// applies min-SNR-γ.
    fn regression(&self, inputs: BatchInputs, rng: &mut SeededRng, parent: bool, weighted: bool) -> Regression {
        let BatchInputs { latents, context, base_context, added, base_added, mask } = inputs;
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
        Regression { noisy, t_values, context, added, target, weights, factor: 1.0, mask }
    }

    pub fn eval_due(&self) -> bool {
        self.config.eval_steps_interval.is_some_and(|every| self.step.is_multiple_of(every)) && self.plan.datasets.iter().any(|d| d.is_eval)
    }

    /// The validation loss: the first `num_eval_images` images of the eval
    /// datasets, each noised at `eval_timesteps` timesteps spaced as DDPM's
    /// `set_timesteps` spaces them (1000/T apart, from 0), with noise and
    /// latent draws fixed by the seed, so every evaluation sees the same
    /// inputs; the mean of the losses. `None` without eval datasets.
    pub async fn evaluate(&mut self) -> Result<Option<f32>> {
        let images: Vec<(usize, usize)> = self
            .plan
            .datasets
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_eval)
            .flat_map(|(d, dataset)| (0..dataset.images.len()).map(move |i| (d, i)))
            .take(self.config.num_eval_images as usize)
            .collect();
        if images.is_empty() {
            return Ok(None);
        }
        if let Some(dropout) = &self.dropout {
            dropout.stop();
        }
        let count = self.config.eval_timesteps.max(1) as usize;
        let ratio = self.noise.num_timesteps() / count;
        let timesteps: Vec<usize> = (0..count).rev().map(|i| i * ratio).collect();
        let step = self.step;
        let mut total = 0.0f64;
        for &(d, image) in &images {
            let mut rng = SeededRng::derived(self.config.seed, &format!("eval/{}/{image}", self.plan.datasets[d].id));
            let batch = Batch { dataset: 0, bucket: 0, samples: vec![Sample { image, caption_variant: 0, drop_caption: false }], epoch: 0, ends_epoch: false };
            let inputs = self.batch_inputs(d, &batch, &mut rng)?;
            for &t in &timesteps {
                let noise = frozen_on(gaussian_noise(inputs.latents.dims(), &mut rng, &self.device), &self.train_device);
                let noisy = self.noise.add_noise(inputs.latents.clone(), noise.clone(), &[t]);
                let target = self.noise.target(inputs.latents.clone(), noise, &[t]);
                let prediction = self.model.unet.forward_with(noisy, &[t as f32], inputs.context.clone(), inputs.added.as_ref());
                let loss = regression_loss(prediction.detach(), target, None, None);
                let value = loss
                    .into_scalar_async::<f32>()
                    .await
                    .map_err(|e| Error::Training { step, message: crate::error::device_failure("the validation loss", e) })?;
                total += value as f64;
            }
        }
        Ok(Some((total / (images.len() * timesteps.len()) as f64) as f32))
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
            let inputs = self.batch_inputs(self.main.datasets[batch.dataset], &batch, &mut rng)?;
            let parent = is_class_batch && self.config.regularisation_mode == RegularisationMode::ParentPrediction && self.config.model_type == ModelType::Lora;
            let mut terms = vec![self.regression(inputs, &mut rng, parent, !parent)];
            if let Some(prior) = self.prior.as_mut() {
                let class_batch =
                    prior.sampler.next_batch().ok_or_else(|| Error::Training { step: self.step, message: "the class datasets ran out of batches".into() })?;
                let prior = self.prior.as_ref().expect("matched above");
                let inputs = self.batch_inputs(prior.datasets[class_batch.dataset], &class_batch, &mut rng)?;
                // Weighted like the instance term, as kohya's sd-scripts and
                // SimpleTuner weight class images (DEVELOPERS: "The prior
                // term's weighting"): left unweighted, as diffusers'
                // train_dreambooth.py leaves it, a small min-SNR gamma makes
                // it outweigh the instance term at every step.
                let mut term = self.regression(inputs, &mut rng, false, true);
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
        // The text encoders' rate follows the schedule too (diffusers' parameter groups).
        let text_lr = self.config.text_encoder_lr.map_or(lr, |rate| lr * rate / self.config.learning_rate);
        let values = self.trainable_values();
        self.optimizer.prepare(values, lr).await?;
        self.model.unet = self.optimizer.apply(self.model.unet.clone(), "", lr, &self.train_device);
        let (optimizer, train_device) = (&mut self.optimizer, &self.train_device);
        update_text_encoders(self.config.train_text_encoder, &mut self.model, |prefix, encoder| Ok(optimizer.apply(encoder, prefix, text_lr, train_device)))?;
        self.optimizer.finish_step();
        self.step += 1;
        let values = self.ema.is_some().then(|| self.trainable_values());
        if let (Some(ema), Some(values)) = (self.ema.as_mut(), values) {
            ema.update(values, self.step);
        }
        if let Some(dropout) = &self.dropout {
            dropout.stop();
        }
        let prodigy_d = self.optimizer.prodigy_d();
        Ok(StepReport { step: self.step, epoch: self.epoch, loss: loss_sum / accumulation as f32, lr, grad_norm, eval_loss: None, prodigy_d })
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
                backward_in_stages(
                    &model.unet,
                    term.noisy.clone(),
                    &term.t_values,
                    term.context.clone(),
                    term.added.as_ref(),
                    &self.train_device,
                    &|prediction| term.loss(prediction),
                    &mut collect,
                )
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
}
