//! Benchmark of the image pipeline's two hot paths (not a test: it asserts
//! nothing about timings, it reports them).
//!
//! 1. Planning: `config::load` + `plan::plan` over N small image files in a
//!    folder (headers only, no pixel decoding). Target: under 5 s for 10,000.
//! 2. Preprocessing: `decode_oriented` + `resize_and_crop` of M 12-megapixel
//!    photo-like JPEGs to a 1024x1024 centre crop, on one thread, optionally
//!    compared with Pillow doing the same (scripts/bench_pillow.py).
//!
//! Generated inputs are cached in the work folder between runs.
//!
//! ```text
//! cargo run --release -p native-runner --bin bench-pipeline -- --with-pillow
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use native_runner::bench::median;
use trainer_core::config;
use trainer_core::data::geometry::{CropAspect, CropStyle, GeometrySettings, ImageGeometry, ResolutionType, Sizer};
use trainer_core::data::preprocess::{decode_oriented, resize_and_crop};
use trainer_core::data::probe::DEFAULT_MAX_IMAGE_PIXELS;
use trainer_core::data::source::ImageSource;
use trainer_core::plan::{plan, Plan, PlanTarget};
use trainer_core::rng::SeededRng;

use native_runner::folder::FolderSource;

#[derive(Parser)]
#[command(name = "bench-pipeline", about = "Times planning of many images and preprocessing of 12 MP JPEGs")]
struct Args {
    /// Folder for the generated images, configs and outputs (kept between runs).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Number of small images to plan over.
    #[arg(long, default_value_t = 10_000)]
    images: usize,
    /// Number of 12-megapixel JPEGs to preprocess.
    #[arg(long, default_value_t = 8)]
    jpegs: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also run scripts/bench_pillow.py on the same JPEGs (or set PILLOW_BENCH=1).
    #[arg(long)]
    with_pillow: bool,
}

fn main() -> ExitCode {
    native_runner::on_compute_pool(pipeline_main)
}

