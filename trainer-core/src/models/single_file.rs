//! Single-file (original LDM) checkpoints: the names of every tensor there,
//! as a function of the diffusers name and the model config, and a view of
//! OpenCLIP's text encoder under transformers' names.
//!
//! Rules (diffusers' own conversion scripts): UNet under
//! `model.diffusion_model.` with `input_blocks`/`middle_block`/`output_blocks`,
//! VAE under `first_stage_model.` (decoder blocks in reverse order), SD 1.x
//! CLIP under `cond_stage_model.transformer.`, SD 2.x OpenCLIP under
//! `cond_stage_model.model.` with q/k/v packed into `in_proj`.

use std::collections::BTreeMap;

use super::config::{UNetConfig, VaeConfig};
use super::loader::TensorSource;
use crate::error::{Error, Result};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const SD1_TEXT_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPENCLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's two encoders in SGM checkpoints: CLIP-L and OpenCLIP bigG.
pub const SDXL_TEXT_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const SDXL_OPENCLIP_PREFIX: &str = "conditioner.embedders.1.model.";

fn resnet_part(name: &str) -> String {
    let (first, rest) = name.split_once('.').unwrap_or((name, ""));
    let mapped = match first {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    if rest.is_empty() {
        mapped.to_string()
    } else {
        format!("{mapped}.{rest}")
    }
}

/// The single-file name of a diffusers UNet tensor.
pub fn unet_name(name: &str, config: &UNetConfig) -> String {
    let lpb = config.layers_per_block;
    let parts: Vec<&str> = name.split('.').collect();
    let rest = |from: usize| parts[from..].join(".");
    let mapped = match parts[0] {
        "time_embedding" => {
            let slot = if parts[1] == "linear_1" { "time_embed.0" } else { "time_embed.2" };
            format!("{slot}.{}", rest(2))
        }
        "add_embedding" => {
            let slot = if parts[1] == "linear_1" { "label_emb.0.0" } else { "label_emb.0.2" };
            format!("{slot}.{}", rest(2))
        }
        "conv_in" => format!("input_blocks.0.0.{}", rest(1)),
        "conv_norm_out" => format!("out.0.{}", rest(1)),
        "conv_out" => format!("out.2.{}", rest(1)),
        "down_blocks" => {
            let i: usize = parts[1].parse().unwrap_or(0);
            match parts[2] {
                "downsamplers" => format!("input_blocks.{}.0.op.{}", (lpb + 1) * (i + 1), rest(5)),
                kind => {
                    let j: usize = parts[3].parse().unwrap_or(0);
                    let slot = (lpb + 1) * i + j + 1;
                    if kind == "resnets" {
                        format!("input_blocks.{slot}.0.{}", resnet_part(&rest(4)))
                    } else {
                        format!("input_blocks.{slot}.1.{}", rest(4))
                    }
                }
            }
        }
        "mid_block" => {
            let j: usize = parts[2].parse().unwrap_or(0);
            if parts[1] == "resnets" {
                format!("middle_block.{}.{}", if j == 0 { 0 } else { 2 }, resnet_part(&rest(3)))
            } else {
                format!("middle_block.1.{}", rest(3))
            }
        }
        "up_blocks" => {
            let i: usize = parts[1].parse().unwrap_or(0);
            let has_attention = config.up_block_types.get(i).is_some_and(|t| t.starts_with("CrossAttn"));
            match parts[2] {
                "upsamplers" => {
                    format!("output_blocks.{}.{}.conv.{}", (lpb + 1) * i + lpb, if has_attention { 2 } else { 1 }, rest(5))
                }
                kind => {
                    let j: usize = parts[3].parse().unwrap_or(0);
                    let slot = (lpb + 1) * i + j;
                    if kind == "resnets" {
                        format!("output_blocks.{slot}.0.{}", resnet_part(&rest(4)))
                    } else {
                        format!("output_blocks.{slot}.1.{}", rest(4))
                    }
                }
            }
        }
        _ => name.to_string(),
    };
    format!("{UNET_PREFIX}{mapped}")
}

/// The single-file name of a diffusers VAE tensor.
pub fn vae_name(name: &str, config: &VaeConfig) -> String {
    let levels = config.block_out_channels.len();
    let parts: Vec<&str> = name.split('.').collect();
    let rest = |from: usize| parts[from..].join(".");
    let mut mapped = if parts.len() > 3 && parts[0] == "encoder" && parts[1] == "down_blocks" {
        if parts[3] == "resnets" {
            format!("encoder.down.{}.block.{}.{}", parts[2], parts[4], rest(5))
        } else {
            format!("encoder.down.{}.downsample.{}", parts[2], rest(5))
        }
    } else if parts.len() > 3 && parts[0] == "decoder" && parts[1] == "up_blocks" {
        let i = levels - 1 - parts[2].parse::<usize>().unwrap_or(0);
        if parts[3] == "resnets" {
            format!("decoder.up.{i}.block.{}.{}", parts[4], rest(5))
        } else {
            format!("decoder.up.{i}.upsample.{}", rest(5))
        }
    } else if parts.len() > 3 && parts[1] == "mid_block" {
        if parts[2] == "resnets" {
            format!("{}.mid.block_{}.{}", parts[0], parts[3].parse::<usize>().unwrap_or(0) + 1, rest(4))
        } else {
            let (which, from) = match parts[4] {
                "group_norm" => ("norm", 5),
                "to_q" => ("q", 5),
                "to_k" => ("k", 5),
                "to_v" => ("v", 5),
                _ => ("proj_out", 6), // to_out.0
            };
            format!("{}.mid.attn_1.{which}.{}", parts[0], rest(from))
        }
    } else {
        name.to_string()
    };
    mapped = mapped.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out");
    format!("{VAE_PREFIX}{mapped}")
}

/// SD 1.x's CLIP: transformers' names under `cond_stage_model.transformer.`,
/// with or without `text_model.`.
pub fn sd1_text_name(name: &str, has_text_model_prefix: bool) -> String {
    clip_text_name(SD1_TEXT_PREFIX, name, has_text_model_prefix)
}

/// A CLIP text encoder's tensor under `prefix` (SD 1.x's, or SDXL's first
/// encoder), with or without transformers' `text_model.`.
pub fn clip_text_name(prefix: &str, name: &str, has_text_model_prefix: bool) -> String {
    let name = name.strip_prefix("text_model.").unwrap_or(name);
    if has_text_model_prefix {
        format!("{prefix}text_model.{name}")
    } else {
        format!("{prefix}{name}")
    }
}

/// Where OpenCLIP keeps each transformers-named text-encoder tensor:
/// transformers name -> (file name, which third of a packed `in_proj`, transposed).
pub type OpenClipNames = BTreeMap<String, (String, Option<usize>, bool)>;

/// The OpenCLIP names of a text tower with `layers` layers under `prefix`.
pub fn openclip_names(prefix: &str, layers: usize, with_projection: bool) -> OpenClipNames {
    let p = |n: &str| format!("{prefix}{n}");
    let mut names = BTreeMap::new();
    names.insert("embeddings.token_embedding.weight".into(), (p("token_embedding.weight"), None, false));
    names.insert("embeddings.position_embedding.weight".into(), (p("positional_embedding"), None, false));
    names.insert("final_layer_norm.weight".into(), (p("ln_final.weight"), None, false));
    names.insert("final_layer_norm.bias".into(), (p("ln_final.bias"), None, false));
    if with_projection {
        names.insert("text_projection.weight".into(), (p("text_projection"), None, true));
    }
    for i in 0..layers {
        let hf = format!("encoder.layers.{i}.");
        let oc = format!("{prefix}transformer.resblocks.{i}.");
        for (a, b) in
            [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
        {
            for kind in ["weight", "bias"] {
                names.insert(format!("{hf}{a}.{kind}"), (format!("{oc}{b}.{kind}"), None, false));
            }
        }
        for (third, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            names.insert(format!("{hf}self_attn.{q}.weight"), (format!("{oc}attn.in_proj_weight"), Some(third), false));
            names.insert(format!("{hf}self_attn.{q}.bias"), (format!("{oc}attn.in_proj_bias"), Some(third), false));
        }
    }
    names
}

/// OpenCLIP's text tower (SD 2.x `cond_stage_model.model.`, SDXL's second
/// encoder `conditioner.embedders.1.model.`) seen under transformers' names
/// (`embeddings.token_embedding.weight`, `encoder.layers.N.self_attn.q_proj.weight`, ...).
/// The packed `attn.in_proj_*` is split into q, k and v; `text_projection` is
/// transposed; layers beyond the model's count (SD 2.x stores 24 and uses 23),
/// `logit_scale` and unused projections are not listed.
pub struct OpenClipView<'a> {
    file: &'a dyn TensorSource,
    prefix: String,
    names: OpenClipNames,
}

impl<'a> OpenClipView<'a> {
    pub fn new(file: &'a dyn TensorSource, prefix: &str, layers: usize, with_projection: bool) -> Self {
        Self { file, prefix: prefix.to_string(), names: openclip_names(prefix, layers, with_projection) }
    }

    /// The file tensors this view reads (to tell used from unused ones).
    pub fn source_names(&self) -> Vec<String> {
        self.names.values().map(|(n, _, _)| n.clone()).collect()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

impl TensorSource for OpenClipView<'_> {
    fn path(&self) -> &str {
        self.file.path()
    }

    fn tensor_names(&self) -> Vec<String> {
        self.names.iter().filter(|(_, (source, _, _))| self.file.shape(source).is_some()).map(|(n, _)| n.clone()).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let (source, third, transpose) = self.names.get(name)?;
        let mut shape = self.file.shape(source)?;
        if third.is_some() {
            shape[0] /= 3;
        }
        if *transpose {
            shape.reverse();
        }
        Some(shape)
    }

    fn values(&self, name: &str) -> Result<Vec<f32>> {
        let (source, third, transpose) = self.names.get(name).ok_or_else(|| Error::Io { path: self.path().into(), message: format!("no tensor '{name}'") })?;
        let values = self.file.values(source)?;
        let shape = self.file.shape(source).unwrap_or_default();
        if let Some(third) = third {
            let part = values.len() / 3;
            return Ok(values[third * part..(third + 1) * part].to_vec());
        }
        if *transpose && shape.len() == 2 {
            return Ok(transposed(&values, shape[0], shape[1]));
        }
        Ok(values)
    }
}

/// The values of a `[rows, cols]` matrix, transposed (OpenCLIP stores
/// `text_projection` as `[width, projection]`, transformers the reverse).
pub fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}
