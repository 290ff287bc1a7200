//! SimpleTuner-compatible configuration: the training config (env file,
//! config.json, config.toml) and the dataloader config (JSON array).

pub mod dataset;
pub mod lycoris;
pub mod optimizer;
pub mod placeholders;
mod raw;
pub mod training;
pub mod values;

use std::path::Path;

use crate::error::{Error, Result};
use dataset::{parse_dataloader_config, DataloaderConfig};
use training::{ConfigFormat, TrainingConfig};

/// Reads the training config at `training_path` and the dataloader config it
/// names (or `dataloader_override`). `read` fetches a file's text: the
/// runner reads the disk, the browser its imported files.
/// A `user_prompt_library` JSON file: `{"shortname": "prompt", ...}`, a
/// value also an object with `prompt` (SimpleTuner's other fields are not
/// used). Shortnames name the images, so they must be plain: letters,
/// digits, `-`, `_`.
pub fn parse_prompt_library(text: &str) -> std::result::Result<Vec<(String, String)>, Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| vec![format!("not valid JSON: {e}")])?;
    let serde_json::Value::Object(entries) = value else { return Err(vec!["must be a JSON object of {\"shortname\": \"prompt\"}".into()]) };
    let mut prompts = Vec::new();
    let mut problems = Vec::new();
    for (name, entry) in entries {
        let prompt = match &entry {
            serde_json::Value::String(prompt) => Some(prompt.clone()),
            serde_json::Value::Object(fields) => fields.get("prompt").and_then(|p| p.as_str()).map(str::to_string),
            _ => None,
        };
        let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        match (prompt, plain) {
            (Some(prompt), true) if !prompt.trim().is_empty() => prompts.push((name, prompt)),
            (_, false) => problems.push(format!("shortname '{name}' names image files: use letters, digits, - and _")),
            _ => problems.push(format!("'{name}' must be a non-empty prompt string or an object with \"prompt\", not {entry}")),
        }
    }
    if prompts.is_empty() && problems.is_empty() {
        problems.push("the library is empty".into());
    }
    if problems.is_empty() {
        Ok(prompts)
    } else {
        Err(problems)
    }
}

pub fn load(
    training_path: &str,
    dataloader_override: Option<&str>,
    read: &dyn Fn(&str) -> Result<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(TrainingConfig, DataloaderConfig)> {
    let text = read(training_path)?;
    let mut training = TrainingConfig::parse(&text, ConfigFormat::from_path(training_path), training_path, env)?;
    if let Some(path) = training.lycoris_config.clone() {
        let text = read(&path).map_err(|e| match e {
            Error::Io { path, message } => {
                Error::Io { path, message: format!("{message} (the lycoris_config named by LYCORIS_CONFIG / lycoris_config in {training_path})") }
            }
            other => other,
        })?;
        let (settings, warnings) = lycoris::parse_lycoris_config(&text).map_err(|problems| Error::Config { source_name: path.clone(), problems })?;
        training.warnings.extend(warnings.into_iter().map(|w| format!("{path}: {w}")));
        training.lycoris = Some(settings);
    }
    if let Some(path) = training.user_prompt_library.clone() {
        let text = read(&path).map_err(|e| match e {
            Error::Io { path, message } => Error::Io { path, message: format!("{message} (the user_prompt_library named in {training_path})") },
            other => other,
        })?;
        training.validation_prompts = parse_prompt_library(&text).map_err(|problems| Error::Config { source_name: path.clone(), problems })?;
    }
    if let Some(path) = dataloader_override {
        training.data_backend_config = path.to_string();
    }
    let dataloader_path = training.data_backend_config.clone();
    let dataloader_text = read(&dataloader_path).map_err(|e| match e {
        Error::Io { path, message } => {
            Error::Io { path, message: format!("{message} (the dataloader config named by DATALOADER_CONFIG / data_backend_config in {training_path})") }
        }
        other => other,
    })?;
    let base_dir = Path::new(&dataloader_path).parent().map(|p| p.to_string_lossy().into_owned());
    let dataloader = parse_dataloader_config(&dataloader_text, &dataloader_path, base_dir.as_deref(), &training.dataset_defaults(), env)?;
    Ok((training, dataloader))
}
