//! Validation images and sampling with the weights being trained (adapters
//! on or off).

use burn::module::Module;
use image::RgbImage;

use super::{Progress, Session};
use crate::config::training::{EmaValidation, ModelType};
use crate::error::Result;
use crate::models::clip::ClipTextModel;
use crate::pipeline::{a1111_parameters, png_with_parameters, to_rgb8, GenerateRequest, Generated};
use crate::schedulers::SamplerKind;

/// A validation image written to the output folder.
pub struct ValidationImage {
    pub path: String,
    pub image: RgbImage,
    /// What it shows: `step 40`, `step 40 (EMA)`.
    pub caption: String,
}

impl Session<'_> {
    pub fn validation_due(&self) -> bool {
        let every = self.config.validation_step_interval;
        let prompts = self.config.validation_prompt.is_some() || !self.config.validation_prompts.is_empty();
        prompts && every > 0 && self.step.is_multiple_of(every)
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

    /// A validation request for `prompt`: the validation settings and seed
    /// (DPM-Solver++ 2M, as diffusers' training scripts validate).
    pub fn validation_request(&self, prompt: String) -> GenerateRequest {
        let (width, height) = self.validation_size();
        GenerateRequest {
            prompt,
            negative_prompt: self.config.validation_negative_prompt.clone(),
            steps: self.config.validation_num_inference_steps.max(1) as usize,
            guidance: self.config.validation_guidance,
            sampler: SamplerKind::DpmPp2m,
            seed: self.config.validation_seed.unwrap_or(self.config.seed),
            width,
            height,
        }
    }

    /// The class prompt: the first caption of the first regularisation dataset.
    fn class_prompt(&self) -> Option<String> {
        let class = self.plan.datasets.iter().find(|d| d.is_regularisation_data)?;
        class.images.first()?.captions().into_iter().next()
    }

    /// Samples the validation prompt with the current weights and writes
    /// `validation/step-<N>.png` (with its parameters), and each prompt of
    /// the user_prompt_library as `validation/step-<N>-<shortname>.png`;
    /// with `use_ema`, the EMA weights' samples too (`…-ema.png`), or only
    /// those (`ema_validation`). Returns what it wrote.
    pub async fn validate(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Vec<ValidationImage>> {
        let mut prompts: Vec<(String, String)> = self.config.validation_prompt.iter().map(|p| (String::new(), p.clone())).collect();
        prompts.extend(self.config.validation_prompts.iter().cloned());
        let ema = self.config.ema.map(|e| e.validation).unwrap_or(EmaValidation::None);
        let mut written = Vec::new();
        for (name, prompt) in prompts {
            let request = self.validation_request(prompt);
            let label = if name.is_empty() { String::new() } else { format!("-{name}") };
            if ema != EmaValidation::EmaOnly || self.ema.as_ref().is_none_or(|e| e.is_empty()) {
                let image = self.sample(&request, progress).await?;
                written.push(self.write_validation(&request, image, &label, false)?);
            }
            if ema != EmaValidation::None {
                if let Some(trained) = self.put_ema_weights() {
                    let image = self.sample(&request, progress).await;
                    self.put_back(trained);
                    written.push(self.write_validation(&request, image?, &label, true)?);
                }
            }
        }
        Ok(written)
    }

    /// Writes one validation image: `label` is `-<shortname>` for a library
    /// prompt (empty for the validation prompt), `ema` adds `-ema`.
    fn write_validation(&self, request: &GenerateRequest, image: RgbImage, label: &str, ema: bool) -> Result<ValidationImage> {
        let weights = if ema { "EMA" } else { "trained" };
        let extra = [("Burnbooth step", self.step.to_string()), ("Burnbooth weights", weights.to_string())];
        let parameters = a1111_parameters(request, self.plan.model.as_deref().unwrap_or("model"), &extra);
        let suffix = if ema { "-ema" } else { "" };
        let path = self.output_path(&format!("validation/step-{:06}{label}{suffix}.png", self.step));
        self.storage.write(&path, &png_with_parameters(&image, &parameters)?)?;
        let mut caption = format!("step {}", self.step);
        if let Some(name) = label.strip_prefix('-') {
            caption.push_str(&format!(": {name}"));
        }
        if ema {
            caption.push_str(" (EMA)");
        }
        Ok(ValidationImage { path, image, caption })
    }

    /// The grid's rows: the validation prompt, then the class prompt (of
    /// the first regularisation dataset, when there is one); empty without
    /// a validation prompt.
    fn comparison_prompts(&self) -> Vec<String> {
        let Some(instance) = self.config.validation_prompt.clone() else { return Vec::new() };
        std::iter::once(instance).chain(self.class_prompt()).collect()
    }

    /// Samples the grid's base-model tiles of a full fine-tune before it
    /// trains (its steps overwrite the base weights; a LoRA run switches
    /// its adapters off instead, whenever it makes a grid). Returns whether
    /// it sampled any: not for a LoRA run, a run without a validation
    /// prompt or that never validates (the grid comes with validation), or
    /// one resumed past step 0.
    pub async fn sample_base_tiles(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Result<bool> {
        let every = self.config.validation_step_interval;
        let validates = self.config.validation_on_startup || (every > 0 && every <= self.total_steps());
        if self.config.model_type != ModelType::Full || self.step > 0 || !validates {
            return Ok(false);
        }
        let prompts = self.comparison_prompts();
        for prompt in &prompts {
            let request = self.validation_request(prompt.clone());
            let tile = self.sample(&request, progress).await?;
            self.base_samples.insert(prompt.clone(), tile);
        }
        Ok(!prompts.is_empty())
    }

    /// The before/after grid, `comparison.png`: a row for the validation
    /// prompt and one for the class prompt ([`comparison_prompts`](Self::comparison_prompts));
    /// in each, the base model's sample on the left and the trained
    /// weights' on the right, from the same seed (the base model's tiles are
    /// sampled once per session). Its parameters name the rows and columns.
    /// `None` without a validation prompt, or for a full fine-tune whose
    /// base tiles were not sampled before it trained (a resumed run).
    pub async fn comparison(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Result<Option<(String, RgbImage)>> {
        let prompts = self.comparison_prompts();
        if prompts.is_empty() {
            return Ok(None);
        }
        let mut tiles = Vec::new();
        for prompt in &prompts {
            let request = self.validation_request(prompt.clone());
            let base = match self.base_samples.get(prompt) {
                Some(tile) => tile.clone(),
                None if self.config.model_type == ModelType::Full => return Ok(None),
                None => {
                    let tile = self.sample_with(&request, false, progress).await?;
                    self.base_samples.insert(prompt.clone(), tile.clone());
                    tile
                }
            };
            tiles.push(base);
            tiles.push(self.sample_with(&request, true, progress).await?);
        }
        let request = self.validation_request(prompts[0].clone());
        let (width, height) = (request.width as u32, request.height as u32);
        let mut grid = RgbImage::new(2 * width, prompts.len() as u32 * height);
        for (i, tile) in tiles.iter().enumerate() {
            image::imageops::replace(&mut grid, tile, (i as i64 % 2) * width as i64, (i as i64 / 2) * height as i64);
        }
        let layout = format!("rows: {}; columns: base model, trained (step {}), same seed", prompts.join(" | "), self.step);
        let parameters = a1111_parameters(&request, self.plan.model.as_deref().unwrap_or("model"), &[("Burnbooth comparison", layout)]);
        let path = self.output_path("comparison.png");
        self.storage.write(&path, &png_with_parameters(&grid, &parameters)?)?;
        Ok(Some((path, grid)))
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
}
