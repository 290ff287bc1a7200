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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
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
    for needle in ["Dataset 'zwxrobot-data'", "6 found, 6 used, 0 skipped", "[regularisation]", "Steps per epoch", "max_train_steps (1000) stops training", "adamw_bf16", "polynomial"] {
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
    assert!(message.contains("multidatabackend-dreambooth.json") && message.contains("dataset 'regularisation-data'") && message.contains("'repeats'"), "{message}");

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
                "sample", "--model", model.to_str().unwrap(), "--prompt", "a photo of sks dog", "--negative-prompt", "blurry",
                "--steps", "5", "--guidance", "7.5", "--sampler", sampler, "--init-latents", latents.to_str().unwrap(),
                "--device", device, "--out", out.to_str().unwrap(),
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
            "sample", "--model", single.to_str().unwrap(), "--config-from", folder.to_str().unwrap(), "--prompt", "a robot",
            "--steps", "4", "--sampler", sampler, "--seed", "3", "--device", "cpu", "--out", out.to_str().unwrap(),
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
