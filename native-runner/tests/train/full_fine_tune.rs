//! Full fine-tunes: the diffusers folder and single file they export sample
//! like each other, and a killed export leaves the previous one whole.

use super::*;

/// [`run_folder`] for a full fine-tune.
fn full_run_folder(name: &str, extra_env: &str) -> PathBuf {
    let dir = run_folder(name, extra_env);
    let config = std::fs::read_to_string(dir.join("config.env")).unwrap().replace("MODEL_TYPE=lora", "MODEL_TYPE=full");
    std::fs::write(dir.join("config.env"), config).unwrap();
    dir
}

#[test]
fn a_full_fine_tune_exports_a_diffusers_folder_and_a_single_file_that_sample_alike() {
    let dir = full_run_folder("full", "MAX_NUM_STEPS=2\nLEARNING_RATE=1e-3\n");
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--output-name", "tuned"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    let folder = dir.join("output/tuned");
    for file in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(folder.join(file).is_file(), "{file} missing from the exported folder");
    }
    let single = dir.join("output/tuned.safetensors");
    assert!(single.is_file());

    assert_exports_sample_alike(&dir, &folder, &single, &repo().join("trainer-core/tests/fixtures/models/sd1/diffusers"));
}

/// Every file under `dir` with its bytes.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(contents(&path));
        } else {
            files.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    files.sort();
    files
}

#[test]
fn a_killed_full_export_leaves_the_previous_export_whole() {
    let dir = full_run_folder("export-kill", "MAX_NUM_STEPS=2\nCHECKPOINTING_STEPS=2\nVALIDATION_STEPS=0\n");
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--output-name", "tuned"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    let folder = dir.join("output/tuned");
    let before = contents(&folder);

    // Two more steps; the hook pauses between the files of the new export.
    let mut child = spawn_train(&dir, &["--output-name", "tuned", "--resume", "latest", "--max-steps", "4"], "1500", Stdio::null());
    let partial = dir.join("output/tuned.partial/unet/diffusion_pytorch_model.safetensors");
    wait_until(&mut child, "the export write", || partial.exists());
    child.kill().unwrap(); // SIGKILL mid-export
    child.wait().unwrap();
    assert_eq!(contents(&folder), before, "the previous export is untouched");

    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--output-name", "tuned", "--resume", "latest", "--max-steps", "4"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("tuned.partial, an export a stopped run had not finished"), "{}", stderr(&output));
    assert!(!dir.join("output/tuned.partial").exists());
    assert_ne!(contents(&folder), before, "the new export replaced the old");
}

/// The exported folder and single file hold the same trained weights under
/// their two naming schemes: both sample the same image, unlike the base model.
fn assert_exports_sample_alike(dir: &Path, folder: &Path, single: &Path, base_model: &Path) {
    let sample = |model_arg: &str, extra: &[&str], out: &str| {
        let mut args = vec!["--steps", "3", "--seed", "7"];
        args.extend_from_slice(extra);
        let output = sample_32px(dir, model_arg, out, &args);
        assert!(output.status.success(), "sample {model_arg}: {}", stderr(&output));
        image::open(dir.join(out)).unwrap().to_rgb8().into_raw()
    };
    let from_folder = sample(folder.to_str().unwrap(), &[], "folder.png");
    let from_single = sample(single.to_str().unwrap(), &["--config-from", base_model.to_str().unwrap()], "single.png");
    let base = sample(base_model.to_str().unwrap(), &[], "base.png");
    assert_eq!(from_folder, from_single, "the single-file checkpoint differs from the diffusers folder");
    assert_ne!(from_folder, base, "the exported model is the trained one, not the base");
}

/// A run that cannot fit on the device stops with what to change, not a
/// crash: at 2048 px the tiny VAE's attention needs 4 TB of scores, which
/// even in its largest number of slices (1024 slices of 4 GiB) exceed
/// lavapipe's largest buffer, so the cache step fails to allocate.

