//! Latent and text-embedding caches (docs/reference.md §1.4).
//!
//! Each image is encoded once into its VAE posterior (mean and log-variance,
//! so every step can draw a fresh latent sample) and each caption once into
//! the text encoder's hidden states. Entries are safetensors files named by
//! a content hash:
//! - latents: image bytes, the full geometry (sizes and crop) and the VAE's
//!   fingerprint; renaming a file keeps its entry, editing pixels, changing
//!   the resolution or crop, or swapping the VAE makes a new one, and
//!   `a.png`/`a.jpg` never collide;
//! - text: the caption, clip skip and the text encoder's fingerprint.

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor};
use sha2::{Digest, Sha256};

use super::storage::{join, Storage};
use super::tensor_file::{self, HostTensor};
use crate::data::geometry::ImageGeometry;
use crate::error::{Error, Result};
use crate::models::loader::hex;

const LATENT_VERSION: &str = "burnbooth-latents-v1";
const TEXT_VERSION: &str = "burnbooth-text-v1";

pub fn latent_key(image_bytes: &[u8], geometry: &ImageGeometry, vae_fingerprint: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(LATENT_VERSION);
    hash.update(Sha256::digest(image_bytes));
    let g = geometry;
    hash.update(format!("target {:?} intermediary {:?} resize {:?} crop {:?}", g.target_size, g.intermediary_size, g.resize_size, g.crop_offset));
    hash.update(vae_fingerprint);
    hex(&hash.finalize())
}

pub fn text_key(caption: &str, clip_skip: usize, text_fingerprint: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(TEXT_VERSION);
    hash.update(format!("clip_skip {clip_skip}\n"));
    hash.update(text_fingerprint);
    hash.update(caption);
    hex(&hash.finalize())
}

pub fn entry_path(cache_dir: &str, key: &str) -> String {
    join(cache_dir, &format!("{key}.safetensors"))
}

/// A cached VAE posterior for one image, `[channels, h, w]` each.
#[derive(Debug, Clone)]
pub struct CachedLatents {
    pub mean: HostTensor,
    pub logvar: HostTensor,
}

impl CachedLatents {
    pub fn write(&self, storage: &dyn Storage, path: &str, source: &str) -> Result<()> {
        let tensors = BTreeMap::from([("mean".to_string(), self.mean.clone()), ("logvar".to_string(), self.logvar.clone())]);
        let metadata = BTreeMap::from([("source".to_string(), source.to_string()), ("format".to_string(), LATENT_VERSION.to_string())]);
        storage.write(path, &tensor_file::write(&tensors, &metadata)?)
    }

    pub fn read(storage: &dyn Storage, path: &str) -> Result<Option<Self>> {
        let Some(bytes) = storage.read(path)? else { return Ok(None) };
        let mut tensors = tensor_file::read(path, bytes)?;
        match (tensors.remove("mean"), tensors.remove("logvar")) {
            (Some(mean), Some(logvar)) if mean.shape == logvar.shape && mean.shape.len() == 3 => Ok(Some(Self { mean, logvar })),
            _ => Err(Error::Io { path: path.into(), message: "not a latent cache entry (needs 'mean' and 'logvar' [C, h, w]); delete it".into() }),
        }
    }

    /// `[1, C, h, w]` tensors (mean, logvar).
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor<4>, Tensor<4>)> {
        let mut shape = vec![1];
        shape.extend(&self.mean.shape);
        let with_batch = |t: &HostTensor| HostTensor { shape: shape.clone(), values: t.values.clone() };
        Ok((with_batch(&self.mean).to_tensor(device)?, with_batch(&self.logvar).to_tensor(device)?))
    }
}

/// A cached caption encoding, `[tokens, dim]`.
/// A cached caption: the UNet's text context `[tokens, dim]` and, for
/// SDXL, the pooled embedding `[dim]`.
#[derive(Debug, Clone)]
pub struct CachedText {
    pub hidden: HostTensor,
    pub pooled: Option<HostTensor>,
}

pub fn write_text(storage: &dyn Storage, path: &str, entry: &CachedText, caption: &str) -> Result<()> {
    let mut tensors = BTreeMap::from([("hidden_states".to_string(), entry.hidden.clone())]);
    if let Some(pooled) = &entry.pooled {
        tensors.insert("pooled".to_string(), pooled.clone());
    }
    let metadata = BTreeMap::from([("caption".to_string(), caption.to_string()), ("format".to_string(), TEXT_VERSION.to_string())]);
    storage.write(path, &tensor_file::write(&tensors, &metadata)?)
}

pub fn read_text(storage: &dyn Storage, path: &str) -> Result<Option<CachedText>> {
    let Some(bytes) = storage.read(path)? else { return Ok(None) };
    let mut tensors = tensor_file::read(path, bytes)?;
    match tensors.remove("hidden_states") {
        Some(hidden) if hidden.shape.len() == 2 => Ok(Some(CachedText { hidden, pooled: tensors.remove("pooled") })),
        _ => Err(Error::Io { path: path.into(), message: "not a text-embedding cache entry (needs 'hidden_states' [tokens, dim]); delete it".into() }),
    }
}
