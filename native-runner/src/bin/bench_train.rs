//! Benchmark (not a test): one LoRA training step (forward, backward, AdamW)
//! of the mid-size SD1-style UNet of docs/reference.md §5 (latents
//! [1, 4, 32, 32], context [1, 77, 256], LoRA rank 4 / alpha 4 on to_q, to_k,
//! to_v, to_out.0, AdamW lr 1e-4), with random weights, through the same
//! LoRA, loss and optimizer code as `train`. Reports the median step time
//! and the process's peak resident memory. `--with-torch` runs
//! scripts/bench_train_torch.py (diffusers + peft) on the same config.
//!
//! `--unet sd15` takes SD 1.5's UNet instead (860 M parameters, context
//! 768), `--unet sdxl` SDXL's (2.6 B parameters, context 2048, with its
//! pooled text embedding and size ids), `--unet-config` any diffusers UNet
//! config.json; `--resolution` the image side in pixels (latents are 1/8 of
//! it; default 256, 32x32 latents), `--rank` the LoRA rank (alpha equal to
//! it), `--checkpointing` turns on gradient checkpointing (by stage, as
//! `train` does it; diffusers' enable_gradient_checkpointing on the PyTorch
//! side), `--f16-base` stores the frozen base weights in f16 as `train`
//! does on GPUs (the PyTorch side loads the UNet in f16 then, its LoRA
//! weights staying f32), `--lora-dropout P` drops the adapters' inputs as
//! `train`'s LORA_DROPOUT does (peft's lora_dropout on the PyTorch side).
//! scripts/gpu-bench.sh runs it on a lent GPU.
//! `--rounds N` repeats the pair (PyTorch, then ours) N times, interleaved,
//! and ends with each round's ratio and their median: on a shared machine
//! one pair's ratio moves with the neighbours' load.
//!
//! cargo run --release -p native-runner --bin bench-train -- [--steps 5] [--device cpu,cpu-gpu,gpu] [--unet mid|sd15|sdxl] [--unet-config PATH] [--resolution 512] [--rank 4] [--checkpointing] [--f16-base] [--lora-dropout 0.1] [--with-torch] [--rounds 3]

use std::time::Instant;

use burn::tensor::{Device, Tensor};
use clap::{Parser, ValueEnum};
use native_runner::bench::{devices, median, pool_memory, MID_SIZE_UNET};
use trainer_core::models::config::UNetConfig;
use trainer_core::models::loader::Loader;
use trainer_core::models::lora::{DropoutSource, LoraTargets};
use trainer_core::models::unet::{AddedConditions, UNet2DConditionModel};
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
    /// The UNet's config.json text.
    unet: String,
    latent_side: usize,
    rank: usize,
    checkpointing: bool,
    f16_base: bool,
    /// LoRA dropout's probability (0: none).
    lora_dropout: f64,
    steps: usize,
}

