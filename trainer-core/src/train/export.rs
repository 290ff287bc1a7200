//! LoRA files in kohya's format (docs/reference.md §4): what
//! ComfyUI, A1111/Forge and diffusers all load.
//!
//! `lora_unet_<diffusers module path with _>.lora_down.weight` `[rank, in]`,
//! `.lora_up.weight` `[out, rank]` and `.alpha` (a scalar), so that
//! `W' = W + multiplier * (alpha / rank) * up @ down`; for a convolution
//! (LoCon) `lora_down` is `[rank, in, k, k]`, `lora_up` `[out, rank, 1, 1]`
//! and the product is taken over the flattened kernels. Text-encoder layers
//! use `lora_te_text_model_encoder_layers_<i>_<self_attn_q_proj|...|mlp_fc2>`.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{DType, Device, Tensor};

use super::tensor_file::{self, HostTensor};
use crate::config::lycoris::{LycorisAlgo, LycorisSettings};
use crate::error::{Error, Result};
use crate::models::layers::{in_dtype, Conv2d, Linear};
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
    for conv in model.unet.adapted_convs() {
        let name = unet_lora_name(model, &conv.path);
        let lora = conv.lora.as_ref().expect("adapted");
        tensors.insert(format!("{name}.lora_down.weight"), HostTensor::from_tensor(lora.down.val().without_autodiff()).await?);
        tensors.insert(format!("{name}.lora_up.weight"), HostTensor::from_tensor(lora.up.val().without_autodiff()).await?);
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
/// With LyCORIS adapters, `lycoris` is their lycoris_config (its JSON goes into the metadata).
pub async fn kohya_file(model: &StableDiffusion, extra: &BTreeMap<String, String>, lycoris: Option<&LycorisSettings>) -> Result<Vec<u8>> {
    let lycoris = lycoris.cloned();
    let tensors = kohya_tensors(model).await?;
    let layers = model.unet.adapted_layers();
    let no_adapter = || Error::Training { step: 0, message: "the model has no LoRA adapters to export".into() };
    let (module, dim, alpha) = match (layers.first(), model.unet.adapted_convs().first()) {
        (Some(first), _) => match (&first.lora, &first.lokr) {
            (Some(lora), _) => ("networks.lora", lora.rank(), lora.alpha),
            (None, Some(lokr)) => ("lycoris.kohya", lokr.rank().unwrap_or(lokr.w1.val().dims()[0]), lokr.alpha),
            (None, None) => return Err(no_adapter()),
        },
        (None, Some(conv)) => {
            let lora = conv.lora.as_ref().expect("adapted");
            ("lycoris.kohya", lora.rank(), lora.alpha)
        }
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
    if layers.first().and_then(|l| l.lora.as_ref()).is_some_and(|l| l.magnitude.is_some()) {
        // What LyCORIS's kohya wrapper records for DoRA with output-axis magnitudes.
        metadata.insert("ss_network_module".to_string(), "lycoris.kohya".to_string());
        metadata.insert("ss_network_args".to_string(), r#"{"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}"#.to_string());
    }
    if let Some(settings) = &lycoris {
        // What LyCORIS's kohya wrapper records (its arguments as strings).
        let args = match settings.algo {
            LycorisAlgo::Lokr => format!(r#"{{"algo": "lokr", "full_matrix": "{}"}}"#, settings.full_matrix),
            LycorisAlgo::Locon => format!(r#"{{"algo": "locon", "conv_dim": "{}", "conv_alpha": "{}"}}"#, settings.conv_dim, settings.conv_alpha),
        };
        metadata.insert("ss_network_module".to_string(), "lycoris.kohya".to_string());
        metadata.insert("ss_network_args".to_string(), args);
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
        [out, 1] | [out, 1, 1, 1] if *out == d_out => {
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

/// A layer a kohya file can change. Merging sees its weight as a matrix
/// `[fan_in, out]`: a Linear layer's in burn's layout, a convolution's
/// `[out, in, k, k]` flattened to `[out, in * k * k]` and transposed.
enum MergeTarget<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

impl MergeTarget<'_> {
    /// `[fan_in, out]`.
    fn dims(&self) -> [usize; 2] {
        match self {
            Self::Linear(linear) => linear.weight.val().dims(),
            Self::Conv(conv) => {
                let [out, d_in, kh, kw] = conv.weight.val().dims();
                [d_in * kh * kw, out]
            }
        }
    }

    /// The weight as that matrix, in f32.
    fn matrix(&self) -> Tensor<2> {
        let [fan_in, out] = self.dims();
        match self {
            Self::Linear(linear) => in_dtype(linear.weight.val(), DType::F32),
            Self::Conv(conv) => in_dtype(conv.weight.val(), DType::F32).reshape([out, fan_in]).transpose(),
        }
    }

    /// Stores `matrix` back, in the weight's own shape and dtype (f16 frozen bases stay f16).
    fn set_matrix(&mut self, matrix: Tensor<2>) {
        match self {
            Self::Linear(linear) => {
                let dtype = linear.weight.val().dtype();
                linear.weight = Param::from_tensor(in_dtype(matrix, dtype));
            }
            Self::Conv(conv) => {
                let weight = conv.weight.val();
                let (dims, dtype) = (weight.dims(), weight.dtype());
                conv.weight = Param::from_tensor(in_dtype(matrix.transpose().reshape(dims), dtype));
            }
        }
    }
}

/// A LoRA pair's product `up @ down` as a `[fan_in, out]` matrix: `down`
/// `[rank, in]` or `[rank, in, k, k]`, `up` `[out, rank]` or `[out, rank, 1, 1]`.
fn lora_product(down: &HostTensor, up: &HostTensor, [fan_in, out]: [usize; 2], device: &Device) -> std::result::Result<(Tensor<2>, usize), String> {
    let pair = || format!("lora_down {:?} and lora_up {:?}", down.shape, up.shape);
    let is_pointwise_up = up.shape.len() == 2 || (up.shape.len() == 4 && up.shape[2..] == [1, 1]);
    if !matches!(down.shape.len(), 2 | 4) || !is_pointwise_up {
        return Err(format!("{} are not a LoRA pair (2-d, or 4-d with a 1x1 lora_up)", pair()));
    }
    let rank = down.shape[0];
    let down_fan: usize = down.shape[1..].iter().product();
    if up.shape[1] != rank {
        return Err(format!("{} have different ranks", pair()));
    }
    if down_fan != fan_in || up.shape[0] != out {
        return Err(format!("{} change a layer of {down_fan} inputs and {} outputs, but the model's layer has {fan_in} and {out}", pair(), up.shape[0]));
    }
    let flat = |t: &HostTensor, rows: usize, cols: usize| {
        HostTensor { shape: vec![rows, cols], values: t.values.clone() }.to_tensor::<2>(device).map_err(|e| e.to_string())
    };
    let down = flat(down, rank, fan_in)?;
    let up = flat(up, out, rank)?;
    Ok((up.matmul(down).transpose(), rank))
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

    // Every layer a kohya file can name: the UNet's adaptable Linear layers
    // and convolutions and the text encoders' Linear layers. SDXL files name
    // UNet layers by SGM path; diffusers paths are accepted too.
    let (linear, convs) = model.unet.adaptable_mut();
    let paths: Vec<String> = linear.iter().map(|l| l.path.clone()).chain(convs.iter().map(|c| c.path.clone())).collect();
    let sdxl_names: BTreeMap<String, String> =
        if model.family == Family::Sdxl { paths.iter().map(|path| (unet_lora_name(model, path), kohya_unet_name(path))).collect() } else { BTreeMap::new() };
    let StableDiffusion { unet, text_encoder, text_encoder_2, .. } = model;
    let (unet_linear, unet_convs) = unet.adaptable_mut();
    let unet_linear = unet_linear.into_iter().map(|l| (kohya_unet_name(&l.path), MergeTarget::Linear(&mut l.base)));
    let unet_convs = unet_convs.into_iter().map(|c| (kohya_unet_name(&c.path), MergeTarget::Conv(&mut c.base)));
    let text = text_encoder.lora_layers_mut().into_iter().map(|l| (kohya_text_name("lora_te_", &l.path), MergeTarget::Linear(&mut l.base)));
    // SDXL's second encoder: `lora_te2_text_model_encoder_layers_N_…`.
    let text_2 = text_encoder_2.iter_mut().flat_map(|e| e.lora_layers_mut()).map(|l| (kohya_text_name("lora_te2_", &l.path), MergeTarget::Linear(&mut l.base)));
    let mut layers: BTreeMap<String, MergeTarget> = unet_linear.chain(unet_convs).chain(text).chain(text_2).collect();

    let mut merged = 0;
    for (name, module) in modules {
        // Text-encoder names of SDXL-style files (lora_te1_) mean the same single encoder here.
        let name = sdxl_names.get(&name).cloned().unwrap_or(name);
        let Some(target) = layers.get_mut(&name.replacen("lora_te1_", "lora_te_", 1)) else {
            problems.push(format!("'{name}' matches no layer of this model"));
            continue;
        };
        let dims = target.dims();
        let base = target.matrix();
        let changed = if !module.lokr.is_empty() {
            lokr_delta(&module.lokr, module.alpha, dims, device).map(|delta| base.clone() + delta * multiplier)
        } else {
            let (Some(down), Some(up)) = (&module.down, &module.up) else {
                problems.push(format!("'{name}' lacks lora_down or lora_up"));
                continue;
            };
            lora_product(down, up, dims, device).and_then(|(product, rank)| {
                let alpha = module.alpha.map(f64::from).unwrap_or(rank as f64);
                let delta = product * (alpha / rank as f64);
                match &module.dora_scale {
                    None => Ok(base.clone() + delta * multiplier),
                    // Another strength blends toward the DoRA weight, as ComfyUI does.
                    Some(scale) => {
                        dora_decompose(base.clone() + delta, scale, device).map(|decomposed| base.clone() + (decomposed - base.clone()) * multiplier)
                    }
                }
            })
        };
        match changed {
            // Merged in f32, stored back in the weight's own dtype.
            Ok(weight) => {
                target.set_matrix(weight);
                merged += 1;
            }
            Err(problem) => problems.push(format!("'{name}': {problem}")),
        }
    }
    if problems.is_empty() {
        Ok(merged)
    } else {
        Err(Error::Config { source_name: path.to_string(), problems })
    }
}
