//! Stable Diffusion's components (tokenizer, CLIP text encoder, VAE, UNet)
//! and loading them from a diffusers folder or a single-file checkpoint.

pub mod activation;
pub mod attention;
mod backend;
pub mod blocks;
pub mod clip;
pub mod config;
pub mod conv;
pub mod dropout;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod matmul;
pub mod naming;
pub mod safetensors_file;
pub mod single_file;
pub mod standard;
pub mod tokenizer;
pub mod unet;
pub mod vae;

use burn::tensor::{DType, Device};
use serde::Serialize;

use crate::error::{Error, Result};
use clip::ClipTextModel;
use config::{parse, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use loader::{Loader, TensorSource};
use safetensors_file::SafetensorsFile;
use single_file::{OpenClipView, OPENCLIP_PREFIX, SD1_TEXT_PREFIX, SDXL_OPENCLIP_PREFIX, SDXL_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX};
use tokenizer::ClipTokenizer;
use unet::UNet2DConditionModel;
use vae::AutoencoderKl;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

/// The storage dtype of each component's weight matrices and kernels
/// (norms and biases stay f32; see [`layers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightDtypes {
    pub unet: DType,
    pub vae: DType,
    pub text_encoder: DType,
}

impl Default for WeightDtypes {
    fn default() -> Self {
        Self { unet: DType::F32, vae: DType::F32, text_encoder: DType::F32 }
    }
}

impl WeightDtypes {
    /// Every component in `dtype` (inference only).
    pub fn all(dtype: DType) -> Self {
        Self { unet: dtype, vae: dtype, text_encoder: dtype }
    }
}

/// The configs of every component.
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text: ClipTextConfig,
    /// SDXL's second text encoder (OpenCLIP bigG, with projection).
    pub text_2: Option<ClipTextConfig>,
    pub scheduler: SchedulerConfig,
    pub pad_token: String,
    pub pad_token_2: String,
}

impl ModelConfigs {
    pub fn family(&self) -> Result<Family> {
        if self.unet.addition_embed_type.as_deref() == Some("text_time") {
            if self.text_2.is_none() {
                return Err(Error::Config {
                    source_name: "model".into(),
                    problems: vec!["an SDXL UNet needs the second text encoder (text_encoder_2/ and tokenizer_2/)".into()],
                });
            }
            return Ok(Family::Sdxl);
        }
        // SD 2.x uses OpenCLIP-H (gelu); SD 1.x CLIP-L (quick_gelu).
        Ok(match self.text.hidden_act {
            config::ClipActivation::Gelu => Family::Sd2,
            config::ClipActivation::QuickGelu => Family::Sd1,
        })
    }

    /// The published SD 1.5, SD 2.1 or SDXL 1.0 configs.
    pub fn standard(family: Family) -> Self {
        let (unet, vae, text, scheduler, pad) = match family {
            Family::Sd1 => (standard::SD15_UNET, standard::SD_VAE, standard::CLIP_L, standard::SD15_SCHEDULER, tokenizer::END_OF_TEXT),
            Family::Sd2 => (standard::SD21_UNET, standard::SD_VAE, standard::OPENCLIP_H, standard::SD21_SCHEDULER, "!"),
            Family::Sdxl => (standard::SDXL_UNET, standard::SDXL_VAE, standard::CLIP_L, standard::SDXL_SCHEDULER, tokenizer::END_OF_TEXT),
        };
        fn builtin<T: serde::de::DeserializeOwned>(text: &str) -> T {
            serde_json::from_str(text).expect("valid built-in config")
        }
        Self {
            unet: builtin(unet),
            vae: builtin(vae),
            text: builtin(text),
            text_2: (family == Family::Sdxl).then(|| builtin(standard::OPENCLIP_BIGG)),
            scheduler: builtin(scheduler),
            pad_token: pad.to_string(),
            pad_token_2: "!".to_string(),
        }
    }
}

/// Files of a model, by path relative to the model (a folder natively,
/// picked files in the browser).
pub trait ModelFiles {
    fn describe(&self) -> String;
    fn exists(&self, relative: &str) -> bool;
    fn read_text(&self, relative: &str) -> Result<String>;
    fn safetensors(&self, relative: &str) -> Result<SafetensorsFile>;
}

/// A diffusers folder on disk; weights are memory-mapped.
#[cfg(not(target_arch = "wasm32"))]
pub struct DiskFolder {
    pub root: std::path::PathBuf,
}

