//! `native-runner sample`: text to image with a base model.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use trainer_core::models::safetensors_file::SafetensorsFile;
use trainer_core::models::StableDiffusion;

use crate::device::load_model;
use trainer_core::pipeline::{a1111_parameters, png_with_parameters, to_rgb8, GenerateRequest};
use trainer_core::schedulers::SamplerKind;
use trainer_core::{Error, Result};

#[derive(Args)]
pub struct SampleArgs {
    /// A diffusers model folder, or a single-file .safetensors checkpoint.
    #[arg(long)]
    model: String,
    /// For a single-file checkpoint: take the component configs from this
    /// diffusers folder instead of the published SD 1.5 / 2.1 configs.
    #[arg(long)]
    config_from: Option<String>,
    #[command(flatten)]
    generate: GenerateArgs,
    /// A .safetensors file with one tensor `latents` [1, 4, H/8, W/8] to start from.
    #[arg(long)]
    init_latents: Option<String>,
    /// Where to compute: auto (a GPU when there is one, else the CPU
    /// backend), gpu (wgpu on the best adapter), cpu-gpu (wgpu on a CPU
    /// Vulkan adapter such as lavapipe) or cpu (burn's CPU backend).
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    out: String,
    /// A LoRA to apply (kohya format, as `train` exports), optionally with a
    /// strength: `file.safetensors` or `file.safetensors:0.8`. Repeatable.
    #[arg(long)]
    lora: Vec<String>,
}

/// What to generate: shared by `sample` and `make-reg`.
#[derive(Args)]
pub struct GenerateArgs {
    /// The prompt (for make-reg the class prompt, e.g. "a picture of a man").
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras.
    #[arg(long, default_value = "dpmpp_2m_karras")]
    sampler: String,
    /// The seed (make-reg: image i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Image width (default: the model's native size).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
}

impl GenerateArgs {
    /// The sampler, checked before any model is loaded.
    pub fn sampler(&self) -> Result<SamplerKind> {
        SamplerKind::parse(&self.sampler)
    }

    /// The request, `width`/`height` where not given on the command line.
    pub fn request(&self, width: usize, height: usize) -> Result<GenerateRequest> {
        Ok(GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.guidance,
            sampler: self.sampler()?,
            seed: self.seed,
            width: self.width.unwrap_or(width),
            height: self.height.unwrap_or(height),
        })
    }
}

/// `path` or `path:multiplier`.
fn parse_lora(spec: &str) -> Result<(String, f64)> {
    if let Some((path, strength)) = spec.rsplit_once(':') {
        if let Ok(multiplier) = strength.parse::<f64>() {
            return Ok((path.to_string(), multiplier));
        }
    }
    Ok((spec.to_string(), 1.0))
}

/// Folds LoRA files into the model's weights.
pub fn apply_loras(model: &mut StableDiffusion, specs: &[String], device: &Device) -> Result<Vec<String>> {
    let mut applied = Vec::new();
    for spec in specs {
        let (path, multiplier) = parse_lora(spec)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::Io { path: path.clone(), message: e.to_string() })?;
        let modules = trainer_core::train::export::merge_kohya(model, &path, bytes, multiplier, device)?;
        eprintln!("applied LoRA {path} ({modules} layers, strength {multiplier})");
        let name = Path::new(&path).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        applied.push(format!("<lora:{name}:{multiplier}>"));
    }
    Ok(applied)
}

fn read_latents(path: &str, device: &Device) -> Result<Tensor<4>> {
    let file = SafetensorsFile::open(path)?;
    let info = file.info("latents").ok_or_else(|| Error::Io { path: path.into(), message: "no tensor named 'latents'".into() })?;
    let shape: [usize; 4] = info
        .shape
        .clone()
        .try_into()
        .map_err(|_| Error::Io { path: path.into(), message: format!("'latents' has shape {:?}; expected [1, 4, H/8, W/8]", info.shape) })?;
    Ok(Tensor::from_data(TensorData::new(file.to_f32("latents")?, shape), device))
}

pub fn run(args: SampleArgs) -> Result<()> {
    // Cheap argument checks first, before a model is loaded.
    args.generate.sampler()?;
    let picked = crate::device::pick(&args.device)?;
    eprintln!("{}", picked.reason);
    let device = picked.device.clone();
    let mut model = load_model(&args.model, args.config_from.as_deref(), &device, picked.inference_dtypes())?;
    let loras = apply_loras(&mut model, &args.lora, &device)?;
    let native = model.native_size();
    let init = args.init_latents.as_deref().map(|p| read_latents(p, &device)).transpose()?;
    // Without a size, an init latent's size decides.
    let (width, height) = match &init {
        Some(latents) => {
            let [_, _, h, w] = latents.dims();
            let factor = model.configs.vae.downscale();
            (w * factor, h * factor)
        }
        None => (native, native),
    };
    let request = args.generate.request(width, height)?;
    if model.tokenizer.length(&request.prompt)? > model.tokenizer.max_length {
        eprintln!("warning: the prompt is longer than {} tokens; the rest is cut off", model.tokenizer.max_length);
    }
    let bar = ProgressBar::new(request.steps as u64);
    bar.set_style(ProgressStyle::with_template("sampling [{bar:30}] {pos}/{len} steps ({per_sec}, {eta})").expect("valid template").progress_chars("=> "));
    let generated = model.generate(&request, init, &device, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let generated = generated?;
    let image = trainer_core::block_on(to_rgb8(generated.image))?;
    let model_name = Path::new(&args.model).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let extra: Vec<(&str, String)> = if loras.is_empty() { Vec::new() } else { vec![("Lora", loras.join(" "))] };
    let parameters = a1111_parameters(&request, &model_name, &extra);
    let png = png_with_parameters(&image, &parameters)?;
    std::fs::write(&args.out, png).map_err(|e| Error::Io { path: args.out.clone(), message: e.to_string() })?;
    eprintln!("wrote {} ({}x{})", args.out, request.width, request.height);
    Ok(())
}
