//! SimpleTuner's dataloader config: a JSON array of dataset entries.
//!
//! Reading follows SimpleTuner's keys and defaults (see the reference notes),
//! with Burnbooth's stricter rules (docs/reference.md §1.2): types are checked,
//! unknown keys are reported with a suggestion, unsupported backends and
//! options fail with the dataset id named, and every problem in the file is
//! reported at once.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use super::placeholders::{expand, PlaceholderContext};
use super::values::Reader;
use crate::data::geometry::{CropAspect, CropStyle, GeometrySettings, ResolutionType};
use crate::error::{Diagnostics, Error, Result};

/// Where captions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptionStrategy {
    /// The file name without extension, underscores as spaces.
    Filename,
    /// A `.txt` file beside the image (one caption per line).
    Textfile,
    /// The dataset's `instance_prompt` for every image.
    InstancePrompt,
}

/// Where a caption is split into tags for shuffling, and how they are joined again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TagSeparator {
    /// `,`, joined with `", "`.
    Comma,
    /// ` `.
    Space,
    /// `.`, joined with `". "`.
    Period,
}

impl TagSeparator {
    pub fn split_on(self) -> char {
        match self {
            Self::Comma => ',',
            Self::Space => ' ',
            Self::Period => '.',
        }
    }

    pub fn joiner(self) -> &'static str {
        match self {
            Self::Comma => ", ",
            Self::Space => " ",
            Self::Period => ". ",
        }
    }
}

/// SimpleTuner's `caption_shuffle`: each caption also appears with its tags
/// in `count` shuffled orders (each order's text embedding cached once; a
/// sample picks one of the variants).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CaptionShuffle {
    pub count: u32,
    /// The training seed unless the dataset gives one.
    pub seed: u64,
    pub split_on: TagSeparator,
    /// Tags before this position keep their place (kohya's `keep_tokens`).
    pub position_start: usize,
    /// The caption as written is one of the variants.
    pub include_original: bool,
}

/// One image dataset (`dataset_type: image`, `type: local`).
#[derive(Debug, Clone, Serialize)]
pub struct ImageDatasetConfig {
    pub id: String,
    /// The folder of images, as written (placeholders expanded, relative
    /// paths joined to the config file's folder).
    pub instance_data_dir: String,
    pub cache_dir_vae: String,
    pub caption_strategy: CaptionStrategy,
    pub instance_prompts: Vec<String>,
    pub prepend_instance_prompt: bool,
    pub only_instance_prompt: bool,
    pub disable_multiline_split: bool,
    /// Shuffled-tag variants of each caption (`caption_shuffle`).
    pub caption_shuffle: Option<CaptionShuffle>,
    /// The dataset ids named by `conditioning_data`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditioning_data: Vec<String>,
    /// The mask dataset paired with this one (masked loss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask: Option<MaskDatasetConfig>,
    pub repeats: u32,
    pub probability: f64,
    pub ignore_epochs: bool,
    pub is_regularisation_data: bool,
    /// Held out for the validation loss (`dataset_type: eval`), never trained on.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_eval: bool,
    pub geometry: GeometrySettings,
    pub minimum_aspect_ratio: Option<f64>,
    pub maximum_aspect_ratio: Option<f64>,
    pub max_num_samples: Option<usize>,
    /// Id of the text-embed cache that holds this dataset's captions.
    pub text_embeds: String,
    pub train_batch_size: u32,
}

/// A folder of loss masks (`dataset_type: conditioning`, `conditioning_type:
/// mask`) for an image dataset: each image's mask has the image's relative
/// path (or its stem with another image extension); its red channel weighs
/// the loss, dark = ignored. It takes the image's sizes and crop.
#[derive(Debug, Clone, Serialize)]
pub struct MaskDatasetConfig {
    pub id: String,
    pub instance_data_dir: String,
    /// The image dataset it belongs to, when it names it.
    #[serde(skip)]
    pub source_dataset_id: Option<String>,
}

