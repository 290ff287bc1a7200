//! Text to image: prompt encoding, classifier-free guidance, the sampling
//! loop and decoding, plus PNGs that carry their parameters (A1111 style).

use burn::tensor::{Device, Int, Tensor, TensorData};
use image::RgbImage;

use crate::error::{Error, Result};
use crate::models::unet::AddedConditions;
use crate::models::vae::{VaeTiling, WEBGPU_BINDING_BYTES};
use crate::models::{Family, StableDiffusion};
use crate::rng::SeededRng;
use crate::schedulers::{SamplerKind, Scheduler};

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
}

/// What the UNet is conditioned on for a batch of prompts.
pub struct Conditioning {
    pub context: Tensor<3>,
    /// SDXL: the second text encoder's pooled, projected embedding.
    pub pooled: Option<Tensor<2>>,
}

pub struct Generated {
    /// Final latents (unscaled by the VAE factor, as diffusers' `output_type="latent"`).
    pub latents: Tensor<4>,
    /// `[1, 3, H, W]` in [0, 1].
    pub image: Tensor<4>,
}

/// Standard normal noise from the seeded generator (Box-Muller), the same on
/// every platform.
pub fn gaussian_noise(shape: [usize; 4], rng: &mut SeededRng, device: &Device) -> Tensor<4> {
    let count: usize = shape.iter().product();
    let mut values = Vec::with_capacity(count);
    while values.len() < count {
        let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
        let u2 = rng.next_f64();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        values.push((radius * angle.cos()) as f32);
        values.push((radius * angle.sin()) as f32);
    }
    values.truncate(count);
    Tensor::from_data(TensorData::new(values, shape), device)
}

impl StableDiffusion {
    /// The UNet's text context for prompts, `[batch, 77, dim]`: the text
    /// encoder's last hidden state (SD 1.x/2.x), or for SDXL both encoders'
    /// penultimate hidden states side by side.
    pub fn encode_prompts(&self, prompts: &[&str], device: &Device) -> Result<Tensor<3>> {
        Ok(self.encode_conditioning(prompts, device)?.context)
    }

    /// Everything the UNet is conditioned on for prompts (SDXL adds the
    /// second encoder's pooled, projected embedding).
    pub fn encode_conditioning(&self, prompts: &[&str], device: &Device) -> Result<Conditioning> {
        let ids = |tokenizer: &crate::models::tokenizer::ClipTokenizer| -> Result<Tensor<2, Int>> {
            let mut ids = Vec::new();
            for prompt in prompts {
                ids.extend(tokenizer.encode(prompt)?.into_iter().map(|i| i as i64));
            }
            Ok(Tensor::<2, Int>::from_data(TensorData::new(ids, [prompts.len(), tokenizer.max_length]), device))
        };
        let first = self.text_encoder.forward(ids(&self.tokenizer)?);
        let (Some(tokenizer_2), Some(encoder_2)) = (&self.tokenizer_2, &self.text_encoder_2) else {
            return Ok(Conditioning { context: first.last_hidden_state, pooled: None });
        };
        let second = encoder_2.forward(ids(tokenizer_2)?);
        let penultimate = |hidden: &[Tensor<3>]| hidden[hidden.len() - 2].clone();
        let context = Tensor::cat(vec![penultimate(&first.hidden_states), penultimate(&second.hidden_states)], 2);
        Ok(Conditioning { context, pooled: second.text_embeds })
    }

    /// The image size the model was trained at (UNet sample size × VAE downscale).
    pub fn native_size(&self) -> usize {
        self.configs.unet.sample_size.unwrap_or(64) * self.configs.vae.downscale()
    }

    /// Latent shape for an image size (must divide by the VAE's downscale).
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<[usize; 4]> {
        let factor = self.configs.vae.downscale();
        if !width.is_multiple_of(factor) || !height.is_multiple_of(factor) || width == 0 || height == 0 {
            return Err(Error::Config {
                source_name: "--width/--height".into(),
                problems: vec![format!("{width}x{height} must be a positive multiple of {factor} (the VAE's downscale)")],
            });
        }
        Ok([1, self.configs.vae.latent_channels, height / factor, width / factor])
    }

