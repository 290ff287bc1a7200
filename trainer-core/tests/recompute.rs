//! Gradient checkpointing by stage computes the gradients of one backward
//! pass over the whole UNet: every trained parameter, including the time
//! embedding (full fine-tune), LoRA adapters with dropout, and text-encoder
//! adapters reached through the context and SDXL's pooled embedding.
//! (training.rs checks that a run gives the same losses with and without it.)

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, DeviceKind, Tensor};
use trainer_core::models::clip::ClipTextModel;
use trainer_core::models::lora::{DropoutSource, LoraLinear, LoraTargets};
use trainer_core::models::unet::AddedConditions;
use trainer_core::models::{DiskFolder, StableDiffusion, WeightDtypes};
use trainer_core::pipeline::gaussian_noise;
use trainer_core::rng::SeededRng;
use trainer_core::train::optimizer::{frozen_on, trainable_on, AdamWSettings, Optimizer, Rule, ToTrainDevice};
use trainer_core::train::recompute::backward_in_stages;

fn fixture(family: &str, device: &Device) -> StableDiffusion {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family).join("diffusers");
    StableDiffusion::from_folder_with(&DiskFolder { root }, device, WeightDtypes::default()).unwrap()
}

/// Counts a module's float tensors.
struct TensorCount(usize);

impl ModuleVisitor for TensorCount {
    fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
        self.0 += 1;
    }
}

/// Attaches adapters whose `up` is random too (a fresh adapter's is zero,
/// which would leave `down` without gradient).
fn attach_random(layers: Vec<&mut LoraLinear>, targets: &LoraTargets, text: bool, dropout: &DropoutSource, device: &Device) {
    let mut rng = SeededRng::new(11);
    for layer in layers {
        let wanted = if text { targets.matches_text(&layer.path) } else { targets.matches(&layer.path) };
        if !wanted {
            continue;
        }
        layer.attach(4, 4.0, 3, Some(dropout.clone()), device);
        let out = layer.dims()[1];
        let up = gaussian_noise([4, out, 1, 1], &mut rng, &device.clone().without_autodiff()).reshape([4, out]) * 0.1;
        layer.lora.as_mut().unwrap().up = Param::from_tensor(trainable_on(up, device));
    }
}

fn encoders(model: &StableDiffusion) -> Vec<(&'static str, &ClipTextModel)> {
    let mut all = vec![("text_encoder.", &model.text_encoder)];
    all.extend(model.text_encoder_2.as_ref().map(|e| ("text_encoder_2.", e)));
    all
}

/// The gradients of one loss, from one backward pass or stage by stage.
fn gradients(model: &StableDiffusion, dropout: &DropoutSource, train_device: &Device, staged: bool) -> (f32, BTreeMap<String, Vec<f32>>) {
    let plain_device = train_device.clone().without_autodiff();
    let mut rng = SeededRng::new(5);
    dropout.start_step(1, 0, 0);
    let conditioning = model.encode_conditioning(&["a photo of zwx toy", "a photo of a ball"], train_device).unwrap();
    let latents = frozen_on(gaussian_noise([2, 4, 8, 8], &mut rng, &plain_device), train_device);
    let target = frozen_on(gaussian_noise([2, 4, 8, 8], &mut rng, &plain_device), train_device);
    let added = conditioning.pooled.map(|pooled| AddedConditions { pooled, time_ids: vec![[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]; 2] });
    let timesteps = [100.0, 700.0];
    let loss_of = |prediction: Tensor<4>| (prediction - target.clone()).square().mean() * 3.0;
    let mut optimizer = Optimizer::new(Rule::AdamW(AdamWSettings { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0, bf16: false }), 0.0);
    let mut collect = |grads: &mut burn::tensor::Gradients| {
        optimizer.accumulate(&model.unet, "", grads, 1.0);
        for (prefix, encoder) in encoders(model) {
            optimizer.accumulate(encoder, prefix, grads, 1.0);
        }
    };
    dropout.begin_forward();
    let loss = if staged {
        backward_in_stages(&model.unet, latents, &timesteps, conditioning.context, added.as_ref(), train_device, &loss_of, &mut collect)
    } else {
        let loss = loss_of(model.unet.forward_with(latents, &timesteps, conditioning.context, added.as_ref()));
        collect(&mut loss.backward());
        loss.without_autodiff()
    };
    let grads = optimizer.gradients().iter().map(|(path, g)| (path.clone(), g.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap())).collect();
    (loss.into_scalar::<f32>(), grads)
}

