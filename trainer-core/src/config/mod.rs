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
        training.lokr = Some(settings);
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
