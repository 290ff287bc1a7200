//! Benchmark (not a test): forward time of a mid-size SD1-style UNet (the
//! "mid-size UNet" of docs/reference.md §5: blocks 64/128/256/256, 2 layers
//! per block, 8 heads, context 256, latents [1, 4, 32, 32]) on burn's CPU
//! backend and on wgpu, with random weights. `scripts/bench_unet_torch.py`
//! times PyTorch on the same config; `--with-torch` runs it too.
//!
//! `--vae-decode` times SD's VAE decoder instead (random weights) on
//! latents of a `--resolution` px image (default 512): what every sample,
//! validation images included, ends with. It tiles as the pipeline does (on
//! wgpu when an activation would pass 128 MiB); `--tile N` forces N px tiles
//! and `--against-untiled` also decodes whole and prints how far apart the
//! two are (`scripts/bench_vae_tiling_torch.py` gives diffusers' figure for
//! the same tiles).
//!
//! `--convs` times SD 1.5's 3x3 convolutions at 512 px one by one (320
//! channels at 64x64, 640 at 32x32, 1280 at 16x16): the forward and the
//! input's gradient (a transposed convolution, what a LoRA step's backward
//! asks of every frozen convolution), with their GFLOP/s;
//! `scripts/bench_conv_torch.py` times PyTorch on the same shapes.
//!
//! cargo run --release -p native-runner --bin bench-unet -- [--runs 5] [--device cpu,cpu-gpu,gpu] [--with-torch] [--vae-decode [--resolution 512] [--tile 352] [--against-untiled]] [--convs]

use std::time::Instant;

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};
use clap::Parser;
use native_runner::bench::{devices, median, pool_memory, MID_SIZE_UNET};
use trainer_core::models::config::{UNetConfig, VaeConfig};
use trainer_core::models::loader::Loader;
use trainer_core::models::unet::UNet2DConditionModel;
use trainer_core::models::vae::{AutoencoderKl, VaeTiling};
use trainer_core::pipeline::{gaussian_noise, vae_budget};
use trainer_core::rng::SeededRng;
use trainer_core::train::optimizer::frozen_on;

fn bench(name: &str, device: Device, runs: usize) -> Option<f64> {
    let config: UNetConfig = serde_json::from_str(MID_SIZE_UNET).expect("valid config");
    let mut loader = Loader::random(1, device.clone());
    let unet = UNet2DConditionModel::load(&config, &mut loader);
    let parameters: usize = loader.requested.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let mut rng = SeededRng::new(2);
    let latents = gaussian_noise([1, 4, 32, 32], &mut rng, &device);
    let context: Tensor<3> = gaussian_noise([1, 77, 256, 1], &mut rng, &device).reshape([1, 77, 256]);
    let start = Instant::now();
    let first = unet.forward(latents.clone(), &[500.0], context.clone());
    let _ = first.into_data();
    let first_time = start.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for _ in 0..runs {
        let start = Instant::now();
        let out = unet.forward(latents.clone(), &[500.0], context.clone());
        let _ = out.into_data(); // waits for the device
        times.push(start.elapsed().as_secs_f64());
    }
    let m = median(&times);
    println!("{name:>10}: forward {m:.3} s (median of {runs}; first call {first_time:.2} s), {:.1} M parameters", parameters as f64 / 1e6);
    Some(m)
}

fn bench_vae_decode(name: &str, device: Device, args: &Args) {
    let (runs, resolution) = (args.runs, args.resolution);
    let config: VaeConfig = serde_json::from_str(trainer_core::models::standard::SD_VAE).expect("valid config");
    let mut loader = Loader::random(1, device.clone());
    let vae = AutoencoderKl::load(&config, &mut loader);
    let side = resolution / 8;
    let latents = gaussian_noise([1, 4, side, side], &mut SeededRng::new(2), &device);
    let tiling = match args.tile {
        Some(tile_sample_size) => Some(VaeTiling { tile_sample_size, overlap: 0.25 }),
        None => vae_budget(&device).and_then(|budget| VaeTiling::for_decoding(&config, 1, resolution, resolution, budget)),
    };
    let mut times = Vec::new();
    let mut decoded = None;
    for _ in 0..=runs {
        let start = Instant::now();
        decoded = Some(vae.decode_tiled(latents.clone(), &config, tiling).into_data()); // waits for the device
        times.push(start.elapsed().as_secs_f64());
    }
    let first = times.remove(0);
    let memory = pool_memory(&device);
    let tiles = tiling.map(|t| format!(", in {} px tiles", t.tile_sample_size)).unwrap_or_else(|| ", whole".into());
    println!(
        "{name:>10}: VAE decode to {resolution} px{tiles} {:.3} s (median of {runs}; first call {first:.2} s){memory}",
        if times.is_empty() { first } else { median(&times) }
    );
    if args.against_untiled {
        let tiled: Vec<f32> = decoded.expect("decoded at least once").try_to_vec::<f32>().expect("f32 output");
        let whole: Vec<f32> = vae.decode(latents).into_data().try_to_vec::<f32>().expect("f32 output");
        let largest = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_difference = tiled.iter().zip(&whole).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let mean_difference = tiled.iter().zip(&whole).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / whole.len() as f64;
        println!(
            "{name:>10}: tiled vs whole: max |difference| / max |whole| {:.4}, mean |difference| {mean_difference:.4} (max |whole| {largest:.3})",
            max_difference / largest
        );
    }
}

