//! `native-runner plan` as a user runs it, on the example the repo ships and
//! on broken setups.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn runner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_native-runner")).args(args).current_dir(repo()).output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A fresh folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burnbooth-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a folder, leaving out `output/` folders (a local run's caches and
/// results, not part of the repository).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        // Run outputs, and the example model scripts/make_example_model.py writes (not needed here).
        if entry.file_name() == "output" || entry.file_name() == "tiny-model" {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn listing(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.is_dir() {
            files.extend(listing(&entry.path()));
        } else {
            files.push((entry.path(), meta.len()));
        }
    }
    files.sort();
    files
}

#[test]
fn plan_json_on_the_shipped_example() {
    let output = runner(&["plan", "--config", "examples/dreambooth/config.env", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let datasets = plan["datasets"].as_array().unwrap();
    assert_eq!(datasets.len(), 2);
    assert_eq!(datasets[0]["id"], "zwxrobot-data");
    assert_eq!(datasets[0]["images"].as_array().unwrap().len(), 6);
    assert_eq!(datasets[1]["images"].as_array().unwrap().len(), 10);
    let image = &datasets[0]["images"][0];
    assert_eq!(image["path"], "robot_01.jpg");
    assert_eq!(image["original_size"], serde_json::json!([512, 512]));
    assert_eq!(image["target_size"], serde_json::json!([128, 128]));
    assert_eq!(image["intermediary_size"], serde_json::json!([128, 128]));
    assert_eq!(image["crop_offset"], serde_json::json!([0, 0]));
    assert_eq!(image["aspect_bucket"], "1.0");
    assert_eq!(image["caption"], "zwxrobot");
    assert_eq!(datasets[0]["skipped"], serde_json::json!([]));
    assert_eq!(plan["stops_on"], "max_steps");
    assert_eq!(plan["max_steps"], 1000);
    assert!(plan["steps_per_epoch"].as_u64().unwrap() >= 12);
    assert!(plan["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("whichever comes first")));
    // The same run twice gives the same plan (random crops are seeded).
    let again = runner(&["plan", "--config", "examples/dreambooth/config.env", "--json"]);
    assert_eq!(stdout(&output), stdout(&again));
}

#[test]
fn plan_text_on_the_shipped_example() {
    let output = runner(&["plan", "--config", "examples/dreambooth/config.env"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for needle in [
        "Dataset 'zwxrobot-data'",
        "6 found, 6 used, 0 skipped",
        "[regularisation]",
        "Steps per epoch",
        "max_train_steps (1000) stops training",
        "adamw_bf16",
        "polynomial",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn bad_files_are_listed_and_the_dataset_folder_is_left_untouched() {
    let dir = scratch("bad-files");
    copy_dir(&repo().join("examples/dreambooth"), &dir);
    std::fs::write(dir.join("subject/empty.png"), b"").unwrap();
    std::fs::write(dir.join("subject/fake.jpg"), b"hello").unwrap();
    let good = std::fs::read(dir.join("subject/robot_01.jpg")).unwrap();
    std::fs::write(dir.join("subject/cut.jpg"), &good[..good.len() / 3]).unwrap();
    std::fs::create_dir_all(dir.join("subject/.thumbnails")).unwrap();
    std::fs::write(dir.join("subject/.thumbnails/t.jpg"), &good).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.join("subject"), dir.join("subject/loop")).unwrap();
    let before = listing(&dir.join("subject"));

    let config = dir.join("config.env");
    let output = runner(&["plan", "--config", config.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let subject = &plan["datasets"][0];
    assert_eq!(subject["images"].as_array().unwrap().len(), 6, "hidden folders and the symlink loop add nothing");
    let skipped: Vec<String> = subject["skipped"].as_array().unwrap().iter().map(|s| format!("{}: {}", s["path"], s["reason"])).collect();
    assert_eq!(skipped.len(), 3, "{skipped:?}");
    assert!(skipped.iter().any(|s| s.contains("empty.png") && s.contains("0 bytes")));
    assert!(skipped.iter().any(|s| s.contains("fake.jpg") && s.contains("not an image")));
    assert!(skipped.iter().any(|s| s.contains("cut.jpg") && s.contains("truncated")));
    assert_eq!(listing(&dir.join("subject")), before, "plan must not write into the dataset folder");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_configs_exit_non_zero_naming_the_culprit() {
    let dir = scratch("invalid");
    copy_dir(&repo().join("examples/dreambooth"), &dir);
    let dataloader = dir.join("multidatabackend-dreambooth.json");
    let text = std::fs::read_to_string(&dataloader).unwrap();

    std::fs::write(&dataloader, text.replace("\"repeats\": 10", "\"repeats\": \"ten\"")).unwrap();
    let output = runner(&["plan", "--config", dir.join("config.env").to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("multidatabackend-dreambooth.json") && message.contains("dataset 'regularisation-data'") && message.contains("'repeats'"),
        "{message}"
    );

    std::fs::write(&dataloader, text.replace("\"instance_data_dir\": \"subject\"", "\"instance_data_dir\": \"no-such-folder\"")).unwrap();
    let output = runner(&["plan", "--config", dir.join("config.env").to_str().unwrap()]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("dataset 'zwxrobot-data'") && message.contains("no-such-folder") && message.contains("does not exist"), "{message}");

    std::fs::write(dir.join("broken.env"), "MODEL_FAMILY=sd1x\nMAX_NUM_STEPS=10\n").unwrap();
    let output = runner(&["plan", "--config", dir.join("broken.env").to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("broken.env") && stderr(&output).contains("DATALOADER_CONFIG"), "{}", stderr(&output));

    let output = runner(&["plan", "--config", dir.join("missing.env").to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("missing.env"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dataloader_config_flag_overrides_the_config_file() {
    let dir = scratch("override");
    copy_dir(&repo().join("examples/dreambooth"), &dir);
    let text = std::fs::read_to_string(dir.join("multidatabackend-dreambooth.json")).unwrap();
    let only_subject: serde_json::Value = serde_json::from_str(&text).unwrap();
    let only_subject = serde_json::Value::Array(vec![only_subject[0].clone()]);
    std::fs::write(dir.join("subject-only.json"), only_subject.to_string()).unwrap();
    let output = runner(&[
        "plan",
        "--config",
        dir.join("config.env").to_str().unwrap(),
        "--dataloader-config",
        dir.join("subject-only.json").to_str().unwrap(),
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(plan["datasets"].as_array().unwrap().len(), 1);
    // 6 images x 2 passes, and 25 epochs end before 1000 steps.
    assert_eq!(plan["steps_per_epoch"], 12);
    assert_eq!(plan["stops_on"], "epochs");
    assert_eq!(plan["max_steps"], 300);
    let _ = std::fs::remove_dir_all(&dir);
}

fn fixture(family: &str) -> PathBuf {
    repo().join("trainer-core/tests/fixtures/models").join(family)
}

/// Writes the reference's starting latents as `latents` in a safetensors file.
fn init_latents_file(family: &str, dir: &Path) -> PathBuf {
    let reference = std::fs::read(fixture(family).join("reference.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let view = tensors.tensor("sampling.init_latents").unwrap();
    let path = dir.join("latents.safetensors");
    let owned = safetensors::tensor::TensorView::new(view.dtype(), view.shape().to_vec(), view.data()).unwrap();
    safetensors::serialize_to_file([("latents", owned)], None, &path).unwrap();
    path
}

fn read_png(path: &Path) -> (u32, u32, Vec<u8>, String) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buffer).unwrap();
    let info = reader.info();
    let parameters = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone()).unwrap_or_default();
    (frame.width, frame.height, buffer[..frame.buffer_size()].to_vec(), parameters)
}

/// The reference image (`[1, 3, H, W]` floats in [0, 1]) as 8-bit RGB.
fn reference_pixels(family: &str, sampler: &str) -> Vec<u8> {
    let reference = std::fs::read(fixture(family).join("reference.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let view = tensors.tensor(&format!("sampling.{sampler}.image")).unwrap();
    let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let (h, w) = (view.shape()[2], view.shape()[3]);
    let mut rgb = Vec::new();
    for i in 0..h * w {
        for c in 0..3 {
            rgb.push((values[c * h * w + i] * 255.0).round().clamp(0.0, 255.0) as u8);
        }
    }
    rgb
}

#[test]
fn sample_from_given_latents_reproduces_diffusers() {
    let dir = scratch("sample");
    for family in ["sd1", "sd2"] {
        let latents = init_latents_file(family, &dir);
        for (sampler, device) in [("ddim", "cpu"), ("euler", "cpu-gpu")] {
            let out = dir.join(format!("{family}-{sampler}.png"));
            let model = fixture(family).join("diffusers");
            let output = runner(&[
                "sample",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "a photo of sks dog",
                "--negative-prompt",
                "blurry",
                "--steps",
                "5",
                "--guidance",
                "7.5",
                "--sampler",
                sampler,
                "--init-latents",
                latents.to_str().unwrap(),
                "--device",
                device,
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(output.status.success(), "{}", stderr(&output));
            let (width, height, pixels, parameters) = read_png(&out);
            assert_eq!((width, height), (16, 16));
            let want = reference_pixels(family, sampler);
            let worst = pixels.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
            assert!(worst <= 1, "{family} {sampler}: a pixel differs by {worst}/255 from diffusers");
            assert!(parameters.starts_with("a photo of sks dog\nNegative prompt: blurry\nSteps: 5, Sampler:"), "{parameters}");
            assert!(parameters.contains("CFG scale: 7.5") && parameters.contains("Size: 16x16"), "{parameters}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sample_single_file_and_every_sampler() {
    let dir = scratch("samplers");
    let single = fixture("sd1").join("single_file.safetensors");
    let folder = fixture("sd1").join("diffusers");
    let mut images = Vec::new();
    for sampler in ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"] {
        let out = dir.join(format!("{sampler}.png"));
        let output = runner(&[
            "sample",
            "--model",
            single.to_str().unwrap(),
            "--config-from",
            folder.to_str().unwrap(),
            "--prompt",
            "a robot",
            "--steps",
            "4",
            "--sampler",
            sampler,
            "--seed",
            "3",
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{sampler}: {}", stderr(&output));
        let (_, _, pixels, parameters) = read_png(&out);
        assert!(parameters.contains("Seed: 3"));
        images.push(pixels);
    }
    // Different samplers take different paths from the same noise.
    assert_ne!(images[0], images[1]);
    assert_ne!(images[3], images[4]);
    let output = runner(&["sample", "--model", single.to_str().unwrap(), "--prompt", "x", "--sampler", "plms", "--device", "cpu", "--out", "/dev/null"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("plms"), "{}", stderr(&output));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The quick-start command, as README.md gives it: the `cargo run …` part of
/// the line that holds it, continued lines joined.
fn readme_quick_start() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let joined = readme.replace("\\\n", " ");
    let line =
        joined.lines().find(|l| l.contains("cargo run -p native-runner -- train")).expect("README.md has a `cargo run -p native-runner -- train` command");
    let command = &line[line.find("cargo run").unwrap()..];
    command.split("&&").next().unwrap().trim().to_string()
}

/// Mean squared difference of two equally sized RGB images, in [0, 1] units.
fn pixel_distance(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: f64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| ((*x as f64 - *y as f64) / 255.0).powi(2)).sum();
    sum / a.as_raw().len() as f64
}

/// The subject photos as the distance measure sees them: each one's centre
/// square, resized (Lanczos3) to the grid tiles' 64 px, which
/// [`centre_box`] assumes.
fn subject_photos() -> Vec<image::RgbImage> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(repo().join("examples/dreambooth/subject"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "png"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let photo = image::open(path).unwrap().to_rgb8();
            let (w, h) = photo.dimensions();
            let side = w.min(h);
            let square = image::imageops::crop_imm(&photo, (w - side) / 2, (h - side) / 2, side, side).to_image();
            image::imageops::resize(&square, 64, 64, image::imageops::FilterType::Lanczos3)
        })
        .collect()
}

/// The middle of a 64 px picture, where the example photos' robot stands
/// (rows 8..56, columns 16..48): the measure of what a picture draws, not
/// of its background, which in the photos is a different colour each time.
fn centre_box(picture: &image::RgbImage) -> image::RgbImage {
    image::imageops::crop_imm(picture, 16, 8, 32, 48).to_image()
}

/// README's quick start, run as written (into a scratch folder): a full
/// fine-tune of the example model with its text encoder trains the steps
/// quickstart.env sets, ends with the exported model and `comparison.png`,
/// whose trained "zwxrobot" picture is nearer the subject photos than the
/// base model's while the class prompt's picture moves much less; and the
/// command its last lines suggest draws the grid's trained picture from
/// the exported model.
#[test]
fn readme_quick_start_runs_as_written() {
    let command = readme_quick_start();
    assert!(command.ends_with("examples/dreambooth/quickstart.env"), "README's first run is quickstart.env: {command}");
    let config = std::fs::read_to_string(repo().join("examples/dreambooth/quickstart.env")).unwrap();
    let steps: usize = config.lines().find_map(|l| l.strip_prefix("MAX_NUM_STEPS=")).expect("quickstart.env sets MAX_NUM_STEPS").parse().unwrap();
    let out = scratch("readme");
    // The command verbatim, with a scratch output folder added. It runs
    // through cargo as a user's would (so a missing `default-run` fails
    // here); the build is the one this test came from.
    let binary = Path::new(env!("CARGO_BIN_EXE_native-runner"));
    let target_dir = binary.parent().unwrap().parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let script = format!("{} --output-dir {}", command.replacen("cargo", &cargo, 1), out.display());
    let output = Command::new("sh").args(["-c", &script]).current_dir(repo()).env("CARGO_TARGET_DIR", target_dir).output().unwrap();
    let log = stderr(&output);
    assert!(output.status.success(), "`{script}` failed:\n{log}");
    for export in ["burnbooth-model/unet/diffusion_pytorch_model.safetensors", "burnbooth-model/text_encoder/model.safetensors", "burnbooth-model.safetensors"]
    {
        assert!(out.join(export).is_file(), "no {export} in {}: {log}", out.display());
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), steps, "{metrics}");

    // The grid: rows "zwxrobot", the class prompt; columns base, trained.
    let grid = image::open(out.join("comparison.png")).unwrap().to_rgb8();
    assert_eq!(grid.dimensions(), (128, 128), "two 64 px rows of base | trained");
    let tile = |column: u32, row: u32| image::imageops::crop_imm(&grid, 64 * column, 64 * row, 64, 64).to_image();
    let (base, trained, base_class, trained_class) = (tile(0, 0), tile(1, 0), tile(0, 1), tile(1, 1));
    let photos: Vec<image::RgbImage> = subject_photos().iter().map(centre_box).collect();
    let to_subject = |picture: &image::RgbImage| photos.iter().map(|p| pixel_distance(&centre_box(picture), p)).sum::<f64>() / photos.len() as f64;
    let (before, after) = (to_subject(&base), to_subject(&trained));
    assert!(after < before * 0.9, "the trained \"zwxrobot\" should be nearer the subject photos than the base model's: {before:.4} -> {after:.4}");
    let (moved, class_moved) = (pixel_distance(&base, &trained), pixel_distance(&base_class, &trained_class));
    assert!(
        class_moved < moved / 2.0,
        "prior preservation should keep the class prompt near the base model: it moved {class_moved:.4}, the instance {moved:.4}"
    );

    // The suggested command (validation size, steps, guidance, sampler and
    // seed), from the exported model, draws the trained tile.
    let line = log.lines().find(|l| l.starts_with("Use the model: native-runner sample ")).unwrap_or_else(|| panic!("no sample hint in:\n{log}"));
    let sample = out.join("sample.png");
    let hint = line["Use the model: native-runner".len()..].replace("--out sample.png", &format!("--out {} --device cpu", sample.display()));
    let output = Command::new("sh").args(["-c", &format!("{} {hint}", binary.display())]).current_dir(repo()).output().unwrap();
    assert!(output.status.success(), "{hint}: {}", stderr(&output));
    let sampled = image::open(&sample).unwrap().to_rgb8();
    let (to_trained, to_base) = (pixel_distance(&sampled, &trained), pixel_distance(&sampled, &base));
    assert!(to_trained < 1e-4, "the hint's sample should be the grid's trained picture: {to_trained:.2e}");
    assert!(to_trained < to_base / 10.0, "and not the base model's: {to_trained:.2e} vs {to_base:.2e}");
    let _ = std::fs::remove_dir_all(&out);
}

/// A PNG of `width × height` black pixels, streamed so a decompression bomb
/// (gigabytes of pixels in a few megabytes) is written without holding it.
fn black_png(path: &Path, width: u32, height: u32) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().unwrap().into_stream_writer().unwrap();
    let row = vec![0u8; width as usize];
    for _ in 0..height {
        std::io::Write::write_all(&mut writer, &row).unwrap();
    }
    writer.finish().unwrap();
}

/// A small real JPEG whose frame header is patched to claim `width × height`.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut bytes = std::fs::read(repo().join("examples/dreambooth/subject/robot_01.jpg")).unwrap();
    let sof = bytes.windows(2).position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2)).unwrap();
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bytes
}

/// A real JPEG with an EXIF block whose first directory lies far past its end.
fn jpeg_with_exif_offset_past_the_end() -> Vec<u8> {
    let bytes = std::fs::read(repo().join("examples/dreambooth/subject/robot_02.jpg")).unwrap();
    let mut tiff = b"Exif\0\0II*\0".to_vec();
    tiff.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
    out.extend_from_slice(&((tiff.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&tiff);
    out.extend_from_slice(&bytes[2..]);
    out
}

/// Peak resident memory of the largest child this process has waited for, in MiB.
fn children_peak_mib() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) }, 0);
    usage.ru_maxrss as f64 / 1024.0
}

#[test]
fn hostile_images_are_skipped_by_plan_and_cache_with_a_named_reason() {
    let dir = scratch("hostile");
    copy_dir(&repo().join("examples/dreambooth"), &dir);
    let subject = dir.join("subject");
    black_png(&subject.join("bomb.png"), 30000, 30000);
    std::fs::write(subject.join("huge.jpg"), jpeg_claiming(65000, 65000)).unwrap();
    image::RgbImage::from_pixel(4, 1200, image::Rgb([200, 10, 10])).save(subject.join("thin.png")).unwrap();
    image::RgbImage::from_pixel(1200, 2, image::Rgb([10, 200, 10])).save(subject.join("flat.png")).unwrap();
    image::RgbImage::from_pixel(4000, 10, image::Rgb([10, 10, 200])).save(subject.join("wide.png")).unwrap();
    std::fs::write(subject.join("exif.jpg"), jpeg_with_exif_offset_past_the_end()).unwrap();
    let config = dir.join("tiny.env");

    let output = runner(&["plan", "--config", config.to_str().unwrap(), "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let dataset = &plan["datasets"][0];
    let skipped: Vec<String> =
        dataset["skipped"].as_array().unwrap().iter().map(|s| format!("{}: {}", s["path"].as_str().unwrap(), s["reason"].as_str().unwrap())).collect();
    for (file, reason) in [
        ("bomb.png", "30000x30000 is 900.0 MP, over the limit of 179.0 MP"),
        ("huge.jpg", "65000x65000"),
        ("thin.png", "extreme aspect ratio: 4x1200 is 1:300"),
        ("flat.png", "1200x2"),
        ("wide.png", "extreme aspect ratio: 4000x10 is 400:1"),
    ] {
        assert!(skipped.iter().any(|s| s.starts_with(file) && s.contains(reason)), "{file} should be skipped for '{reason}': {skipped:?}");
    }
    // A broken EXIF block is ignored (orientation as stored), as Pillow's exif_transpose does.
    let used: Vec<&str> = dataset["images"].as_array().unwrap().iter().map(|i| i["path"].as_str().unwrap()).collect();
    assert!(used.contains(&"exif.jpg"), "{used:?}");
    assert_eq!(used.len(), 7, "the six robots and exif.jpg: {used:?}");

    let model = repo().join("trainer-core/tests/fixtures/models/sd1/diffusers");
    let output = Command::new(env!("CARGO_BIN_EXE_native-runner"))
        .args(["cache", "--config", config.to_str().unwrap(), "--model", model.to_str().unwrap(), "--device", "cpu"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(output.status.success(), "cache failed: {}", stderr(&output));
    assert!(stderr(&output).contains("caches ready"), "{}", stderr(&output));
    let peak = children_peak_mib();
    assert!(peak < 600.0, "a child process peaked at {peak:.0} MiB");
    let latents = std::fs::read_dir(dir.join("output/tiny/cache/vae/zwxrobot")).unwrap().count();
    assert_eq!(latents, 7, "one latent per usable image");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn commands_on_a_headless_machine_print_no_display_warnings() {
    let model = fixture("sd1").join("diffusers");
    let out = scratch("headless").join("x.png");
    let output = Command::new(env!("CARGO_BIN_EXE_native-runner"))
        .args([
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--width",
            "32",
            "--height",
            "32",
            "--out",
            out.to_str().unwrap(),
        ])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(!text.contains("XDG_RUNTIME_DIR"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("device: ") && l.contains("--device auto")), "the device and why: {text}");
}
