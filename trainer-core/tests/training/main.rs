//! Training on the tiny SD1 fixture, in memory: Dreambooth has the intended
//! effect, resume reproduces the run exactly, caches are reused, exported
//! LoRAs merge back to the same model, bad losses stop training, and the
//! run loop both hosts drive stops, resumes and exports.

#[path = "../common.rs"]
mod common;
mod run_loop;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::Device;
use common::*;
use image::{ImageFormat, Rgb, RgbImage};
use trainer_core::block_on;
use trainer_core::config::training::TrainingConfig;
use trainer_core::data::source::{ImageSource, MemorySource};
use trainer_core::models::{DiskFolder, StableDiffusion, WeightDtypes};
use trainer_core::pipeline::GenerateRequest;
use trainer_core::plan::{plan, PlanTarget};
use trainer_core::schedulers::SamplerKind;
use trainer_core::train::session::{image_tensor, Session, SessionOptions};
use trainer_core::train::storage::{MemoryStorage, Storage};

fn fixture_model(device: &Device, dtypes: WeightDtypes) -> StableDiffusion {
    fixture_model_of("sd1", device, dtypes)
}

fn fixture_model_of(family: &str, device: &Device, dtypes: WeightDtypes) -> StableDiffusion {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family).join("diffusers");
    StableDiffusion::from_folder_with(&DiskFolder { root }, device, dtypes).unwrap()
}

const F32_TARGET: PlanTarget = PlanTarget { has_bf16: false, has_f16: false };

fn encode_png(image: &RgbImage) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// The subject: a distinctive red/white checkerboard.
fn subject_image() -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| if (x / 8 + y / 8) % 2 == 0 { Rgb([220, 30, 30]) } else { Rgb([250, 250, 250]) })
}

/// Class images: smooth gradients in other colours.
fn class_image(i: u32) -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| Rgb([(x * 8) as u8, (40 + i * 30) as u8, (y * 8) as u8]))
}

const BASE_ENV: &str = "MODEL_FAMILY=sd1x
DATALOADER_CONFIG=dataloader.json
MODEL_TYPE=lora
TRAINING_SEED=1
TRAIN_BATCH_SIZE=1
LEARNING_RATE=3e-3
OPTIMIZER=adamw
LR_SCHEDULE=constant
LORA_RANK=4
LORA_ALPHA=4
VALIDATION_STEPS=0
OUTPUT_DIR=/out
";

struct Setup {
    training: TrainingConfig,
    sources: BTreeMap<String, MemorySource>,
    json: String,
}

fn setup(extra_env: &str, with_class: bool) -> Setup {
    let training = training(&format!("{BASE_ENV}{extra_env}"));
    let subject = source_with(&[("a.png", encode_png(&subject_image())), ("b.png", encode_png(&subject_image()))]);
    let class = source_with(&(0..4).map(|i| (["c0.png", "c1.png", "c2.png", "c3.png"][i as usize], encode_png(&class_image(i)))).collect::<Vec<_>>());
    let mut datasets = vec![r#"{"id": "subject", "type": "local", "instance_data_dir": "subject", "caption_strategy": "instanceprompt",
        "instance_prompt": "a photo of zwx toy", "resolution": 32, "resolution_type": "pixel", "minimum_image_size": 32,
        "cache_dir_vae": "/cache/vae/subject"}"#
        .to_string()];
    if with_class {
        datasets.push(
            r#"{"id": "class", "type": "local", "instance_data_dir": "class", "caption_strategy": "instanceprompt",
            "instance_prompt": "a photo of a toy", "resolution": 32, "resolution_type": "pixel", "minimum_image_size": 32,
            "is_regularisation_data": true, "repeats": 10, "ignore_epochs": true, "cache_dir_vae": "/cache/vae/class"}"#
                .to_string(),
        );
    }
    datasets.push(r#"{"id": "text", "type": "local", "dataset_type": "text_embeds", "default": true, "cache_dir": "/cache/text"}"#.to_string());
    let sources = BTreeMap::from([("subject".to_string(), subject), ("class".to_string(), class)]);
    Setup { training, sources, json: format!("[{}]", datasets.join(",")) }
}

fn session<'a>(setup: &Setup, storage: &'a MemoryStorage, device: &Device, target: PlanTarget) -> Session<'a> {
    session_on(setup, storage, device, target, "sd1")
}

/// A session on the tiny fixture model of `family` (sd1, sdxl).
fn session_on<'a>(setup: &Setup, storage: &'a MemoryStorage, device: &Device, target: PlanTarget, family: &str) -> Session<'a> {
    let dataloader = dataloader(&setup.json, &setup.training).unwrap();
    let open =
        |d: &trainer_core::config::dataset::ImageDatasetConfig| -> trainer_core::Result<Box<dyn ImageSource>> { Ok(Box::new(setup.sources[&d.id].clone())) };
    let planned = plan(&setup.training, &dataloader, &open, target, &mut |_| {}).unwrap();
    let model = fixture_model_of(family, device, planned.precision.weight_dtypes(setup.training.model_type));
    let sources: Vec<Box<dyn ImageSource>> = planned.datasets.iter().map(|d| Box::new(setup.sources[&d.id].clone()) as Box<dyn ImageSource>).collect();
    let masks = trainer_core::plan::open_mask_sources(&planned, &dataloader, &open).unwrap();
    let mut session = Session::new(setup.training.clone(), planned, model, sources, storage, device.clone(), SessionOptions::default()).unwrap();
    session.set_mask_sources(masks).unwrap();
    block_on(session.prepare_caches(&mut |_| {})).unwrap();
    session
}

fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        steps: 8,
        guidance: 1.0,
        sampler: SamplerKind::Ddim,
        seed: 7,
        width: 32,
        height: 32,
    }
}

