//! The run loop both hosts drive: stopping, resuming and exporting, and the
//! before/after grid that ends a LoRA run.

use trainer_core::train::metrics::StepMetrics;
use trainer_core::train::run::{self, Control, RunEnd, RunHost, RunOptions, StepTiming};
use trainer_core::train::run_record::OutputUse;
use trainer_core::train::session::StepReport;

use super::*;

/// A host for [`run::run`] that stops at a given step and keeps what it is told.
#[derive(Default)]
struct RecordingHost {
    stop_at: Option<u64>,
    notes: Vec<String>,
    earlier_steps: Vec<u64>,
    steps: Vec<u64>,
    syncs: usize,
    /// Captions of the images the loop showed.
    images: Vec<String>,
    /// Asks for a grid after every validation, as the page does.
    grid_each_validation: bool,
    /// Samples finished while drawing grids.
    grid_samples: usize,
}

impl RunHost for RecordingHost {
    fn now(&self) -> f64 {
        0.0
    }
    fn note(&mut self, line: &str) {
        self.notes.push(line.to_string());
    }
    fn progress(&mut self, phase: &str, done: u64, total: u64) {
        if phase == "comparison sampling" && done == total {
            self.grid_samples += 1;
        }
    }
    fn history(&mut self, earlier: &[StepMetrics]) {
        self.earlier_steps = earlier.iter().map(|m| m.step).collect();
    }
    fn stepped(&mut self, report: &StepReport, _timing: &StepTiming) {
        self.steps.push(report.step);
    }
    fn image_written(&mut self, _path: &str, caption: &str) {
        self.images.push(caption.to_string());
    }
    fn comparison_at_each_validation(&self) -> bool {
        self.grid_each_validation
    }
    async fn saved(&mut self) -> trainer_core::Result<()> {
        self.syncs += 1;
        Ok(())
    }
    async fn between_steps(&mut self, step: u64, _total: u64) -> Control {
        if self.stop_at == Some(step) {
            Control::Stop
        } else {
            Control::Continue
        }
    }
}

#[test]
fn the_run_loop_stops_with_a_checkpoint_resumes_and_ends_a_full_fine_tune_with_its_exports() {
    let setup = setup("MODEL_TYPE=full\nLEARNING_RATE=2e-4\nMAX_NUM_STEPS=4\n", false);
    let storage = MemoryStorage::default();
    let device = Device::flex();
    let options =
        |output_use, resume: Option<&str>| RunOptions { output_use, resume: resume.map(String::from), export_name: Some("tuned".into()), source_configs: None };

    let mut first = session(&setup, &storage, &device, F32_TARGET);
    let mut host = RecordingHost { stop_at: Some(2), ..Default::default() };
    let end = block_on(run::run(&mut first, &mut host, &options(OutputUse::New, None))).unwrap();
    assert_eq!(end, RunEnd::Stopped { step: 2, checkpoint: "/out/checkpoints/checkpoint-00000002".into() });
    assert_eq!(host.steps, [1, 2]);
    assert!(host.notes.iter().any(|n| n.starts_with("caches ready")), "{:?}", host.notes);
    assert!(host.syncs >= 2, "the host hears of the caches and of the checkpoint");
    assert!(storage.exists("/out/checkpoints/checkpoint-00000002/state.json").unwrap());
    assert!(!storage.exists("/out/tuned.safetensors").unwrap(), "a stopped run exports nothing");

    // A new run into the folder is refused; resuming continues at step 3.
    let mut again = session(&setup, &storage, &device, F32_TARGET);
    let refused = block_on(run::run(&mut again, &mut RecordingHost::default(), &options(OutputUse::New, None))).unwrap_err();
    assert!(refused.to_string().contains("holds an earlier run"), "{refused}");
    let mut host = RecordingHost::default();
    let end = block_on(run::run(&mut again, &mut host, &options(OutputUse::Resume, Some("latest")))).unwrap();
    assert_eq!(host.earlier_steps, [1, 2], "the resumed run hands the earlier losses to the host");
    assert_eq!(host.steps, [3, 4]);
    let exports = vec!["/out/tuned".to_string(), "/out/tuned.safetensors".to_string()];
    assert_eq!(end, RunEnd::Finished { exports, comparison: None }, "no comparison without a validation prompt");
    for file in ["/out/tuned/unet/diffusion_pytorch_model.safetensors", "/out/tuned/model_index.json", "/out/tuned.safetensors", "/out/loss.png"] {
        assert!(storage.exists(file).unwrap(), "{file} was not written");
    }
    let metrics = String::from_utf8(storage.read("/out/metrics.jsonl").unwrap().unwrap()).unwrap();
    assert_eq!(metrics.lines().count(), 4, "one metrics line per step: {metrics}");
}

