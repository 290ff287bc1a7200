//! The model the user picked: a diffusers folder or one `.safetensors`
//! checkpoint, read into memory and described before anything is loaded
//! onto the GPU.

use std::collections::BTreeMap;

use burn::tensor::Device;
use trainer_core::models::safetensors_file::SafetensorsFile;
use trainer_core::models::{detect_family, read_folder_configs, Family, ModelFiles, StableDiffusion, WeightDtypes};
use trainer_core::train::full_export::source_config_paths;
use trainer_core::{Error, Result};

use crate::browser::PickedFile;
use crate::gpu::AdapterSummary;

/// Weight files the core looks for, per component, in its order of preference.
const WEIGHTS: [(&str, &[&str]); 4] = [
    ("unet", &["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]),
    ("vae", &["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"]),
    ("text_encoder", &["model.safetensors", "model.fp16.safetensors"]),
    // SDXL only (the folder has text_encoder_2/config.json).
    ("text_encoder_2", &["model.safetensors", "model.fp16.safetensors"]),
];

/// The picked model's files that loading needs, in memory.
pub enum PickedModel {
    Folder { name: String, files: BTreeMap<String, Vec<u8>> },
    SingleFile { name: String, file: SafetensorsFile, bytes: u64 },
}

impl ModelFiles for PickedModelFolder<'_> {
    fn describe(&self) -> String {
        self.name.to_string()
    }

    fn exists(&self, relative: &str) -> bool {
        self.files.contains_key(relative) || self.files.keys().any(|k| k.starts_with(&format!("{relative}/")))
    }

    fn read_text(&self, relative: &str) -> Result<String> {
        let bytes =
            self.files.get(relative).ok_or_else(|| Error::Io { path: format!("{}/{relative}", self.name), message: "not in the picked folder".into() })?;
        String::from_utf8(bytes.clone()).map_err(|e| Error::Io { path: format!("{}/{relative}", self.name), message: e.to_string() })
    }

    fn safetensors(&self, relative: &str) -> Result<SafetensorsFile> {
        let bytes =
            self.files.get(relative).ok_or_else(|| Error::Io { path: format!("{}/{relative}", self.name), message: "not in the picked folder".into() })?;
        SafetensorsFile::from_bytes(&format!("{}/{relative}", self.name), bytes.clone())
    }
}

/// A borrowed view of a picked folder, for the core's loader.
pub struct PickedModelFolder<'a> {
    name: &'a str,
    files: &'a BTreeMap<String, Vec<u8>>,
}

/// What the model panel shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSummary {
    pub name: String,
    pub family: String,
    pub parameters: u64,
    pub file_bytes: u64,
    pub largest_tensor: (String, u64),
}

impl ModelSummary {
    pub fn describe(&self) -> String {
        format!("{}: {}, {:.1} M parameters, {} of files", self.name, self.family, self.parameters as f64 / 1e6, mib(self.file_bytes))
    }

    /// Bytes once on the device, at `element` bytes per weight.
    pub fn device_bytes(&self, element: u64) -> u64 {
        self.parameters * element
    }

    /// Whether the adapter can hold the model, and why not. Where the
    /// adapter has `shader-f16` the weights are stored in f16 (see
    /// trainer-core's `models::layers`), which halves both figures.
    pub fn fit(&self, adapter: &AdapterSummary) -> std::result::Result<String, String> {
        let (element, dtype) = if adapter.shader_f16 { (2, "f16") } else { (4, "f32") };
        let (name, f32_bytes) = &self.largest_tensor;
        let bytes = f32_bytes / 4 * element;
        if bytes > adapter.max_tensor_bytes() {
            return Err(format!(
                "does not fit: tensor {name} needs {} as {dtype}, more than this adapter's largest buffer ({})",
                mib(bytes),
                mib(adapter.max_tensor_bytes())
            ));
        }
        // wasm32 addresses 4 GiB; the host copy of the weights lives there while loading.
        if self.device_bytes(4) + self.file_bytes > 3 * 1024 * 1024 * 1024 {
            return Err(format!(
                "too large for a browser tab: {} of f32 weights (as read) plus {} of files exceed what a wasm32 page can address (4 GiB); use the native runner",
                mib(self.device_bytes(4)),
                mib(self.file_bytes)
            ));
        }
        Ok(format!(
            "fits: largest tensor {} as {dtype} (limit {}), {} of weights as {dtype}",
            mib(bytes),
            mib(adapter.max_tensor_bytes()),
            mib(self.device_bytes(element))
        ))
    }
}