fn latents(session: &mut Session<'_>, prompt: &str) -> Vec<f32> {
    let generated = session.generate(&request(prompt), &mut |_| {}).unwrap();
    generated.latents.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn mean_squared(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64
}

fn train(session: &mut Session<'_>, steps: u64) -> Vec<f32> {
    (0..steps).map(|_| block_on(session.train_step()).unwrap().loss).collect()
}

#[test]
fn dreambooth_pulls_the_instance_prompt_to_the_subject_and_parent_prediction_limits_class_drift() {
    let device = Device::flex();
    let steps = 80;
    let env = format!("MAX_NUM_STEPS={steps}\nLORA_DROPOUT=0\nLEARNING_RATE=1e-2\n");

    // The subject's latents, as the training sees them.
    let model = fixture_model(&device, WeightDtypes::default());
    let subject = model.vae.encode(image_tensor(&subject_image(), &device)).mean * model.configs.vae.scaling_factor;
    let subject: Vec<f32> = subject.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();

    // Without class data.
    let storage = MemoryStorage::default();
    let plain = setup(&format!("{env}REGULARISATION_MODE=mixed\n"), false);
    let mut run = session(&plain, &storage, &device, F32_TARGET);
    let instance_before = latents(&mut run, "a photo of zwx toy");
    let class_before = latents(&mut run, "a photo of a toy");
    train(&mut run, steps);
    let instance_after = latents(&mut run, "a photo of zwx toy");
    let class_drift_without_prior = mean_squared(&latents(&mut run, "a photo of a toy"), &class_before);

    let before = mean_squared(&instance_before, &subject);
    let after = mean_squared(&instance_after, &subject);
    assert!(after < before * 0.9, "instance samples should move toward the subject: distance {before:.4} -> {after:.4}");

    // Parent prediction: class batches learn the base model's own prediction.
    let storage = MemoryStorage::default();
    let parent = setup(&format!("{env}REGULARISATION_MODE=parent_prediction\n"), true);
    let mut run = session(&parent, &storage, &device, F32_TARGET);
    train(&mut run, steps);
    let instance_after_parent = mean_squared(&latents(&mut run, "a photo of zwx toy"), &subject);
    let class_drift_with_parent = mean_squared(&latents(&mut run, "a photo of a toy"), &class_before);
    assert!(instance_after_parent < before, "parent prediction still moves toward the subject: {before:.4} -> {instance_after_parent:.4}");
    assert!(
        class_drift_with_parent < class_drift_without_prior * 0.5,
        "the class prompt should stay closer to the base model with parent prediction: drift {class_drift_with_parent:.5} vs {class_drift_without_prior:.5} without"
    );
    eprintln!(
        "instance distance {before:.4} -> {after:.4} (plain), {instance_after_parent:.4} (parent); \
         class drift {class_drift_without_prior:.5} (plain), {class_drift_with_parent:.5} (parent)"
    );
}

/// Prior preservation keeps what the base model draws for the class prompt
/// only if it draws something: on random weights every prompt drifts alike.
/// The `sd1-trained` fixture (`scripts/make_trained_fixture.py`) learned "a
/// photo of a toy" from this file's class images, next to three other
/// captioned kinds, and samples toys for it. Its instance prompt "a photo of
/// zwx toy" is nearly the class prompt to its text encoder (as a rare token
/// is to a real one), so training the subject drags the class prompt along
/// (language drift) unless the class images train beside it.
#[test]
fn prior_preservation_keeps_the_class_prompt_near_the_base_models_samples() {
    let device = Device::flex();
    let steps = 80;
    let env = format!("MODEL_TYPE=full\nLEARNING_RATE=2e-4\nMAX_NUM_STEPS={steps}\n");
    let model = fixture_model_of("sd1-trained", &device, WeightDtypes::default());
    let encode = |image: &RgbImage| -> Vec<f32> {
        let latents = model.vae.encode(image_tensor(image, &device)).mean * model.configs.vae.scaling_factor;
        latents.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    };
    let subject = encode(&subject_image());
    let class_images: Vec<Vec<f32>> = (0..4).map(|i| encode(&class_image(i))).collect();
    // Averages over seeds, with guidance as users sample.
    let seeds = 7..13;
    let samples = |run: &mut Session<'_>, prompt: &str| -> Vec<Vec<f32>> {
        seeds
            .clone()
            .map(|seed| {
                let request = GenerateRequest { guidance: 3.0, seed, ..request(prompt) };
                run.generate(&request, &mut |_| {}).unwrap().latents.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
            })
            .collect()
    };
    let mean_distance = |a: &[Vec<f32>], b: &dyn Fn(usize) -> f64| (0..a.len()).map(b).sum::<f64>() / a.len() as f64;
    let to_subject = |a: &[Vec<f32>]| mean_distance(a, &|i| mean_squared(&a[i], &subject));
    let to_class_images = |a: &[Vec<f32>]| mean_distance(a, &|i| class_images.iter().map(|c| mean_squared(&a[i], c)).fold(f64::MAX, f64::min));

    let storage = MemoryStorage::default();
    let plain = setup(&format!("{env}REGULARISATION_MODE=mixed\n"), false);
    let mut run = session_on(&plain, &storage, &device, F32_TARGET, "sd1-trained");
    let instance_before = to_subject(&samples(&mut run, "a photo of zwx toy"));
    let class_before = samples(&mut run, "a photo of a toy");
    let drift = |after: &[Vec<f32>]| mean_distance(after, &|i| mean_squared(&after[i], &class_before[i]));
    // The base model draws toys for the class prompt (each class image has mean square 1).
    assert!(to_class_images(&class_before) < 0.4, "the fixture should sample its class images: {:.3}", to_class_images(&class_before));
    train(&mut run, steps);
    let instance_plain = to_subject(&samples(&mut run, "a photo of zwx toy"));
    let class_plain = samples(&mut run, "a photo of a toy");

    let storage = MemoryStorage::default();
    let prior = setup(&format!("{env}REGULARISATION_MODE=prior_preservation\n"), true);
    let mut run = session_on(&prior, &storage, &device, F32_TARGET, "sd1-trained");
    assert!(train(&mut run, steps).iter().all(|l| l.is_finite()));
    let instance_prior = to_subject(&samples(&mut run, "a photo of zwx toy"));
    let class_prior = samples(&mut run, "a photo of a toy");

    eprintln!(
        "instance distance to the subject {instance_before:.3} -> {instance_plain:.3} (plain), {instance_prior:.3} (prior preservation); \
         class drift {:.3} (plain), {:.3} (prior preservation); class samples to the nearest class image {:.3} (base), {:.3} (plain), {:.3} (prior preservation)",
        drift(&class_plain), drift(&class_prior), to_class_images(&class_before), to_class_images(&class_plain), to_class_images(&class_prior)
    );
    assert!(instance_plain < instance_before * 0.95, "the instance prompt should move toward the subject: {instance_before:.3} -> {instance_plain:.3}");
    assert!(instance_prior < instance_before * 0.95, "prior preservation should still learn the subject: {instance_before:.3} -> {instance_prior:.3}");
    assert!(
        drift(&class_prior) < drift(&class_plain) * 0.75,
        "the class prompt should stay closer to the base model's samples with prior preservation: drift {:.3} vs {:.3} without",
        drift(&class_prior),
        drift(&class_plain)
    );
    assert!(to_class_images(&class_prior) < to_class_images(&class_plain), "prior preservation should keep the class prompt drawing class images");
}