/// A text-embedding cache (`dataset_type: text_embeds`).
#[derive(Debug, Clone, Serialize)]
pub struct TextEmbedsConfig {
    pub id: String,
    pub cache_dir: String,
    pub default: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataloaderConfig {
    pub datasets: Vec<ImageDatasetConfig>,
    pub text_embeds: Vec<TextEmbedsConfig>,
    pub warnings: Vec<String>,
}

impl DataloaderConfig {
    pub fn default_text_embeds(&self) -> &TextEmbedsConfig {
        self.text_embeds.iter().find(|t| t.default).unwrap_or(&self.text_embeds[0])
    }
}

/// SimpleTuner's global dataset options: set in the training config, used
/// by every dataset entry that does not set its own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetOptions {
    pub resolution: f64,
    pub resolution_type: String,
    pub minimum_image_size: Option<f64>,
    pub caption_strategy: String,
    pub instance_prompt: Option<String>,
    pub prepend_instance_prompt: bool,
    pub only_instance_prompt: bool,
    pub train_batch_size: u32,
}

impl Default for DatasetOptions {
    /// SimpleTuner's defaults.
    fn default() -> Self {
        Self {
            resolution: 1024.0,
            resolution_type: "pixel_area".into(),
            minimum_image_size: None,
            caption_strategy: "filename".into(),
            instance_prompt: None,
            prepend_instance_prompt: false,
            only_instance_prompt: false,
            train_batch_size: 4,
        }
    }
}

/// Values a dataset entry falls back to, from the training config.
#[derive(Debug, Clone)]
pub struct DatasetDefaults {
    pub model_family: String,
    pub output_dir: String,
    pub options: DatasetOptions,
    pub alignment: u32,
    pub rounding: u32,
    /// Unknown keys are errors instead of warnings.
    pub strict: bool,
    /// The training seed (`caption_shuffle` draws from it unless given its own).
    pub seed: u64,
}

impl Default for DatasetDefaults {
    fn default() -> Self {
        Self {
            model_family: "sd1x".into(),
            output_dir: "output".into(),
            options: DatasetOptions::default(),
            alignment: 64,
            rounding: 2,
            strict: false,
            seed: 0,
        }
    }
}

const UNSUPPORTED_BACKENDS: [&str; 6] = ["aws", "csv", "huggingface", "parquet", "webshart", "memory"];
const UNSUPPORTED_DATASET_TYPES: [&str; 7] = ["video", "audio", "caption", "image_embeds", "conditioning_image_embeds", "distillation_cache", "grounding"];

/// Keys SimpleTuner accepts that change nothing for local image datasets here
/// (caching throughput knobs, discovery bookkeeping). Read and ignored.
const ACCEPTED_NO_OP_KEYS: [&str; 18] = [
    "vae_cache_clear_each_epoch",
    "vae_cache_ondemand",
    "vae_cache_disable",
    "skip_file_discovery",
    "preserve_data_backend_cache",
    "scan_for_errors",
    "metadata_update_interval",
    "cache_file_suffix",
    "hash_filenames",
    "compress_cache",
    "image_processing_batch_size",
    "read_batch_size",
    "write_batch_size",
    "vae_batch_size",
    "max_workers",
    "disable_validation",
    "max_upscale_threshold",
    "timestep_sampling_offset",
];

/// Keys whose feature Burnbooth lacks; using them would silently change what
/// is trained, so they are errors.
const UNSUPPORTED_FEATURE_KEYS: [&str; 6] = ["conditioning", "parquet", "video", "audio", "caption_filter_list", "image_embeds"];

