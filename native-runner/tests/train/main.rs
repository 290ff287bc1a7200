//! `native-runner train` and `sample --lora` as a user runs them, on the
//! tiny fixture model and the example images (resized to 32 px to keep the
//! runs short): outputs, kohya export, resume and kill -9 mid-checkpoint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod full_fine_tune;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn runner(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_native-runner")).args(args).current_dir(dir).output().unwrap()
}

/// `train --config config.env --device cpu` plus `extra` in the background;
/// a non-empty `pause_ms` sets the test hook that pauses between the files
/// of a checkpoint or export.
fn spawn_train(dir: &Path, extra: &[&str], pause_ms: &str, stderr: Stdio) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_native-runner"));
    command.args([&["train", "--config", "config.env", "--device", "cpu"], extra].concat()).current_dir(dir).stdout(Stdio::null()).stderr(stderr);
    if !pause_ms.is_empty() {
        command.env("BURNBOOTH_TEST_CHECKPOINT_PAUSE_MS", pause_ms);
    }
    command.spawn().unwrap()
}

/// Waits (up to 5 minutes) until `ready` holds while `child` still runs.
fn wait_until(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < Duration::from_secs(300), "waited 5 minutes for {what}");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `native-runner sample` of the example prompt at 32 px on the CPU, into
/// `out`, with `extra` arguments (steps, seed, LoRA).
fn sample_32px(dir: &Path, model: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec!["sample", "--model", model, "--prompt", "a photograph of zwxrobot", "--width", "32", "--height", "32", "--device", "cpu", "--out", out];
    args.extend_from_slice(extra);
    runner(&args, dir)
}

/// `native-runner train` of one of the guide's configs in examples/dreambooth
/// on a fixture model (`sd1`, `sdxl`), writing to `out`.
fn train_guide(config: &str, fixture: &str, steps: &str, out: &Path) -> Output {
    let config = format!("examples/dreambooth/{config}");
    let model = repo().join("trainer-core/tests/fixtures/models").join(fixture).join("diffusers");
    let args =
        ["train", "--config", &config, "--model", model.to_str().unwrap(), "--max-steps", steps, "--device", "cpu", "--output-dir", out.to_str().unwrap()];
    runner(&args, &repo())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burnbooth-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A run folder with config.env and dataloader.json over the example images.
fn run_folder(name: &str, extra_env: &str) -> PathBuf {
    let dir = scratch(name);
    let examples = repo().join("examples/dreambooth");
    let model = repo().join("trainer-core/tests/fixtures/models/sd1/diffusers");
    let env = format!(
        "MODEL_FAMILY=sd1x\nMODEL_TYPE=lora\nMODEL_NAME={}\nOUTPUT_DIR=output\nDATALOADER_CONFIG=dataloader.json\n\
         TRAINING_SEED=3\nTRAIN_BATCH_SIZE=1\nLEARNING_RATE=1e-3\nOPTIMIZER=adamw\nLR_SCHEDULE=constant\nLORA_RANK=4\nLORA_ALPHA=2\n\
         VALIDATION_PROMPT=\"a photograph of zwxrobot\"\nVALIDATION_NUM_INFERENCE_STEPS=3\nVALIDATION_RESOLUTION=32\n\
         REGULARISATION_MODE=prior_preservation\n{extra_env}",
        model.display()
    );
    std::fs::write(dir.join("config.env"), env).unwrap();
    let dataloader = format!(
        r#"[
  {{"id": "subject", "type": "local", "instance_data_dir": "{}", "caption_strategy": "instanceprompt", "instance_prompt": "zwxrobot",
    "resolution": 32, "resolution_type": "pixel", "minimum_image_size": 32, "crop": true, "crop_aspect": "square", "cache_dir_vae": "cache/vae/subject"}},
  {{"id": "class", "type": "local", "instance_data_dir": "{}", "caption_strategy": "instanceprompt", "instance_prompt": "a picture of a toy",
    "resolution": 32, "resolution_type": "pixel", "minimum_image_size": 32, "crop": true, "crop_aspect": "square", "repeats": 10,
    "ignore_epochs": true, "is_regularisation_data": true, "cache_dir_vae": "cache/vae/class"}},
  {{"id": "text", "type": "local", "dataset_type": "text_embeds", "default": true, "cache_dir": "cache/text"}}
]"#,
        examples.join("subject").display(),
        examples.join("regularisation").display()
    );
    std::fs::write(dir.join("dataloader.json"), dataloader).unwrap();
    dir
}

