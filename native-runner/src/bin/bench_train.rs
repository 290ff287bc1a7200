//! Benchmark (not a test): one LoRA training step (forward, backward, AdamW)
//! of the mid-size SD1-style UNet of docs/reference.md §5 (latents
//! [1, 4, 32, 32], context [1, 77, 256], LoRA rank 4 / alpha 4 on to_q, to_k,
//! to_v, to_out.0, AdamW lr 1e-4), with random weights, through the same
//! LoRA, loss and optimizer code as `train`. Reports the median step time
//! and the process's peak resident memory. `--with-torch` runs
//! scripts/bench_train_torch.py (diffusers + peft) on the same config.
//!
//! `--unet sd15` takes SD 1.5's UNet instead (860 M parameters, context
//! 768), `--resolution` the image side in pixels (latents are 1/8 of it;
//! default 256, 32x32 latents), `--checkpointing` turns on gradient
//! checkpointing (by stage, as `train` does it; diffusers'
//! enable_gradient_checkpointing on the PyTorch side), `--f16-base` stores
//! the frozen base weights in f16 as `train` does on GPUs (the PyTorch side
//! loads the UNet in f16 then, its LoRA weights staying f32).
//!
//! cargo run --release -p native-runner --bin bench-train -- [--steps 5] [--device cpu,cpu-gpu,gpu] [--unet mid|sd15] [--resolution 512] [--checkpointing] [--f16-base] [--with-torch]

use std::time::Instant;

use burn::tensor::{Device, Tensor};
use clap::{Parser, ValueEnum};
use native_runner::bench::{devices, median, pool_memory, MID_SIZE_UNET};
use trainer_core::models::config::UNetConfig;
use trainer_core::models::loader::Loader;
use trainer_core::models::lora::LoraTargets;
use trainer_core::models::unet::UNet2DConditionModel;
use trainer_core::pipeline::gaussian_noise;
use trainer_core::rng::SeededRng;
use trainer_core::train::optimizer::{frozen_on, AdamWSettings, Optimizer, Rule};
use trainer_core::train::recompute::backward_in_stages;

/// Peak resident set size of this process (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// What one run measures.
struct Settings {
    unet: &'static str,
    latent_side: usize,
    checkpointing: bool,
    f16_base: bool,
    steps: usize,
}

fn bench(name: &str, device: Device, settings: &Settings) {
    let steps = settings.steps;
    let config: UNetConfig = serde_json::from_str(settings.unet).expect("valid config");
    let train_device = device.clone().autodiff();
    let weight_dtype = if settings.f16_base { burn::tensor::DType::F16 } else { burn::tensor::DType::F32 };
    let mut loader = Loader::random(1, train_device.clone()).with_weight_dtype(weight_dtype);
    let mut unet = UNet2DConditionModel::load(&config, &mut loader);
    unet = burn::module::Module::no_grad(unet);
    let targets = LoraTargets::attention();
    let mut lora_parameters = 0;
    for layer in unet.lora_layers_mut() {
        if targets.matches(&layer.path) {
            layer.attach(4, 4.0, 1, None, &train_device);
            let [d_in, d_out] = layer.dims();
            lora_parameters += 4 * (d_in + d_out);
        }
    }
    let mut optimizer = Optimizer::new(Rule::AdamW(AdamWSettings { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 1e-2, bf16: false }), 1.0);
    let mut rng = SeededRng::new(2);
    let (side, width) = (settings.latent_side, config.cross_attention_dim.get(0));
    let latents = frozen_on(gaussian_noise([1, 4, side, side], &mut rng, &device), &train_device);
    let context: Tensor<3> = frozen_on(gaussian_noise([1, 77, width, 1], &mut rng, &device).reshape([1, 77, width]), &train_device);
    let target = frozen_on(gaussian_noise([1, 4, side, side], &mut rng, &device), &train_device);
    let mut times = Vec::new();
    let mut first = 0.0;
    for step in 0..=steps {
        let start = Instant::now();
        let loss_of = |prediction: Tensor<4>| (prediction - target.clone()).square().mean();
        let loss = if settings.checkpointing {
            let mut collect = |grads: &mut burn::tensor::Gradients| optimizer.accumulate(&unet, "", grads, 1.0);
            backward_in_stages(&unet, latents.clone(), &[500.0], context.clone(), None, &train_device, &loss_of, &mut collect)
        } else {
            let loss = loss_of(unet.forward(latents.clone(), &[500.0], context.clone()));
            optimizer.accumulate(&unet, "", &mut loss.backward(), 1.0);
            loss
        };
        let (next, _norm) = trainer_core::block_on(optimizer.step(unet, 1e-4, &train_device)).expect("step");
        unet = next;
        let _ = loss.into_scalar::<f32>(); // waits for the device
        let elapsed = start.elapsed().as_secs_f64();
        if step == 0 {
            first = elapsed;
        } else {
            times.push(elapsed);
        }
    }
    let memory = peak_rss_mib().map(|m| format!("{m:.0} MiB peak RSS (process so far)")).unwrap_or_default() + &pool_memory(&device);
    println!(
        "{name:>18}: LoRA step {:.3} s (median of {steps}; first {first:.2} s), {lora_parameters} LoRA parameters, {memory}",
        if times.is_empty() { first } else { median(&times) }
    );
}