/// Parses a dataloader config. `source_name` names the file in errors;
/// `base_dir` is the folder relative paths are resolved against.
pub fn parse_dataloader_config(
    text: &str,
    source_name: &str,
    base_dir: Option<&str>,
    defaults: &DatasetDefaults,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<DataloaderConfig> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| Error::Config { source_name: source_name.to_string(), problems: vec![format!("not valid JSON: {e}")] })?;
    let Value::Array(entries) = root else {
        return Err(Error::Config {
            source_name: source_name.to_string(),
            problems: vec!["must be a JSON array of dataset entries ([ {...}, {...} ])".into()],
        });
    };
    if entries.is_empty() {
        return Err(Error::Config { source_name: source_name.to_string(), problems: vec!["the array is empty: add at least one dataset".into()] });
    }

    let context = PlaceholderContext { model_family: &defaults.model_family, output_dir: &defaults.output_dir, env };
    let mut diagnostics = Diagnostics::default();
    let mut datasets = Vec::new();
    let mut text_embeds = Vec::new();
    let mut masks = Vec::new();
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();

    for (index, entry) in entries.iter().enumerate() {
        let Value::Object(object) = entry else {
            diagnostics.error(format!("entry #{} must be an object {{...}}, not {entry}", index + 1));
            continue;
        };
        let id = match object.get("id") {
            Some(Value::String(id)) if !id.trim().is_empty() => id.clone(),
            Some(Value::String(_)) | None => {
                diagnostics.error(format!("entry #{}: every dataset needs a non-empty 'id'", index + 1));
                continue;
            }
            Some(other) => {
                diagnostics.error(format!("entry #{}: 'id' must be a string, not {other}", index + 1));
                continue;
            }
        };
        let owner = format!("dataset '{id}'");
        let object = match expand_placeholders(object, &id, &context) {
            Ok(object) => object,
            Err((key, message)) => {
                diagnostics.error(format!("{owner}: '{key}' {message}"));
                continue;
            }
        };
        let mut reader = Reader::new(owner, &object, false, &mut diagnostics);
        if reader.bool(&["disabled", "disable"]).unwrap_or(false) {
            continue;
        }
        if let Some(previous) = ids.insert(id.clone(), index) {
            reader.error(format!("the id is used twice (entries #{} and #{}); ids must be unique", previous + 1, index + 1));
            continue;
        }
        let dataset_type = reader.string(&["dataset_type"]).unwrap_or_else(|| "image".into()).to_ascii_lowercase();
        let backend = reader.string(&["type"]);
        let Some(backend) = backend else {
            reader.error("'type' is missing; use \"type\": \"local\" for a folder of images");
            continue;
        };
        let backend = backend.to_ascii_lowercase();
        if UNSUPPORTED_BACKENDS.contains(&backend.as_str()) {
            reader.error(format!("backend type '{backend}' is not supported yet; only 'local' (a folder of images) is"));
            continue;
        }
        if backend != "local" {
            reader.error(format!("unknown backend type '{backend}'; supported: local"));
            continue;
        }
        match dataset_type.as_str() {
            "text_embeds" => {
                if let Some(t) = read_text_embeds(&mut reader, &id, base_dir, defaults) {
                    text_embeds.push(t);
                }
            }
            "image" => {
                if let Some(d) = read_image_dataset(&mut reader, &id, base_dir, defaults) {
                    datasets.push(d);
                }
            }
            "eval" => {
                if let Some(mut d) = read_image_dataset(&mut reader, &id, base_dir, defaults) {
                    if d.is_regularisation_data {
                        reader.error("an eval dataset is held out from training; it cannot be is_regularisation_data too");
                    }
                    // Scored one image at a time, never sampled for training.
                    (d.is_eval, d.train_batch_size, d.repeats) = (true, 1, 0);
                    datasets.push(d);
                }
            }
            "conditioning" => {
                if let Some(m) = read_mask_dataset(&mut reader, &id, base_dir, defaults) {
                    masks.push(m);
                }
            }
            other if UNSUPPORTED_DATASET_TYPES.contains(&other) => {
                reader.error(format!("dataset_type '{other}' is not supported yet; Burnbooth trains on image datasets"));
            }
            other => reader.error(format!("unknown dataset_type '{other}'; use image, text_embeds, conditioning or eval")),
        }
    }

    check_cross_references(&mut datasets, &mut text_embeds, defaults, &mut diagnostics);
    pair_masks(&mut datasets, masks, &mut diagnostics);
    let warnings = diagnostics.into_result(source_name)?;
    Ok(DataloaderConfig { datasets, text_embeds, warnings })
}

fn expand_placeholders(object: &Map<String, Value>, id: &str, context: &PlaceholderContext<'_>) -> std::result::Result<Map<String, Value>, (String, String)> {
    fn walk(value: &Value, id: &str, context: &PlaceholderContext<'_>) -> std::result::Result<Value, String> {
        Ok(match value {
            Value::String(s) => Value::String(expand(s, id, context)?),
            Value::Array(items) => Value::Array(items.iter().map(|v| walk(v, id, context)).collect::<Result<_, _>>()?),
            Value::Object(map) => Value::Object(map.iter().map(|(k, v)| Ok((k.clone(), walk(v, id, context)?))).collect::<Result<_, String>>()?),
            other => other.clone(),
        })
    }
    object.iter().map(|(key, value)| walk(value, id, context).map(|v| (key.clone(), v)).map_err(|e| (key.clone(), e))).collect()
}

/// Joins a relative path to the config's folder; absolute paths stay.
pub fn resolve_path(path: &str, base_dir: Option<&str>) -> String {
    let trimmed = path.trim();
    let trimmed = if trimmed.len() > 1 { trimmed.trim_end_matches('/') } else { trimmed };
    match base_dir {
        Some(base) if !Path::new(trimmed).is_absolute() && !base.is_empty() => Path::new(base).join(trimmed).to_string_lossy().into_owned(),
        _ => trimmed.to_string(),
    }
}

