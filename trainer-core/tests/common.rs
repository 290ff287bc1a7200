//! Helpers shared by the integration tests: in-memory configs and images.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use trainer_core::config::dataset::{parse_dataloader_config, DataloaderConfig, DatasetDefaults, ImageDatasetConfig};
use trainer_core::config::training::{ConfigFormat, TrainingConfig};
use trainer_core::data::source::{ImageSource, MemorySource};
use trainer_core::plan::{plan, Plan, PlanTarget};
use trainer_core::{Error, Result};

pub fn no_env(_: &str) -> Option<String> {
    None
}

/// A patterned RGB image (so resizes and crops are checkable), encoded.
pub fn encoded_image(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| Rgb([(x * 7 % 256) as u8, (y * 5 % 256) as u8, ((x + y) % 256) as u8]));
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    encoded_image(width, height, ImageFormat::Jpeg)
}

pub fn png(width: u32, height: u32) -> Vec<u8> {
    encoded_image(width, height, ImageFormat::Png)
}

/// A fully transparent RGBA PNG whose colour channels are black.
pub fn transparent_png(width: u32, height: u32) -> Vec<u8> {
    let image = RgbaImage::from_pixel(width, height, Rgba([0, 0, 0, 0]));
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, ImageFormat::Png).unwrap();
    bytes.into_inner()
}

/// Inserts an EXIF APP1 segment with the given orientation after SOI.
pub fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\0*");
    tiff.extend_from_slice(&8u32.to_be_bytes());
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes());
    let mut segment = b"Exif\0\0".to_vec();
    segment.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((segment.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&segment);
    out.extend_from_slice(&jpeg[2..]);
    out
}

pub fn training(text: &str) -> TrainingConfig {
    TrainingConfig::parse(text, ConfigFormat::Env, "/cfg/config.env", &no_env).unwrap()
}

pub fn dataloader(json: &str, training: &TrainingConfig) -> Result<DataloaderConfig> {
    parse_dataloader_config(json, "/cfg/dataloader.json", Some("/cfg"), &training.dataset_defaults(), &no_env)
}

pub fn dataloader_with_defaults(json: &str) -> Result<DataloaderConfig> {
    parse_dataloader_config(json, "/cfg/dataloader.json", Some("/cfg"), &DatasetDefaults::default(), &no_env)
}

/// Plans with in-memory datasets keyed by dataset id.
pub fn plan_memory(training: &TrainingConfig, dataloader: &DataloaderConfig, sources: BTreeMap<String, MemorySource>) -> Result<Plan> {
    let open = |dataset: &ImageDatasetConfig| -> Result<Box<dyn ImageSource>> {
        match sources.get(&dataset.id) {
            Some(source) => Ok(Box::new(source.clone())),
            None => Err(Error::Dataset { dataset: dataset.id.clone(), message: "no test source".into() }),
        }
    };
    plan(training, dataloader, &open, PlanTarget { has_bf16: false, has_f16: false }, &mut |_| {})
}

pub fn source_with(files: &[(&str, Vec<u8>)]) -> MemorySource {
    let mut source = MemorySource::new("memory");
    for (path, bytes) in files {
        source.insert(*path, bytes.clone());
    }
    source
}

/// The error text of a result that must fail.
pub fn error_text<T: std::fmt::Debug>(result: Result<T>) -> String {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(error) => error.to_string(),
    }
}