fn pipeline_main() -> ExitCode {
    native_runner::keep_freed_memory();
    native_runner::quiet_headless_vulkan();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let work_dir = args.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("burnbooth-bench"));
    fs::create_dir_all(&work_dir).map_err(|e| format!("{}: {e}", work_dir.display()))?;
    let work_dir = work_dir.canonicalize().map_err(|e| format!("{}: {e}", work_dir.display()))?;
    if args.images == 0 || args.jpegs == 0 {
        return Err("--images and --jpegs must be at least 1".into());
    }
    let runs = args.runs.max(1);
    println!("work dir: {}", work_dir.display());
    if cfg!(debug_assertions) {
        println!("warning: this is a debug build; timings mean little (use --release)");
    }

    // 1. Planning.
    let plan_dir = work_dir.join("plan-images");
    let generated = ensure_plan_images(&plan_dir, args.images)?;
    println!(
        "\n[plan] {} images in {} ({})",
        args.images,
        plan_dir.display(),
        generated.map_or("cached".to_string(), |d| format!("generated in {:.1} s", d.as_secs_f64()))
    );
    let config_path = write_plan_configs(&work_dir, &plan_dir)?;
    let mut plan_times = Vec::new();
    let mut last_plan = None;
    for run in 0..runs {
        let start = Instant::now();
        let plan = run_plan(&config_path)?;
        let elapsed = start.elapsed().as_secs_f64();
        println!("[plan] run {}: {:.3} s ({:.0} images/s)", run + 1, elapsed, args.images as f64 / elapsed);
        plan_times.push(elapsed);
        last_plan = Some(plan);
    }
    let plan = last_plan.expect("at least one run");
    let dataset = &plan.datasets[0];
    println!(
        "[plan] {} found, {} used, {} skipped; buckets: {}; {} steps",
        dataset.images_found,
        dataset.images_used,
        dataset.skipped.len(),
        dataset.buckets.iter().map(|b| format!("{} {}x{} ({})", b.aspect_bucket, b.target_size[0], b.target_size[1], b.images)).collect::<Vec<_>>().join(", "),
        plan.max_steps
    );
    let plan_median = median(&plan_times);
    println!("[plan] (the files are in the OS page cache here; a first plan after a reboot also waits for the disk)");

    // 2. Preprocessing.
    let jpeg_dir = work_dir.join("jpeg-12mp");
    let (jpegs, generated) = ensure_photos(&jpeg_dir, args.jpegs)?;
    let total_bytes: u64 = jpegs.iter().map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    println!(
        "\n[preprocess] {} JPEGs of {PHOTO_WIDTH}x{PHOTO_HEIGHT} in {} (average {:.2} MB; {})",
        jpegs.len(),
        jpeg_dir.display(),
        total_bytes as f64 / jpegs.len().max(1) as f64 / 1e6,
        generated.map_or("cached".to_string(), |d| format!("generated in {:.1} s", d.as_secs_f64()))
    );
    let geometry = photo_geometry();
    println!(
        "[preprocess] geometry: {}x{} -> resize {}x{} -> crop {}x{} at (top {}, left {})",
        geometry.original_size[0],
        geometry.original_size[1],
        geometry.resize_size[0],
        geometry.resize_size[1],
        geometry.target_size[0],
        geometry.target_size[1],
        geometry.crop_offset[0],
        geometry.crop_offset[1]
    );
    // Files are read into memory first: I/O is not timed (Pillow's side
    // does the same, decoding from BytesIO).
    let files: Vec<Vec<u8>> = jpegs.iter().map(|p| fs::read(p).map_err(|e| format!("{}: {e}", p.display()))).collect::<Result<_, _>>()?;
    // fast_image_resize is trainer-core's dependency, not this crate's: its
    // `Resizer` (which picks the best CPU extensions) is reached by inference
    // from `resize_and_crop`'s signature. One untimed warm-up image.
    let mut resizer = Default::default();
    let warm_up = decode_oriented(&files[0], DEFAULT_MAX_IMAGE_PIXELS)?;
    resize_and_crop(&warm_up, &geometry, &mut resizer)?;
    drop(warm_up);
    println!("[preprocess] fast_image_resize CPU extensions: {:?}", resizer.cpu_extensions());
    let mut decode_totals = Vec::new();
    let mut resize_totals = Vec::new();
    let mut run_totals = Vec::new();
    let mut sample: Option<RgbImage> = None;
    for run in 0..runs {
        let (mut decode, mut resize) = (Duration::ZERO, Duration::ZERO);
        for bytes in &files {
            let start = Instant::now();
            let image = decode_oriented(bytes, DEFAULT_MAX_IMAGE_PIXELS)?;
            let decoded = Instant::now();
            let out = resize_and_crop(&image, &geometry, &mut resizer)?;
            // Freeing the decoded image is part of the cost (Pillow's side
            // frees it inside its resize step too).
            drop(image);
            let done = Instant::now();
            decode += decoded - start;
            resize += done - decoded;
            if sample.is_none() {
                sample = Some(out);
            }
        }
        let total = (decode + resize).as_secs_f64();
        println!(
            "[preprocess] run {}: decode+orient {:.3} s, resize+crop {:.3} s, {:.2} images/s",
            run + 1,
            decode.as_secs_f64(),
            resize.as_secs_f64(),
            files.len() as f64 / total
        );
        decode_totals.push(decode.as_secs_f64());
        resize_totals.push(resize.as_secs_f64());
        run_totals.push(total);
    }
    let sample_path = work_dir.join("preprocessed-sample.png");
    if let Some(sample) = sample {
        sample.save(&sample_path).map_err(|e| format!("{}: {e}", sample_path.display()))?;
        println!("[preprocess] first output saved to {}", sample_path.display());
    }
    let count = files.len() as f64;
    let decode_ms = median(&decode_totals) / count * 1e3;
    let resize_ms = median(&resize_totals) / count * 1e3;
    let ours_per_s = count / median(&run_totals);

    // 3. Pillow.
    let with_pillow = args.with_pillow || std::env::var("PILLOW_BENCH").is_ok_and(|v| v == "1");
    let pillow = if with_pillow {
        match run_pillow(&jpeg_dir, files.len()) {
            Ok(result) => Some(result),
            Err(message) => {
                eprintln!("[pillow] failed: {message}");
                None
            }
        }
    } else {
        None
    };

    println!("\n=== summary ({} runs, medians) ===", runs);
    println!("{:<44} {:>12}", "plan, wall time", format!("{plan_median:.3} s"));
    println!("{:<44} {:>12}", format!("plan, images/s ({} images)", args.images), format!("{:.0}", args.images as f64 / plan_median));
    println!("{:<44} {:>12}", "preprocess, decode+orient per image", format!("{decode_ms:.1} ms"));
    println!("{:<44} {:>12}", "preprocess, resize+crop per image", format!("{resize_ms:.1} ms"));
    println!("{:<44} {:>12}", "preprocess, images/s on one core (ours)", format!("{ours_per_s:.2}"));
    if let Some(p) = &pillow {
        println!("{:<44} {:>12}", "Pillow, decode+exif_transpose+convert", format!("{:.1} ms", p.decode_s / count * 1e3));
        println!("{:<44} {:>12}", "Pillow, resize+crop per image", format!("{:.1} ms", p.resize_s / count * 1e3));
        println!("{:<44} {:>12}", "Pillow, images/s on one core", format!("{:.2}", p.images_per_s));
        println!("{:<44} {:>12}", "ratio ours / Pillow (images/s)", format!("{:.2}x", ours_per_s / p.images_per_s));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Planning

const PLAN_SIZES: [(u32, u32); 4] = [(640, 480), (480, 640), (1024, 1024), (1920, 1080)];

/// Makes `count` small image files (cached: nothing is written when the
/// folder already holds exactly `count` files). Returns the time spent
/// generating, if any.
fn ensure_plan_images(dir: &Path, count: usize) -> Result<Option<Duration>, String> {
    let existing = fs::read_dir(dir).map(|entries| entries.filter_map(|e| e.ok()).filter(|e| e.path().is_file()).count()).unwrap_or(0);
    if existing == count {
        return Ok(None);
    }
    let start = Instant::now();
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // One encoded template per size and format, in a few colours; every
    // file is a copy of one (planning reads headers only).
    let mut templates: Vec<(Vec<u8>, &str)> = Vec::new();
    for (size_index, &(width, height)) in PLAN_SIZES.iter().enumerate() {
        for (format_index, ext) in ["jpg", "png"].into_iter().enumerate() {
            let tint = (size_index * 2 + format_index) as u32 * 29;
            let image = RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, (tint % 256) as u8]));
            templates.push((encode(&image, ext, 85)?, ext));
        }
    }
    for i in 0..count {
        let (bytes, ext) = &templates[i % templates.len()];
        let path = dir.join(format!("image_{i:06}.{ext}"));
        fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Some(start.elapsed()))
}

