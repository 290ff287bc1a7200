//! Full fine-tune exports: the model's weights under the names they were
//! loaded from (the loader records each parameter's checkpoint name), as a
//! diffusers folder's weight files and as one A1111/ComfyUI single-file
//! checkpoint (SD 1.x, 2.x and SDXL).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor};

use super::storage::{join, Storage};
use super::tensor_file::{self, HostTensor};
use crate::error::{Error, Result};
use crate::models::loader::ParamNames;
use crate::models::{single_file, standard, tokenizer, Family, StableDiffusion};

struct NamedParams<'a> {
    names: &'a ParamNames,
    found: Vec<(String, Tensor<1>, Vec<usize>)>,
}

impl ModuleVisitor for NamedParams<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // LoRA adapters were not loaded from the checkpoint: they have no name.
        let Some((name, transposed)) = self.names.get(&param.id) else { return };
        let mut value = param.val().without_autodiff().cast(DType::F32);
        if *transposed && D == 2 {
            value = value.transpose();
        }
        let dims = value.dims().to_vec();
        let count: usize = dims.iter().product();
        self.found.push((name.clone(), value.reshape([count]), dims));
    }
}

/// A component's weights by checkpoint name, on the host. Fails when a
/// loaded parameter is no longer in the module.
pub async fn named_tensors<M: Module>(module: &M, names: &ParamNames, what: &str) -> Result<BTreeMap<String, HostTensor>> {
    let mut visitor = NamedParams { names, found: Vec::new() };
    module.visit(&mut visitor);
    if visitor.found.len() != names.len() {
        return Err(Error::Training {
            step: 0,
            message: format!("{what}: {} of {} loaded parameters are still in the model; cannot export it whole", visitor.found.len(), names.len()),
        });
    }
    let mut out = BTreeMap::new();
    for (name, flat, shape) in visitor.found {
        out.insert(name, HostTensor::from_flat(flat, shape).await?);
    }
    Ok(out)
}

fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// The files of a diffusers folder that an exported folder copies from its
/// base model when they are there: `model_index.json` and each component's
/// config, the scheduler config, and the tokenizers (SDXL's second encoder
/// and tokenizer included).
pub fn source_config_paths() -> Vec<String> {
    let mut paths = vec!["model_index.json".to_string(), "unet/config.json".into(), "vae/config.json".into(), "scheduler/scheduler_config.json".into()];
    for (encoder, tokenizer) in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")] {
        paths.push(format!("{encoder}/config.json"));
        for file in ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"] {
            paths.push(format!("{tokenizer}/{file}"));
        }
    }
    paths
}

/// Writes a complete diffusers folder under `dir`: the three components'
/// weights (the UNet as trained), and their configs, tokenizer, scheduler
/// and `model_index.json` from `configs` (name -> JSON text, as read from
/// the source folder) or, when absent, the published configs of the family.
pub async fn write_diffusers_folder(
    model: &StableDiffusion,
    storage: &dyn Storage,
    dir: &str,
    configs: Option<&BTreeMap<String, String>>,
    between_files: &dyn Fn(),
) -> Result<()> {
    let unet = named_tensors(&model.unet.without_lora(), &model.names.unet, "UNet").await?;
    storage.write(&join(dir, "unet/diffusion_pytorch_model.safetensors"), &tensor_file::write(&unet, &pt_metadata())?)?;
    between_files();
    let vae = named_tensors(&model.vae, &model.names.vae, "VAE").await?;
    storage.write(&join(dir, "vae/diffusion_pytorch_model.safetensors"), &tensor_file::write(&vae, &pt_metadata())?)?;
    let mut encoders = vec![("text_encoder", &model.text_encoder, &model.names.text_encoder, "text encoder")];
    if let Some(encoder) = &model.text_encoder_2 {
        encoders.push(("text_encoder_2", encoder, &model.names.text_encoder_2, "text encoder 2"));
    }
    for (folder, encoder, names, what) in encoders {
        let text: BTreeMap<String, HostTensor> =
            named_tensors(encoder, names, what).await?.into_iter().map(|(n, t)| (crate::models::clip::transformers_key(&n), t)).collect();
        storage.write(&join(dir, &format!("{folder}/model.safetensors")), &tensor_file::write(&text, &pt_metadata())?)?;
    }
    let texts: BTreeMap<String, String> = match configs {
        Some(configs) => configs.clone(),
        None => standard_files(model.family),
    };
    for (name, text) in texts {
        storage.write(&join(dir, &name), text.as_bytes())?;
    }
    Ok(())
}

