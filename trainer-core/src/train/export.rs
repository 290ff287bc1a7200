//! LoRA files in kohya's format (docs/reference.md §4): what
//! ComfyUI, A1111/Forge and diffusers all load.
//!
//! `lora_unet_<diffusers module path with _>.lora_down.weight` `[rank, in]`,
//! `.lora_up.weight` `[out, rank]` and `.alpha` (a scalar), so that
//! `W' = W + multiplier * (alpha / rank) * up @ down`. Text-encoder layers
//! use `lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|...|mlp_fc2>`.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor};

use super::tensor_file::{self, HostTensor};
use crate::error::{Error, Result};
use crate::models::layers::{in_dtype, Linear};
use crate::models::lora::{kohya_text_name, kohya_unet_name};
use crate::models::single_file::{unet_name, UNET_PREFIX};
use crate::models::{Family, StableDiffusion};

/// The kohya tensors of every adapter in the UNet and the text encoder.
pub async fn kohya_tensors(model: &StableDiffusion) -> Result<BTreeMap<String, HostTensor>> {
    let mut tensors = BTreeMap::new();
    // kohya: `lora_te_` for SD 1.x/2.x's one encoder, `lora_te1_`/`lora_te2_` for SDXL's two.
    let first_prefix = if model.text_encoder_2.is_some() { "lora_te1_" } else { "lora_te_" };
    let unet = model.unet.adapted_layers().into_iter().map(|l| (unet_lora_name(model, &l.path), l));
    let text = model.text_encoder.adapted_layers().into_iter().map(|l| (kohya_text_name(first_prefix, &l.path), l));
    let text_2 = model.text_encoder_2.iter().flat_map(|e| e.adapted_layers()).map(|l| (kohya_text_name("lora_te2_", &l.path), l));
    for (name, layer) in unet.chain(text).chain(text_2) {
        let lora = layer.lora.as_ref().expect("adapted");
        let down = lora.down.val().without_autodiff().transpose();
        let up = lora.up.val().without_autodiff().transpose();
        tensors.insert(format!("{name}.lora_down.weight"), HostTensor::from_tensor(down).await?);
        tensors.insert(format!("{name}.lora_up.weight"), HostTensor::from_tensor(up).await?);
        tensors.insert(format!("{name}.alpha"), HostTensor { shape: vec![], values: vec![lora.alpha as f32] });
    }
    Ok(tensors)
}

/// The kohya name of a UNet layer: its diffusers path for SD 1.x/2.x (as
/// sd-scripts writes them), its SGM path for SDXL (sd-scripts' SDXL UNet is
/// the original one: `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`).
pub fn unet_lora_name(model: &StableDiffusion, path: &str) -> String {
    if model.family != Family::Sdxl {
        return kohya_unet_name(path);
    }
    let ldm = unet_name(&format!("{path}.weight"), &model.configs.unet);
    let sgm = ldm.strip_prefix(UNET_PREFIX).and_then(|n| n.strip_suffix(".weight")).unwrap_or(&ldm);
    format!("lora_unet_{}", sgm.replace('.', "_"))
}

/// A kohya LoRA file with `ss_*` / `modelspec.*` metadata (plus `extra`).
pub async fn kohya_file(model: &StableDiffusion, extra: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let tensors = kohya_tensors(model).await?;
    let layers = model.unet.adapted_layers();
    let first =
        layers.first().and_then(|l| l.lora.as_ref()).ok_or_else(|| Error::Training { step: 0, message: "the model has no LoRA adapters to export".into() })?;
    let (version, architecture, v2) = match (model.family, model.configs.scheduler.prediction_type) {
        (crate::models::Family::Sd1, _) => ("sd_v1", "stable-diffusion-v1/lora", "False"),
        (crate::models::Family::Sd2, crate::models::config::PredictionType::VPrediction) => ("sd_2.0", "stable-diffusion-v2-768-v/lora", "True"),
        (crate::models::Family::Sd2, _) => ("sd_2.0", "stable-diffusion-v2-512/lora", "True"),
        (crate::models::Family::Sdxl, _) => ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
    };
    let mut metadata = BTreeMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), first.rank().to_string()),
        ("ss_network_alpha".to_string(), format_alpha(first.alpha)),
        ("ss_base_model_version".to_string(), version.to_string()),
        ("ss_v2".to_string(), v2.to_string()),
        ("modelspec.sai_model_spec".to_string(), "1.0.0".to_string()),
        ("modelspec.architecture".to_string(), architecture.to_string()),
        ("modelspec.implementation".to_string(), "diffusers".to_string()),
        ("burnbooth.format".to_string(), "kohya".to_string()),
    ]);
    metadata.extend(extra.clone());
    tensor_file::write(&tensors, &metadata)
}