/// Keys of a mask dataset that describe sizes and crops: the mask takes its
/// image's, so these change nothing (SimpleTuner asks for them to match).
const MASK_GEOMETRY_KEYS: [&str; 16] = [
    "resolution",
    "resolution_type",
    "crop",
    "crop_style",
    "crop_aspect",
    "crop_aspect_buckets",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "minimum_aspect_ratio",
    "maximum_aspect_ratio",
    "repeats",
    "caption_strategy",
    "cache_dir_vae",
    "probability",
    "is_regularisation_data",
];

fn read_mask_dataset(reader: &mut Reader<'_>, id: &str, base_dir: Option<&str>, defaults: &DatasetDefaults) -> Option<MaskDatasetConfig> {
    reader.accept(&["id", "type", "dataset_type", "disabled", "disable"]);
    reader.accept(&ACCEPTED_NO_OP_KEYS);
    reader.accept(&MASK_GEOMETRY_KEYS);
    match reader.string(&["conditioning_type"]).map(|t| t.to_ascii_lowercase()) {
        Some(kind) if kind == "mask" => {}
        Some(kind) => {
            reader.error(format!("conditioning_type '{kind}' is not supported yet; Burnbooth reads conditioning datasets of type 'mask' (masked loss)"));
            return None;
        }
        None => {
            reader.error("a conditioning dataset needs 'conditioning_type'; Burnbooth reads \"mask\" (masked loss)");
            return None;
        }
    }
    let instance_data_dir = match reader.string(&["instance_data_dir", "instance_data_root"]) {
        Some(dir) if !dir.trim().is_empty() => resolve_path(&dir, base_dir),
        _ => {
            reader.error("'instance_data_dir' is missing or empty: a mask dataset needs the folder of its masks");
            return None;
        }
    };
    let source_dataset_id = reader.string(&["source_dataset_id"]);
    reader.report_unknown(defaults.strict);
    Some(MaskDatasetConfig { id: id.to_string(), instance_data_dir, source_dataset_id })
}

/// Pairs each mask dataset with its image dataset: the one it names
/// (`source_dataset_id`) or the one that names it (`conditioning_data`).
fn pair_masks(datasets: &mut [ImageDatasetConfig], masks: Vec<MaskDatasetConfig>, diagnostics: &mut Diagnostics) {
    for dataset in datasets.iter() {
        for named in &dataset.conditioning_data {
            if !masks.iter().any(|m| &m.id == named) {
                diagnostics.error(format!(
                    "dataset '{}': conditioning_data '{named}' is not the id of a conditioning dataset with conditioning_type mask in this file",
                    dataset.id
                ));
            }
        }
    }
    for mask in masks {
        let naming: Vec<usize> = datasets.iter().enumerate().filter(|(_, d)| d.conditioning_data.contains(&mask.id)).map(|(i, _)| i).collect();
        let source = match &mask.source_dataset_id {
            Some(source) => match datasets.iter().position(|d| &d.id == source) {
                Some(index) => Some(index),
                None => {
                    diagnostics.error(format!("mask dataset '{}': source_dataset_id '{source}' is not the id of an image dataset in this file", mask.id));
                    continue;
                }
            },
            None => match naming.as_slice() {
                [index] => Some(*index),
                [] => None,
                _ => {
                    diagnostics.error(format!("mask dataset '{}' is named by the conditioning_data of several datasets; set its source_dataset_id", mask.id));
                    continue;
                }
            },
        };
        let Some(index) = source else {
            diagnostics.error(format!(
                "mask dataset '{}' belongs to no image dataset: set its source_dataset_id, or name it in the image dataset's conditioning_data",
                mask.id
            ));
            continue;
        };
        let dataset = &mut datasets[index];
        if let Some(other) = &dataset.mask {
            diagnostics.error(format!("dataset '{}' has two mask datasets, '{}' and '{}'; keep one", dataset.id, other.id, mask.id));
            continue;
        }
        dataset.mask = Some(mask);
    }
}

