//! Every model component against PyTorch (diffusers/transformers) on the
//! tiny SD 1.x and SD 2.x fixtures written by scripts/make_fixtures.py, on
//! the CPU backend (flex) and on wgpu (lavapipe in CI).
//!
//! Tolerance: relative L2 error `‖got − want‖ / ‖want‖`, 1e-4 on the CPU
//! backend and 1e-3 on wgpu, for every tensor compared.

use std::path::PathBuf;

use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use trainer_core::models::safetensors_file::SafetensorsFile;
use trainer_core::models::{read_folder_configs, DiskFolder, Family, StableDiffusion};
use trainer_core::pipeline::GenerateRequest;
use trainer_core::schedulers::SamplerKind;

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(family)
}

fn reference(family: &str) -> SafetensorsFile {
    SafetensorsFile::open(fixture(family).join("reference.safetensors").to_str().unwrap()).unwrap()
}

/// The CPU backend, and wgpu: on a CPU Vulkan adapter (lavapipe, what CI
/// has) unless BURNBOOTH_TEST_WGPU=gpu picks the best adapter.
fn devices() -> Vec<(&'static str, Device, f64)> {
    let kind = match std::env::var("BURNBOOTH_TEST_WGPU").as_deref() {
        Ok("gpu") => DeviceKind::DefaultDevice,
        _ => DeviceKind::Cpu,
    };
    vec![("flex", Device::flex(), 1e-4), ("wgpu", Device::wgpu(kind), 1e-3)]
}