    /// Samples an image. `init_latents` replaces the seeded starting noise
    /// (to compare with diffusers run from the same latents).
    pub fn generate(
        &self,
        request: &GenerateRequest,
        init_latents: Option<Tensor<4>>,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        let shape = self.latent_shape(request.width, request.height)?;
        let mut rng = SeededRng::new(request.seed);
        let noise = match init_latents {
            Some(latents) => {
                if latents.dims() != shape {
                    return Err(Error::Config {
                        source_name: "--init-latents".into(),
                        problems: vec![format!("latents have shape {:?}, but {}x{} needs {shape:?}", latents.dims(), request.width, request.height)],
                    });
                }
                latents
            }
            None => gaussian_noise(shape, &mut rng, device),
        };
        // SDXL (force_zeros_for_empty_prompt): an empty negative prompt
        // conditions on zeros, so it is not encoded.
        let zero_negative = self.family == Family::Sdxl && request.negative_prompt.is_empty();
        let prompts = if zero_negative { vec![request.prompt.as_str()] } else { vec![request.negative_prompt.as_str(), request.prompt.as_str()] };
        let conditioning = self.encode_conditioning(&prompts, device)?;
        let mut context = conditioning.context;
        let mut pooled = conditioning.pooled;
        if zero_negative {
            context = Tensor::cat(vec![context.zeros_like(), context], 0);
            pooled = pooled.map(|p| Tensor::cat(vec![p.zeros_like(), p], 0));
        }
        // Original size, crop top-left, target size: a whole, uncropped image.
        let (h, w) = (request.height as f32, request.width as f32);
        let added = pooled.map(|pooled| AddedConditions { pooled, time_ids: vec![[h, w, 0.0, 0.0, h, w]; 2] });
        let mut scheduler = Scheduler::new(request.sampler, &self.configs.scheduler, request.steps)?;
        let mut latents = noise * scheduler.init_noise_sigma();
        let total = scheduler.timesteps.len();
        for step in 0..total {
            let t = scheduler.timesteps[step] as f32;
            let input = scheduler.scale_model_input(Tensor::cat(vec![latents.clone(), latents.clone()], 0), step);
            let output = self.unet.forward_with(input, &[t, t], context.clone(), added.as_ref());
            let mut halves = output.chunk(2, 0);
            let conditional = halves.pop().expect("two halves");
            let unconditional = halves.pop().expect("two halves");
            let guided = unconditional.clone() + (conditional - unconditional) * request.guidance;
            let step_noise = (request.sampler == SamplerKind::EulerAncestral).then(|| gaussian_noise(shape, &mut rng, device));
            latents = scheduler.step(guided, step, latents, step_noise);
            progress(step + 1, total);
        }
        let image = self.decode_latents(latents.clone());
        Ok(Generated { latents, image })
    }

    /// Latents (as sampled) to an image in [0, 1], in tiles where the
    /// device binds buffers of limited size and the image needs it.
    pub fn decode_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        let [batch, _, h, w] = latents.dims();
        let factor = self.configs.vae.downscale();
        let tiling = vae_budget(&latents.device()).and_then(|budget| VaeTiling::for_decoding(&self.configs.vae, batch, h * factor, w * factor, budget));
        let scaled = latents / self.configs.vae.scaling_factor;
        (self.vae.decode_tiled(scaled, &self.configs.vae, tiling) / 2.0 + 0.5).clamp(0.0, 1.0)
    }

    /// How a `height × width` image is encoded on `device`: tiled where its
    /// activations would not bind there (see [`vae_budget`]).
    pub fn encode_tiling(&self, device: &Device, height: usize, width: usize) -> Option<VaeTiling> {
        vae_budget(device).and_then(|budget| VaeTiling::for_encoding(&self.configs.vae, 1, height, width, budget))
    }
}

/// `[1, 3, H, W]` in [0, 1] to 8-bit RGB (rounding as diffusers' `numpy_to_pil`).
pub async fn to_rgb8(image: Tensor<4>) -> Result<RgbImage> {
    let [_, _, height, width] = image.dims();
    let data = image.into_data_async().await.map_err(|e| Error::Io { path: "image".into(), message: crate::error::device_failure("the image", e) })?;
    let values: Vec<f32> = data.convert::<f32>().try_to_vec::<f32>().map_err(|e| Error::Io { path: "image".into(), message: format!("{e:?}") })?;
    let plane = width * height;
    let mut rgb = RgbImage::new(width as u32, height as u32);
    for (i, pixel) in rgb.pixels_mut().enumerate() {
        for c in 0..3 {
            pixel[c] = (values[c * plane + i] * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(rgb)
}

/// The A1111 `parameters` text for an image.
pub fn a1111_parameters(request: &GenerateRequest, model: &str, extra: &[(&str, String)]) -> String {
    let mut text = request.prompt.clone();
    if !request.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", request.negative_prompt));
    }
    let sampler = match request.sampler {
        SamplerKind::Ddim => "DDIM",
        SamplerKind::Euler => "Euler",
        SamplerKind::EulerAncestral => "Euler a",
        SamplerKind::DpmPp2m => "DPM++ 2M",
        SamplerKind::DpmPp2mKarras => "DPM++ 2M Karras",
    };
    text.push_str(&format!(
        "\nSteps: {}, Sampler: {sampler}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {model}",
        request.steps, request.guidance, request.seed, request.width, request.height
    ));
    for (key, value) in extra {
        text.push_str(&format!(", {key}: {value}"));
    }
    text
}

/// A PNG with a `parameters` tEXt chunk.
pub fn png_with_parameters(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.add_text_chunk("parameters".to_string(), parameters.to_string()).map_err(|e| Error::Io { path: "png".into(), message: e.to_string() })?;
        let mut writer = encoder.write_header().map_err(|e| Error::Io { path: "png".into(), message: e.to_string() })?;
        writer.write_image_data(image.as_raw()).map_err(|e| Error::Io { path: "png".into(), message: e.to_string() })?;
    }
    Ok(bytes)
}

/// The largest VAE activation `device` is asked to hold in one buffer:
/// WebGPU's guaranteed binding size on cubecl devices (wgpu, WebGPU, which
/// allocate from memory pools), none on burn's CPU backend.
pub fn vae_budget(device: &Device) -> Option<u64> {
    (!crate::is_cpu_backend(device)).then_some(WEBGPU_BINDING_BYTES)
}