fn read_text_embeds(reader: &mut Reader<'_>, id: &str, base_dir: Option<&str>, defaults: &DatasetDefaults) -> Option<TextEmbedsConfig> {
    reader.accept(&[
        "id",
        "type",
        "dataset_type",
        "disabled",
        "disable",
        "write_batch_size",
        "text_encoder_batch_size",
        "text_cache_ondemand",
        "text_cache_disable",
        "preserve_data_backend_cache",
        "compress_cache",
    ]);
    if reader.has("caption_filter_list") {
        reader.error("'caption_filter_list' is not supported yet; remove it or edit the captions instead");
    }
    reader.accept(&["caption_filter_list"]);
    let default = reader.bool(&["default"]).unwrap_or(false);
    let cache_dir = reader
        .string(&["cache_dir"])
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| format!("{}/cache/text/{}/{id}", defaults.output_dir, defaults.model_family));
    reader.report_unknown(defaults.strict);
    Some(TextEmbedsConfig { id: id.to_string(), cache_dir: resolve_path(&cache_dir, base_dir), default })
}

/// `caption_shuffle`: `{"enable": true, "count": 3, "seed": 42, "split_on":
/// "comma", "position_start": 1, "include_original": true}`, checked as
/// SimpleTuner checks it. `None` unless enabled.
fn read_caption_shuffle(reader: &mut Reader<'_>, training_seed: u64) -> Option<CaptionShuffle> {
    let (key, value) = reader.raw(&["caption_shuffle"])?;
    let Value::Object(object) = value else {
        reader.error(format!("'{key}' must be an object such as {{\"enable\": true, \"count\": 3, \"position_start\": 1}}, not {value}"));
        return None;
    };
    let known = ["enable", "count", "seed", "split_on", "position_start", "include_original"];
    for name in object.keys().filter(|k| !known.contains(&k.as_str())) {
        let hint = crate::error::nearest(name, known.iter().copied()).map(|n| format!("; did you mean '{n}'?")).unwrap_or_default();
        reader.warn(format!("'{key}.{name}' is not a caption_shuffle setting (ignored){hint}"));
    }
    let flag = |name: &str, default: bool| match object.get(name) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("'{key}.{name}' must be true or false, not {other}")),
    };
    let whole = |name: &str, min: u64, default: u64| match object.get(name) {
        None => Ok(default),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v >= min) => Ok(n.as_u64().expect("checked")),
        Some(other) => Err(format!("'{key}.{name}' must be a whole number of at least {min}, not {other}")),
    };
    let split_on = match object.get("split_on") {
        None => Ok(TagSeparator::Comma),
        Some(Value::String(s)) if s == "comma" => Ok(TagSeparator::Comma),
        Some(Value::String(s)) if s == "space" => Ok(TagSeparator::Space),
        Some(Value::String(s)) if s == "period" => Ok(TagSeparator::Period),
        Some(other) => Err(format!("'{key}.split_on' must be \"comma\", \"space\" or \"period\", not {other}")),
    };
    let settings = (|| {
        let enable = flag("enable", false)?;
        let shuffle = CaptionShuffle {
            count: whole("count", 1, 1)? as u32,
            seed: whole("seed", 0, training_seed)?,
            split_on: split_on.clone()?,
            position_start: whole("position_start", 0, 0)? as usize,
            include_original: flag("include_original", true)?,
        };
        Ok::<_, String>(enable.then_some(shuffle))
    })();
    match settings {
        Ok(shuffle) => shuffle,
        Err(problem) => {
            reader.error(problem);
            None
        }
    }
}