fn tensor<const D: usize>(file: &SafetensorsFile, name: &str, device: &Device) -> Tensor<D> {
    let shape: [usize; D] = file.info(name).unwrap().shape.clone().try_into().unwrap();
    Tensor::from_data(TensorData::new(file.to_f32(name).unwrap(), shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Relative L2 error and largest absolute difference.
fn compare(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "sizes differ");
    let (mut diff, mut norm, mut max) = (0.0f64, 0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        let d = (*g as f64 - *w as f64).abs();
        diff += d * d;
        norm += (*w as f64) * (*w as f64);
        max = max.max(d);
    }
    ((diff / norm.max(1e-30)).sqrt(), max)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f64) {
    let (relative, max) = compare(got, want);
    assert!(relative <= tolerance, "{what}: relative error {relative:.2e} (max abs {max:.2e}) over {tolerance:.0e}");
}

fn load(family: &str, device: &Device) -> StableDiffusion {
    StableDiffusion::from_folder(&DiskFolder { root: fixture(family).join("diffusers") }, device).unwrap()
}

fn load_single(family: &str, device: &Device) -> StableDiffusion {
    let file = SafetensorsFile::open(fixture(family).join("single_file.safetensors").to_str().unwrap()).unwrap();
    let configs = read_folder_configs(&DiskFolder { root: fixture(family).join("diffusers") }).unwrap();
    StableDiffusion::from_single_file(&file, Some(configs), device).unwrap()
}

fn ids(file: &SafetensorsFile, device: &Device) -> Tensor<2, Int> {
    let values = file.to_i64("text.input_ids").unwrap();
    let rows = values.len() / 77;
    Tensor::from_data(TensorData::new(values, [rows, 77]), device)
}

#[test]
fn text_encoders_match_transformers() {
    for family in ["sd1", "sd2"] {
        let reference = reference(family);
        for (name, device, tolerance) in devices() {
            let model = load(family, &device);
            let ids = ids(&reference, &device);
            let out = model.text_encoder.forward(ids.clone());
            let want = reference.to_f32("text.last_hidden_state").unwrap();
            assert_close(&format!("{family} {name} last_hidden_state"), &values(out.last_hidden_state), &want, tolerance);
            if family == "sd1" {
                let skipped = model.text_encoder.encode_with_clip_skip(ids, 1);
                assert_close(&format!("{family} {name} clip_skip 1"), &values(skipped), &reference.to_f32("text.clip_skip_1").unwrap(), tolerance);
            }
        }
    }
}

#[test]
fn vae_matches_diffusers() {
    for family in ["sd1", "sd2"] {
        let reference = reference(family);
        for (name, device, tolerance) in devices() {
            let model = load(family, &device);
            let posterior = model.vae.encode(tensor(&reference, "vae.input", &device));
            assert_close(&format!("{family} {name} posterior mean"), &values(posterior.mean), &reference.to_f32("vae.posterior_mean").unwrap(), tolerance);
            assert_close(
                &format!("{family} {name} posterior logvar"),
                &values(posterior.logvar),
                &reference.to_f32("vae.posterior_logvar").unwrap(),
                tolerance,
            );
            let decoded = model.vae.decode(tensor(&reference, "vae.decode_input", &device));
            assert_close(&format!("{family} {name} decode"), &values(decoded), &reference.to_f32("vae.decoded").unwrap(), tolerance);
        }
    }
}

#[test]
fn unet_matches_diffusers() {
    for family in ["sd1", "sd2"] {
        let reference = reference(family);
        for (name, device, tolerance) in devices() {
            let model = load(family, &device);
            let timesteps: Vec<f32> = reference.to_i64("unet.timesteps").unwrap().iter().map(|t| *t as f32).collect();
            let out = model.unet.forward(tensor(&reference, "unet.sample", &device), &timesteps, tensor(&reference, "unet.context", &device));
            assert_close(&format!("{family} {name} unet"), &values(out), &reference.to_f32("unet.output").unwrap(), tolerance);
        }
    }
}

#[test]
fn whole_sampling_runs_match_diffusers() {
    // SDXL's run has an empty negative prompt: its unconditional input is zeros.
    for family in ["sd1", "sd2", "sdxl"] {
        let reference = reference(family);
        let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture(family).join("reference.json")).unwrap()).unwrap();
        let run = &run["sampling"];
        for (name, device, tolerance) in devices() {
            let model = load(family, &device);
            for sampler in [SamplerKind::Ddim, SamplerKind::Euler] {
                let request = GenerateRequest {
                    prompt: run["prompt"].as_str().unwrap().into(),
                    negative_prompt: run["negative_prompt"].as_str().unwrap().into(),
                    steps: run["steps"].as_u64().unwrap() as usize,
                    guidance: run["guidance"].as_f64().unwrap(),
                    sampler,
                    seed: 0,
                    width: run["width"].as_u64().unwrap() as usize,
                    height: run["height"].as_u64().unwrap() as usize,
                };
                let init = tensor(&reference, "sampling.init_latents", &device);
                let out = model.generate(&request, Some(init), &device, &mut |_, _| {}).unwrap();
                let key = sampler.name();
                assert_close(
                    &format!("{family} {name} {key} latents"),
                    &values(out.latents),
                    &reference.to_f32(&format!("sampling.{key}.latents")).unwrap(),
                    tolerance * 10.0,
                );
                let (relative, max) = compare(&values(out.image), &reference.to_f32(&format!("sampling.{key}.image")).unwrap());
                println!("{family} {name} {key}: image relative error {relative:.2e}, max per-pixel error {max:.2e} (of 1.0)");
                assert!(max < 1e-3, "{family} {name} {key}: per-pixel error {max:.2e}");
            }
        }
    }
}

#[test]
fn single_file_loads_the_same_model_as_the_folder() {
    for family in ["sd1", "sd2"] {
        let reference = reference(family);
        let device = Device::flex();
        let folder = load(family, &device);
        let single = load_single(family, &device);
        assert_eq!(single.family, if family == "sd1" { Family::Sd1 } else { Family::Sd2 });
        let timesteps = [10.0, 981.0];
        let a = folder.unet.forward(tensor(&reference, "unet.sample", &device), &timesteps, tensor(&reference, "unet.context", &device));
        let b = single.unet.forward(tensor(&reference, "unet.sample", &device), &timesteps, tensor(&reference, "unet.context", &device));
        assert_close(&format!("{family} unet"), &values(b), &values(a), 1e-6);
        let ids = ids(&reference, &device);
        let a = folder.text_encoder.forward(ids.clone()).last_hidden_state;
        let b = single.text_encoder.forward(ids).last_hidden_state;
        assert_close(&format!("{family} text"), &values(b), &values(a), 1e-6);
        let latents = tensor(&reference, "vae.decode_input", &device);
        assert_close(&format!("{family} vae"), &values(single.vae.decode(latents.clone())), &values(folder.vae.decode(latents)), 1e-6);
        // The bundled vocabulary tokenizes like the folder's.
        assert_eq!(single.tokenizer.encode("a photo of sks dog").unwrap(), folder.tokenizer.encode("a photo of sks dog").unwrap());
    }
}