#[cfg(not(target_arch = "wasm32"))]
impl ModelFiles for DiskFolder {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn exists(&self, relative: &str) -> bool {
        self.root.join(relative).exists()
    }

    fn read_text(&self, relative: &str) -> Result<String> {
        let path = self.root.join(relative);
        std::fs::read_to_string(&path).map_err(|e| Error::Io { path: path.display().to_string(), message: e.to_string() })
    }

    fn safetensors(&self, relative: &str) -> Result<SafetensorsFile> {
        SafetensorsFile::open(&self.root.join(relative).display().to_string())
    }
}

/// A loaded SD 1.x / 2.x model.
pub struct StableDiffusion {
    pub family: Family,
    pub configs: ModelConfigs,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second tokenizer and text encoder.
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder_2: Option<ClipTextModel>,
    pub vae: AutoencoderKl,
    pub unet: UNet2DConditionModel,
    pub fingerprints: Fingerprints,
    /// Checkpoint (diffusers) names of the loaded parameters, for exports.
    pub names: ComponentNames,
}

/// [`loader::ParamNames`] of each component.
#[derive(Debug, Clone, Default)]
pub struct ComponentNames {
    pub unet: loader::ParamNames,
    pub vae: loader::ParamNames,
    pub text_encoder: loader::ParamNames,
    pub text_encoder_2: loader::ParamNames,
}

/// Each component's identity (a hash of its weights), for cache keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fingerprints {
    pub unet: String,
    pub vae: String,
    pub text_encoder: String,
    /// Empty without a second text encoder.
    pub text_encoder_2: String,
}

impl Fingerprints {
    /// The identity of everything that encodes captions (both SDXL encoders),
    /// so caches of different models never mix.
    pub fn text(&self) -> String {
        if self.text_encoder_2.is_empty() {
            self.text_encoder.clone()
        } else {
            format!("{}+{}", self.text_encoder, self.text_encoder_2)
        }
    }
}

/// Reads the configs of a diffusers folder.
pub fn read_folder_configs(files: &dyn ModelFiles) -> Result<ModelConfigs> {
    for sub in ["unet", "vae", "text_encoder", "tokenizer"] {
        if !files.exists(sub) {
            return Err(Error::Io {
                path: format!("{}/{sub}", files.describe()),
                message: format!("missing sub-folder '{sub}/': a diffusers model folder has unet/, vae/, text_encoder/ and tokenizer/"),
            });
        }
    }
    let read = |path: &str| files.read_text(path);
    let scheduler = if files.exists("scheduler/scheduler_config.json") {
        parse(&read("scheduler/scheduler_config.json")?, &format!("{}/scheduler/scheduler_config.json", files.describe()))?
    } else {
        SchedulerConfig::default()
    };
    let text_2 = if files.exists("text_encoder_2/config.json") {
        Some(parse(&read("text_encoder_2/config.json")?, &format!("{}/text_encoder_2/config.json", files.describe()))?)
    } else {
        None
    };
    Ok(ModelConfigs {
        unet: parse(&read("unet/config.json")?, &format!("{}/unet/config.json", files.describe()))?,
        vae: parse(&read("vae/config.json")?, &format!("{}/vae/config.json", files.describe()))?,
        text: parse(&read("text_encoder/config.json")?, &format!("{}/text_encoder/config.json", files.describe()))?,
        text_2,
        scheduler,
        pad_token: pad_token(files, "tokenizer")?,
        pad_token_2: if files.exists("tokenizer_2") { pad_token(files, "tokenizer_2")? } else { tokenizer::END_OF_TEXT.to_string() },
    })
}