fn losses(dir: &Path) -> Vec<(u64, f32)> {
    let text = std::fs::read_to_string(dir.join("output/metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (value["step"].as_u64().unwrap(), value["loss"].as_f64().unwrap() as f32)
        })
        .collect()
}

fn png_text(path: &Path) -> String {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let reader = decoder.read_info().unwrap();
    reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone()).unwrap_or_default()
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|entries| entries.count()).unwrap_or(0)
}

#[test]
fn train_writes_every_output_and_resume_reproduces_the_losses() {
    let dir = run_folder("full", "MAX_NUM_STEPS=6\nCHECKPOINTING_STEPS=3\nVALIDATION_STEPS=3\n");
    let output = runner(&["train", "--config", "config.env", "--device", "cpu"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    let out = dir.join("output");

    // Metrics, plot, validation images with their parameters, caches.
    let first = losses(&dir);
    assert_eq!(first.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    assert!(first.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
    assert!(image::open(out.join("loss.png")).unwrap().width() > 100);
    for step in [3, 6] {
        let png = out.join(format!("validation/step-{step:06}.png"));
        let parameters = png_text(&png);
        assert!(parameters.starts_with("a photograph of zwxrobot"), "{parameters}");
        assert!(parameters.contains(&format!("Burnbooth step: {step}")), "{parameters}");
    }
    assert_eq!(count_files(&dir.join("cache/vae/subject")), 6);
    assert_eq!(count_files(&dir.join("cache/vae/class")), 10);
    // The two captions, and the empty one for caption dropout.
    assert_eq!(count_files(&dir.join("cache/text")), 3);
    // Nothing was written next to the dataset images (six photos, six caption files).
    assert_eq!(count_files(&repo().join("examples/dreambooth/subject")), 12);

    // The kohya LoRA: names, shapes, alpha, metadata.
    let bytes = std::fs::read(out.join("burnbooth-lora.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    assert_eq!(file.tensor(&format!("{name}.lora_down.weight")).unwrap().shape(), [4, 8]);
    assert_eq!(file.tensor(&format!("{name}.lora_up.weight")).unwrap().shape(), [8, 4]);
    let alpha = file.tensor(&format!("{name}.alpha")).unwrap();
    assert_eq!(alpha.shape(), [] as [usize; 0]);
    assert_eq!(f32::from_le_bytes(alpha.data().try_into().unwrap()), 2.0);
    // 3 transformers x 2 attentions x 4 projections (fixture: 2 down, 1 mid, 2x... levels).
    assert!(file
        .names()
        .iter()
        .all(|n| n.starts_with("lora_unet_") && (n.ends_with(".lora_down.weight") || n.ends_with(".lora_up.weight") || n.ends_with(".alpha"))));
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = metadata.metadata().clone().unwrap();
    assert_eq!(metadata["ss_network_dim"], "4");
    assert_eq!(metadata["ss_network_alpha"], "2.0");
    assert_eq!(metadata["modelspec.architecture"], "stable-diffusion-v1/lora");

    // Checkpoints: the step-3 one, continued elsewhere, gives the same steps 4-6.
    let checkpoint = out.join("checkpoints/checkpoint-00000003");
    assert!(checkpoint.join("state.json").exists());
    let again = run_folder("resumed", "MAX_NUM_STEPS=6\nCHECKPOINTING_STEPS=3\nVALIDATION_STEPS=0\n");
    let target = again.join("output/checkpoints/checkpoint-00000003");
    std::fs::create_dir_all(&target).unwrap();
    for file in ["state.json", "trainable.safetensors", "optimizer.safetensors"] {
        std::fs::copy(checkpoint.join(file), target.join(file)).unwrap();
    }
    std::fs::write(
        again.join("output/metrics.jsonl"),
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().take(3).map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--resume", "latest"], &again);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("resumed from"), "{}", stderr(&output));
    assert_eq!(losses(&again), first, "a resumed run must reproduce the uninterrupted run's losses exactly");

    // The exported LoRA loads back in `sample --lora` and changes the image;
    // strength 0 gives the base model's image.
    let model = repo().join("trainer-core/tests/fixtures/models/sd1/diffusers");
    let lora = out.join("burnbooth-lora.safetensors");
    let sample = |extra: &[&str], name: &str| -> Vec<u8> {
        let path = dir.join(name);
        let mut args = vec!["--steps", "4", "--seed", "5"];
        args.extend_from_slice(extra);
        let output = sample_32px(&dir, model.to_str().unwrap(), path.to_str().unwrap(), &args);
        assert!(output.status.success(), "{}", stderr(&output));
        image::open(path).unwrap().to_rgb8().into_raw()
    };
    let base = sample(&[], "base.png");
    let lora_arg = lora.to_str().unwrap().to_string();
    let with_lora = sample(&["--lora", &lora_arg], "lora.png");
    let zero = format!("{lora_arg}:0");
    let with_zero = sample(&["--lora", &zero], "zero.png");
    assert_ne!(base, with_lora, "the trained LoRA must change the image");
    assert_eq!(base, with_zero, "a LoRA at strength 0 leaves the model unchanged");
    assert!(png_text(&dir.join("lora.png")).contains("<lora:burnbooth-lora:1>"));
}

#[test]
fn a_lora_for_another_model_is_refused_with_the_layer_named() {
    let dir = scratch("badlora");
    let mut tensors = std::collections::BTreeMap::new();
    let down = vec![0u8; 4 * 4 * 999];
    let up = vec![0u8; 4 * 4 * 8];
    tensors.insert("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight".to_string(), (vec![4usize, 999], down));
    tensors.insert("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight".to_string(), (vec![8, 4], up));
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, (s, d))| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())).collect();
    std::fs::write(dir.join("bad.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    let model = repo().join("trainer-core/tests/fixtures/models/sd1/diffusers");
    let output = runner(
        &["sample", "--model", model.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--device", "cpu", "--out", "x.png", "--lora", "bad.safetensors"],
        &dir,
    );
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") && text.contains("999"), "{text}");
}

#[test]
fn kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_usable() {
    let dir = run_folder("kill", "MAX_NUM_STEPS=6\nCHECKPOINTING_STEPS=2\nVALIDATION_STEPS=0\n");
    let mut child = spawn_train(&dir, &[], "1500", Stdio::null());
    // Wait until the step-4 checkpoint is being written (step 2's is complete by then).
    let partial = dir.join("output/checkpoints/checkpoint-00000004.partial");
    wait_until(&mut child, "the step-4 checkpoint write", || partial.join("trainable.safetensors").exists());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!dir.join("output/checkpoints/checkpoint-00000004").exists(), "a half-written checkpoint must not look complete");
    assert!(dir.join("output/checkpoints/checkpoint-00000002/state.json").exists());

    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--resume", "latest"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("checkpoint-00000002 at step 2"), "{}", stderr(&output));
    assert_eq!(losses(&dir).iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    assert!(!partial.exists(), "leftovers of the interrupted write are cleaned up");
}

#[test]
fn sigterm_saves_a_checkpoint_that_resumes() {
    let dir = run_folder("sigterm", "MAX_NUM_STEPS=40\nCHECKPOINTING_STEPS=100\nVALIDATION_STEPS=0\n");
    let mut child = spawn_train(&dir, &[], "", Stdio::piped());
    // Wait for the first step's metrics, then ask the process to stop.
    let metrics = dir.join("output/metrics.jsonl");
    wait_until(&mut child, "the first step", || std::fs::read_to_string(&metrics).map(|m| m.lines().count()).unwrap_or(0) >= 1);
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "SIGTERM should end the run cleanly: {text}");
    assert!(text.contains("interrupted: saved"), "{text}");
    let stopped_at = losses(&dir).last().unwrap().0;
    assert!(stopped_at < 40, "the run stopped early");
    let saved: Vec<_> = std::fs::read_dir(dir.join("output/checkpoints")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(saved, [format!("checkpoint-{stopped_at:08}")], "one checkpoint, written at the signal");

    let end = (stopped_at + 2).to_string();
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--resume", "latest", "--max-steps", &end], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(losses(&dir).iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=stopped_at + 2).collect::<Vec<_>>());
}

/// The first signal during minutes of validation sampling says what will
/// happen; a second one ends the process at once.
#[test]
fn a_second_sigterm_during_validation_quits_at_once() {
    // 256 px on the fixture is 128x128 latents: minutes per validation image.
    let dir = run_folder(
        "sigterm-twice",
        "MAX_NUM_STEPS=40\nCHECKPOINTING_STEPS=100\nVALIDATION_STEPS=1\nVALIDATION_RESOLUTION=256\nVALIDATION_NUM_INFERENCE_STEPS=30\n",
    );
    let mut child = spawn_train(&dir, &[], "", Stdio::piped());
    let metrics = dir.join("output/metrics.jsonl");
    wait_until(&mut child, "the first step", || std::fs::read_to_string(&metrics).map(|m| m.lines().count()).unwrap_or(0) >= 1);
    // SAFETY: signalling a child process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    std::thread::sleep(Duration::from_secs(2));
    assert!(child.try_wait().unwrap().is_none(), "the first signal waits for the image under way");
    let second = Instant::now();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().unwrap();
    let waited = second.elapsed();
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(waited < Duration::from_secs(10), "the second signal should end the run at once, not after {waited:?}: {text}");
    assert_eq!(output.status.code(), Some(128 + libc::SIGTERM), "{text}");
    assert!(text.contains("stopping: a checkpoint is saved once the step or image under way is done; Ctrl-C again quits at once"), "{text}");
    assert_eq!(losses(&dir).len(), 1, "only the first step ran");
}

#[test]
fn a_non_finite_gradient_stops_the_run_before_the_update_and_keeps_the_checkpoint() {
    let dir = run_folder("nan", "MAX_NUM_STEPS=2\nCHECKPOINTING_STEPS=2\nVALIDATION_STEPS=0\n");
    let output = runner(&["train", "--config", "config.env", "--device", "cpu"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    let checkpoint = dir.join("output/checkpoints/checkpoint-00000002/trainable.safetensors");
    let before = std::fs::read(&checkpoint).unwrap();
    // A prior-loss weight of 1e30 keeps the loss finite (about 1e30) while
    // the squared gradients overflow f32: the gradient norm is infinite.
    let mut config = std::fs::read_to_string(dir.join("config.env")).unwrap();
    config.push_str("PRIOR_LOSS_WEIGHT=1e30\nMAX_NUM_STEPS=4\n");
    std::fs::write(dir.join("config.env"), config).unwrap();
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--resume", "latest"], &dir);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("step 3") && text.contains("gradient norm is inf") && text.contains("the weights were not updated"), "{text}");
    assert_eq!(std::fs::read(&checkpoint).unwrap(), before, "the last good checkpoint is untouched");
    let saved: Vec<_> = std::fs::read_dir(dir.join("output/checkpoints")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(saved, ["checkpoint-00000002"]);
    assert_eq!(losses(&dir).iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2], "the failed step is not recorded");
}

#[test]
fn a_used_output_folder_is_refused_resumed_with_changes_named_or_started_over() {
    let dir = run_folder("used", "MAX_NUM_STEPS=2\nCHECKPOINTING_STEPS=2\nVALIDATION_STEPS=0\n");
    let train = |extra: &[&str]| runner(&[&["train", "--config", "config.env", "--device", "cpu"], extra].concat(), &dir);
    assert!(train(&[]).status.success());
    let first_losses = losses(&dir);

    // Another run into the same folder: refused, nothing touched.
    let output = train(&[]);
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("output") && text.contains("holds an earlier run") && text.contains("--resume latest") && text.contains("--start-over"), "{text}");
    assert_eq!(losses(&dir), first_losses);

    // Resuming after a config change says what changed.
    let config = std::fs::read_to_string(dir.join("config.env")).unwrap();
    std::fs::write(dir.join("config.env"), format!("{config}LEARNING_RATE=2e-3\n")).unwrap();
    let output = train(&["--resume", "latest", "--max-steps", "3"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("since the run began: setting learning_rate was 0.001 and is now 0.002"), "{}", stderr(&output));

    // A different adapter layout cannot resume.
    std::fs::write(dir.join("config.env"), format!("{config}LORA_RANK=8\n")).unwrap();
    let output = train(&["--resume", "latest", "--max-steps", "4"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("cannot resume: lora_rank was 4 and is now 8"), "{}", stderr(&output));

    // Starting over moves the old outputs aside, caches stay.
    let output = train(&["--start-over"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("moved to") && stderr(&output).contains("previous-1"), "{}", stderr(&output));
    let aside = dir.join("output/previous-1");
    assert!(
        aside.join("metrics.jsonl").is_file() && aside.join("checkpoints/checkpoint-00000003").is_dir() && aside.join("burnbooth-lora.safetensors").is_file()
    );
    assert!(dir.join("cache/vae/subject").is_dir(), "caches are kept");
    assert_eq!(losses(&dir).iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2], "the new run's metrics only");
}

#[test]
fn a_checkpoint_in_the_layout_before_diffusers_keys_is_refused_with_a_message() {
    let dir = run_folder("old-format", "MAX_NUM_STEPS=2\nCHECKPOINTING_STEPS=2\nVALIDATION_STEPS=0\n");
    let output = runner(&["train", "--config", "config.env", "--device", "cpu"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    // What Burnbooth wrote before checkpoints named tensors by diffusers' keys: no format in state.json.
    let state_path = dir.join("output/checkpoints/checkpoint-00000002/state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["format"], 2, "checkpoints record their layout");
    state.as_object_mut().unwrap().remove("format");
    std::fs::write(&state_path, state.to_string()).unwrap();
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--resume", "latest", "--max-steps", "3"], &dir);
    let text = stderr(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("state.json") && text.contains("format 1") && text.contains("--start-over"), "{text}");
}

#[test]
fn a_second_run_cannot_use_a_folder_while_the_first_trains() {
    let dir = run_folder("locked", "MAX_NUM_STEPS=40\nCHECKPOINTING_STEPS=100\nVALIDATION_STEPS=0\n");
    let mut first = spawn_train(&dir, &[], "", Stdio::null());
    let lock = dir.join("output/.burnbooth.lock");
    wait_until(&mut first, "the lock", || lock.exists());
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--resume", "latest"], &dir);
    assert!(!output.status.success());
    assert!(stderr(&output).contains(&format!("another run (process {}) is using this output folder", first.id())), "{}", stderr(&output));
    first.kill().unwrap(); // SIGKILL: the lock stays behind
    first.wait().unwrap();
    assert!(lock.exists());
    // A lock whose process is gone is taken over.
    let output = runner(&["train", "--config", "config.env", "--device", "cpu", "--start-over", "--max-steps", "1"], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!lock.exists(), "the lock is removed when the run ends");
}

#[test]
fn the_guide_configuration_trains_unchanged_apart_from_paths() {
    // examples/dreambooth/config.env is the guide's setup (adamw-bf16, polynomial
    // decay to LEARNING_RATE_END, both step and epoch limits); only the model
    // and the step count come from the command line.
    let out = scratch("guide");
    let output = train_guide("config.env", "sd1", "2", &out);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stderr(&output);
    assert!(text.contains("bf16 weights and state"), "adamw-bf16 runs with bf16 state on the CPU backend: {text}");
    assert!(out.join("burnbooth-lora.safetensors").exists());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
}

#[test]
fn the_options_example_trains_lokr_and_locon_with_prodigy_an_ema_masks_and_shuffled_captions() {
    // examples/dreambooth/options.env as written, for 15 of its 30 steps.
    let out = scratch("options");
    let output = train_guide("options.env", "sd1", "15", &out);
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("Prodigy with f32 state") && text.contains("d_coef 2"), "{text}");
    let lora = trainer_core::models::safetensors_file::SafetensorsFile::open(out.join("burnbooth-lora.safetensors").to_str().unwrap()).unwrap();
    // LoKr on the transformers' layers, LoCon on the resnets' (module_algo_map).
    let lokr_on_attention = lora.names().any(|n| n.ends_with("attn1_to_q.lokr_w1"));
    let locon_on_resnets =
        lora.names().any(|n| n.ends_with("resnets_0_conv1.lora_down.weight")) && lora.names().any(|n| n.ends_with("time_emb_proj.lora_up.weight"));
    assert!(
        lokr_on_attention && locon_on_resnets && lora.names().all(|n| !n.contains("attn1_to_q.lora_")),
        "LoKr and LoCon: {:?}",
        lora.names().collect::<Vec<_>>()
    );
    // Each caption comes with its shuffles, the token first; each image has its mask.
    let plan = runner(&["plan", "--config", "examples/dreambooth/options.env", "--json"], &repo());
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert!(plan["adapters"].as_str().is_some_and(|a| a.starts_with("LyCORIS LoKr on to_q, to_k, to_v, to_out.0 (factor 16); LoKr on ff.net.0.proj, ff.net.2 (factor 8); LoCon on conv1, conv2, conv_shortcut, time_emb_proj")), "{}", plan["adapters"]);
    for image in plan["datasets"][0]["images"].as_array().unwrap() {
        let variants: Vec<&str> = image["caption_variants"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(variants.len() > 1 && variants.iter().all(|v| v.starts_with("zwxrobot, ")), "{variants:?}");
        assert!(image["mask"].as_str().is_some_and(|m| m.ends_with(".png")), "{image}");
    }
    for file in ["burnbooth-lora.safetensors", "burnbooth-lora-ema.safetensors", "validation/step-000015.png", "validation/step-000015-ema.png"] {
        assert!(out.join(file).exists(), "{file} is written: {text}");
    }
    let state = std::fs::read_to_string(out.join("checkpoints/checkpoint-00000015/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let d: f64 = state["optimizer_scalars"]["prodigy.d"].as_str().unwrap().parse().unwrap();
    assert!(d > 1e-6, "Prodigy's step size grows from d0 1e-6: {d}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics.lines().map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["loss"].as_f64().unwrap()).collect();
    assert!(losses.len() == 15 && losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    // Prodigy's step size is in the metrics, step by step, ending where the checkpoint says.
    let last = metrics.lines().last().map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["prodigy_d"].as_f64().unwrap());
    assert!(last.is_some_and(|last| ((last - d) / d).abs() < 1e-12), "{last:?} vs {d}");
}

#[test]
fn running_out_of_device_memory_stops_with_advice() {
    let dir = run_folder("oom", "MAX_NUM_STEPS=1\n");
    let dataloader = std::fs::read_to_string(dir.join("dataloader.json")).unwrap().replace("\"resolution\": 32", "\"resolution\": 2048");
    std::fs::write(dir.join("dataloader.json"), dataloader).unwrap();
    let output = runner(&["train", "--config", "config.env", "--device", "cpu-gpu"], &dir);
    let text = stderr(&output);
    assert!(!output.status.success(), "the run cannot fit: {text}");
    assert!(text.contains("the device ran out of memory: lower TRAIN_BATCH_SIZE or the dataset resolution"), "{text}");
    assert!(text.contains("can't allocate buffer"), "cubecl's own reason follows the advice: {text}");
    assert!(!text.contains("panicked"), "a clean error, not a crash: {text}");
}

#[test]
fn the_guide_sdxl_configuration_trains_the_tiny_sdxl_model() {
    // examples/dreambooth/sdxl.env is the guide's SDXL setup; SDXL's caches
    // carry the pooled embedding, and each image its size and crop ids.
    let out = scratch("guide-sdxl");
    let model = repo().join("trainer-core/tests/fixtures/models/sdxl/diffusers");
    let output = train_guide("sdxl.env", "sdxl", "2", &out);
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("(Sdxl)"), "{text}");
    let lora = out.join("burnbooth-lora.safetensors");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);

    // kohya's SDXL naming: SGM block paths (sd-scripts trains SDXL on the original UNet).
    let tensors = trainer_core::train::tensor_file::read("lora", std::fs::read(&lora).unwrap()).unwrap();
    assert!(tensors.contains_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"), "{:?}", tensors.keys().next());
    assert!(
        tensors.keys().all(|k| ["lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"].iter().any(|p| k.starts_with(p))),
        "every UNet name is an SGM path"
    );

    // The LoRA loads back onto the model it was trained on (every module matches a layer).
    let (lora_arg, image) = (lora.to_str().unwrap(), out.join("lora.png"));
    let applied = sample_32px(&repo(), model.to_str().unwrap(), image.to_str().unwrap(), &["--steps", "3", "--lora", lora_arg]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert!(stderr(&applied).contains("applied LoRA"), "{}", stderr(&applied));

    // Pointing the SD 1.x guide config at an SDXL model is refused, by name.
    let wrong = train_guide("config.env", "sdxl", "1", &out.join("wrong"));
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("model_family is sd1x but the model is Sdxl"), "{}", stderr(&wrong));
}