/// Writing a loaded model back as a single file gives the source file's
/// tensors under the source's names, bit for bit (both f32): SD 1.x's CLIP,
/// SD 2.x's OpenCLIP with q/k/v packed into `in_proj`, SDXL's two encoders
/// (the second's projection transposed back). SD 2.x files keep
/// an unused last text block, `text_projection` and `logit_scale`, which the
/// model never loads, so the export leaves them out.
#[test]
fn single_file_export_writes_back_the_source_tensors() {
    use trainer_core::train::full_export::single_file_checkpoint;
    use trainer_core::train::tensor_file;
    let device = Device::flex();
    for family in ["sd1", "sd2", "sdxl"] {
        let source = SafetensorsFile::open(fixture(family).join("single_file.safetensors").to_str().unwrap()).unwrap();
        let model = load_single(family, &device);
        let exported = tensor_file::read("export", trainer_core::block_on(single_file_checkpoint(&model)).unwrap()).unwrap();
        let layers = model.configs.text.num_hidden_layers;
        // SD 2.x only: the unused last block, projection and logit scale.
        let sd2_unused = |name: &str| {
            name.starts_with("cond_stage_model.model.")
                && (name.ends_with("text_projection") || name.ends_with("logit_scale") || name.contains(&format!("transformer.resblocks.{layers}.")))
        };
        let not_loaded = |name: &str| name.ends_with("position_ids") || sd2_unused(name);
        let mut expected: Vec<String> = source.names().filter(|n| !not_loaded(n)).map(str::to_string).collect();
        expected.sort();
        let written: Vec<String> = exported.keys().cloned().collect();
        assert_eq!(written, expected, "{family}: the export's tensor names");
        for (name, tensor) in &exported {
            assert_eq!(tensor.shape, source.info(name).unwrap().shape, "{family}: shape of {name}");
            assert!(tensor.values == source.to_f32(name).unwrap(), "{family}: values of {name} differ");
        }
        let skipped = source.names().count() - expected.len();
        eprintln!("{family}: {} tensors written back unchanged ({skipped} of the source not loaded)", written.len());
    }
}

/// SDXL's conditioning: both encoders' penultimate hidden states (8 + 12
/// channels in the fixture, so the order is checked), the second's pooled
/// projection, each with its own tokenizer (padding differs).
#[test]
fn sdxl_text_encoders_and_prompt_conditioning_match_diffusers() {
    let reference = reference("sdxl");
    for (name, device, tolerance) in devices() {
        let model = load("sdxl", &device);
        assert_eq!(model.family, Family::Sdxl);
        let prompts = ["a photo of sks dog", "", "a cat 🐱 wearing a hat 🎩 and 👩‍🚀 emoji"];
        for (key, tokenizer, encoder) in
            [("text", &model.tokenizer, &model.text_encoder), ("text2", model.tokenizer_2.as_ref().unwrap(), model.text_encoder_2.as_ref().unwrap())]
        {
            let want_ids = reference.to_i64(&format!("{key}.input_ids")).unwrap();
            let ids: Vec<i64> = prompts.iter().flat_map(|p| tokenizer.encode(p).unwrap()).map(|i| i as i64).collect();
            assert_eq!(ids, want_ids, "{key} token ids");
            let out = encoder.forward(Tensor::from_data(TensorData::new(ids, [3, 77]), &device));
            let penultimate = out.hidden_states[out.hidden_states.len() - 2].clone();
            assert_close(&format!("sdxl {name} {key} penultimate"), &values(penultimate), &reference.to_f32(&format!("{key}.penultimate")).unwrap(), tolerance);
            if key == "text2" {
                assert_close(&format!("sdxl {name} pooled"), &values(out.text_embeds.unwrap()), &reference.to_f32("text2.text_embeds").unwrap(), tolerance);
            }
        }
        let conditioning = model.encode_conditioning(&["a photo of sks dog"], &device).unwrap();
        assert_close(&format!("sdxl {name} prompt embeds"), &values(conditioning.context), &reference.to_f32("prompt.embeds").unwrap(), tolerance);
        assert_close(&format!("sdxl {name} pooled prompt"), &values(conditioning.pooled.unwrap()), &reference.to_f32("prompt.pooled").unwrap(), tolerance);
    }
}