/// The median time of `runs` calls of `work`, after one untimed call.
fn median_time(runs: usize, mut work: impl FnMut()) -> f64 {
    work();
    let times: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(&times)
}

/// SD 1.5's 3x3 convolutions at 512 px, one by one (see the module docs).
fn bench_convs(name: &str, device: Device, runs: usize) {
    let mut rng = SeededRng::new(2);
    let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
    let train_device = device.clone().autodiff();
    for (channels, side) in [(320, 64), (640, 32), (1280, 16)] {
        let x = gaussian_noise([1, channels, side, side], &mut rng, &device);
        let weight = gaussian_noise([channels, channels, 3, 3], &mut rng, &device) * 0.02;
        let flops = 2.0 * (channels * channels * 9 * side * side) as f64;
        // into_data waits for the device.
        let forward = median_time(runs, || {
            let _ = conv2d(x.clone(), weight.clone(), None, options.clone()).into_data();
        });
        let tracked = frozen_on(x.clone(), &train_device).require_grad();
        let frozen_weight = frozen_on(weight, &train_device);
        let both = median_time(runs, || {
            let grads = conv2d(tracked.clone(), frozen_weight.clone(), None, options.clone()).sum().backward();
            let _ = tracked.grad(&grads).expect("the input's gradient").into_data();
        });
        let backward = (both - forward).max(1e-9);
        println!(
            "{name:>10}: conv {channels}ch {side}x{side}: forward {:.1} ms ({:.0} GFLOP/s), input gradient {:.1} ms ({:.0} GFLOP/s)",
            forward * 1e3,
            flops / forward / 1e9,
            backward * 1e3,
            flops / backward / 1e9
        );
    }
}

/// UNet forward or VAE decode, timed on each device (see the module docs).
#[derive(Parser)]
#[command(name = "bench-unet")]
struct Args {
    /// Timed runs after the first (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Comma-separated devices: cpu, cpu-gpu, gpu.
    #[arg(long, default_value = "cpu,cpu-gpu")]
    device: String,
    /// Also run scripts/bench_unet_torch.py on the same config.
    #[arg(long)]
    with_torch: bool,
    /// Time SD's VAE decoder instead of the UNet.
    #[arg(long)]
    vae_decode: bool,
    /// With --vae-decode: the image side in pixels.
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// With --vae-decode: force tiles of this many pixels.
    #[arg(long)]
    tile: Option<usize>,
    /// With --vae-decode: also decode whole and report how far apart the two are.
    #[arg(long)]
    against_untiled: bool,
    /// Time SD 1.5's 3x3 convolutions one by one instead of the UNet.
    #[arg(long)]
    convs: bool,
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
    let args = Args::parse();
    if args.convs {
        for (label, device) in devices(&args.device) {
            bench_convs(label, device, args.runs);
        }
        if args.with_torch {
            run_torch("scripts/bench_conv_torch.py", args.runs);
        }
        return;
    }
    if args.vae_decode {
        for (label, device) in devices(&args.device) {
            bench_vae_decode(label, device, &args);
        }
        return;
    }
    for (label, device) in devices(&args.device) {
        bench(label, device, args.runs);
    }
    if args.with_torch {
        run_torch("scripts/bench_unet_torch.py", args.runs);
    }
}

fn run_torch(script: &str, runs: usize) {
    let status = std::process::Command::new("python3").args([script, "--runs", &runs.to_string()]).status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("the PyTorch side ({script}) failed (pip install torch diffusers)");
    }
}