fn encode(image: &RgbImage, ext: &str, quality: u8) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let (width, height) = image.dimensions();
    let result = if ext == "png" {
        PngEncoder::new(&mut bytes).write_image(image.as_raw(), width, height, ExtendedColorType::Rgb8)
    } else {
        JpegEncoder::new_with_quality(&mut bytes, quality).write_image(image.as_raw(), width, height, ExtendedColorType::Rgb8)
    };
    result.map_err(|e| format!("encoding {ext}: {e}"))?;
    Ok(bytes)
}

/// Writes an SDXL env config and a one-dataset dataloader JSON; returns the
/// env file's path.
fn write_plan_configs(work_dir: &Path, image_dir: &Path) -> Result<PathBuf, String> {
    let dataloader_path = work_dir.join("bench-dataloader.json");
    let dataloader = serde_json::json!([
        {
            "id": "bench",
            "type": "local",
            "instance_data_dir": image_dir.to_string_lossy(),
            "caption_strategy": "filename",
            "resolution": 1024,
            "resolution_type": "pixel_area",
            "crop": true,
            "crop_style": "center",
            "crop_aspect": "square",
            "cache_dir_vae": work_dir.join("output/cache/vae/bench").to_string_lossy(),
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": true,
            "cache_dir": work_dir.join("output/cache/text").to_string_lossy(),
        }
    ]);
    let text = serde_json::to_string_pretty(&dataloader).expect("JSON serialises");
    fs::write(&dataloader_path, text).map_err(|e| format!("{}: {e}", dataloader_path.display()))?;

    let config_path = work_dir.join("bench-config.env");
    let config = format!(
        "MODEL_FAMILY=sdxl\nMODEL_TYPE=lora\nMODEL_NAME=stabilityai/stable-diffusion-xl-base-1.0\nOUTPUT_DIR='{}'\n\
         DATALOADER_CONFIG='{}'\nTRAIN_BATCH_SIZE=1\nMAX_NUM_STEPS=1000\nRESOLUTION=1024\nRESOLUTION_TYPE=pixel_area\n\
         LEARNING_RATE=1e-4\nTRAINING_SEED=42\n",
        work_dir.join("output").display(),
        dataloader_path.display()
    );
    fs::write(&config_path, config).map_err(|e| format!("{}: {e}", config_path.display()))?;
    Ok(config_path)
}