#[test]
fn sdxl_unet_with_added_conditions_matches_diffusers() {
    use trainer_core::models::unet::AddedConditions;
    let reference = reference("sdxl");
    for (name, device, tolerance) in devices() {
        let model = load("sdxl", &device);
        let timesteps: Vec<f32> = reference.to_i64("unet.timesteps").unwrap().iter().map(|t| *t as f32).collect();
        let ids = reference.to_f32("unet.time_ids").unwrap();
        let added =
            AddedConditions { pooled: tensor(&reference, "unet.text_embeds", &device), time_ids: ids.chunks(6).map(|c| c.try_into().unwrap()).collect() };
        let out = model.unet.forward_with(tensor(&reference, "unet.sample", &device), &timesteps, tensor(&reference, "unet.context", &device), Some(&added));
        assert_close(&format!("sdxl {name} unet"), &values(out), &reference.to_f32("unet.output").unwrap(), tolerance);
    }
}

/// An SGM single file (`conditioner.embedders.0/1`, OpenCLIP's packed
/// q/k/v and transposed projection) gives the folder's model: same
/// conditioning, and the same sampling run bit for bit.
#[test]
fn sdxl_single_file_loads_the_same_model_as_the_folder() {
    let device = Device::flex();
    let folder = load("sdxl", &device);
    let single = load_single("sdxl", &device);
    assert_eq!(single.family, Family::Sdxl);
    let prompts = ["a photo of sks dog", ""];
    let a = folder.encode_conditioning(&prompts, &device).unwrap();
    let b = single.encode_conditioning(&prompts, &device).unwrap();
    assert_close("sdxl single-file context", &values(b.context), &values(a.context), 1e-6);
    assert_close("sdxl single-file pooled", &values(b.pooled.unwrap()), &values(a.pooled.unwrap()), 1e-6);
    let request = GenerateRequest {
        prompt: "a photo of sks dog".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        guidance: 5.0,
        sampler: SamplerKind::Euler,
        seed: 4,
        width: 16,
        height: 16,
    };
    let a = folder.generate(&request, None, &device, &mut |_, _| {}).unwrap();
    let b = single.generate(&request, None, &device, &mut |_, _| {}).unwrap();
    assert_close("sdxl single-file sampling", &values(b.image), &values(a.image), 1e-6);
}

/// Tiled decoding and encoding (diffusers' enable_tiling, 16-pixel tiles on
/// the tiny VAE, whose downscale factor is 2) against diffusers' own tiled
/// output, on a non-square latent and image so edge tiles are narrower.
#[test]
fn vae_tiling_matches_diffusers() {
    use trainer_core::models::vae::VaeTiling;
    let reference = SafetensorsFile::open(fixture("sd1").join("vae_tiling.safetensors").to_str().unwrap()).unwrap();
    let tiling = Some(VaeTiling { tile_sample_size: 16, overlap: 0.25 });
    for (name, device, tolerance) in devices() {
        let model = load("sd1", &device);
        let config = &model.configs.vae;
        let latents = tensor::<4>(&reference, "latents", &device);
        let tiled = values(model.vae.decode_tiled(latents.clone(), config, tiling));
        assert_close(&format!("{name} tiled decode"), &tiled, &reference.to_f32("decoded_tiled").unwrap(), tolerance);
        let whole = values(model.vae.decode_tiled(latents, config, None));
        assert_close(&format!("{name} untiled decode"), &whole, &reference.to_f32("decoded_untiled").unwrap(), tolerance);
        let image = tensor::<4>(&reference, "image", &device);
        let posterior = model.vae.encode_tiled(image, config, tiling);
        assert_close(&format!("{name} tiled encode mean"), &values(posterior.mean), &reference.to_f32("mean_tiled").unwrap(), tolerance);
        assert_close(&format!("{name} tiled encode logvar"), &values(posterior.logvar), &reference.to_f32("logvar_tiled").unwrap(), tolerance);
    }
}