#[test]
fn a_lora_run_validates_the_base_model_at_step_0_and_ends_with_a_before_after_grid() {
    let extra = "MAX_NUM_STEPS=3\nLEARNING_RATE=1e-2\nVALIDATION_PROMPT=\"a photo of zwx toy\"\nVALIDATION_RESOLUTION=32\n\
                 VALIDATION_NUM_INFERENCE_STEPS=4\nTRAINER_EXTRA_ARGS=\"--validation_on_startup\"\n";
    let setup = setup(extra, true);
    assert!(setup.training.validation_on_startup);
    let storage = MemoryStorage::default();
    let device = Device::flex();
    let mut session = session(&setup, &storage, &device, F32_TARGET);
    let mut host = RecordingHost::default();
    let options = RunOptions { output_use: OutputUse::New, resume: None, export_name: None, source_configs: None };
    let end = block_on(run::run(&mut session, &mut host, &options)).unwrap();
    let RunEnd::Finished { comparison: Some(grid_path), .. } = end else { panic!("a LoRA run with a validation prompt ends with a grid: {end:?}") };
    assert_eq!(grid_path, "/out/comparison.png");
    assert_eq!(host.images, ["step 0", "base model | trained (step 3)"]);
    assert_eq!(host.grid_samples, 4, "base and trained, for the instance and the class prompt");

    let bytes = storage.read(&grid_path).unwrap().unwrap();
    let grid = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(grid.dimensions(), (64, 64), "two columns (base, trained) and two rows (instance, class prompt) of 32 px");
    let parameters = String::from_utf8_lossy(&bytes);
    assert!(parameters.contains("rows: a photo of zwx toy | a photo of a toy"), "the grid says what its rows are");
    // The base column is the base model: the step-0 validation image, which
    // the base model drew from the same prompt and seed.
    let startup = image::load_from_memory(&storage.read("/out/validation/step-000000.png").unwrap().unwrap()).unwrap().to_rgb8();
    let tile = |column: u32, row: u32| image::imageops::crop_imm(&grid, column * 32, row * 32, 32, 32).to_image();
    assert_eq!(tile(0, 0), startup, "the base model's tile is the base model's image");
    assert_ne!(tile(1, 0), tile(0, 0), "three steps of training change the instance prompt's image");
}

/// The page's host asks for the grid after every validation: each shows
/// the weights of its step, the base model's tiles are sampled once, and
/// the run's end reuses the last validation's grid instead of sampling it
/// again.
#[test]
fn a_host_that_asks_gets_a_grid_after_every_validation_with_the_base_sampled_once() {
    let extra = "MAX_NUM_STEPS=4\nVALIDATION_STEPS=2\nLEARNING_RATE=1e-2\nVALIDATION_PROMPT=\"a photo of zwx toy\"\n\
                 VALIDATION_RESOLUTION=32\nVALIDATION_NUM_INFERENCE_STEPS=4\n";
    let setup = setup(extra, true);
    let storage = MemoryStorage::default();
    let device = Device::flex();
    let mut session = session(&setup, &storage, &device, F32_TARGET);
    let mut host = RecordingHost { grid_each_validation: true, ..Default::default() };
    let options = RunOptions { output_use: OutputUse::New, resume: None, export_name: None, source_configs: None };
    let grid_at = |storage: &MemoryStorage| image::load_from_memory(&storage.read("/out/comparison.png").unwrap().unwrap()).unwrap().to_rgb8();
    // Stop after step 2's validation to look at its grid, then go on.
    host.stop_at = Some(2);
    let end = block_on(run::run(&mut session, &mut host, &options)).unwrap();
    assert!(matches!(end, RunEnd::Stopped { step: 2, .. }), "{end:?}");
    assert_eq!(host.images, ["step 2", "base model | trained (step 2)"]);
    assert_eq!(host.grid_samples, 4);
    let at_2 = grid_at(&storage);
    host.stop_at = None;
    let end = block_on(run::run(&mut session, &mut host, &RunOptions { output_use: OutputUse::Resume, resume: Some("latest".into()), ..options })).unwrap();
    assert!(matches!(&end, RunEnd::Finished { comparison: Some(path), .. } if path == "/out/comparison.png"), "{end:?}");
    assert_eq!(
        host.images,
        ["step 2", "base model | trained (step 2)", "step 4", "base model | trained (step 4)"],
        "one grid per validation, none again at the end"
    );
    assert_eq!(host.grid_samples, 6, "step 4's grid samples only the trained column");
    let at_4 = grid_at(&storage);
    let tile = |grid: &image::RgbImage, column: u32, row: u32| image::imageops::crop_imm(grid, column * 32, row * 32, 32, 32).to_image();
    assert_eq!(tile(&at_4, 0, 0), tile(&at_2, 0, 0), "the base column is the same picture");
    assert_eq!(tile(&at_4, 0, 1), tile(&at_2, 0, 1));
    assert_ne!(tile(&at_4, 1, 0), tile(&at_2, 1, 0), "two more steps change the trained column");
    let last = image::load_from_memory(&storage.read("/out/validation/step-000004.png").unwrap().unwrap()).unwrap().to_rgb8();
    assert_eq!(tile(&at_4, 1, 0), last, "the trained tile is step 4's validation image");
}