/// Loads the configs and plans, as `native-runner plan` does.
fn run_plan(config_path: &Path) -> Result<Plan, String> {
    let read = |path: &str| -> trainer_core::Result<String> {
        fs::read_to_string(path).map_err(|e| trainer_core::Error::Io { path: path.to_string(), message: e.to_string() })
    };
    let env = |name: &str| std::env::var(name).ok();
    let (training, dataloader) = config::load(&config_path.to_string_lossy(), None, &read, &env).map_err(|e| e.to_string())?;
    let open = |dataset: &config::dataset::ImageDatasetConfig| -> trainer_core::Result<Box<dyn ImageSource>> {
        Ok(Box::new(FolderSource::open(&dataset.id, &dataset.instance_data_dir)?))
    };
    plan(&training, &dataloader, &open, PlanTarget { has_bf16: false, has_f16: false }, &mut |_| {}).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// Preprocessing

const PHOTO_WIDTH: u32 = 4032;
const PHOTO_HEIGHT: u32 = 3024;

/// The geometry the planner gives a 4032x3024 photo at 1024 px pixel_area
/// with a square centre crop: Lanczos to 1365x1024, crop 1024x1024 at left 170.
fn photo_geometry() -> ImageGeometry {
    let settings = GeometrySettings {
        resolution: 1024.0 * 1024.0 / 1e6,
        resolution_type: ResolutionType::Area,
        crop: true,
        crop_style: CropStyle::Center,
        crop_aspect: CropAspect::Square,
        ..Default::default()
    };
    Sizer::new(settings).geometry([PHOTO_WIDTH, PHOTO_HEIGHT], &mut SeededRng::new(0))
}

/// Makes `count` photo-like 12 MP JPEGs (cached per file). Returns their
/// paths and the time spent generating, if any.
fn ensure_photos(dir: &Path, count: usize) -> Result<(Vec<PathBuf>, Option<Duration>), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    let mut spent = None;
    for i in 0..count {
        let path = dir.join(format!("photo_{i:03}.jpg"));
        if !path.is_file() {
            let start = Instant::now();
            let image = photo_like(i as u64 + 1);
            let mut bytes = encode(&image, "jpg", 90)?;
            insert_exif_orientation(&mut bytes, 1);
            // Write then rename, so an interrupted run leaves no half file.
            let partial = path.with_extension("partial");
            fs::write(&partial, &bytes).map_err(|e| format!("{}: {e}", partial.display()))?;
            fs::rename(&partial, &path).map_err(|e| format!("{}: {e}", path.display()))?;
            *spent.get_or_insert(Duration::ZERO) += start.elapsed();
        }
        paths.push(path);
    }
    Ok((paths, spent))
}

/// Noise strengths of the generated photos, tuned so that a 12 MP quality-90
/// file is about the size of a phone photo's (3 to 5 MB).
const NOISE_SIGMA: f32 = 5.0;
const CHROMA_NOISE: f32 = 8.0;