fn read_image_dataset(reader: &mut Reader<'_>, id: &str, base_dir: Option<&str>, defaults: &DatasetDefaults) -> Option<ImageDatasetConfig> {
    reader.accept(&["id", "type", "dataset_type", "disabled", "disable"]);
    reader.accept(&ACCEPTED_NO_OP_KEYS);
    for key in UNSUPPORTED_FEATURE_KEYS {
        if reader.has(key) {
            reader.error(format!("'{key}' is not supported yet; remove it to train on this dataset as plain images"));
        }
    }
    reader.accept(&UNSUPPORTED_FEATURE_KEYS);
    for key in ["delete_unwanted_images", "delete_problematic_images", "delete_nsfw_images"] {
        if reader.bool(&[key]) == Some(true) {
            reader.warn(format!("'{key}' is ignored: Burnbooth never deletes your files; unusable images are skipped and listed in the plan"));
        }
    }
    for key in ["start_epoch", "start_step", "end_epoch", "end_step"] {
        if reader.has(key) {
            reader.warn(format!("'{key}' is not supported yet: the dataset is used for the whole run"));
        }
    }
    reader.accept(&["start_epoch", "start_step", "end_epoch", "end_step", "slider_strength", "disable_after_epoch_step"]);
    let caption_shuffle = read_caption_shuffle(reader, defaults.seed);
    let conditioning_data = reader.strings(&["conditioning_data"]).unwrap_or_default();
    if reader.has("conditioning_type") || reader.has("source_dataset_id") {
        reader.error("'conditioning_type' and 'source_dataset_id' belong on the mask dataset (dataset_type conditioning), not on an image dataset");
    }
    reader.accept(&["conditioning_type", "source_dataset_id"]);
    if let Some(backend) = reader.string(&["metadata_backend"]) {
        match backend.to_ascii_lowercase().as_str() {
            "discovery" | "json" | "filesystem" => {}
            other => reader.error(format!("metadata_backend '{other}' is not supported; use discovery")),
        }
    }

    let instance_data_dir = match reader.string(&["instance_data_dir", "instance_data_root"]) {
        Some(dir) if !dir.trim().is_empty() => resolve_path(&dir, base_dir),
        _ => {
            reader.error("'instance_data_dir' is missing or empty: a local dataset needs the folder of its images");
            String::new()
        }
    };
    let cache_dir_vae = reader
        .string(&["cache_dir_vae"])
        .filter(|d| !d.trim().is_empty())
        .unwrap_or_else(|| format!("{}/cache/vae/{}/{id}", defaults.output_dir, defaults.model_family));

    // Captions.
    let instance_prompts = reader.strings(&["instance_prompt"]).or_else(|| defaults.options.instance_prompt.clone().map(|p| vec![p]));
    let instance_prompts: Vec<String> = instance_prompts.unwrap_or_default().iter().map(|p| p.trim().to_string()).collect();
    let strategy_text = reader.string(&["caption_strategy"]).unwrap_or_else(|| defaults.options.caption_strategy.clone());
    let caption_strategy = match strategy_text.trim().to_ascii_lowercase().as_str() {
        "filename" => Some(CaptionStrategy::Filename),
        "textfile" => Some(CaptionStrategy::Textfile),
        "instanceprompt" => Some(CaptionStrategy::InstancePrompt),
        "instance_prompt" => {
            reader.warn("caption_strategy 'instance_prompt' is spelled 'instanceprompt' in SimpleTuner; accepted");
            Some(CaptionStrategy::InstancePrompt)
        }
        s @ ("parquet" | "csv" | "huggingface" | "webshart") => {
            reader.error(format!("caption_strategy '{s}' is not supported yet; use filename, textfile or instanceprompt"));
            None
        }
        other => {
            reader.error(format!("caption_strategy '{other}' is not one of: filename, textfile, instanceprompt"));
            None
        }
    };
    let prepend_instance_prompt = reader.bool(&["prepend_instance_prompt"]).unwrap_or(defaults.options.prepend_instance_prompt);
    let only_instance_prompt = reader.bool(&["only_instance_prompt"]).unwrap_or(defaults.options.only_instance_prompt);
    let disable_multiline_split = reader.bool(&["disable_multiline_split"]).unwrap_or(false);
    let needs_prompt = caption_strategy == Some(CaptionStrategy::InstancePrompt) || prepend_instance_prompt || only_instance_prompt;
    if needs_prompt && instance_prompts.iter().all(|p| p.is_empty()) {
        let why = if caption_strategy == Some(CaptionStrategy::InstancePrompt) {
            "caption_strategy is instanceprompt"
        } else if prepend_instance_prompt {
            "prepend_instance_prompt is true"
        } else {
            "only_instance_prompt is true"
        };
        reader.error(format!("{why} but no non-empty 'instance_prompt' is given"));
    }

    // Sampling.
    let repeats = reader.int(&["repeats"], 0).unwrap_or(0) as u32;
    let probability = reader.f64(&["probability"]).unwrap_or(1.0);
    if probability < 0.0 {
        reader.error(format!("'probability' must be 0 or more, not {probability}"));
    }
    let ignore_epochs = reader.bool(&["ignore_epochs"]).unwrap_or(false);
    let is_regularisation_data = reader.bool(&["is_regularisation_data", "is_regularization_data"]).unwrap_or(false);
    let max_num_samples = reader.int(&["max_num_samples"], 1).map(|n| n as usize);
    let train_batch_size = reader.int(&["train_batch_size"], 1).map(|n| n as u32).unwrap_or(defaults.options.train_batch_size);
    let text_embeds = reader.string(&["text_embeds", "text_embed_cache"]).unwrap_or_default();

    let geometry = read_geometry(reader, defaults);
    let minimum_aspect_ratio = reader.f64(&["minimum_aspect_ratio"]).filter(|v| *v > 0.0);
    let maximum_aspect_ratio = reader.f64(&["maximum_aspect_ratio"]).filter(|v| *v > 0.0);
    reader.report_unknown(defaults.strict);

    Some(ImageDatasetConfig {
        id: id.to_string(),
        instance_data_dir,
        cache_dir_vae: resolve_path(&cache_dir_vae, base_dir),
        caption_strategy: caption_strategy?,
        instance_prompts,
        prepend_instance_prompt,
        only_instance_prompt,
        disable_multiline_split,
        caption_shuffle,
        conditioning_data,
        mask: None,
        repeats,
        probability,
        ignore_epochs,
        is_regularisation_data,
        is_eval: false,
        geometry: geometry?,
        minimum_aspect_ratio,
        maximum_aspect_ratio,
        max_num_samples,
        text_embeds,
        train_batch_size,
    })
}