/// Min-SNR weighting scales the prior term as it scales the instance term
/// (kohya's and SimpleTuner's weighting, not diffusers' unweighted prior).
/// With a tiny gamma every weight is below 0.02, so the whole first loss
/// shrinks; an unweighted prior term would keep about half of it.
#[test]
fn min_snr_weighting_scales_the_prior_term_too() {
    let device = Device::flex();
    let first_loss = |extra: &str| -> f32 {
        let storage = MemoryStorage::default();
        let setup = setup(&format!("MAX_NUM_STEPS=1\nREGULARISATION_MODE=prior_preservation\n{extra}"), true);
        let mut run = session(&setup, &storage, &device, F32_TARGET);
        train(&mut run, 1)[0]
    };
    let plain = first_loss("");
    let weighted = first_loss("TRAINER_EXTRA_ARGS=\"--snr_gamma 0.0001\"\n");
    let instance_only = first_loss("PRIOR_LOSS_WEIGHT=0\n");
    assert!(instance_only < plain * 0.9, "the prior term should add to the loss: {instance_only} of {plain}");
    assert!(weighted > 0.0 && weighted < plain * 0.05, "min-SNR should weight both terms: {weighted} of {plain}");
}

/// A full fine-tune with `--train_text_encoder` (Dreambooth's own setup)
/// trains every text-encoder weight beside the UNet's, keeps them in its
/// checkpoints and resumes exactly.
#[test]
fn a_full_fine_tune_trains_the_text_encoder_and_resumes_exactly() {
    use trainer_core::train::checkpoint::trainable_tensors;
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let setup = setup("MODEL_TYPE=full\nLEARNING_RATE=2e-4\nMAX_NUM_STEPS=6\nTRAINER_EXTRA_ARGS=\"--train_text_encoder\"\n", true);
    let mut run = session(&setup, &storage, &device, F32_TARGET);
    let start = block_on(trainable_tensors(&run.model.text_encoder)).unwrap();
    assert!(start.keys().any(|k| k.contains("token_embedding")), "every text-encoder weight trains: {:?}", start.keys().take(4).collect::<Vec<_>>());
    train(&mut run, 3);
    let moved = block_on(trainable_tensors(&run.model.text_encoder)).unwrap();
    let changed = start.keys().filter(|k| moved[*k] != start[*k]).count();
    assert!(changed * 2 > start.len(), "only {changed} of {} text-encoder tensors moved in 3 steps", start.len());
    assert_resumes_exactly(&mut run, &setup, &storage, &device);
}

#[test]
fn exported_kohya_lora_merges_back_to_the_same_unet_output() {
    // Plain LoRA, and DoRA (use_dora), whose file carries dora_scale.
    for extra in ["", "TRAINER_EXTRA_ARGS=\"--use_dora\"\n"] {
        let device = Device::flex();
        let storage = MemoryStorage::default();
        let setup = setup(&format!("MAX_NUM_STEPS=4\n{extra}"), false);
        let mut run = session(&setup, &storage, &device, F32_TARGET);
        train(&mut run, 4);
        let path = block_on(run.export_lora("test-lora")).unwrap();
        let bytes = storage.read(&path).unwrap().unwrap();
        let file = trainer_core::train::tensor_file::read(&path, bytes.clone()).unwrap();
        let scales: Vec<&Vec<usize>> = file.iter().filter(|(k, _)| k.ends_with(".dora_scale")).map(|(_, t)| &t.shape).collect();
        let layers = run.model.unet.adapted_layers();
        if extra.is_empty() {
            assert!(scales.is_empty());
        } else {
            assert_eq!(scales.len(), layers.len(), "one dora_scale per adapted layer");
            assert!(scales.iter().zip(&layers).all(|(shape, layer)| **shape == vec![layer.dims()[1], 1]), "[out, 1]: {scales:?}");
        }

        assert_merges_back(&run, &path, bytes, &device);
    }
}

/// A fresh fixture model with the exported file `path` merged in gives the
/// trained adapters' UNet output on a fixed input (relative L2 below 1e-5:
/// the file stores f32, merging only reorders float sums), which differs
/// from the base model's.
fn assert_merges_back(run: &Session<'_>, path: &str, bytes: Vec<u8>, device: &Device) {
    let sample = trainer_core::pipeline::gaussian_noise([1, 4, 16, 16], &mut trainer_core::rng::SeededRng::new(9), device);
    let context = run.model.encode_prompts(&["a photo of zwx toy"], device).unwrap();
    let adapted = run.model.unet.valid().forward(sample.clone(), &[500.0], context.clone());
    let base = fixture_model(device, WeightDtypes::default()).unet.forward(sample.clone(), &[500.0], context.clone());
    let mut merged = fixture_model(device, WeightDtypes::default());
    let count = trainer_core::train::export::merge_kohya(&mut merged, path, bytes, 1.0, device).unwrap();
    assert_eq!(count, run.model.unet.adapted_layers().len() + run.model.unet.adapted_convs().len(), "every adapted layer is in the file");
    let from_file = merged.unet.forward(sample, &[500.0], context);
    let values = |t: burn::tensor::Tensor<4>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let (adapted, base, from_file) = (values(adapted), values(base), values(from_file));
    let relative = |a: &[f32], b: &[f32]| (mean_squared(a, b) / mean_squared(b, &vec![0.0; b.len()])).sqrt();
    assert!(relative(&adapted, &base) > 1e-4, "training must have changed the UNet ({path})");
    assert!(relative(&from_file, &adapted) < 1e-5, "merged output differs ({path}): {:.2e}", relative(&from_file, &adapted));
}

/// Checkpoints `run` (after its step 3) and trains 3 more steps; a session
/// resumed from the checkpoint trains those steps with the same losses and
/// ends with the same trainable UNet and text-encoder tensors.
fn assert_resumes_exactly(run: &mut Session<'_>, setup: &Setup, storage: &MemoryStorage, device: &Device) {
    use trainer_core::train::checkpoint::trainable_tensors;
    block_on(run.save_checkpoint()).unwrap();
    let rest = train(run, 3);
    let mut resumed = session(setup, storage, device, F32_TARGET);
    resumed.resume("latest").unwrap();
    assert_eq!(train(&mut resumed, 3), rest, "steps 4-6 after resuming equal the uninterrupted run");
    assert_eq!(block_on(trainable_tensors(&resumed.model.unet)).unwrap(), block_on(trainable_tensors(&run.model.unet)).unwrap());
    // The text encoder's trained weights (none unless it trains).
    assert_eq!(block_on(trainable_tensors(&resumed.model.text_encoder)).unwrap(), block_on(trainable_tensors(&run.model.text_encoder)).unwrap());
}

