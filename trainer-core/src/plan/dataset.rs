//! Planning one dataset: discovery, header probes (bounded, skipping what
//! cannot be used with a reason), sizes, crops, captions and buckets.

use std::collections::BTreeMap;

use crate::config::dataset::ImageDatasetConfig;
use crate::config::training::TrainingConfig;
use crate::data::captions::captions_for;
use crate::data::geometry::{bucket_key, Size, Sizer};
use crate::data::preprocess::decode_oriented;
use crate::data::probe::probe;
use crate::data::source::{discover, extension, ImageSource};
use crate::error::{Error, Result};
use crate::rng::SeededRng;

use super::{BucketPlan, DatasetPlan, PlanProgress, PlannedImage, SkippedFile};

/// Plans one dataset: discovery, headers, sizes, captions and buckets.
pub fn plan_dataset(
    training: &TrainingConfig,
    dataset: &ImageDatasetConfig,
    source: &dyn ImageSource,
    progress: &mut dyn FnMut(PlanProgress<'_>),
) -> Result<DatasetPlan> {
    let discovery = discover(source)?;
    let mut skipped: Vec<SkippedFile> = discovery
        .other_files
        .iter()
        .map(|path| SkippedFile {
            path: path.clone(),
            reason: match extension(path) {
                Some(ext) => format!("not an image file (.{ext}); images must be png, jpg, jpeg, webp or bmp"),
                None => "not an image file (no extension)".into(),
            },
        })
        .collect();
    let mut notes = Vec::new();
    let sizer_settings = dataset.geometry.clone();
    let mut sizer = Sizer::new(sizer_settings);
    let total = discovery.images.len();

    // Headers, minimum size and captions.
    let mut candidates: Vec<(String, [u32; 2], Vec<String>)> = Vec::new();
    let mut with_alpha = 0;
    for (done, path) in discovery.images.iter().enumerate() {
        if done.is_multiple_of(256) {
            progress(PlanProgress { dataset: &dataset.id, done, total });
        }
        let info = {
            let mut file = source.open(path)?;
            probe(file.as_mut(), training.max_image_pixels)?
        };
        let info = match info {
            Ok(info) => info,
            Err(reason) => {
                skipped.push(SkippedFile { path: path.clone(), reason });
                continue;
            }
        };
        if info.suspect_truncated {
            // The end of the file looks wrong: only a full decode can tell.
            if let Err(reason) = source.read(path).map_err(|e| e.to_string()).and_then(|bytes| decode_oriented(&bytes, training.max_image_pixels)) {
                skipped.push(SkippedFile { path: path.clone(), reason: format!("truncated or corrupt: {reason}") });
                continue;
            }
        }
        let original = info.oriented_size();
        if let Err(reason) = sizer.check_minimum_size(original).and_then(|()| check_aspect(dataset, original)) {
            skipped.push(SkippedFile { path: path.clone(), reason });
            continue;
        }
        match captions_for(dataset, source, path) {
            Ok(captions) => candidates.push((path.clone(), original, captions)),
            Err(reason) => {
                skipped.push(SkippedFile { path: path.clone(), reason });
                continue;
            }
        }
        if info.may_have_alpha {
            with_alpha += 1;
        }
    }
    progress(PlanProgress { dataset: &dataset.id, done: total, total });
    if with_alpha > 0 {
        notes.push(format!("{with_alpha} image(s) may have transparency: it is composited on white"));
    }

    if let Some(limit) = dataset.max_num_samples {
        if candidates.len() > limit {
            // A subset that depends only on the dataset id, like SimpleTuner's.
            let mut order: Vec<usize> = (0..candidates.len()).collect();
            SeededRng::derived(0, &format!("max_num_samples/{}", dataset.id)).shuffle(&mut order);
            let keep: std::collections::BTreeSet<usize> = order[..limit].iter().copied().collect();
            let mut kept = Vec::new();
            for (index, candidate) in candidates.into_iter().enumerate() {
                if keep.contains(&index) {
                    kept.push(candidate);
                } else {
                    skipped.push(SkippedFile { path: candidate.0, reason: format!("not among the max_num_samples ({limit}) chosen") });
                }
            }
            candidates = kept;
        }
    }

    // Sizes and buckets.
    let mut images = Vec::new();
    for (path, original, captions) in candidates {
        let mut rng = SeededRng::derived(training.seed, &format!("crop/{}/{path}", dataset.id));
        let geometry = sizer.geometry(original, &mut rng);
        let key = bucket_key(geometry.aspect_bucket);
        if let Some(min) = dataset.minimum_aspect_ratio {
            if geometry.aspect_bucket < min {
                skipped.push(SkippedFile { path, reason: format!("aspect bucket {key} is below minimum_aspect_ratio {min}") });
                continue;
            }
        }
        if let Some(max) = dataset.maximum_aspect_ratio {
            if geometry.aspect_bucket > max {
                skipped.push(SkippedFile { path, reason: format!("aspect bucket {key} is above maximum_aspect_ratio {max}") });
                continue;
            }
        }
        let resize_size = (geometry.resize_size != geometry.intermediary_size).then_some(geometry.resize_size);
        images.push(PlannedImage {
            path,
            original_size: geometry.original_size,
            target_size: geometry.target_size,
            intermediary_size: geometry.intermediary_size,
            resize_size,
            crop_offset: geometry.crop_offset,
            aspect_bucket: key,
            caption: captions[0].clone(),
            caption_variants: if captions.len() > 1 { captions } else { Vec::new() },
            mask: None,
        });
    }
    skipped.sort_by(|a, b| a.path.cmp(&b.path));

    if images.is_empty() {
        let mut message = format!("no usable image in {} ({} image file(s) found", source.describe(), total);
        if !skipped.is_empty() {
            let reasons: Vec<String> = skipped.iter().take(3).map(|s| format!("{}: {}", s.path, s.reason)).collect();
            message.push_str(&format!("; skipped: {}{}", reasons.join("; "), if skipped.len() > 3 { "; ..." } else { "" }));
        }
        message.push(')');
        return Err(Error::Dataset { dataset: dataset.id.clone(), message });
    }

    let buckets = bucket_plans(training, dataset, &images, &mut notes)?;
    let batches_per_epoch = buckets.iter().map(|b| b.batches_per_epoch).sum();
    Ok(DatasetPlan {
        id: dataset.id.clone(),
        folder: dataset.instance_data_dir.clone(),
        is_regularisation_data: dataset.is_regularisation_data,
        is_eval: dataset.is_eval,
        caption_strategy: dataset.caption_strategy,
        caption_shuffle: dataset.caption_shuffle,
        repeats: dataset.repeats,
        probability: dataset.probability,
        ignore_epochs: dataset.ignore_epochs,
        train_batch_size: dataset.train_batch_size,
        images_found: total,
        images_used: images.len(),
        images,
        skipped,
        buckets,
        batches_per_epoch,
        cache_dir_vae: dataset.cache_dir_vae.clone(),
        text_embeds: dataset.text_embeds.clone(),
        text_cache_dir: String::new(),
        masks: None,
        notes,
    })
}

/// How far from square an image may be (long edge over short edge) when the
/// dataset sets no `minimum_aspect_ratio` / `maximum_aspect_ratio`. Beyond
/// it the bucket's short edge rounds to nothing (a 4x1200 image rounds to
/// aspect 0.0) or its long edge to many times the resolution.
pub const MAX_ASPECT_RATIO: f64 = 8.0;

/// Refuses images too far from square to bucket.
fn check_aspect(dataset: &ImageDatasetConfig, [width, height]: [u32; 2]) -> std::result::Result<(), String> {
    let aspect = width as f64 / height as f64;
    let lowest = dataset.minimum_aspect_ratio.unwrap_or(1.0 / MAX_ASPECT_RATIO).max(1.0 / 64.0);
    let highest = dataset.maximum_aspect_ratio.unwrap_or(MAX_ASPECT_RATIO).min(64.0);
    if aspect < lowest || aspect > highest {
        let ratio = if aspect < 1.0 { format!("1:{:.0}", 1.0 / aspect) } else { format!("{aspect:.0}:1") };
        return Err(format!(
            "extreme aspect ratio: {width}x{height} is {ratio}, outside {lowest:.3} to {highest:.3} (width over height); set minimum_aspect_ratio / maximum_aspect_ratio to allow it"
        ));
    }
    Ok(())
}

/// Groups images by bucket (in ascending aspect order) and checks each
/// bucket can fill a batch.
fn bucket_plans(training: &TrainingConfig, dataset: &ImageDatasetConfig, images: &[PlannedImage], notes: &mut Vec<String>) -> Result<Vec<BucketPlan>> {
    let mut by_key: BTreeMap<String, (f64, Size, usize)> = BTreeMap::new();
    for image in images {
        let entry = by_key.entry(image.aspect_bucket.clone()).or_insert((image.aspect_bucket.parse().unwrap_or(1.0), image.target_size, 0));
        entry.2 += 1;
    }
    let mut buckets: Vec<(String, f64, Size, usize)> = by_key.into_iter().map(|(k, (a, s, n))| (k, a, s, n)).collect();
    buckets.sort_by(|a, b| a.1.total_cmp(&b.1));

    let batch_size = dataset.train_batch_size.max(1) as u64;
    let effective_batch = batch_size * training.gradient_accumulation_steps.max(1) as u64;
    let passes = dataset.repeats as u64 + 1;
    let mut problems = Vec::new();
    for (key, _, _, count) in &buckets {
        let samples = *count as u64 * passes;
        if samples >= effective_batch {
            continue;
        }
        let repeats_needed = effective_batch.div_ceil(*count as u64) - 1;
        let images_needed = effective_batch.div_ceil(passes) - *count as u64;
        let advice = format!(
            "set repeats to at least {repeats_needed}, add {images_needed} more image(s) of that shape, or lower train_batch_size / gradient_accumulation_steps"
        );
        if training.allow_dataset_oversubscription {
            notes.push(format!(
                "bucket {key} has {count} image(s), fewer than a batch of {effective_batch}: its batches repeat images (allow_dataset_oversubscription); to avoid that, {advice}"
            ));
        } else {
            problems.push(format!(
                "bucket {key} has {count} image(s) x {passes} pass(es) = {samples} sample(s), fewer than train_batch_size x gradient_accumulation_steps = {effective_batch}: {advice} (or set allow_dataset_oversubscription)"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Dataset { dataset: dataset.id.clone(), message: problems.join("; ") });
    }
    Ok(buckets
        .into_iter()
        .map(|(key, _, target_size, count)| BucketPlan {
            aspect_bucket: key,
            target_size,
            images: count,
            batches_per_epoch: (count as u64).div_ceil(batch_size) * passes,
        })
        .collect())
}