fn read_geometry(reader: &mut Reader<'_>, defaults: &DatasetDefaults) -> Option<GeometrySettings> {
    let mut ok = true;
    let mut settings = GeometrySettings { alignment: defaults.alignment, rounding: defaults.rounding, ..Default::default() };
    let resolution_type = reader.choice(&["resolution_type"], &["pixel", "area", "pixel_area"]).unwrap_or_else(|| defaults.options.resolution_type.clone());
    let had_resolution = reader.has("resolution");
    let resolution = reader.f64(&["resolution"]).unwrap_or(defaults.options.resolution);
    if resolution <= 0.0 {
        reader.error(format!("'resolution' must be positive, not {resolution}"));
        ok = false;
    }
    let mut maximum = reader.f64(&["maximum_image_size"]).filter(|v| *v > 0.0);
    let mut downsample = reader.f64(&["target_downsample_size"]).filter(|v| *v > 0.0);
    let mut minimum =
        if reader.has("minimum_image_size") { reader.f64(&["minimum_image_size"]).filter(|v| *v > 0.0) } else { defaults.options.minimum_image_size };
    match resolution_type.as_str() {
        "pixel_area" => {
            if resolution.fract() != 0.0 {
                let source = if had_resolution { "" } else { " (from the training config)" };
                reader.error(format!("resolution_type pixel_area needs a whole-number edge in pixels as 'resolution', not {resolution}{source}"));
                ok = false;
            }
            // SimpleTuner converts pixel_area to area: edge E -> E*E/1e6 megapixels.
            settings.resolution_type = ResolutionType::Area;
            settings.resolution = resolution * resolution / 1e6;
            for value in [&mut maximum, &mut downsample, &mut minimum].into_iter().flatten() {
                *value = *value * *value / 1e6;
            }
        }
        "area" => {
            settings.resolution_type = ResolutionType::Area;
            settings.resolution = resolution;
            if resolution > 20.0 {
                reader.error(format!(
                    "resolution {resolution} with resolution_type area would be {resolution} megapixels; for an edge in pixels use resolution_type pixel_area"
                ));
                ok = false;
            }
        }
        _ => {
            settings.resolution_type = ResolutionType::Pixel;
            settings.resolution = resolution;
        }
    }
    if let Some(m) = minimum {
        if settings.resolution_type == ResolutionType::Area && m > 5.0 {
            reader.error(format!(
                "minimum_image_size is {m} megapixels (over 5); with resolution_type area it is in megapixels, with pixel_area or pixel in pixels"
            ));
            ok = false;
        }
    }
    if maximum.is_some() != downsample.is_some() && maximum.is_some() {
        reader.error("maximum_image_size needs target_downsample_size too");
        ok = false;
    }
    if let Some(m) = maximum {
        if settings.resolution_type == ResolutionType::Area && m >= 20.0 {
            reader.error(format!("maximum_image_size {m} is in megapixels with resolution_type area; it must be under 20"));
            ok = false;
        }
        if settings.resolution_type == ResolutionType::Pixel && m < 512.0 {
            reader.error(format!("maximum_image_size {m} px is under 512 with resolution_type pixel"));
            ok = false;
        }
    }
    settings.maximum_image_size = maximum;
    settings.target_downsample_size = downsample;
    settings.minimum_image_size = minimum;

    settings.crop = reader.bool(&["crop"]).unwrap_or(false);
    if let Some(style) = reader.choice(&["crop_style"], &["random", "center", "centre", "corner", "face"]) {
        settings.crop_style = match style.as_str() {
            "center" | "centre" => CropStyle::Center,
            "corner" => CropStyle::Corner,
            "face" => {
                reader.error("crop_style 'face' is not supported yet (it needs a face detector); use center");
                ok = false;
                CropStyle::Center
            }
            _ => CropStyle::Random,
        };
    } else if reader.has("crop_style") {
        ok = false;
    }
    if let Some(aspect) = reader.choice(&["crop_aspect"], &["square", "preserve", "random", "closest"]) {
        settings.crop_aspect = match aspect.as_str() {
            "preserve" => CropAspect::Preserve,
            "random" => CropAspect::Random,
            "closest" => CropAspect::Closest,
            _ => CropAspect::Square,
        };
    } else if reader.has("crop_aspect") {
        ok = false;
    }
    if let Some((key, value)) = reader.raw(&["crop_aspect_buckets"]) {
        match value.as_array().map(|items| items.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>()) {
            Some(Some(buckets)) if !buckets.is_empty() && buckets.iter().all(|b| *b > 0.0) => settings.crop_aspect_buckets = buckets,
            _ => {
                reader.error(format!("'{key}' must be a non-empty list of positive aspect ratios such as [0.75, 1.0, 1.33], not {value}"));
                ok = false;
            }
        }
    }
    if settings.crop && matches!(settings.crop_aspect, CropAspect::Random | CropAspect::Closest) && settings.crop_aspect_buckets.is_empty() {
        reader.error("crop_aspect random or closest needs 'crop_aspect_buckets', a list of aspect ratios");
        ok = false;
    }
    ok.then_some(settings)
}