/// LoKr (lora_type lycoris, SimpleTuner's example lycoris_config with a
/// factor the tiny model's sizes allow) trains the attention and
/// feed-forward layers, resumes exactly, and its file (LyCORIS's lokr_w1 /
/// lokr_w2 / alpha names) merges back to the same UNet output.
#[test]
fn lokr_trains_resumes_exactly_and_its_file_merges_back() {
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let mut setup = setup("MAX_NUM_STEPS=6\nLORA_TYPE=lycoris\nLEARNING_RATE=1e-2\n", false);
    let config = r#"{"algo": "lokr", "multiplier": 1.0, "full_matrix": true, "linear_alpha": 1, "factor": 16,
        "apply_preset": {"target_module": ["Attention", "FeedForward"], "module_algo_map": {"Attention": {"factor": 4}, "FeedForward": {"factor": 2}}}}"#;
    let (lokr, warnings) = trainer_core::config::lycoris::parse_lycoris_config(config).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    setup.training.lycoris = Some(lokr);
    let mut run = session(&setup, &storage, &device, F32_TARGET);
    let described = trainer_core::plan::describe(&run.plan);
    assert!(described.contains("Adapters: LyCORIS LoKr on to_q, to_k, to_v, to_out.0 (factor 4); LoKr on ff.net.0.proj, ff.net.2 (factor 2)"), "{described}");
    let layers = run.model.unet.adapted_layers();
    assert!(!layers.is_empty() && layers.iter().all(|l| l.lokr.is_some() && l.lora.is_none()));
    assert!(layers.iter().any(|l| l.path.ends_with("ff.net.2")) && !layers.iter().any(|l| l.path.ends_with("proj_in")), "Attention and FeedForward only");
    train(&mut run, 3);
    assert_resumes_exactly(&mut run, &setup, &storage, &device);

    let path = block_on(run.export_lora("lokr")).unwrap();
    let bytes = storage.read(&path).unwrap().unwrap();
    let file = trainer_core::train::tensor_file::read(&path, bytes.clone()).unwrap();
    let names: Vec<&String> = file.keys().collect();
    assert!(names.iter().all(|n| n.starts_with("lora_unet_") && (n.ends_with(".lokr_w1") || n.ends_with(".lokr_w2") || n.ends_with(".alpha"))), "{names:?}");
    assert_eq!(names.len(), 3 * run.model.unet.adapted_layers().len());
    assert_merges_back(&run, &path, bytes, &device);
}

