//! The batch sampler: which images train at each step.
//!
//! Follows SimpleTuner's rules (multiaspect/sampler.py and
//! runtime/dataloader_iterator.py): a batch comes from one bucket of one
//! dataset; a dataset visits its buckets round-robin, each image once per
//! pass, topping a short last batch up with other images of its bucket;
//! `repeats` adds full passes; datasets are chosen at each step with weights
//! (`probability`, times the dataset's batch count under auto-weighting).
//! An epoch ends when every dataset that counts toward epochs is exhausted;
//! an `ignore_epochs` dataset never holds an epoch open and keeps cycling.
//!
//! Every random choice comes from a generator derived from the seed and a
//! label (dataset, bucket, pass or step), so the sequence is the same on
//! every platform and resumes exactly from a saved [`BatchSamplerState`].

use serde::{Deserialize, Serialize};

use crate::config::training::DatasetSampling;
use crate::rng::SeededRng;

/// One dataset as the sampler sees it: buckets of image indices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchSamplerDataset {
    pub id: String,
    /// Buckets in visiting order, each with indices into the dataset's images.
    pub buckets: Vec<BatchSamplerBucket>,
    pub repeats: u32,
    pub probability: f64,
    pub ignore_epochs: bool,
    pub batch_size: u32,
    /// How many caption variants each image has (indexed like the images).
    pub caption_variants: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchSamplerBucket {
    pub key: String,
    pub images: Vec<usize>,
}

impl BatchSamplerDataset {
    /// Batches in one pass over the dataset.
    pub fn batches_per_pass(&self) -> u64 {
        let bs = self.batch_size.max(1) as u64;
        self.buckets.iter().map(|b| (b.images.len() as u64).div_ceil(bs)).sum()
    }