fn format_alpha(alpha: f64) -> String {
    if alpha.fract() == 0.0 {
        format!("{alpha:.1}")
    } else {
        alpha.to_string()
    }
}

/// One module's LoRA in a kohya file.
struct KohyaModule {
    down: Option<HostTensor>,
    up: Option<HostTensor>,
    alpha: Option<f32>,
}

/// Folds a kohya LoRA file into the model's weights with `multiplier`.
/// Every module of the file must match a layer of the model; all that do
/// not are listed in the error.
pub fn merge_kohya(model: &mut StableDiffusion, path: &str, bytes: Vec<u8>, multiplier: f64, device: &Device) -> Result<usize> {
    let tensors = tensor_file::read(path, bytes)?;
    let mut modules: BTreeMap<String, KohyaModule> = BTreeMap::new();
    let mut problems = Vec::new();
    for (name, tensor) in tensors {
        let Some((module, part)) = name.split_once('.') else {
            problems.push(format!("unexpected tensor '{name}'"));
            continue;
        };
        let entry = modules.entry(module.to_string()).or_insert(KohyaModule { down: None, up: None, alpha: None });
        match part {
            "lora_down.weight" => entry.down = Some(tensor),
            "lora_up.weight" => entry.up = Some(tensor),
            "alpha" => entry.alpha = tensor.values.first().copied(),
            other => problems.push(format!("'{name}': unsupported part '{other}' (only lora_down/lora_up/alpha LoRAs are supported)")),
        }
    }

    // Every Linear a kohya file can name: the UNet's adaptable layers and the text encoder's.
    // SDXL files name UNet layers by SGM path; diffusers paths are accepted too.
    let paths: Vec<String> = model.unet.lora_layers_mut().iter().map(|l| l.path.clone()).collect();
    let sdxl_names: BTreeMap<String, String> =
        if model.family == Family::Sdxl { paths.iter().map(|path| (unet_lora_name(model, path), kohya_unet_name(path))).collect() } else { BTreeMap::new() };
    let unet = model.unet.lora_layers_mut().into_iter().map(|l| (kohya_unet_name(&l.path), &mut l.base));
    let text = model.text_encoder.lora_layers_mut().into_iter().map(|l| (kohya_text_name("lora_te_", &l.path), &mut l.base));
    // SDXL's second encoder: `lora_te2_text_model_encoder_layers_N_…`.
    let text_2 = model.text_encoder_2.iter_mut().flat_map(|e| e.lora_layers_mut()).map(|l| (kohya_text_name("lora_te2_", &l.path), &mut l.base));
    let mut layers: BTreeMap<String, &mut Linear> = unet.chain(text).chain(text_2).collect();

    let mut merged = 0;
    for (name, module) in modules {
        let (Some(down), Some(up)) = (module.down, module.up) else {
            problems.push(format!("'{name}' lacks lora_down or lora_up"));
            continue;
        };
        if down.shape.len() != 2 || up.shape.len() != 2 || down.shape[0] != up.shape[1] {
            problems.push(format!("'{name}': lora_down {:?} and lora_up {:?} are not a linear LoRA pair", down.shape, up.shape));
            continue;
        }
        let rank = down.shape[0];
        let alpha = module.alpha.map(f64::from).unwrap_or(rank as f64);
        // Text-encoder names of SDXL-style files (lora_te1_) mean the same single encoder here.
        let name = sdxl_names.get(&name).cloned().unwrap_or(name);
        let Some(linear) = layers.get_mut(&name.replacen("lora_te1_", "lora_te_", 1)) else {
            problems.push(format!("'{name}' matches no layer of this model"));
            continue;
        };
        let [d_in, d_out] = linear.weight.val().dims();
        if down.shape[1] != d_in || up.shape[0] != d_out {
            problems.push(format!("'{name}': LoRA is {}->{} but the model's layer is {d_in}->{d_out}", down.shape[1], up.shape[0]));
            continue;
        }
        // burn layout: down [in, rank], up [rank, out].
        let down = down.to_tensor::<2>(device)?.transpose();
        let up = up.to_tensor::<2>(device)?.transpose();
        let delta: Tensor<2> = down.matmul(up) * (alpha / rank as f64 * multiplier);
        // Merged in f32, stored back in the weight's own dtype (f16 frozen bases).
        let weight = linear.weight.val();
        let dtype = weight.dtype();
        linear.weight = Param::from_tensor(in_dtype(in_dtype(weight, DType::F32) + delta, dtype));
        merged += 1;
    }
    if problems.is_empty() {
        Ok(merged)
    } else {
        Err(Error::Config { source_name: path.to_string(), problems })
    }
}