/// LoCon (lycoris_config algo locon, no apply_preset: LyCORIS's default
/// preset) adapts every Linear layer and convolution of the UNet, with
/// conv_dim on the 3x3 kernels and linear_dim on the 1x1 ones; it trains,
/// resumes exactly, and its file (kohya names, 4-d pairs for
/// convolutions) merges back to the same UNet output.
#[test]
fn locon_adapts_the_convolutions_too_resumes_exactly_and_its_file_merges_back() {
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let mut setup = setup("MAX_NUM_STEPS=6\nLORA_TYPE=lycoris\nLEARNING_RATE=1e-2\n", false);
    let config = r#"{"algo": "locon", "multiplier": 1, "linear_dim": 4, "linear_alpha": 2, "conv_dim": 3, "conv_alpha": 1.5}"#;
    let (locon, warnings) = trainer_core::config::lycoris::parse_lycoris_config(config).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    setup.training.lycoris = Some(locon);
    let mut run = session(&setup, &storage, &device, F32_TARGET);
    let described = trainer_core::plan::describe(&run.plan);
    assert!(described.contains("LoCon on conv1, conv2, conv_shortcut, time_emb_proj") && described.contains("conv_dim 3, conv_alpha 1.5"), "{described}");
    let unet = &mut run.model.unet;
    let (all_linear, all_convs) = unet.adaptable_mut();
    let (all_linear, all_convs) = (all_linear.len(), all_convs.len());
    let (layers, convs) = (run.model.unet.adapted_layers(), run.model.unet.adapted_convs());
    assert_eq!((layers.len(), convs.len()), (all_linear, all_convs), "the default preset adapts every layer");
    for conv in &convs {
        let lora = conv.lora.as_ref().unwrap();
        let kernel = conv.dims()[2];
        let expected = if kernel == 1 { (4, 2.0) } else { (3, 1.5) };
        assert_eq!((lora.rank(), lora.alpha), expected, "{}: {kernel}x{kernel}", conv.path);
    }
    assert!(convs.iter().any(|c| c.path == "down_blocks.0.downsamplers.0.conv") && convs.iter().any(|c| c.path.ends_with("attentions.0.proj_in")));
    assert!(layers.iter().any(|l| l.path == "time_embedding.linear_1") && layers.iter().all(|l| l.lora.as_ref().is_some_and(|a| a.rank() == 4)));
    train(&mut run, 3);
    assert_resumes_exactly(&mut run, &setup, &storage, &device);

    let path = block_on(run.export_lora("locon")).unwrap();
    let bytes = storage.read(&path).unwrap().unwrap();
    let file = trainer_core::train::tensor_file::read(&path, bytes.clone()).unwrap();
    assert_eq!(file["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape, vec![3, 8, 3, 3]);
    assert_eq!(file["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape, vec![8, 3, 1, 1]);
    assert_eq!(file["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape, vec![4, 8, 1, 1]);
    assert_eq!(file["lora_unet_time_embedding_linear_1.lora_down.weight"].shape.len(), 2);
    assert_eq!(file["lora_unet_conv_in.alpha"].values, vec![1.5]);
    let metadata = trainer_core::models::safetensors_file::SafetensorsFile::from_bytes(&path, bytes.clone()).unwrap().metadata;
    assert_eq!(metadata.get("ss_network_module").map(String::as_str), Some("lycoris.kohya"));
    assert!(metadata.get("ss_network_args").is_some_and(|a| a.contains(r#""algo": "locon""#) && a.contains(r#""conv_dim": "3""#)), "{metadata:?}");
    assert_merges_back(&run, &path, bytes, &device);
}

/// DoRA trains its magnitudes with the adapters and resumes exactly; a run
/// begun without DoRA is not resumed with it.
#[test]
fn dora_trains_the_magnitudes_and_resumes_exactly() {
    use trainer_core::train::checkpoint::trainable_tensors;
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let setup = setup("MAX_NUM_STEPS=6\nLORA_DROPOUT=0.1\nTRAINER_EXTRA_ARGS=\"--use_dora\"\n", false);
    let mut run = session(&setup, &storage, &device, F32_TARGET);
    let start = block_on(trainable_tensors(&run.model.unet)).unwrap();
    let magnitudes: Vec<&String> = start.keys().filter(|k| k.ends_with(".magnitude")).collect();
    assert_eq!(magnitudes.len(), run.model.unet.adapted_layers().len());
    train(&mut run, 3);
    let moved = block_on(trainable_tensors(&run.model.unet)).unwrap();
    assert!(magnitudes.iter().all(|k| moved[*k] != start[*k]), "every magnitude trains");
    assert_resumes_exactly(&mut run, &setup, &storage, &device);
    let plain = self::setup("MAX_NUM_STEPS=6\nLORA_DROPOUT=0.1\n", false);
    let error = session(&plain, &storage, &device, F32_TARGET).resume("latest").unwrap_err().to_string();
    assert!(error.contains("trainable tensors"), "{error}");
}

#[test]
fn caches_are_reused_and_invalidated_by_geometry() {
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let first = setup("MAX_NUM_STEPS=1\n", true);
    let mut computed = Vec::new();
    let mut run = session(&first, &storage, &device, F32_TARGET);
    block_on(run.prepare_caches(&mut |p| computed.push((p.phase.to_string(), p.computed)))).unwrap();
    let last = |phase: &str, list: &[(String, usize)]| list.iter().rev().find(|(p, _)| p == phase).map(|(_, c)| *c).unwrap();
    assert_eq!(last("latents", &computed), 0, "a second pass finds every latent cached");
    assert_eq!(last("text embeddings", &computed), 0);
    let entries = storage.paths().len();

    // A new resolution changes every image's geometry: new latents, same text.
    let mut second = setup("MAX_NUM_STEPS=1\n", true);
    second.json = second.json.replace("\"resolution\": 32", "\"resolution\": 128").replace("\"minimum_image_size\": 32", "\"minimum_image_size\": 16");
    let mut run = session(&second, &storage, &device, F32_TARGET);
    computed.clear();
    block_on(run.prepare_caches(&mut |p| computed.push((p.phase.to_string(), p.computed)))).unwrap();
    // The two subject files have the same pixels, so they share one entry.
    assert_eq!(storage.paths().len(), entries + 5, "one subject and four class entries at the new size");
}

/// Gradient checkpointing (on by default) trains as one backward pass
/// does: prior preservation (two UNet passes a step), LoRA dropout and the
/// text encoder's adapters included.
#[test]
fn gradient_checkpointing_gives_the_losses_and_weights_of_one_backward_pass() {
    let device = Device::flex();
    let env = "MAX_NUM_STEPS=3\nLORA_DROPOUT=0.2\nREGULARISATION_MODE=prior_preservation\nTRAINER_EXTRA_ARGS=\"--train_text_encoder\"\n";
    let run = |checkpointing: bool| {
        let storage = MemoryStorage::default();
        let setup = setup(&format!("{env}USE_GRADIENT_CHECKPOINTING={checkpointing}\n"), true);
        assert_eq!(setup.training.gradient_checkpointing, checkpointing);
        let mut run = session(&setup, &storage, &device, F32_TARGET);
        let reports: Vec<(f32, f32)> = (0..3).map(|_| block_on(run.train_step()).map(|r| (r.loss, r.grad_norm)).unwrap()).collect();
        let adapters: Vec<f32> = run
            .model
            .unet
            .adapted_layers()
            .iter()
            .chain(run.model.text_encoder.adapted_layers().iter())
            .flat_map(|l| {
                let lora = l.lora.as_ref().unwrap();
                [lora.down.val(), lora.up.val()].map(|t| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()).concat()
            })
            .collect();
        (reports, adapters)
    };
    let (plain, plain_weights) = run(false);
    let (staged, staged_weights) = run(true);
    for (step, ((loss_a, norm_a), (loss_b, norm_b))) in plain.iter().zip(&staged).enumerate() {
        assert!((loss_a - loss_b).abs() <= 1e-5 * loss_a.abs(), "step {}: loss {loss_a} vs {loss_b} with checkpointing", step + 1);
        assert!((norm_a - norm_b).abs() <= 1e-4 * norm_a.abs(), "step {}: gradient norm {norm_a} vs {norm_b} with checkpointing", step + 1);
    }
    let scale = plain_weights.iter().fold(0f32, |m, v| m.max(v.abs()));
    let error = plain_weights.iter().zip(&staged_weights).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(error <= 1e-4 * scale, "adapter weights differ by {error} (largest {scale})");
}

#[test]
fn a_diverging_loss_stops_training_with_a_message() {
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let setup = setup("MAX_NUM_STEPS=50\nLEARNING_RATE=1e30\nMAX_GRAD_NORM=0\n", false);
    let mut run = session(&setup, &storage, &device, F32_TARGET);
    let error = (0..50).find_map(|_| block_on(run.train_step()).err()).expect("a learning rate of 1e30 must blow up");
    let text = error.to_string();
    assert!(text.contains("the loss is") && text.contains("weights were not updated"), "{text}");
}

#[test]
fn adamw_bf16_keeps_weights_in_bf16_and_resumes_exactly() {
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let setup = setup("MAX_NUM_STEPS=6\nOPTIMIZER=adamw_bf16\nLORA_DROPOUT=0.1\n", true);
    let mut run = session(&setup, &storage, &device, PlanTarget { has_bf16: true, has_f16: false });
    let first = train(&mut run, 3);
    let layer = run.model.unet.adapted_layers()[0];
    assert_eq!(layer.lora.as_ref().unwrap().down.val().dtype(), burn::tensor::DType::BF16);
    block_on(run.save_checkpoint()).unwrap();
    let rest = train(&mut run, 3);

    let mut resumed = session(&setup, &storage, &device, PlanTarget { has_bf16: true, has_f16: false });
    resumed.resume("latest").unwrap();
    assert_eq!(resumed.step, 3);
    assert_eq!(train(&mut resumed, 3), rest, "steps 4-6 after resuming equal the uninterrupted run");
    assert_eq!(first.len(), 3);
}

/// Prodigy and Adafactor train the adapters through the session (UNet and
/// text encoder, one step size for both under Prodigy), keep their state
/// in checkpoints and resume exactly; a checkpoint is not resumed by
/// another optimizer.
#[test]
fn prodigy_and_adafactor_train_resume_exactly_and_refuse_another_optimizers_checkpoint() {
    use trainer_core::train::checkpoint::trainable_tensors;
    let device = Device::flex();
    for optimizer in ["prodigy", "torch-adafactor"] {
        let storage = MemoryStorage::default();
        let setup = setup(&format!("MAX_NUM_STEPS=6\nOPTIMIZER={optimizer}\nLORA_DROPOUT=0.1\nTRAINER_EXTRA_ARGS=\"--train_text_encoder\"\n"), true);
        let mut run = session(&setup, &storage, &device, F32_TARGET);
        let described = trainer_core::plan::describe(&run.plan);
        let named = if optimizer == "prodigy" {
            "Optimizer: prodigy (Prodigy with f32 state: step size d from d0 0.000001"
        } else {
            "Optimizer: adafactor (Adafactor (torch)"
        };
        assert!(described.contains(named), "{described}");
        let start = block_on(trainable_tensors(&run.model.unet)).unwrap();
        train(&mut run, 3);
        let moved = block_on(trainable_tensors(&run.model.unet)).unwrap();
        // Every `up` (zero at first) moves; a `down` gets its gradient
        // through `up`, which Prodigy's first step sizes (d from 1e-6) keep
        // too small to move it within 3 steps.
        let ups: Vec<&String> = start.keys().filter(|k| k.ends_with(".up") || k.contains("lora_B") || k.contains("lora_up")).collect();
        assert_eq!(ups.len() * 2, start.len(), "{:?}", start.keys().take(4).collect::<Vec<_>>());
        for key in ups {
            assert_ne!(moved[key], start[key], "{optimizer}: {key} moves in 3 steps");
        }
        let path = block_on(run.save_checkpoint()).unwrap();
        let state = String::from_utf8(storage.read(&format!("{path}/state.json")).unwrap().unwrap()).unwrap();
        assert_eq!(state.contains("prodigy.d"), optimizer == "prodigy", "{state}");
        let rest = train(&mut run, 3);

        let mut resumed = session(&setup, &storage, &device, F32_TARGET);
        resumed.resume("latest").unwrap();
        assert_eq!(train(&mut resumed, 3), rest, "{optimizer}: steps 4-6 after resuming equal the uninterrupted run");
        assert_eq!(block_on(trainable_tensors(&resumed.model.text_encoder)).unwrap(), block_on(trainable_tensors(&run.model.text_encoder)).unwrap());

        let other = setup_with_optimizer_of(&setup, if optimizer == "prodigy" { "adamw" } else { "prodigy" });
        let mut refused = session(&other, &storage, &device, F32_TARGET);
        let error = refused.resume("latest").unwrap_err().to_string();
        assert!(error.contains("this checkpoint was trained with") && error.contains("resume with the same optimizer"), "{error}");
    }
}

/// `use_ema` keeps SimpleTuner's average of the adapters (decay
/// min(t/(t+9), ema_decay) after step t, every ema_update_interval-th
/// step, the first update a copy), resumes it exactly, validates with it
/// beside the trained weights and exports it as a second LoRA.
#[test]
fn ema_follows_simpletuners_decay_resumes_exactly_validates_and_exports() {
    use trainer_core::train::checkpoint::trainable_tensors;
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let setup = setup(
        "MAX_NUM_STEPS=6\nLORA_DROPOUT=0\nUSE_EMA=true\nVALIDATION_PROMPT=a photo of zwx toy\nVALIDATION_RESOLUTION=32\nVALIDATION_NUM_INFERENCE_STEPS=2\nTRAINER_EXTRA_ARGS=\"--ema_decay=0.5 --ema_update_interval=2\"\n",
        false,
    );
    let mut run = session(&setup, &storage, &device, F32_TARGET);
    let described = trainer_core::plan::describe(&run.plan);
    assert!(
        described.contains("EMA: decay 0.5 (rising as t/(t+9) to it), updated every 2 step(s); validation: comparison; exported as a second LoRA"),
        "{described}"
    );
    let mut expected: Option<BTreeMap<String, Vec<f32>>> = None;
    let mut raw = BTreeMap::new();
    for t in 1..=4u64 {
        train(&mut run, 1);
        raw = block_on(trainable_tensors(&run.model.unet)).unwrap().into_iter().map(|(k, v)| (k, v.values)).collect::<BTreeMap<_, _>>();
        if t % 2 != 0 {
            continue;
        }
        let decay = (t as f32 / (t as f32 + 9.0)).min(0.5);
        expected = Some(match expected {
            None => raw.clone(),
            Some(average) => average.iter().map(|(k, a)| (k.clone(), a.iter().zip(&raw[k]).map(|(a, w)| a - (1.0 - decay) * (a - w)).collect())).collect(),
        });
    }
    let expected = expected.unwrap();
    let ema: BTreeMap<String, Vec<f32>> = block_on(run.ema_tensors()).unwrap().unwrap().into_iter().map(|(k, v)| (k, v.values)).collect();
    assert_eq!(ema.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "the EMA averages exactly the adapters");
    let mut apart = 0.0f64;
    for (key, values) in &ema {
        let scale = expected[key].iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let error = values.iter().zip(&expected[key]).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(error <= 1e-5 * scale, "{key}: EMA differs from the formula by {error} (largest value {scale})");
        apart += mean_squared(values, &raw[key]);
    }
    assert!(apart > 0.0, "after step 4 the EMA lags the trained weights");

    // Validation writes the trained and the EMA sample (ema_validation's
    // default, comparison) of the validation prompt and of each prompt of
    // the user_prompt_library.
    run.config.validation_prompts =
        trainer_core::config::parse_prompt_library(r#"{"class": "a photo of a toy", "styled": {"prompt": "zwx toy, watercolour"}}"#).unwrap();
    let written = block_on(run.validate(&mut |_| {})).unwrap();
    let paths: Vec<&str> = written.iter().map(|w| w.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/out/validation/step-000004.png",
            "/out/validation/step-000004-ema.png",
            "/out/validation/step-000004-class.png",
            "/out/validation/step-000004-class-ema.png",
            "/out/validation/step-000004-styled.png",
            "/out/validation/step-000004-styled-ema.png"
        ]
    );
    let captions: Vec<&str> = written.iter().map(|w| w.caption.as_str()).collect();
    assert_eq!(captions[3], "step 4: class (EMA)");
    assert_ne!(written[0].image, written[1].image, "the EMA weights sample differently");
    assert_ne!(written[0].image, written[2].image, "another prompt samples differently");
    run.config.validation_prompts.clear();

    block_on(run.save_checkpoint()).unwrap();
    train(&mut run, 2);
    let mut resumed = session(&setup, &storage, &device, F32_TARGET);
    resumed.resume("latest").unwrap();
    train(&mut resumed, 2);
    assert_eq!(block_on(resumed.ema_tensors()).unwrap(), block_on(run.ema_tensors()).unwrap(), "the EMA resumes exactly");

    // The EMA LoRA is written beside the trained one and merges the same layers.
    let trained = block_on(run.export_lora("lora")).unwrap();
    let averaged = block_on(run.export_lora_ema("lora")).unwrap().expect("use_ema exports the EMA");
    assert_eq!(averaged, "/out/lora-ema.safetensors");
    let (trained_bytes, averaged_bytes) = (storage.read(&trained).unwrap().unwrap(), storage.read(&averaged).unwrap().unwrap());
    assert_ne!(trained_bytes, averaged_bytes);
    let mut merged = fixture_model(&device, WeightDtypes::default());
    let layers = trainer_core::train::export::merge_kohya(&mut merged, &averaged, averaged_bytes, 1.0, &device).unwrap();
    assert_eq!(layers, run.model.unet.adapted_layers().len());
}

/// Masked loss: the subject's loss is weighed by its mask folder's masks
/// (paired by file name; dark = ignored): all dark trains nothing, all
/// light is the unmasked loss exactly, half dark lies between; an image
/// without a mask trains on all of it, and the plan names it.
#[test]
fn masked_loss_weighs_the_subject_loss_by_its_masks() {
    let device = Device::flex();
    let plain = |value: u8| encode_png(&RgbImage::from_pixel(32, 32, Rgb([value, value, value])));
    let half = encode_png(&RgbImage::from_fn(32, 32, |x, _| if x < 16 { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) }));
    let first_steps = |masks: Option<Vec<(&str, Vec<u8>)>>| -> (Vec<f32>, String) {
        let storage = MemoryStorage::default();
        let mut setup = setup("MAX_NUM_STEPS=3\nLORA_DROPOUT=0\n", false);
        if let Some(files) = &masks {
            setup.json = setup.json.replace(r#""id": "subject","#, r#""id": "subject", "conditioning_data": "subject-masks","#).replacen(
                '[',
                r#"[{"id": "subject-masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask", "instance_data_dir": "masks", "resolution": 32},"#,
                1,
            );
            setup.sources.insert("subject-masks".into(), source_with(files));
        }
        let mut run = session(&setup, &storage, &device, F32_TARGET);
        (train(&mut run, 3), trainer_core::plan::describe(&run.plan))
    };
    let (unmasked, _) = first_steps(None);
    let (light, described) = first_steps(Some(vec![("a.png", plain(255)), ("b.jpg", plain(255))]));
    assert_eq!(light, unmasked, "a light mask is no mask");
    assert!(described.contains("loss masks: 'subject-masks' (/cfg/masks): 2 of 2 images have one"), "{described}");
    let (dark, _) = first_steps(Some(vec![("a.png", plain(0)), ("b.png", plain(0))]));
    assert_eq!(dark, [0.0; 3], "a dark mask hides the whole loss");
    let (halves, _) = first_steps(Some(vec![("a.png", half.clone()), ("b.png", half)]));
    assert!(halves[0] > 0.0 && halves[0] < unmasked[0], "half hidden: {halves:?} vs {unmasked:?}");
    let (partly, described) = first_steps(Some(vec![("a.png", plain(0))]));
    assert!(described.contains("1 of 2 images have one") && described.contains("1 without a mask train on the whole image: b.png"), "{described}");
    assert!(partly.iter().any(|l| *l > 0.0), "b.png trains unmasked: {partly:?}");
}

/// `setup` with another optimizer.
fn setup_with_optimizer_of(setup: &Setup, optimizer: &str) -> Setup {
    let mut training = setup.training.clone();
    let other = self::training(&format!("{BASE_ENV}OPTIMIZER={optimizer}\nTRAINER_EXTRA_ARGS=\"--train_text_encoder\"\n"));
    (training.optimizer, training.prodigy, training.adafactor, training.learning_rate) = (other.optimizer, other.prodigy, other.adafactor, other.learning_rate);
    Setup { training, sources: setup.sources.clone(), json: setup.json.clone() }
}

#[test]
fn frozen_base_weights_in_f16_halve_the_memory_and_train_like_f32() {
    use trainer_core::models::layers::stored_bytes;
    let device = Device::flex();
    let setup = setup("MAX_NUM_STEPS=4\nLORA_DROPOUT=0\n", false);
    let (storage32, storage16) = (MemoryStorage::default(), MemoryStorage::default());
    let mut run32 = session(&setup, &storage32, &device, F32_TARGET);
    let mut run16 = session(&setup, &storage16, &device, PlanTarget { has_bf16: false, has_f16: true });
    assert_eq!(run32.plan.precision.frozen_weights, "f32");
    assert_eq!(run16.plan.precision.frozen_weights, "f16");

    // Weight matrices and kernels are f16; norms, biases and the adapters f32.
    let layer = run16.model.unet.adapted_layers()[0];
    assert_eq!(layer.base.weight.val().dtype(), burn::tensor::DType::F16);
    assert_eq!(run16.model.unet.conv_in.base.weight.val().dtype(), burn::tensor::DType::F16);
    assert_eq!(run16.model.unet.conv_in.base.bias.as_ref().unwrap().val().dtype(), burn::tensor::DType::F32);
    assert_eq!(layer.lora.as_ref().unwrap().down.val().dtype(), burn::tensor::DType::F32);
    for (what, small, large) in [
        ("UNet", stored_bytes(&run16.model.unet), stored_bytes(&run32.model.unet)),
        ("VAE", stored_bytes(&run16.model.vae), stored_bytes(&run32.model.vae)),
        ("text encoder", stored_bytes(&run16.model.text_encoder), stored_bytes(&run32.model.text_encoder)),
    ] {
        let ratio = small as f64 / large as f64;
        eprintln!("{what}: {large} bytes in f32, {small} with f16 weights ({ratio:.3})");
        // Tiny models are bias- and norm-heavy (those stay f32): about 0.5 for SD 1.5.
        assert!(ratio < 0.6, "{what}: f16 storage should about halve the weights: {small} vs {large} bytes");
    }

    // Caches made with f16 weights are not mixed with f32 ones (different model identity).
    assert_ne!(run16.model.fingerprints.vae, run32.model.fingerprints.vae);

    // Computing in f32 from f16-stored weights: the fixture's weights are
    // f16-exact, so f32 compute gives the same numbers up to summation
    // order (an f16 computation would differ by ~1e-3).
    let relative = |a: &[f32], b: &[f32]| (mean_squared(a, b) / mean_squared(b, &vec![0.0; b.len()])).sqrt();
    let (losses32, losses16) = (train(&mut run32, 4), train(&mut run16, 4));
    for (a, b) in losses32.iter().zip(&losses16) {
        assert!(((a - b) / a).abs() < 1e-2, "losses differ: f32 {losses32:?} vs f16 weights {losses16:?}");
    }
    let (sample32, sample16) = (latents(&mut run32, "a photo of zwx toy"), latents(&mut run16, "a photo of zwx toy"));
    let difference = relative(&sample16, &sample32);
    eprintln!("losses f32 {losses32:?}, f16 weights {losses16:?}; sampled latents relative L2 difference {difference:.2e}");
    assert!(difference < 2e-2, "samples with f16 base weights differ by {difference:.2e} (relative L2)");

    // The exported LoRA is f32 whatever the base and merges into an f16 model.
    let path = block_on(run16.export_lora("f16-base")).unwrap();
    let bytes = storage16.read(&path).unwrap().unwrap();
    let mut merged = fixture_model(&device, WeightDtypes::all(burn::tensor::DType::F16));
    let layers = trainer_core::train::export::merge_kohya(&mut merged, &path, bytes, 1.0, &device).unwrap();
    assert_eq!(layers, run16.model.unet.adapted_layers().len());
}

#[test]
fn text_encoder_lora_trains_resumes_and_exports_kohya_te_keys() {
    let device = Device::flex();
    let storage = MemoryStorage::default();
    // SimpleTuner's env files pass these through TRAINER_EXTRA_ARGS; parent
    // prediction makes the class batches use the base encoder's context.
    let setup = setup(
        "MAX_NUM_STEPS=6\nLORA_DROPOUT=0.1\nREGULARISATION_MODE=parent_prediction\nTRAINER_EXTRA_ARGS=\"--train_text_encoder --text_encoder_lr=1e-2\"\n",
        true,
    );
    assert!(setup.training.train_text_encoder);
    let mut run = session(&setup, &storage, &device, F32_TARGET);
    let text_layers = run.model.text_encoder.encoder.layers.len();
    assert_eq!(run.model.text_encoder.adapted_layers().len(), 4 * text_layers, "q, k, v and out_proj of every layer");
    let prompt = "a photo of zwx toy";
    let base_context = fixture_model(&device, WeightDtypes::default()).encode_prompts(&[prompt], &device).unwrap();

    train(&mut run, 3);
    block_on(run.save_checkpoint()).unwrap();
    let rest = train(&mut run, 3);
    let moved: f32 = run.model.text_encoder.adapted_layers().iter().map(|l| l.lora.as_ref().unwrap().up.val().abs().sum().into_scalar::<f32>()).sum();
    assert!(moved > 0.0, "the text encoder's adapters must train");

    // Resuming restores the text encoder's adapters and moments too.
    let mut resumed = session(&setup, &storage, &device, F32_TARGET);
    resumed.resume("latest").unwrap();
    assert_eq!(train(&mut resumed, 3), rest, "steps 4-6 after resuming equal the uninterrupted run");

    // The kohya file names the text-encoder layers as kohya does, and merged
    // into a fresh model it samples what the trained adapters sample.
    let path = block_on(run.export_lora("te-lora")).unwrap();
    let bytes = storage.read(&path).unwrap().unwrap();
    let tensors = trainer_core::train::tensor_file::read(&path, bytes.clone()).unwrap();
    assert!(tensors.contains_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"), "{:?}", tensors.keys().take(5).collect::<Vec<_>>());
    assert_eq!(tensors.keys().filter(|k| k.starts_with("lora_te_") && k.ends_with(".alpha")).count(), 4 * text_layers);
    let mut merged = fixture_model(&device, WeightDtypes::default());
    let layers = trainer_core::train::export::merge_kohya(&mut merged, &path, bytes, 1.0, &device).unwrap();
    assert_eq!(layers, run.model.unet.adapted_layers().len() + 4 * text_layers);

    let values = |t: burn::tensor::Tensor<3>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let relative = |a: &[f32], b: &[f32]| (mean_squared(a, b) / mean_squared(b, &vec![0.0; b.len()])).sqrt();
    let merged_context = values(merged.encode_prompts(&[prompt], &device).unwrap());
    let text_change = relative(&merged_context, &values(base_context));
    assert!(text_change > 1e-5, "the merged text encoder must differ from the base: {text_change:.2e}");
    let trained = latents(&mut run, prompt);
    let from_file = merged.generate(&request(prompt), None, &device, &mut |_, _| {}).unwrap().latents;
    let from_file: Vec<f32> = from_file.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let difference = relative(&from_file, &trained);
    eprintln!("text context moved {text_change:.2e} from the base; merged vs adapter samples differ by {difference:.2e}");
    assert!(difference < 1e-4, "merged samples differ from the adapters' by {difference:.2e} (relative L2)");
}

/// SDXL with both text encoders training: kohya's `lora_te1_`/`lora_te2_`
/// names, exact resume, and the exported file merged into a fresh model
/// samples what the adapters sample.
#[test]
fn sdxl_lora_with_both_text_encoders_trains_resumes_and_exports() {
    let device = Device::flex();
    let storage = MemoryStorage::default();
    let env = "MAX_NUM_STEPS=4\nLORA_DROPOUT=0.1\nREGULARISATION_MODE=mixed\nTRAINER_EXTRA_ARGS=\"--train_text_encoder --text_encoder_lr=1e-2\"\n";
    let mut setup = setup(env, false);
    setup.training = training(&format!("{}{env}", BASE_ENV.replace("MODEL_FAMILY=sd1x", "MODEL_FAMILY=sdxl")));
    let mut run = session_on(&setup, &storage, &device, F32_TARGET, "sdxl");
    let layers_1 = run.model.text_encoder.encoder.layers.len();
    let layers_2 = run.model.text_encoder_2.as_ref().unwrap().encoder.layers.len();
    assert_eq!(run.model.text_encoder_2.as_ref().unwrap().adapted_layers().len(), 4 * layers_2);

    train(&mut run, 2);
    block_on(run.save_checkpoint()).unwrap();
    let rest = train(&mut run, 2);
    let moved: f32 =
        run.model.text_encoder_2.as_ref().unwrap().adapted_layers().iter().map(|l| l.lora.as_ref().unwrap().up.val().abs().sum().into_scalar::<f32>()).sum();
    assert!(moved > 0.0, "the second encoder's adapters must train");
    let mut resumed = session_on(&setup, &storage, &device, F32_TARGET, "sdxl");
    resumed.resume("latest").unwrap();
    assert_eq!(train(&mut resumed, 2), rest, "steps 3-4 after resuming equal the uninterrupted run");

    let path = block_on(run.export_lora("sdxl-te")).unwrap();
    let bytes = storage.read(&path).unwrap().unwrap();
    let tensors = trainer_core::train::tensor_file::read(&path, bytes.clone()).unwrap();
    let count = |prefix: &str| tensors.keys().filter(|k| k.starts_with(prefix) && k.ends_with(".alpha")).count();
    assert_eq!((count("lora_te1_"), count("lora_te2_")), (4 * layers_1, 4 * layers_2));
    assert!(tensors.contains_key("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"));
    let mut merged = fixture_model_of("sdxl", &device, WeightDtypes::default());
    let merged_layers = trainer_core::train::export::merge_kohya(&mut merged, &path, bytes, 1.0, &device).unwrap();
    assert_eq!(merged_layers, run.model.unet.adapted_layers().len() + 4 * (layers_1 + layers_2));

    let prompt = "a photo of zwx toy";
    let trained = latents(&mut run, prompt);
    let from_file: Vec<f32> =
        merged.generate(&request(prompt), None, &device, &mut |_, _| {}).unwrap().latents.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let relative = (mean_squared(&from_file, &trained) / mean_squared(&trained, &vec![0.0; trained.len()])).sqrt();
    eprintln!("SDXL: merged vs adapter samples differ by {relative:.2e}");
    assert!(relative < 1e-4, "merged samples differ from the adapters' by {relative:.2e} (relative L2)");
}