/// One LoRA training step, timed on each device (see the module docs).
#[derive(Parser)]
#[command(name = "bench-train")]
struct Args {
    /// Steps to time (the median is reported; the first step is shown apart).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Comma-separated devices: cpu, cpu-gpu, gpu.
    #[arg(long, default_value = "cpu,cpu-gpu")]
    device: String,
    /// The UNet: the mid-size reference UNet or SD 1.5's.
    #[arg(long, value_enum, default_value_t = UnetChoice::Mid)]
    unet: UnetChoice,
    /// Image side in pixels (latents are 1/8 of it).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Gradient checkpointing by stage, as `train` does it.
    #[arg(long)]
    checkpointing: bool,
    /// Frozen base weights in f16, as `train` stores them on GPUs.
    #[arg(long)]
    f16_base: bool,
    /// Also run scripts/bench_train_torch.py on the same settings.
    #[arg(long)]
    with_torch: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum UnetChoice {
    Mid,
    Sd15,
}

fn main() {
    native_runner::keep_freed_memory();
    native_runner::quiet_headless_vulkan();
    if cfg!(debug_assertions) {
        println!("warning: debug build; use --release for meaningful timings");
    }
    let Args { steps, device: devices_arg, unet: unet_choice, resolution, checkpointing, f16_base, with_torch } = Args::parse();
    let (unet, unet_name) = match unet_choice {
        UnetChoice::Mid => (MID_SIZE_UNET, "mid"),
        UnetChoice::Sd15 => (trainer_core::models::standard::SD15_UNET, "sd15"),
    };
    let settings = Settings { unet, latent_side: resolution / 8, checkpointing, f16_base, steps };
    println!(
        "UNet {unet_name}, {resolution} px (latents {0}x{0}), gradient checkpointing {checkpointing}, base weights {1}",
        resolution / 8,
        if f16_base { "f16" } else { "f32" }
    );
    for (label, device) in devices(&devices_arg) {
        bench(label, device, &settings);
    }
    if with_torch {
        let mut torch_args = vec![
            "scripts/bench_train_torch.py".to_string(),
            "--steps".into(),
            steps.to_string(),
            "--unet".into(),
            unet_name.into(),
            "--resolution".into(),
            resolution.to_string(),
        ];
        if checkpointing {
            torch_args.push("--checkpointing".into());
        }
        if f16_base {
            torch_args.push("--f16-base".into());
        }
        let status = std::process::Command::new("python3").args(&torch_args).status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("the PyTorch side failed (pip install torch diffusers peft)");
        }
    }
}