/// Compares each gradient with relative error max|a - b| / max|a| ≤ `tolerance`.
fn assert_same_gradients(plain: &BTreeMap<String, Vec<f32>>, staged: &BTreeMap<String, Vec<f32>>, expected_count: usize, tolerance: f32) {
    assert_eq!(plain.keys().collect::<Vec<_>>(), staged.keys().collect::<Vec<_>>(), "the same parameters get gradients");
    assert_eq!(plain.len(), expected_count, "every trained parameter gets a gradient");
    for (path, a) in plain {
        let b = &staged[path];
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let error = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0, "{path}: zero gradient (the test would not see an error)");
        assert!(error <= tolerance * scale, "{path}: staged gradient differs by {error} (largest value {scale})");
    }
}

/// On the CPU backend (relative tolerance 1e-4) and on wgpu (lavapipe in
/// CI, or the best adapter with BURNBOOTH_TEST_WGPU=gpu; 1e-3, as its
/// reductions sum in another order).
#[test]
fn staged_backward_matches_one_backward_full_unet_and_text_encoder_lora() {
    let wgpu = match std::env::var("BURNBOOTH_TEST_WGPU").as_deref() {
        Ok("gpu") => DeviceKind::DefaultDevice,
        _ => DeviceKind::Cpu,
    };
    for (device, tolerance) in [(Device::flex(), 1e-4), (Device::wgpu(wgpu), 1e-3)] {
        let train_device = device.clone().autodiff();
        let mut model = fixture("sd1", &device);
        let dropout = DropoutSource::new(0.25);
        model.unet = model.unet.map(&mut ToTrainDevice { device: &train_device, trainable: true });
        let mut encoder = model.text_encoder.map(&mut ToTrainDevice { device: &train_device, trainable: false });
        attach_random(encoder.lora_layers_mut(), &LoraTargets::attention(), true, &dropout, &train_device);
        model.text_encoder = encoder;
        let mut unet_tensors = TensorCount(0);
        model.unet.visit(&mut unet_tensors);
        let text_adapters = model.text_encoder.adapted_layers().len();
        let (loss_plain, plain) = gradients(&model, &dropout, &train_device, false);
        let (loss_staged, staged) = gradients(&model, &dropout, &train_device, true);
        assert!((loss_plain - loss_staged).abs() <= tolerance * loss_plain.abs(), "{device:?}: {loss_plain} vs {loss_staged}");
        assert!(plain.keys().any(|p| p.starts_with("time_embedding.")), "the time embedding trains");
        assert_same_gradients(&plain, &staged, unet_tensors.0 + 2 * text_adapters, tolerance);
    }
}

#[test]
fn staged_backward_matches_one_backward_sdxl_lora_with_dropout_and_both_text_encoders() {
    let device = Device::flex();
    let train_device = device.clone().autodiff();
    let mut model = fixture("sdxl", &device);
    let dropout = DropoutSource::new(0.25);
    let mut unet = model.unet.map(&mut ToTrainDevice { device: &train_device, trainable: false });
    attach_random(unet.lora_layers_mut(), &LoraTargets::all_linear(), false, &dropout, &train_device);
    model.unet = unet;
    for encoder in [&mut model.text_encoder, model.text_encoder_2.as_mut().unwrap()] {
        let mut on_device = encoder.clone().map(&mut ToTrainDevice { device: &train_device, trainable: false });
        attach_random(on_device.lora_layers_mut(), &LoraTargets::attention(), true, &dropout, &train_device);
        *encoder = on_device;
    }
    let adapters = model.unet.adapted_layers().len();
    let text_adapters: usize = encoders(&model).iter().map(|(_, e)| e.adapted_layers().len()).sum();
    let (loss_plain, plain) = gradients(&model, &dropout, &train_device, false);
    let (loss_staged, staged) = gradients(&model, &dropout, &train_device, true);
    assert!((loss_plain - loss_staged).abs() <= 1e-5 * loss_plain.abs(), "{loss_plain} vs {loss_staged}");
    assert!(plain.keys().any(|p| p.starts_with("text_encoder_2.")), "the pooled embedding's encoder trains");
    // SDXL's context is the encoders' penultimate layer: the first
    // encoder's last layer (4 adapters) feeds nothing.
    let unused =
        plain.keys().filter(|p| p.starts_with(&format!("text_encoder.text_model.encoder.layers.{}.", model.text_encoder.encoder.layers.len() - 1))).count();
    assert_eq!(unused, 0, "the first encoder's last layer must get no gradient");
    assert_same_gradients(&plain, &staged, 2 * (adapters + text_adapters - 4), 1e-4);
}