/// The pad token from `<folder>/tokenizer_config.json` or `special_tokens_map.json`.
fn pad_token(files: &dyn ModelFiles, folder: &str) -> Result<String> {
    for name in [format!("{folder}/tokenizer_config.json"), format!("{folder}/special_tokens_map.json")] {
        let name = name.as_str();
        if files.exists(name) {
            let value: serde_json::Value =
                serde_json::from_str(&files.read_text(name)?).map_err(|e| Error::Config { source_name: name.into(), problems: vec![e.to_string()] })?;
            match &value["pad_token"] {
                serde_json::Value::String(s) => return Ok(s.clone()),
                serde_json::Value::Object(o) => {
                    if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                        return Ok(s.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(tokenizer::END_OF_TEXT.to_string())
}

/// The weights file of a component: safetensors only (pickles are refused).
fn component_weights(files: &dyn ModelFiles, component: &str, names: &[&str]) -> Result<SafetensorsFile> {
    for name in names {
        let path = format!("{component}/{name}");
        if files.exists(&path) {
            return files.safetensors(&path);
        }
    }
    for pickle in ["diffusion_pytorch_model.bin", "pytorch_model.bin"] {
        let path = format!("{component}/{pickle}");
        if files.exists(&path) {
            safetensors_file::refuse_pickle(&format!("{}/{path}", files.describe()))?;
        }
    }
    Err(Error::Io { path: format!("{}/{component}", files.describe()), message: format!("no weights found (looked for {})", names.join(", ")) })
}

fn tokenizer_from_folder(files: &dyn ModelFiles, folder: &str, pad: &str) -> Result<ClipTokenizer> {
    let source = format!("{}/{folder}", files.describe());
    let (vocab, merges, json) = (format!("{folder}/vocab.json"), format!("{folder}/merges.txt"), format!("{folder}/tokenizer.json"));
    if files.exists(&vocab) && files.exists(&merges) {
        return ClipTokenizer::from_vocab_and_merges(&files.read_text(&vocab)?, &files.read_text(&merges)?, pad, &source);
    }
    if files.exists(&json) {
        return ClipTokenizer::from_tokenizer_json(&files.read_text(&json)?, pad, &source);
    }
    Err(Error::Io { path: source, message: "no vocab.json + merges.txt or tokenizer.json".into() })
}

/// Whether names in a file carry transformers' `text_model.` prefix.
/// Text-encoder names without a folder's `text_model.` prefix (the form
/// the single-file renames start from).
fn has_text_model_prefix(file: &dyn TensorSource, prefix: &str) -> bool {
    file.tensor_names().iter().any(|n| n.starts_with(&format!("{prefix}text_model.")))
}

/// One component read through its loader, with what the model keeps of it.
struct Loaded<M> {
    module: M,
    fingerprint: String,
    names: loader::ParamNames,
}

/// Loads one component with `load`, then checks that every tensor of the
/// file was used (`unused_allowed` names may stay unread).
fn load_component<M>(mut loader: Loader<'_>, what: &str, unused_allowed: &dyn Fn(&str) -> bool, load: impl FnOnce(&mut Loader<'_>) -> M) -> Result<Loaded<M>> {
    let module = load(&mut loader);
    let fingerprint = loader.fingerprint();
    let names = std::mem::take(&mut loader.names);
    loader.finish(what, unused_allowed)?;
    Ok(Loaded { module, fingerprint, names })
}

/// A loader of one component's tensors from `source`, stored in `dtype`.
fn component_loader<'a>(source: &'a dyn TensorSource, rename: loader::Rename<'a>, dtype: DType, device: &Device) -> Loader<'a> {
    Loader::new(vec![source], rename, device.clone()).with_weight_dtype(dtype)
}

/// Names used as the file spells them.
fn unchanged<'a>() -> loader::Rename<'a> {
    Box::new(|name| name.to_string())
}

/// transformers' position ids are a buffer, not a weight.
fn position_ids(name: &str) -> bool {
    name.ends_with("position_ids")
}

impl StableDiffusion {
    /// Loads a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
    pub fn from_folder(files: &dyn ModelFiles, device: &Device) -> Result<Self> {
        Self::from_folder_with(files, device, WeightDtypes::default())
    }

    /// [`from_folder`](Self::from_folder), storing weights in `dtypes`.
    pub fn from_folder_with(files: &dyn ModelFiles, device: &Device, dtypes: WeightDtypes) -> Result<Self> {
        let configs = read_folder_configs(files)?;
        let family = configs.family()?;
        let tokenizer = tokenizer_from_folder(files, "tokenizer", &configs.pad_token)?;
        let model_names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"];
        let text_names = ["model.safetensors", "model.fp16.safetensors"];

        let unet_file = component_weights(files, "unet", &model_names)?;
        let unet = load_component(component_loader(&unet_file, unchanged(), dtypes.unet, device), "UNet", &|_| false, |l| {
            UNet2DConditionModel::load(&configs.unet, l)
        })?;
        let vae_file = component_weights(files, "vae", &model_names)?;
        let vae = load_component(component_loader(&vae_file, unchanged(), dtypes.vae, device), "VAE", &|_| false, |l| AutoencoderKl::load(&configs.vae, l))?;

        // transformers 5 saves CLIPTextModel without the `text_model.` prefix;
        // it keeps SDXL's text_projection outside text_model.
        let text_encoder = |folder: &str, config: &ClipTextConfig, projection: bool, what: &str| -> Result<Loaded<ClipTextModel>> {
            let file = component_weights(files, folder, &text_names)?;
            let rename: loader::Rename<'_> = if has_text_model_prefix(&file, "") { Box::new(clip::transformers_key) } else { unchanged() };
            load_component(component_loader(&file, rename, dtypes.text_encoder, device), what, &position_ids, |l| ClipTextModel::load(config, l, projection))
        };
        let text = text_encoder("text_encoder", &configs.text, false, "text encoder")?;
        let (mut tokenizer_2, mut text_2) = (None, None);
        if let Some(config) = &configs.text_2 {
            tokenizer_2 = Some(tokenizer_from_folder(files, "tokenizer_2", &configs.pad_token_2)?);
            text_2 = Some(text_encoder("text_encoder_2", config, true, "text encoder 2")?);
        }
        Ok(Self::assemble(family, configs, (tokenizer, text), tokenizer_2.zip(text_2), vae, unet))
    }

    /// Loads a single-file checkpoint. `configs` come from a diffusers folder
    /// when given, else from the published model of the detected family.
    pub fn from_single_file(file: &SafetensorsFile, configs: Option<ModelConfigs>, device: &Device) -> Result<Self> {
        Self::from_single_file_with(file, configs, device, WeightDtypes::default())
    }

    /// [`from_single_file`](Self::from_single_file), storing weights in `dtypes`.
    pub fn from_single_file_with(file: &SafetensorsFile, configs: Option<ModelConfigs>, device: &Device, dtypes: WeightDtypes) -> Result<Self> {
        let family = detect_family(file)?;
        let configs = configs.unwrap_or_else(|| ModelConfigs::standard(family));
        let tokenizer = ClipTokenizer::standard(&configs.pad_token)?;
        // Each component ignores the others' tensors, known by their prefix.
        let outside = |prefix: &'static str| move |n: &str| !n.starts_with(prefix);

        let unet_config = configs.unet.clone();
        let unet = load_component(
            component_loader(file, Box::new(move |n| single_file::unet_name(n, &unet_config)), dtypes.unet, device),
            "UNet",
            &outside(UNET_PREFIX),
            |l| UNet2DConditionModel::load(&configs.unet, l),
        )?;
        let vae_config = configs.vae.clone();
        let vae = load_component(
            component_loader(file, Box::new(move |n| single_file::vae_name(n, &vae_config)), dtypes.vae, device),
            "VAE",
            &outside(VAE_PREFIX),
            |l| AutoencoderKl::load(&configs.vae, l),
        )?;

        let clip = |l: &mut Loader<'_>| ClipTextModel::load(&configs.text, l, false);
        let text = match family {
            Family::Sd1 => {
                let with_prefix = has_text_model_prefix(file, SD1_TEXT_PREFIX);
                let rename = Box::new(move |n: &str| single_file::sd1_text_name(n, with_prefix));
                load_component(
                    component_loader(file, rename, dtypes.text_encoder, device),
                    "text encoder",
                    &|n| outside(SD1_TEXT_PREFIX)(n) || position_ids(n),
                    clip,
                )?
            }
            Family::Sd2 => {
                let view = OpenClipView::new(file, OPENCLIP_PREFIX, configs.text.num_hidden_layers, false);
                load_component(component_loader(&view, unchanged(), dtypes.text_encoder, device), "text encoder", &|_| false, clip)?
            }
            Family::Sdxl => {
                let with_prefix = has_text_model_prefix(file, SDXL_TEXT_PREFIX);
                let rename = Box::new(move |n: &str| single_file::clip_text_name(SDXL_TEXT_PREFIX, n, with_prefix));
                load_component(
                    component_loader(file, rename, dtypes.text_encoder, device),
                    "text encoder",
                    &|n| outside(SDXL_TEXT_PREFIX)(n) || position_ids(n),
                    clip,
                )?
            }
        };
        let mut second = None;
        if let (Family::Sdxl, Some(config)) = (family, &configs.text_2) {
            let view = OpenClipView::new(file, SDXL_OPENCLIP_PREFIX, config.num_hidden_layers, true);
            let text_2 = load_component(component_loader(&view, unchanged(), dtypes.text_encoder, device), "text encoder 2", &|_| false, |l| {
                ClipTextModel::load(config, l, true)
            })?;
            second = Some((ClipTokenizer::standard(&configs.pad_token_2)?, text_2));
        }
        Ok(Self::assemble(family, configs, (tokenizer, text), second, vae, unet))
    }

    /// The model from its loaded components.
    fn assemble(
        family: Family,
        configs: ModelConfigs,
        (tokenizer, text): (ClipTokenizer, Loaded<ClipTextModel>),
        second: Option<(ClipTokenizer, Loaded<ClipTextModel>)>,
        vae: Loaded<AutoencoderKl>,
        unet: Loaded<UNet2DConditionModel>,
    ) -> Self {
        let (tokenizer_2, text_2) = second.unzip();
        let (text_encoder_2, text_2_fingerprint, text_2_names) = match text_2 {
            Some(t) => (Some(t.module), t.fingerprint, t.names),
            None => (None, String::new(), loader::ParamNames::default()),
        };
        Self {
            family,
            configs,
            tokenizer,
            fingerprints: Fingerprints { unet: unet.fingerprint, vae: vae.fingerprint, text_encoder: text.fingerprint, text_encoder_2: text_2_fingerprint },
            names: ComponentNames { unet: unet.names, vae: vae.names, text_encoder: text.names, text_encoder_2: text_2_names },
            text_encoder: text.module,
            tokenizer_2,
            text_encoder_2,
            vae: vae.module,
            unet: unet.module,
        }
    }
}

/// The family of a single file, from its tensors (diffusers' detection keys).
pub fn detect_family(file: &dyn TensorSource) -> Result<Family> {
    if file.shape(&format!("{SDXL_OPENCLIP_PREFIX}token_embedding.weight")).is_some() {
        if file.shape(&format!("{SDXL_TEXT_PREFIX}text_model.embeddings.token_embedding.weight")).is_none()
            && file.shape(&format!("{SDXL_TEXT_PREFIX}embeddings.token_embedding.weight")).is_none()
        {
            return Err(Error::Config {
                source_name: file.path().to_string(),
                problems: vec!["an SGM checkpoint without the CLIP-L encoder (an SDXL refiner?): only SDXL base models are supported".into()],
            });
        }
        return Ok(Family::Sdxl);
    }
    if file.shape(&format!("{OPENCLIP_PREFIX}token_embedding.weight")).is_some() {
        return Ok(Family::Sd2);
    }
    if file.tensor_names().iter().any(|n| n.starts_with(SD1_TEXT_PREFIX)) {
        return Ok(Family::Sd1);
    }
    Err(Error::Config {
        source_name: file.path().to_string(),
        problems: vec!["not a Stable Diffusion 1.x/2.x checkpoint: no text encoder under cond_stage_model.".into()],
    })
}

/// Every tensor a model with these configs needs, with its shape, in
/// diffusers names (`unet.`, `vae.`, `text_encoder.` prefixed). Computed by a
/// dry run of the loaders: nothing is allocated.
pub fn expected_keys(configs: &ModelConfigs) -> Vec<(String, Vec<usize>)> {
    let device = Device::flex();
    let mut all = Vec::new();
    let mut loader = Loader::dry_run(device.clone());
    let _ = UNet2DConditionModel::load(&configs.unet, &mut loader);
    all.extend(loader.requested.into_iter().map(|(n, s)| (format!("unet.{n}"), s)));
    let mut loader = Loader::dry_run(device.clone());
    let _ = AutoencoderKl::load(&configs.vae, &mut loader);
    all.extend(loader.requested.into_iter().map(|(n, s)| (format!("vae.{n}"), s)));
    let mut loader = Loader::dry_run(device.clone());
    let _ = ClipTextModel::load(&configs.text, &mut loader, false);
    all.extend(loader.requested.into_iter().map(|(n, s)| (format!("text_encoder.{}", clip::transformers_key(&n)), s)));
    if let Some(text_2) = &configs.text_2 {
        let mut loader = Loader::dry_run(device);
        let _ = ClipTextModel::load(text_2, &mut loader, true);
        all.extend(loader.requested.into_iter().map(|(n, s)| (format!("text_encoder_2.{}", clip::transformers_key(&n)), s)));
    }
    all
}