/// The validation loss: an eval dataset (here the subject's pictures again)
/// is held out, so training draws exactly what it draws without it; it is
/// scored at fixed timesteps with fixed draws (the same value twice in a
/// row), the run loop records it every eval_steps_interval steps in
/// metrics.jsonl, says it, and the plan describes it.
#[test]
fn an_eval_dataset_is_held_out_and_its_loss_recorded_every_interval() {
    let extra = "MAX_NUM_STEPS=4\nTRAINER_EXTRA_ARGS=\"--eval_steps_interval=2 --eval_timesteps=4 --num_eval_images=1\"\n";
    let plain = setup(extra, false);
    let mut held = setup(extra, false);
    held.json = held.json.replacen(
        '[',
        r#"[{"id": "held-out", "type": "local", "dataset_type": "eval", "instance_data_dir": "held", "caption_strategy": "instanceprompt",
            "instance_prompt": "a photo of zwx toy", "resolution": 32, "resolution_type": "pixel", "minimum_image_size": 32, "cache_dir_vae": "/cache/vae/held"},"#,
        1,
    );
    held.sources.insert("held-out".into(), held.sources["subject"].clone());
    let device = Device::flex();
    let (plain_storage, held_storage) = (MemoryStorage::default(), MemoryStorage::default());
    let mut without = session(&plain, &plain_storage, &device, F32_TARGET);
    let mut with = session(&held, &held_storage, &device, F32_TARGET);
    let described = trainer_core::plan::describe(&with.plan);
    assert!(described.contains("Dataset 'held-out'  [eval: held out for the validation loss]"), "{described}");
    assert!(described.contains("Validation loss: every 2 steps on 1 of the 2 held-out image(s) of held-out at 4 timesteps each"), "{described}");
    assert_eq!(with.plan.max_steps, without.plan.max_steps);
    let first = block_on(with.evaluate()).unwrap().expect("an eval dataset");
    assert_eq!(block_on(with.evaluate()).unwrap(), Some(first), "fixed timesteps and draws");
    assert!(block_on(without.evaluate()).unwrap().is_none());

    let mut host = RecordingHost::default();
    let options = RunOptions { output_use: OutputUse::New, resume: None, export_name: None, source_configs: None };
    block_on(run::run(&mut with, &mut host, &options)).unwrap();
    assert_eq!(train(&mut without, 4), with.metrics.iter().map(|m| m.loss).collect::<Vec<_>>(), "held out: training draws as without it");
    let evaluated: Vec<(u64, bool)> = with.metrics.iter().map(|m| (m.step, m.eval_loss.is_some())).collect();
    assert_eq!(evaluated, [(1, false), (2, true), (3, false), (4, true)]);
    assert_ne!(with.metrics[3].eval_loss, Some(first), "training on the subject changes its loss");
    assert!(host.notes.iter().any(|n| n.starts_with("validation loss at step 2:")), "{:?}", host.notes);
    let jsonl = String::from_utf8(held_storage.read("/out/metrics.jsonl").unwrap().unwrap()).unwrap();
    assert_eq!(jsonl.matches("eval_loss").count(), 2, "{jsonl}");
}
