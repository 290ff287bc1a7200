//! Entry points for fuzzing the readers of untrusted bytes: image headers
//! (JPEG, PNG, WebP, BMP and their EXIF blocks), the training config in its
//! three forms, the dataloader config and safetensors files. Each takes any
//! bytes and must return without panicking, looping or allocating what a
//! header merely claims. `fuzz/` runs them under libFuzzer (cargo-fuzz);
//! `tests/fuzz_corpus.rs` runs them over the committed corpus and
//! mutations of it in every test run.

use crate::config::dataset::{parse_dataloader_config, DatasetDefaults};
use crate::config::training::{ConfigFormat, TrainingConfig};
use crate::data::probe::{exif_orientation, probe, DEFAULT_MAX_IMAGE_PIXELS};
use crate::data::source::SliceAccess;
use crate::models::safetensors_file::SafetensorsFile;

fn no_env(_: &str) -> Option<String> {
    None
}

/// The header probe of every image format, then the EXIF reader alone.
pub fn image_headers(data: &[u8]) {
    let _ = probe(&mut SliceAccess(data), DEFAULT_MAX_IMAGE_PIXELS);
    let _ = exif_orientation(data);
}

/// A training config read as an env file, as JSON and as TOML.
pub fn training_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for (format, name) in [(ConfigFormat::Env, "config.env"), (ConfigFormat::Json, "config.json"), (ConfigFormat::Toml, "config.toml")] {
        let _ = TrainingConfig::parse(&text, format, name, &no_env);
    }
}

/// A dataloader config (SimpleTuner's JSON array).
pub fn dataloader_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = parse_dataloader_config(&text, "dataloader.json", Some("/data"), &DatasetDefaults::default(), &no_env);
}

/// A safetensors file: its header, then every tensor's values.
pub fn safetensors(data: &[u8]) {
    if let Ok(file) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) {
        let names: Vec<String> = file.names().map(str::to_string).collect();
        for name in names {
            let _ = file.to_f32(&name);
        }
    }
}

/// Every target by name, for the corpus test and the fuzz crate.
/// A fuzz target: its name and the function that reads one input.
pub type Target = (&'static str, fn(&[u8]));

pub const TARGETS: &[Target] =
    &[("image_headers", image_headers), ("training_config", training_config), ("dataloader_config", dataloader_config), ("safetensors", safetensors)];
