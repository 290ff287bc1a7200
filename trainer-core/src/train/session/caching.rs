//! Caching: every planned image's latents and every caption's text
//! embedding, computed once and kept by content key in the run's storage.

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use super::{Progress, Session};
use crate::data::preprocess::{prepare, prepare_mask};
use crate::error::{Error, Result};
use crate::train::cache::{self, CachedLatents, CachedText};
use crate::train::tensor_file::HostTensor;

impl Session<'_> {
    /// Encodes every image and caption that is not cached yet.
    pub async fn prepare_caches(&mut self, progress: &mut dyn FnMut(Progress<'_>)) -> Result<()> {
        let total_images: usize = self.plan.datasets.iter().map(|d| d.images.len()).sum();
        let mut resizer = fast_image_resize::Resizer::new();
        let (mut done, mut computed) = (0, 0);
        self.latent_paths = Vec::new();
        for (d, dataset) in self.plan.datasets.iter().enumerate() {
            let mut paths = Vec::new();
            for image in &dataset.images {
                let bytes = self.sources[d].read(&image.path)?;
                let geometry = image.geometry();
                let [width, height] = geometry.target_size.map(|side| side as usize);
                let tiling = self.model.encode_tiling(&self.device, height, width);
                // Tiled latents differ slightly from whole ones: their cache entries do too.
                let vae_identity = match tiling {
                    Some(tiling) => format!("{}+tiles{}", self.model.fingerprints.vae, tiling.tile_sample_size),
                    None => self.model.fingerprints.vae.clone(),
                };
                let key = cache::latent_key(&bytes, &geometry, &vae_identity);
                let path = cache::entry_path(&dataset.cache_dir_vae, &key);
                if !self.storage.exists(&path)? {
                    let pixels = prepare(&bytes, &geometry, &mut resizer)
                        .map_err(|reason| Error::Image { path: format!("{}/{}", dataset.folder, image.path), reason })?;
                    let distribution = self.model.vae.encode_tiled(image_tensor(&pixels, &self.device), &self.model.configs.vae, tiling);
                    // A device failure names the image being encoded.
                    let at_image = |error: Error| match error {
                        Error::Io { message, .. } => {
                            Error::Io { path: format!("{}/{}", dataset.folder, image.path), message: format!("encoding its latents: {message}") }
                        }
                        other => other,
                    };
                    let entry = CachedLatents {
                        mean: HostTensor::from_batch_item(distribution.mean).await.map_err(at_image)?,
                        logvar: HostTensor::from_batch_item(distribution.logvar).await.map_err(at_image)?,
                    };
                    entry.write(self.storage, &path, &format!("{}/{}", dataset.folder, image.path))?;
                    computed += 1;
                }
                paths.push(path);
                done += 1;
                progress(Progress { phase: "latents", done, total: total_images, computed });
            }
            self.latent_paths.push(paths);
        }
        self.prepare_masks(&mut resizer, progress)?;

        let mut captions: Vec<(String, String)> = Vec::new();
        for dataset in &self.plan.datasets {
            for image in &dataset.images {
                for caption in image.captions() {
                    captions.push((dataset.text_cache_dir.clone(), caption));
                }
            }
            if self.config.caption_dropout_probability > 0.0 {
                captions.push((dataset.text_cache_dir.clone(), String::new()));
            }
        }
        captions.sort();
        captions.dedup();
        // The cache holds the base encoder's output (resumed runs carry trained adapters).
        let base = self.inference_text_encoders(false);
        let trained = self.replace_text_encoders(base);
        let result = self.cache_text_embeddings(&captions, progress).await;
        self.replace_text_encoders(trained);
        result
    }

    /// Each masked image's loss mask on the latent grid (kept in memory:
    /// a latent-sized plane per image, quick to make again at each start).
    fn prepare_masks(&mut self, resizer: &mut fast_image_resize::Resizer, progress: &mut dyn FnMut(Progress<'_>)) -> Result<()> {
        let downscale = self.model.configs.vae.downscale();
        let total: usize = self.plan.datasets.iter().filter_map(|d| d.masks.as_ref()).map(|m| m.paired).sum();
        let mut done = 0;
        self.masks = Vec::new();
        for (d, dataset) in self.plan.datasets.iter().enumerate() {
            let Some(plan) = &dataset.masks else {
                self.masks.push(Vec::new());
                continue;
            };
            let source = self.mask_sources.get(d).and_then(Option::as_ref).ok_or_else(|| Error::Dataset {
                dataset: dataset.id.clone(),
                message: format!("its mask folder '{}' ({}) was not opened", plan.folder, plan.id),
            })?;
            let mut masks = Vec::new();
            for image in &dataset.images {
                let Some(path) = &image.mask else {
                    masks.push(None);
                    continue;
                };
                let bytes = source.read(path)?;
                let geometry = image.geometry();
                let [width, height] = geometry.target_size.map(|side| side as usize);
                let grid = [height / downscale, width / downscale];
                let values = prepare_mask(&bytes, &geometry, grid, self.config.max_image_pixels, resizer)
                    .map_err(|reason| Error::Image { path: format!("{}/{path} (the mask of {})", plan.folder, image.path), reason })?;
                masks.push(Some(HostTensor { shape: vec![1, grid[0], grid[1]], values }));
                done += 1;
                progress(Progress { phase: "masks", done, total, computed: done });
            }
            self.masks.push(masks);
        }
        Ok(())
    }

    async fn cache_text_embeddings(&mut self, captions: &[(String, String)], progress: &mut dyn FnMut(Progress<'_>)) -> Result<()> {
        let (mut done, mut computed) = (0, 0);
        for (dir, caption) in captions {
            let key = cache::text_key(caption, 0, &self.model.fingerprints.text());
            let path = cache::entry_path(dir, &key);
            if !self.storage.exists(&path)? {
                let conditioning = self.model.encode_conditioning(&[caption.as_str()], &self.device)?;
                let pooled = match conditioning.pooled {
                    Some(pooled) => Some(HostTensor::from_batch_item(pooled).await?),
                    None => None,
                };
                let entry = CachedText { hidden: HostTensor::from_batch_item(conditioning.context).await?, pooled };
                cache::write_text(self.storage, &path, &entry, caption)?;
                computed += 1;
            }
            self.text_paths.insert((dir.clone(), caption.clone()), path);
            done += 1;
            progress(Progress { phase: "text embeddings", done, total: captions.len(), computed });
        }
        Ok(())
    }
}

/// RGB pixels to a `[1, 3, H, W]` tensor in [-1, 1].
pub fn image_tensor(image: &RgbImage, device: &Device) -> Tensor<4> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let plane = width * height;
    let mut values = vec![0f32; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            values[c * plane + i] = pixel[c] as f32 / 127.5 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(values, [1, 3, height, width]), device)
}
