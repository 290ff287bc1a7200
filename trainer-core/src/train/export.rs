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
use crate::config::lycoris::LokrSettings;
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
        if let Some(lokr) = &layer.lokr {
            // LyCORIS's names, torch layout as kept.
            let read = |p: &Option<burn::module::Param<Tensor<2>>>| p.as_ref().map(|p| p.val().without_autodiff().cast(DType::F32));
            tensors.insert(format!("{name}.lokr_w1"), HostTensor::from_tensor(lokr.w1.val().without_autodiff().cast(DType::F32)).await?);
            for (part, tensor) in [("lokr_w2", read(&lokr.w2)), ("lokr_w2_a", read(&lokr.w2_a)), ("lokr_w2_b", read(&lokr.w2_b))] {
                if let Some(tensor) = tensor {
                    tensors.insert(format!("{name}.{part}"), HostTensor::from_tensor(tensor).await?);
                }
            }
            tensors.insert(format!("{name}.alpha"), HostTensor { shape: vec![], values: vec![lokr.alpha as f32] });
            continue;
        }
        let lora = layer.lora.as_ref().expect("adapted");
        let down = lora.down.val().without_autodiff().transpose();
        let up = lora.up.val().without_autodiff().transpose();
        tensors.insert(format!("{name}.lora_down.weight"), HostTensor::from_tensor(down).await?);
        tensors.insert(format!("{name}.lora_up.weight"), HostTensor::from_tensor(up).await?);
        tensors.insert(format!("{name}.alpha"), HostTensor { shape: vec![], values: vec![lora.alpha as f32] });
        if let Some(magnitude) = &lora.magnitude {
            // LyCORIS's output-axis layout (wd_on_out), `[out, 1]`: docs/reference.md §4.
            let magnitude = magnitude.val().without_autodiff().cast(DType::F32);
            let out = magnitude.dims()[0];
            tensors.insert(format!("{name}.dora_scale"), HostTensor::from_tensor(magnitude.reshape([out, 1])).await?);
        }
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
/// With LoKr adapters, `lokr_settings` is their lycoris_config (its JSON goes into the metadata).
pub async fn kohya_file(model: &StableDiffusion, extra: &BTreeMap<String, String>, lokr_settings: Option<&LokrSettings>) -> Result<Vec<u8>> {
    let lokr_settings = lokr_settings.cloned();
    let tensors = kohya_tensors(model).await?;
    let layers = model.unet.adapted_layers();
    let no_adapter = || Error::Training { step: 0, message: "the model has no LoRA adapters to export".into() };
    let first = layers.first().ok_or_else(no_adapter)?;
    let (module, dim, alpha) = match (&first.lora, &first.lokr) {
        (Some(lora), _) => ("networks.lora", lora.rank(), lora.alpha),
        (None, Some(lokr)) => ("lycoris.kohya", lokr.rank().unwrap_or(lokr.w1.val().dims()[0]), lokr.alpha),
        (None, None) => return Err(no_adapter()),
    };
    let (version, architecture, v2) = match (model.family, model.configs.scheduler.prediction_type) {
        (crate::models::Family::Sd1, _) => ("sd_v1", "stable-diffusion-v1/lora", "False"),
        (crate::models::Family::Sd2, crate::models::config::PredictionType::VPrediction) => ("sd_2.0", "stable-diffusion-v2-768-v/lora", "True"),
        (crate::models::Family::Sd2, _) => ("sd_2.0", "stable-diffusion-v2-512/lora", "True"),
        (crate::models::Family::Sdxl, _) => ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False"),
    };
    let mut metadata = BTreeMap::from([
        ("ss_network_module".to_string(), module.to_string()),
        ("ss_network_dim".to_string(), dim.to_string()),
        ("ss_network_alpha".to_string(), format_alpha(alpha)),
        ("ss_base_model_version".to_string(), version.to_string()),
        ("ss_v2".to_string(), v2.to_string()),
        ("modelspec.sai_model_spec".to_string(), "1.0.0".to_string()),
        ("modelspec.architecture".to_string(), architecture.to_string()),
        ("modelspec.implementation".to_string(), "diffusers".to_string()),
        ("burnbooth.format".to_string(), "kohya".to_string()),
    ]);
    if first.lora.as_ref().is_some_and(|l| l.magnitude.is_some()) {
        // What LyCORIS's kohya wrapper records for DoRA with output-axis magnitudes.
        metadata.insert("ss_network_module".to_string(), "lycoris.kohya".to_string());
        metadata.insert("ss_network_args".to_string(), r#"{"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}"#.to_string());
    }
    if let (Some(_), Some(settings)) = (&first.lokr, &lokr_settings) {
        metadata.insert("ss_network_args".to_string(), format!(r#"{{"algo": "lokr", "full_matrix": "{}"}}"#, settings.full_matrix));
        metadata.insert("lycoris_config".to_string(), settings.source.clone());
    }
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
    /// DoRA's magnitude: `[out, 1]` (per output feature, as PEFT and
    /// LyCORIS's `wd_on_out` keep it) or `[1, in]` (LyCORIS before 2025).
    dora_scale: Option<HostTensor>,
    /// LoKr's factors (`lokr_w1`, `lokr_w2` or its pair `lokr_w2_a/_b`).
    lokr: BTreeMap<String, HostTensor>,
}

/// The DoRA weight from an adapted weight `W + scale * BA` (burn layout
/// `[in, out]`) and its `dora_scale`: each output column rescaled to its
/// magnitude (`[out, 1]`, PEFT's and LyCORIS's `wd_on_out` layout), or
/// each input row (`[1, in]`, LyCORIS's layout before 2025). The norm is
/// taken without an epsilon, as PEFT's merge does.
pub fn dora_decompose(adapted: Tensor<2>, dora_scale: &HostTensor, device: &Device) -> std::result::Result<Tensor<2>, String> {
    let [d_in, d_out] = adapted.dims();
    let scale = HostTensor { shape: vec![dora_scale.values.len()], values: dora_scale.values.clone() }.to_tensor::<1>(device).map_err(|e| e.to_string())?;
    let tiny = f32::MIN_POSITIVE as f64;
    match dora_scale.shape.as_slice() {
        [out, 1] if *out == d_out => {
            let norm = adapted.clone().square().sum_dim(0).sqrt().clamp_min(tiny);
            Ok(adapted * (scale.reshape([1, d_out]) / norm))
        }
        [1, input] if *input == d_in => {
            let norm = adapted.clone().square().sum_dim(1).sqrt().clamp_min(tiny);
            Ok(adapted * (scale.reshape([d_in, 1]) / norm))
        }
        other => Err(format!("dora_scale has shape {other:?}; a layer of {d_in}->{d_out} needs [{d_out}, 1] or [1, {d_in}]")),
    }
}

/// A LoKr module's weight change in burn's `[in, out]` layout, as ComfyUI
/// computes it: `kron(w1, w2)` times `alpha / rank` when `w2` is a
/// low-rank pair (its rank), times 1 when both factors are full.
fn lokr_delta(parts: &BTreeMap<String, HostTensor>, alpha: Option<f32>, [d_in, d_out]: [usize; 2], device: &Device) -> std::result::Result<Tensor<2>, String> {
    let matrix = |name: &str| parts.get(name).map(|t| t.to_tensor::<2>(device).map_err(|e| format!("{name}: {e}"))).transpose();
    let w1 = matrix("lokr_w1")?.ok_or("lokr_w1 is missing (factored w1 pairs are not supported)")?;
    let (w2, rank) = match (matrix("lokr_w2")?, matrix("lokr_w2_a")?, matrix("lokr_w2_b")?) {
        (Some(w2), _, _) => (w2, None),
        (None, Some(a), Some(b)) => {
            let rank = b.dims()[0];
            (a.matmul(b), Some(rank))
        }
        _ => return Err("lokr_w2 (or lokr_w2_a with lokr_w2_b) is missing".into()),
    };
    let delta = crate::models::lora::kron(w1, w2);
    if delta.dims() != [d_out, d_in] {
        return Err(format!("the LoKr factors make a {:?} change but the layer is {d_in}->{d_out}", delta.dims()));
    }
    let scale = match (alpha, rank) {
        (Some(alpha), Some(rank)) => alpha as f64 / rank as f64,
        _ => 1.0,
    };
    Ok(delta.transpose() * scale)
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
        let entry = modules.entry(module.to_string()).or_insert(KohyaModule { down: None, up: None, alpha: None, dora_scale: None, lokr: BTreeMap::new() });
        match part {
            "lora_down.weight" => entry.down = Some(tensor),
            "lora_up.weight" => entry.up = Some(tensor),
            "alpha" => entry.alpha = tensor.values.first().copied(),
            "dora_scale" => entry.dora_scale = Some(tensor),
            part @ ("lokr_w1" | "lokr_w2" | "lokr_w2_a" | "lokr_w2_b") => {
                entry.lokr.insert(part.to_string(), tensor);
            }
            other => problems.push(format!(
                "'{name}': unsupported part '{other}' (LoRA's lora_down/lora_up/alpha/dora_scale and LoKr's lokr_w1/lokr_w2(_a/_b) are supported)"
            )),
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
        if !module.lokr.is_empty() {
            let name = sdxl_names.get(&name).cloned().unwrap_or(name);
            let Some(linear) = layers.get_mut(&name.replacen("lora_te1_", "lora_te_", 1)) else {
                problems.push(format!("'{name}' matches no layer of this model"));
                continue;
            };
            match lokr_delta(&module.lokr, module.alpha, linear.weight.val().dims(), device) {
                Ok(delta) => {
                    let weight = linear.weight.val();
                    let dtype = weight.dtype();
                    linear.weight = Param::from_tensor(in_dtype(in_dtype(weight, DType::F32) + delta * multiplier, dtype));
                    merged += 1;
                }
                Err(problem) => problems.push(format!("'{name}': {problem}")),
            }
            continue;
        }
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
        let weight = linear.weight.val();
        let dtype = weight.dtype();
        let base = in_dtype(weight, DType::F32);
        let merged_weight = match module.dora_scale {
            None => base + down.matmul(up) * (alpha / rank as f64 * multiplier),
            Some(scale) => {
                let adapted = base.clone() + down.matmul(up) * (alpha / rank as f64);
                let decomposed = match dora_decompose(adapted, &scale, device) {
                    Ok(decomposed) => decomposed,
                    Err(problem) => {
                        problems.push(format!("'{name}': {problem}"));
                        continue;
                    }
                };
                // Another strength blends toward the DoRA weight, as ComfyUI does.
                base.clone() + (decomposed - base) * multiplier
            }
        };
        // Merged in f32, stored back in the weight's own dtype (f16 frozen bases).
        linear.weight = Param::from_tensor(in_dtype(merged_weight, dtype));
        merged += 1;
    }
    if problems.is_empty() {
        Ok(merged)
    } else {
        Err(Error::Config { source_name: path.to_string(), problems })
    }
}