#[test]
fn an_sdxl_full_fine_tune_exports_a_folder_and_an_sgm_single_file_that_sample_alike() {
    let dir = run_folder("full-sdxl", "MAX_NUM_STEPS=2\nLEARNING_RATE=1e-3\nREGULARISATION_MODE=mixed\n");
    let sd1 = repo().join("trainer-core/tests/fixtures/models/sd1/diffusers");
    let model = repo().join("trainer-core/tests/fixtures/models/sdxl/diffusers");
    let config = std::fs::read_to_string(dir.join("config.env"))
        .unwrap()
        .replace("MODEL_TYPE=lora", "MODEL_TYPE=full")
        .replace("MODEL_FAMILY=sd1x", "MODEL_FAMILY=sdxl")
        .replace(sd1.to_str().unwrap(), model.to_str().unwrap());
    std::fs::write(dir.join("config.env"), config).unwrap();
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--output-name", "tuned"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    let folder = dir.join("output/tuned");
    for file in [
        "model_index.json",
        "text_encoder_2/model.safetensors",
        "text_encoder_2/config.json",
        "tokenizer_2/vocab.json",
        "unet/diffusion_pytorch_model.safetensors",
    ] {
        assert!(folder.join(file).is_file(), "{file} missing from the exported folder");
    }
    assert_exports_sample_alike(&dir, &folder, &dir.join("output/tuned.safetensors"), &model);
}

/// Dreambooth's own setup, a full fine-tune with `--train_text_encoder`:
/// the text encoder's weights train and are exported with the UNet, and
/// the run ends with the before/after grid, whose base tiles were sampled
/// before the first step overwrote the base weights: the left column is
/// the base model's picture, as `sample` draws it from the base model with
/// the settings the run's last lines give.
#[test]
fn a_full_fine_tune_trains_the_text_encoder_and_ends_with_the_comparison_grid() {
    let dir = full_run_folder("full-text", "MAX_NUM_STEPS=2\nVALIDATION_STEPS=2\nLEARNING_RATE=1e-3\nTRAINER_EXTRA_ARGS=\"--train_text_encoder\"\n");
    let output = runner(&["train", "--config", "config.env", "--device", "cpu"], &dir);
    let log = stderr(&output);
    assert!(output.status.success(), "{log}");
    assert!(log.contains("sampled the base model's comparison tiles"), "{log}");
    let plan = runner(&["plan", "--config", "config.env"], &dir);
    assert!(String::from_utf8_lossy(&plan.stdout).contains("Text encoder: all its weights train too"), "{}", String::from_utf8_lossy(&plan.stdout));

    // Every text-encoder tensor is exported; the trained ones moved.
    let base_model = repo().join("trainer-core/tests/fixtures/models/sd1/diffusers");
    let read = |path: PathBuf| std::fs::read(path).unwrap();
    let (base_bytes, trained_bytes) =
        (read(base_model.join("text_encoder/model.safetensors")), read(dir.join("output/burnbooth-model/text_encoder/model.safetensors")));
    let (base, trained) = (safetensors::SafeTensors::deserialize(&base_bytes).unwrap(), safetensors::SafeTensors::deserialize(&trained_bytes).unwrap());
    let mut moved = 0;
    for (name, tensor) in base.tensors() {
        let key = if trained.names().contains(&name.as_str()) { name.clone() } else { format!("text_model.{name}") };
        let exported = trained.tensor(&key).unwrap_or_else(|_| panic!("{key} missing from the exported text encoder"));
        assert_eq!((exported.shape(), exported.dtype()), (tensor.shape(), tensor.dtype()), "{key}");
        moved += usize::from(exported.data() != tensor.data());
    }
    assert!(moved * 2 > base.len(), "only {moved} of {} text-encoder tensors changed", base.len());

    // The grid's base tile is the base model's sample.
    let grid = image::open(dir.join("output/comparison.png")).unwrap().to_rgb8();
    assert_eq!(grid.dimensions(), (64, 64), "two 32 px rows (subject, class) of base | trained");
    let line = log.lines().find(|l| l.starts_with("Use the model: native-runner sample ")).unwrap_or_else(|| panic!("no sample hint in:\n{log}"));
    let settings = &line[line.find(" --prompt").unwrap()..];
    let settings = settings.replace("--out sample.png", "--out base.png --device cpu");
    let sample = Command::new("sh")
        .args(["-c", &format!("{} sample --model {} {settings}", env!("CARGO_BIN_EXE_native-runner"), base_model.display())])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(sample.status.success(), "{}", stderr(&sample));
    let base_tile = image::imageops::crop_imm(&grid, 0, 0, 32, 32).to_image();
    let trained_tile = image::imageops::crop_imm(&grid, 32, 0, 32, 32).to_image();
    let drawn = image::open(dir.join("base.png")).unwrap().to_rgb8();
    let differing = |a: &image::RgbImage, b: &image::RgbImage| a.as_raw().iter().zip(b.as_raw()).filter(|(x, y)| x.abs_diff(**y) > 2).count();
    assert_eq!(differing(&base_tile, &drawn), 0, "the grid's base tile should be the base model's sample");
    assert!(differing(&trained_tile, &drawn) > 0, "and its trained tile the trained model's");
}