fn check_cross_references(
    datasets: &mut [ImageDatasetConfig],
    text_embeds: &mut Vec<TextEmbedsConfig>,
    defaults: &DatasetDefaults,
    diagnostics: &mut Diagnostics,
) {
    if datasets.is_empty() && diagnostics.errors.is_empty() {
        diagnostics.error("no image dataset: add an entry with \"type\": \"local\" and an instance_data_dir");
    }
    let default_count = text_embeds.iter().filter(|t| t.default).count();
    if default_count > 1 {
        let ids: Vec<&str> = text_embeds.iter().filter(|t| t.default).map(|t| t.id.as_str()).collect();
        diagnostics.error(format!("only one text_embeds entry can be \"default\": true; these all are: {}", ids.join(", ")));
    }
    if text_embeds.is_empty() {
        text_embeds.push(TextEmbedsConfig {
            id: "text-embeds".into(),
            cache_dir: format!("{}/cache/text/{}", defaults.output_dir, defaults.model_family),
            default: true,
        });
    } else if default_count == 0 {
        text_embeds[0].default = true;
    }
    let default_id = text_embeds.iter().find(|t| t.default).map(|t| t.id.clone()).unwrap_or_default();
    for dataset in datasets.iter_mut() {
        if dataset.text_embeds.is_empty() {
            dataset.text_embeds = default_id.clone();
        } else if !text_embeds.iter().any(|t| t.id == dataset.text_embeds) {
            diagnostics.error(format!("dataset '{}': text_embeds '{}' is not the id of any text_embeds entry in this file", dataset.id, dataset.text_embeds));
        }
    }
    // Each dataset caches latents in its own folder; sharing one would mix
    // latents of different geometry.
    let mut vae_dirs: BTreeMap<String, &str> = BTreeMap::new();
    for dataset in datasets.iter() {
        let dir = normalise_dir(&dataset.cache_dir_vae);
        if let Some(other) = vae_dirs.insert(dir.clone(), &dataset.id) {
            diagnostics.error(format!("datasets '{other}' and '{}' share cache_dir_vae '{}'; give each dataset its own", dataset.id, dataset.cache_dir_vae));
        }
        if let Some(t) = text_embeds.iter().find(|t| normalise_dir(&t.cache_dir) == dir) {
            diagnostics.error(format!(
                "dataset '{}': cache_dir_vae '{}' is also the cache_dir of text_embeds '{}'; use separate folders",
                dataset.id, dataset.cache_dir_vae, t.id
            ));
        }
    }
}

fn normalise_dir(dir: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in dir.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if dir.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}