    /// Batches in one epoch, repeats included.
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_pass() * (self.repeats as u64 + 1)
    }

    fn counts_toward_epochs(&self) -> bool {
        self.probability > 0.0 && !self.ignore_epochs
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BatchSamplerSettings {
    pub seed: u64,
    pub sampling: DatasetSampling,
    pub caption_dropout_probability: f64,
}

/// One training example.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Index into the dataset's images.
    pub image: usize,
    /// Which caption variant to train on.
    pub caption_variant: u32,
    /// Train on the empty caption instead (caption dropout).
    pub drop_caption: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub dataset: usize,
    pub bucket: usize,
    pub samples: Vec<Sample>,
    /// The epoch this batch belongs to (1-based).
    pub epoch: u64,
    /// This batch finished its epoch.
    pub ends_epoch: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BucketState {
    order: Vec<usize>,
    cursor: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DatasetState {
    /// Passes started so far (seeds each pass's shuffle).
    passes_started: u64,
    /// Passes finished in the current epoch.
    passes_this_epoch: u32,
    exhausted: bool,
    next_bucket: usize,
    buckets: Vec<BucketState>,
}

/// Where the sampler is: save it in checkpoints to resume exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSamplerState {
    batches_drawn: u64,
    epoch: u64,
    datasets: Vec<DatasetState>,
}

pub struct BatchSampler {
    datasets: Vec<BatchSamplerDataset>,
    settings: BatchSamplerSettings,
    state: BatchSamplerState,
}

impl BatchSampler {
    pub fn new(datasets: Vec<BatchSamplerDataset>, settings: BatchSamplerSettings) -> Self {
        let mut sampler = Self { state: BatchSamplerState { batches_drawn: 0, epoch: 1, datasets: Vec::new() }, datasets, settings };
        sampler.state.datasets = (0..sampler.datasets.len())
            .map(|_| DatasetState { passes_started: 0, passes_this_epoch: 0, exhausted: false, next_bucket: 0, buckets: Vec::new() })
            .collect();
        for index in 0..sampler.datasets.len() {
            sampler.start_pass(index);
        }
        sampler
    }

    /// Resumes from a saved position.
    pub fn with_state(datasets: Vec<BatchSamplerDataset>, settings: BatchSamplerSettings, state: BatchSamplerState) -> Self {
        Self { datasets, settings, state }
    }

    /// Moves the sampler to a saved position (resuming a run). A position
    /// saved over other datasets (images added or removed, buckets changed)
    /// cannot be taken exactly: the sampler then keeps its fresh passes,
    /// continues the saved step and epoch count, and says why.
    pub fn restore(&mut self, state: BatchSamplerState) -> Result<(), String> {
        match self.misfit(&state) {
            None => {
                self.state = state;
                Ok(())
            }
            Some(reason) => {
                self.state.batches_drawn = state.batches_drawn;
                self.state.epoch = state.epoch;
                Err(reason)
            }
        }
    }

    /// Why `state` does not fit these datasets: its bucket orders must be
    /// shuffles of the buckets' images (or a dataset not started yet).
    fn misfit(&self, state: &BatchSamplerState) -> Option<String> {
        if state.datasets.len() != self.datasets.len() {
            return Some(format!("the checkpoint had {} datasets, the plan has {}", state.datasets.len(), self.datasets.len()));
        }
        for (dataset, saved) in self.datasets.iter().zip(&state.datasets) {
            if saved.buckets.is_empty() {
                continue;
            }
            let same = saved.buckets.len() == dataset.buckets.len()
                && saved.buckets.iter().zip(&dataset.buckets).all(|(s, b)| {
                    let (mut order, mut images) = (s.order.clone(), b.images.clone());
                    order.sort_unstable();
                    images.sort_unstable();
                    order == images && s.cursor <= s.order.len()
                });
            if !same {
                return Some(format!("dataset '{}' has other images or buckets than when the checkpoint was saved", dataset.id));
            }
        }
        None
    }

    pub fn state(&self) -> &BatchSamplerState {
        &self.state
    }

    pub fn datasets(&self) -> &[BatchSamplerDataset] {
        &self.datasets
    }

    /// The current epoch (1-based).
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Whether epochs can end at all (some dataset counts toward them).
    pub fn epochs_can_end(&self) -> bool {
        self.datasets.iter().any(BatchSamplerDataset::counts_toward_epochs)
    }

    fn start_pass(&mut self, index: usize) {
        let dataset = &self.datasets[index];
        let state = &mut self.state.datasets[index];
        let pass = state.passes_started;
        state.passes_started += 1;
        state.next_bucket = 0;
        state.buckets = dataset
            .buckets
            .iter()
            .map(|bucket| {
                let mut order = bucket.images.clone();
                let label = format!("shuffle/{}/{}/{pass}", dataset.id, bucket.key);
                SeededRng::derived(self.settings.seed, &label).shuffle(&mut order);
                BucketState { order, cursor: 0 }
            })
            .collect();
    }

    fn weights(&self) -> Vec<f64> {
        let total_batches: f64 = self.datasets.iter().map(|d| d.batches_per_epoch() as f64).sum::<f64>().max(1.0);
        self.datasets
            .iter()
            .zip(&self.state.datasets)
            .map(|(dataset, state)| {
                if state.exhausted || dataset.probability <= 0.0 || dataset.batches_per_pass() == 0 {
                    0.0
                } else {
                    match self.settings.sampling {
                        DatasetSampling::Uniform => dataset.probability,
                        DatasetSampling::AutoWeighting => dataset.probability * dataset.batches_per_epoch() as f64 / total_batches,
                    }
                }
            })
            .collect()
    }

    /// The next micro-batch, or `None` when no dataset has any image.
    pub fn next_batch(&mut self) -> Option<Batch> {
        let weights = self.weights();
        if weights.iter().all(|w| *w <= 0.0) {
            return None;
        }
        let step = self.state.batches_drawn;
        let mut rng = SeededRng::derived(self.settings.seed, &format!("step/{step}"));
        let dataset_index = rng.weighted_index(&weights);
        let (bucket_index, images) = self.take_from_dataset(dataset_index, &mut rng);

        let dataset = &self.datasets[dataset_index];
        let samples = images
            .into_iter()
            .map(|image| {
                let variants = dataset.caption_variants.get(image).copied().unwrap_or(1).max(1);
                let caption_variant = if variants > 1 { rng.below(variants as u64) as u32 } else { 0 };
                let drop_caption = self.settings.caption_dropout_probability > 0.0 && rng.next_f64() < self.settings.caption_dropout_probability;
                Sample { image, caption_variant, drop_caption }
            })
            .collect();
        let epoch = self.state.epoch;
        self.state.batches_drawn += 1;
        let ends_epoch = self.finish_batch(dataset_index);
        Some(Batch { dataset: dataset_index, bucket: bucket_index, samples, epoch, ends_epoch })
    }

    /// Takes one batch from the dataset's next bucket that has images left.
    fn take_from_dataset(&mut self, index: usize, rng: &mut SeededRng) -> (usize, Vec<usize>) {
        let dataset = &self.datasets[index];
        let batch_size = dataset.batch_size.max(1) as usize;
        let state = &mut self.state.datasets[index];
        let bucket_count = state.buckets.len();
        let mut bucket_index = state.next_bucket % bucket_count;
        for _ in 0..bucket_count {
            let bucket = &state.buckets[bucket_index];
            if bucket.cursor < bucket.order.len() {
                break;
            }
            bucket_index = (bucket_index + 1) % bucket_count;
        }
        let bucket = &mut state.buckets[bucket_index];
        let end = (bucket.cursor + batch_size).min(bucket.order.len());
        let mut images: Vec<usize> = bucket.order[bucket.cursor..end].to_vec();
        bucket.cursor = end;
        // Top a short batch up with other images of the same bucket.
        let all = &dataset.buckets[bucket_index].images;
        while images.len() < batch_size {
            let unused: Vec<usize> = all.iter().copied().filter(|i| !images.contains(i)).collect();
            let pool = if unused.is_empty() { all } else { &unused };
            images.push(pool[rng.below(pool.len() as u64) as usize]);
        }
        state.next_bucket = (bucket_index + 1) % bucket_count;
        (bucket_index, images)
    }

    /// Updates pass, repeat and epoch bookkeeping; returns whether the epoch ended.
    fn finish_batch(&mut self, index: usize) -> bool {
        let pass_done = self.state.datasets[index].buckets.iter().all(|b| b.cursor >= b.order.len());
        if !pass_done {
            return false;
        }
        let dataset = &self.datasets[index];
        let (repeats, ignore_epochs) = (dataset.repeats, dataset.ignore_epochs);
        let state = &mut self.state.datasets[index];
        state.passes_this_epoch += 1;
        if state.passes_this_epoch <= repeats {
            self.start_pass(index);
            return false;
        }
        if ignore_epochs {
            // Keeps being sampled: a new round of passes, regardless of epochs.
            state.passes_this_epoch = 0;
            self.start_pass(index);
            return false;
        }
        state.exhausted = true;
        let epoch_over = self.datasets.iter().zip(&self.state.datasets).all(|(d, s)| !d.counts_toward_epochs() || s.exhausted);
        if epoch_over {
            self.state.epoch += 1;
            for i in 0..self.datasets.len() {
                if self.datasets[i].counts_toward_epochs() {
                    let state = &mut self.state.datasets[i];
                    state.exhausted = false;
                    state.passes_this_epoch = 0;
                    self.start_pass(i);
                }
            }
        }
        epoch_over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(id: &str, images: usize, repeats: u32, batch_size: u32) -> BatchSamplerDataset {
        BatchSamplerDataset {
            id: id.into(),
            buckets: vec![BatchSamplerBucket { key: "1.0".into(), images: (0..images).collect() }],
            repeats,
            probability: 1.0,
            ignore_epochs: false,
            batch_size,
            caption_variants: vec![1; images],
        }
    }

    fn settings(seed: u64) -> BatchSamplerSettings {
        BatchSamplerSettings { seed, sampling: DatasetSampling::AutoWeighting, caption_dropout_probability: 0.0 }
    }

    #[test]
    fn each_image_once_per_pass_and_repeats_add_passes() {
        let mut sampler = BatchSampler::new(vec![dataset("a", 5, 2, 1)], settings(1));
        let mut seen = vec![0; 5];
        let mut batches = 0;
        loop {
            let batch = sampler.next_batch().unwrap();
            batches += 1;
            seen[batch.samples[0].image] += 1;
            if batch.ends_epoch {
                break;
            }
        }
        assert_eq!(batches, 15);
        assert_eq!(seen, vec![3; 5]);
    }

    #[test]
    fn short_last_batch_is_topped_up_from_its_bucket() {
        let mut sampler = BatchSampler::new(vec![dataset("a", 5, 0, 2)], settings(3));
        let batches: Vec<Batch> = (0..3).map(|_| sampler.next_batch().unwrap()).collect();
        assert!(batches[2].ends_epoch);
        for batch in &batches {
            assert_eq!(batch.samples.len(), 2);
            assert_ne!(batch.samples[0].image, batch.samples[1].image);
        }
    }
}