/// Small xorshift generator for image content.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Smooth gradients and soft shapes, a few hard edges, fine texture and
/// sensor-like noise: compresses roughly like a photo.
fn photo_like(seed: u64) -> RgbImage {
    let (w, h) = (PHOTO_WIDTH, PHOTO_HEIGHT);
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
    // Low-frequency waves per axis, precomputed.
    let fx: Vec<f32> = (0..w).map(|x| (x as f32 * 0.0021 + seed as f32).sin() * 28.0 + (x as f32 * 0.011).sin() * 9.0).collect();
    let fy: Vec<f32> = (0..h).map(|y| (y as f32 * 0.0017 + seed as f32 * 0.7).cos() * 24.0 + (y as f32 * 0.013).sin() * 8.0).collect();
    let tx: Vec<f32> = (0..w).map(|x| (x as f32 * 0.37).sin()).collect();
    let ty: Vec<f32> = (0..h).map(|y| (y as f32 * 0.29).sin()).collect();
    // Hard-edged discs (objects).
    let discs: Vec<(f32, f32, f32, [f32; 3])> = (0..14)
        .map(|_| {
            let (cx, cy) = (rng.unit() * w as f32, rng.unit() * h as f32);
            let r = 80.0 + rng.unit() * 600.0;
            (cx, cy, r, [rng.unit() * 90.0 - 45.0, rng.unit() * 90.0 - 45.0, rng.unit() * 90.0 - 45.0])
        })
        .collect();
    let base = [60.0 + rng.unit() * 80.0, 60.0 + rng.unit() * 80.0, 60.0 + rng.unit() * 80.0];
    let mut image = RgbImage::new(w, h);
    for (y, row) in image.as_mut().chunks_exact_mut(w as usize * 3).enumerate() {
        let t = y as f32 / h as f32;
        let yf = y as f32;
        let active: Vec<&(f32, f32, f32, [f32; 3])> = discs.iter().filter(|d| (yf - d.1).abs() < d.2).collect();
        for (x, pixel) in row.chunks_exact_mut(3).enumerate() {
            let xf = x as f32;
            let smooth = fx[x] + fy[y];
            let texture = tx[x] * ty[y] * 5.0;
            let mut offset = [0.0f32; 3];
            for d in &active {
                let (dx, dy) = (xf - d.0, yf - d.1);
                if dx * dx + dy * dy < d.2 * d.2 {
                    offset = d.3;
                }
            }
            // Sensor-like noise: luma (sum of three uniforms, roughly
            // Gaussian, sigma ~NOISE_SIGMA) plus a little chroma noise.
            let bits = rng.next();
            let noise = (((bits & 0xFF) + ((bits >> 8) & 0xFF) + ((bits >> 16) & 0xFF)) as f32 / 255.0 - 1.5) * 2.0 * NOISE_SIGMA;
            let chroma = [(bits >> 24) & 0xFF, (bits >> 32) & 0xFF, (bits >> 40) & 0xFF].map(|b| (b as f32 / 255.0 - 0.5) * CHROMA_NOISE);
            for c in 0..3 {
                let gradient = match c {
                    0 => 50.0 * (1.0 - t),
                    1 => 30.0 * t,
                    _ => 70.0 * (1.0 - t) * (xf / w as f32),
                };
                let value = base[c] + gradient + smooth * (1.0 - 0.3 * c as f32) + texture + offset[c] + noise + chroma[c];
                pixel[c] = value.clamp(0.0, 255.0) as u8;
            }
        }
    }
    image
}

/// Inserts an EXIF APP1 segment holding only an orientation tag right after
/// the JPEG's SOI marker, as cameras write it.
fn insert_exif_orientation(jpeg: &mut Vec<u8>, orientation: u16) {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II*\0");
    tiff.extend_from_slice(&8u32.to_le_bytes()); // first IFD
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes()); // count
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]); // value padding
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
    segment.extend_from_slice(b"Exif\0\0");
    segment.extend_from_slice(&tiff);
    jpeg.splice(2..2, segment);
}

// ---------------------------------------------------------------------------
// Pillow

struct PillowResult {
    images_per_s: f64,
    decode_s: f64,
    resize_s: f64,
}

fn run_pillow(jpeg_dir: &Path, count: usize) -> Result<PillowResult, String> {
    let in_repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench_pillow.py");
    let script = if in_repo.is_file() { in_repo } else { PathBuf::from("scripts/bench_pillow.py") };
    println!("\n[pillow] python3 {} {} --count {count}", script.display(), jpeg_dir.display());
    let output =
        Command::new("python3").arg(&script).arg(jpeg_dir).arg("--count").arg(count.to_string()).output().map_err(|e| format!("cannot run python3: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines().filter(|l| !l.starts_with('{')) {
        println!("[pillow] {line}");
    }
    if !output.status.success() {
        return Err(format!("{} exited with {}: {}", script.display(), output.status, String::from_utf8_lossy(&output.stderr).trim()));
    }
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).ok_or("no JSON line in the script's output")?;
    println!("[pillow] {line}");
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad JSON from the script: {e}"))?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_f64()).ok_or(format!("'{name}' missing from the script's JSON"));
    Ok(PillowResult { images_per_s: field("pillow_images_per_s")?, decode_s: field("decode_s")?, resize_s: field("resize_s")? })
}