pub fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::Sd1 => "Stable Diffusion 1.x",
        Family::Sd2 => "Stable Diffusion 2.x",
        Family::Sdxl => "Stable Diffusion XL",
    }
}

fn count(file: &SafetensorsFile, parameters: &mut u64, largest: &mut (String, u64)) {
    for name in file.names().map(str::to_string).collect::<Vec<_>>() {
        let Some(info) = file.info(&name) else { continue };
        let elements: u64 = info.shape.iter().map(|&d| d as u64).product();
        *parameters += elements;
        if elements * 4 > largest.1 {
            *largest = (name, elements * 4);
        }
    }
}

/// The files of a picked diffusers folder that loading needs: configs,
/// tokenizer and one weights file per component (other variants stay on disk).
pub fn needed_files(name: &str, picked: &[PickedFile]) -> std::result::Result<Vec<PickedFile>, String> {
    let by_path: BTreeMap<&str, &PickedFile> = picked.iter().map(|f| (f.path.as_str(), f)).collect();
    if !by_path.contains_key("unet/config.json") {
        return Err(format!("{name}: not a diffusers model folder (no unet/config.json). Pick the folder that holds model_index.json, unet/, vae/ and text_encoder/, or a single .safetensors checkpoint"));
    }
    let mut wanted: Vec<PickedFile> =
        picked.iter().filter(|f| (f.path.ends_with(".json") || f.path.ends_with(".txt")) && f.path.split('/').count() <= 2).cloned().collect();
    for (component, names) in WEIGHTS {
        if component == "text_encoder_2" && !by_path.contains_key("text_encoder_2/config.json") {
            continue;
        }
        match names.iter().map(|n| format!("{component}/{n}")).find_map(|p| by_path.get(p.as_str())) {
            Some(file) => wanted.push((*file).clone()),
            None => return Err(format!("{name}/{component}: no weights (looked for {}); .bin pickles are not loaded, for safety", names.join(", "))),
        }
    }
    Ok(wanted)
}

impl PickedModel {
    pub fn single_file(name: String, bytes: Vec<u8>) -> std::result::Result<Self, String> {
        let size = bytes.len() as u64;
        let file = SafetensorsFile::from_bytes(&name, bytes).map_err(|e| e.to_string())?;
        Ok(Self::SingleFile { name, file, bytes: size })
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Folder { name, .. } | Self::SingleFile { name, .. } => name,
        }
    }

    /// The picked folder's configs and tokenizer files that a full
    /// fine-tune's exported folder copies (`None` for a single file: the
    /// export then uses the family's published configs).
    pub fn source_configs(&self) -> Option<BTreeMap<String, String>> {
        let Self::Folder { files, .. } = self else { return None };
        let texts = source_config_paths().into_iter().filter_map(|path| {
            let text = String::from_utf8(files.get(&path)?.clone()).ok()?;
            Some((path, text))
        });
        Some(texts.collect())
    }

    fn folder(&self) -> Option<PickedModelFolder<'_>> {
        match self {
            Self::Folder { name, files } => Some(PickedModelFolder { name, files }),
            Self::SingleFile { .. } => None,
        }
    }

    /// Family, size and the largest tensor, from configs and file headers.
    pub fn summary(&self) -> Result<ModelSummary> {
        let mut parameters = 0;
        let mut largest = (String::new(), 0);
        let (family, file_bytes) = match self {
            Self::Folder { files, .. } => {
                let folder = self.folder().expect("a folder");
                let family = read_folder_configs(&folder)?.family()?;
                for (component, names) in WEIGHTS {
                    if let Some(path) = names.iter().map(|n| format!("{component}/{n}")).find(|p| files.contains_key(p)) {
                        count(&folder.safetensors(&path)?, &mut parameters, &mut largest);
                    }
                }
                (family, files.values().map(|b| b.len() as u64).sum())
            }
            Self::SingleFile { file, bytes, .. } => {
                count(file, &mut parameters, &mut largest);
                (detect_family(file)?, *bytes)
            }
        };
        Ok(ModelSummary { name: self.name().to_string(), family: family_name(family).to_string(), parameters, file_bytes, largest_tensor: largest })
    }

    pub fn load(&self, device: &Device, dtypes: WeightDtypes) -> Result<StableDiffusion> {
        match self {
            Self::Folder { .. } => StableDiffusion::from_folder_with(&self.folder().expect("a folder"), device, dtypes),
            Self::SingleFile { file, .. } => StableDiffusion::from_single_file_with(file, None, device, dtypes),
        }
    }
}