/// The published configs of a family, as a diffusers folder holds them.
fn standard_files(family: Family) -> BTreeMap<String, String> {
    let (unet, vae, text, scheduler, pad) = match family {
        Family::Sd1 => (standard::SD15_UNET, standard::SD_VAE, standard::CLIP_L, standard::SD15_SCHEDULER, tokenizer::END_OF_TEXT),
        Family::Sd2 => (standard::SD21_UNET, standard::SD_VAE, standard::OPENCLIP_H, standard::SD21_SCHEDULER, "!"),
        Family::Sdxl => (standard::SDXL_UNET, standard::SDXL_VAE, standard::CLIP_L, standard::SDXL_SCHEDULER, tokenizer::END_OF_TEXT),
    };
    let index = match family {
        Family::Sdxl => {
            r#"{
  "_class_name": "StableDiffusionXLPipeline",
  "force_zeros_for_empty_prompt": true,
  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#
        }
        _ => {
            r#"{
  "_class_name": "StableDiffusionPipeline",
  "feature_extractor": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#
        }
    };
    let tokenizer_config = |pad: &str| {
        format!(
            r#"{{"model_max_length": 77, "bos_token": "{}", "eos_token": "{}", "pad_token": "{pad}", "unk_token": "{}", "tokenizer_class": "CLIPTokenizer"}}"#,
            tokenizer::START_OF_TEXT,
            tokenizer::END_OF_TEXT,
            tokenizer::END_OF_TEXT
        )
    };
    let mut files = BTreeMap::from([
        ("model_index.json".to_string(), index.to_string()),
        ("unet/config.json".to_string(), unet.to_string()),
        ("vae/config.json".to_string(), vae.to_string()),
        ("text_encoder/config.json".to_string(), text.to_string()),
        ("scheduler/scheduler_config.json".to_string(), scheduler.to_string()),
        ("tokenizer/vocab.json".to_string(), tokenizer::STANDARD_VOCAB.to_string()),
        ("tokenizer/merges.txt".to_string(), tokenizer::STANDARD_MERGES.to_string()),
        ("tokenizer/tokenizer_config.json".to_string(), tokenizer_config(pad)),
    ]);
    if family == Family::Sdxl {
        files.insert("text_encoder_2/config.json".to_string(), standard::OPENCLIP_BIGG.to_string());
        files.insert("tokenizer_2/vocab.json".to_string(), tokenizer::STANDARD_VOCAB.to_string());
        files.insert("tokenizer_2/merges.txt".to_string(), tokenizer::STANDARD_MERGES.to_string());
        files.insert("tokenizer_2/tokenizer_config.json".to_string(), tokenizer_config("!"));
    }
    files
}

/// One single-file checkpoint (LDM/SGM names, as A1111/Forge and ComfyUI
/// load them), f32. OpenCLIP text encoders (SD 2.x's, SDXL's second) are
/// written in OpenCLIP's layout (q/k/v packed into `in_proj`, SDXL's
/// projection transposed). SD 2.x's unused last block, `text_projection`
/// and `logit_scale` are not written: the model never held them (diffusers
/// drops them on load), and every loader uses the penultimate layer.
pub async fn single_file_checkpoint(model: &StableDiffusion) -> Result<Vec<u8>> {
    let mut all = BTreeMap::new();
    for (name, tensor) in named_tensors(&model.unet.without_lora(), &model.names.unet, "UNet").await? {
        all.insert(single_file::unet_name(&name, &model.configs.unet), tensor);
    }
    for (name, mut tensor) in named_tensors(&model.vae, &model.names.vae, "VAE").await? {
        let file_name = single_file::vae_name(&name, &model.configs.vae);
        // The LDM VAE's attention projections are 1x1 convolutions.
        if file_name.contains(".mid.attn_1.") && file_name.ends_with(".weight") && tensor.shape.len() == 2 {
            tensor.shape.extend([1, 1]);
        }
        all.insert(file_name, tensor);
    }
    let text = named_tensors(&model.text_encoder, &model.names.text_encoder, "text encoder").await?;
    let architecture = match model.family {
        Family::Sd1 => {
            for (name, tensor) in text {
                all.insert(single_file::sd1_text_name(&name, true), tensor);
            }
            "stable-diffusion-v1"
        }
        Family::Sd2 => {
            all.extend(pack_openclip(text, single_file::OPENCLIP_PREFIX, model.configs.text.num_hidden_layers, false)?);
            "stable-diffusion-v2"
        }
        Family::Sdxl => {
            for (name, tensor) in text {
                all.insert(single_file::clip_text_name(single_file::SDXL_TEXT_PREFIX, &name, true), tensor);
            }
            let (Some(encoder), Some(config)) = (&model.text_encoder_2, &model.configs.text_2) else {
                return Err(Error::Training { step: 0, message: "an SDXL model without its second text encoder".into() });
            };
            let text_2 = named_tensors(encoder, &model.names.text_encoder_2, "text encoder 2").await?;
            all.extend(pack_openclip(text_2, single_file::SDXL_OPENCLIP_PREFIX, config.num_hidden_layers, true)?);
            "stable-diffusion-xl-v1-base"
        }
    };
    let metadata =
        BTreeMap::from([("modelspec.architecture".to_string(), architecture.to_string()), ("burnbooth.export".to_string(), "full fine-tune".to_string())]);
    tensor_file::write(&all, &metadata)
}

/// Text-encoder tensors under transformers' names to OpenCLIP's under
/// `prefix`: q, k and v concatenated into `in_proj`, the projection transposed.
fn pack_openclip(text: BTreeMap<String, HostTensor>, prefix: &str, layers: usize, with_projection: bool) -> Result<BTreeMap<String, HostTensor>> {
    let names = single_file::openclip_names(prefix, layers, with_projection);
    let mut out = BTreeMap::new();
    let mut thirds: BTreeMap<String, [Option<HostTensor>; 3]> = BTreeMap::new();
    for (name, tensor) in text {
        let Some((file_name, third, transposed)) = names.get(&name) else {
            return Err(Error::Training { step: 0, message: format!("text-encoder tensor '{name}' has no OpenCLIP name") });
        };
        match third {
            Some(third) => thirds.entry(file_name.clone()).or_default()[*third] = Some(tensor),
            None if *transposed => {
                let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
                out.insert(file_name.clone(), HostTensor { shape: vec![cols, rows], values: single_file::transposed(&tensor.values, rows, cols) });
            }
            None => {
                out.insert(file_name.clone(), tensor);
            }
        }
    }
    for (file_name, [q, k, v]) in thirds {
        let (Some(q), Some(k), Some(v)) = (q, k, v) else {
            return Err(Error::Training { step: 0, message: format!("'{file_name}': the text encoder lacks one of q, k, v") });
        };
        let mut shape = q.shape.clone();
        shape[0] *= 3;
        out.insert(file_name, HostTensor { shape, values: [q.values, k.values, v.values].concat() });
    }
    Ok(out)
}