/// Times the step on `device`; returns its median step time in seconds.
fn bench(name: &str, device: Device, settings: &Settings) -> f64 {
    let steps = settings.steps;
    let config: UNetConfig = serde_json::from_str(&settings.unet).expect("valid config");
    let train_device = device.clone().autodiff();
    let weight_dtype = if settings.f16_base { burn::tensor::DType::F16 } else { burn::tensor::DType::F32 };
    let mut loader = Loader::random(1, train_device.clone()).with_weight_dtype(weight_dtype);
    let mut unet = UNet2DConditionModel::load(&config, &mut loader);
    unet = burn::module::Module::no_grad(unet);
    let targets = LoraTargets::attention();
    let mut lora_parameters = 0;
    let dropout = (settings.lora_dropout > 0.0).then(|| DropoutSource::new(settings.lora_dropout));
    for layer in unet.lora_layers_mut() {
        if targets.matches(&layer.path) {
            layer.attach(settings.rank, settings.rank as f64, 1, dropout.clone(), &train_device);
            let [d_in, d_out] = layer.dims();
            lora_parameters += settings.rank * (d_in + d_out);
        }
    }
    let mut optimizer = Optimizer::new(Rule::AdamW(AdamWSettings { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 1e-2, bf16: false }), 1.0);
    let mut rng = SeededRng::new(2);
    let (side, width) = (settings.latent_side, config.cross_attention_dim.get(0));
    let latents = frozen_on(gaussian_noise([1, 4, side, side], &mut rng, &device), &train_device);
    let context: Tensor<3> = frozen_on(gaussian_noise([1, 77, width, 1], &mut rng, &device).reshape([1, 77, width]), &train_device);
    let target = frozen_on(gaussian_noise([1, 4, side, side], &mut rng, &device), &train_device);
    // SDXL's added conditions: a pooled text embedding and the six size ids.
    let added = (config.addition_embed_type.as_deref() == Some("text_time")).then(|| {
        let time_width = 6 * config.addition_time_embed_dim.unwrap_or(256);
        let pooled_width = config.projection_class_embeddings_input_dim.unwrap_or(2816) - time_width;
        let pooled = frozen_on(gaussian_noise([1, pooled_width, 1, 1], &mut rng, &device).reshape([1, pooled_width]), &train_device);
        let pixels = (side * 8) as f32;
        AddedConditions { pooled, time_ids: vec![[pixels, pixels, 0.0, 0.0, pixels, pixels]] }
    });
    let mut times = Vec::new();
    let mut first = 0.0;
    for step in 0..=steps {
        let start = Instant::now();
        if let Some(dropout) = &dropout {
            dropout.start_step(1, step as u64, 0);
            dropout.begin_forward();
        }
        let loss_of = |prediction: Tensor<4>| (prediction - target.clone()).square().mean();
        let loss = if settings.checkpointing {
            let mut collect = |grads: &mut burn::tensor::Gradients| optimizer.accumulate(&unet, "", grads, 1.0);
            backward_in_stages(&unet, latents.clone(), &[500.0], context.clone(), added.as_ref(), &train_device, &loss_of, &mut collect)
        } else {
            let loss = loss_of(unet.forward_with(latents.clone(), &[500.0], context.clone(), added.as_ref()));
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
    let step = if times.is_empty() { first } else { median(&times) };
    println!("{name:>18}: LoRA step {step:.3} s (median of {steps}; first {first:.2} s), {lora_parameters} LoRA parameters, {memory}");
    step
}

/// Runs scripts/bench_train_torch.py on the same settings, passing its
/// report through; returns its median step time in seconds.
fn bench_torch(settings: &Settings) -> Option<f64> {
    // The PyTorch side builds the same config.
    let config_path = std::env::temp_dir().join(format!("bench-train-unet-{}.json", std::process::id()));
    std::fs::write(&config_path, &settings.unet).expect("writes the UNet config");
    let mut torch_args = vec![
        "scripts/bench_train_torch.py".to_string(),
        "--steps".into(),
        settings.steps.to_string(),
        "--unet-config".into(),
        config_path.display().to_string(),
        "--rank".into(),
        settings.rank.to_string(),
        "--resolution".into(),
        (settings.latent_side * 8).to_string(),
    ];
    if settings.checkpointing {
        torch_args.push("--checkpointing".into());
    }
    if settings.f16_base {
        torch_args.push("--f16-base".into());
    }
    if settings.lora_dropout > 0.0 {
        torch_args.extend(["--lora-dropout".into(), settings.lora_dropout.to_string()]);
    }
    let output = std::process::Command::new("python3").args(&torch_args).stderr(std::process::Stdio::inherit()).output();
    let _ = std::fs::remove_file(&config_path);
    match output {
        Ok(output) if output.status.success() => {
            let report = String::from_utf8_lossy(&output.stdout);
            print!("{report}");
            // "PyTorch (CPU): LoRA step 0.281 s (median of 5; ...".
            report.split_once("LoRA step ").and_then(|(_, rest)| rest.split_once(" s")?.0.parse().ok())
        }
        _ => {
            eprintln!("the PyTorch side failed (pip install torch diffusers peft)");
            None
        }
    }
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
    /// The UNet: the mid-size reference UNet, SD 1.5's or SDXL's.
    #[arg(long, value_enum, default_value_t = UnetChoice::Mid)]
    unet: UnetChoice,
    /// A diffusers UNet config.json to build instead of `--unet`.
    #[arg(long)]
    unet_config: Option<String>,
    /// LoRA rank (alpha equal to it) on the attention projections.
    #[arg(long, default_value_t = 4)]
    rank: usize,
    /// Image side in pixels (latents are 1/8 of it).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    /// Gradient checkpointing by stage, as `train` does it.
    #[arg(long)]
    checkpointing: bool,
    /// Frozen base weights in f16, as `train` stores them on GPUs.
    #[arg(long)]
    f16_base: bool,
    /// LoRA dropout on the adapters' inputs (train's LORA_DROPOUT, whose
    /// default is 0.1; peft's default is none).
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Also run scripts/bench_train_torch.py on the same settings.
    #[arg(long)]
    with_torch: bool,
    /// Times to repeat PyTorch's run and ours, interleaved.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

/// One round's median step times, in seconds.
struct Round {
    torch: Option<f64>,
    /// Per device label.
    ours: Vec<(&'static str, f64)>,
}

#[derive(Clone, Copy, ValueEnum)]
enum UnetChoice {
    Mid,
    Sd15,
    Sdxl,
}

fn main() {
    native_runner::on_compute_pool(run)
}

fn run() {
    native_runner::keep_freed_memory();
    native_runner::quiet_headless_vulkan();
    if cfg!(debug_assertions) {
        println!("warning: debug build; use --release for meaningful timings");
    }
    let Args { steps, device: devices_arg, unet: unet_choice, unet_config, rank, resolution, checkpointing, f16_base, lora_dropout, with_torch, rounds } =
        Args::parse();
    let (unet, unet_name) = match (&unet_config, unet_choice) {
        (Some(path), _) => (std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}")), path.as_str()),
        (None, UnetChoice::Mid) => (MID_SIZE_UNET.to_string(), "mid"),
        (None, UnetChoice::Sd15) => (trainer_core::models::standard::SD15_UNET.to_string(), "sd15"),
        (None, UnetChoice::Sdxl) => (trainer_core::models::standard::SDXL_UNET.to_string(), "sdxl"),
    };
    let settings = Settings { unet: unet.clone(), latent_side: resolution / 8, rank, checkpointing, f16_base, lora_dropout, steps };
    println!(
        "UNet {unet_name}, {resolution} px (latents {0}x{0}), LoRA rank {rank} on attention, dropout {lora_dropout}, gradient checkpointing {checkpointing}, base weights {1}",
        resolution / 8,
        if f16_base { "f16" } else { "f32" }
    );
    let mut results = Vec::new();
    for round in 1..=rounds.max(1) {
        if rounds > 1 {
            println!("round {round} of {rounds}");
        }
        // PyTorch first: its numbers stand even if ours runs past a time limit.
        let torch = if with_torch { bench_torch(&settings) } else { None };
        let ours = devices(&devices_arg).into_iter().map(|(label, device)| (label, bench(label, device, &settings))).collect();
        results.push(Round { torch, ours });
    }
    // Ours over PyTorch's, per device: each round's ratio, then their median.
    let labels: Vec<&str> = results[0].ours.iter().map(|(label, _)| *label).collect();
    for label in labels {
        let ratios: Vec<f64> = results.iter().filter_map(|round| Some(round.ours.iter().find(|(l, _)| *l == label)?.1 / round.torch?)).collect();
        if !ratios.is_empty() {
            let each = ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", ");
            println!("{label} / PyTorch: {:.2}x median of {} round(s) ({each})", median(&ratios), ratios.len());
        }
    }
}
