//! The batch samplers a plan sets up (instance and prior datasets apart)
//! and the simulation of their epochs that finds where training stops.

use std::collections::BTreeMap;

use crate::config::training::{RegularisationMode, TrainingConfig};
use crate::data::batch_sampler::{BatchSampler, BatchSamplerBucket, BatchSamplerDataset, BatchSamplerSettings};
use crate::error::{Error, Result};
use crate::rng::SeededRng;

use super::{DatasetPlan, StopsOn, MAX_SIMULATED_BATCHES};

/// A sampler over some of the plan's datasets; `datasets[i]` is the plan
/// index of the sampler's dataset `i`.
pub struct PlannedBatchSampler {
    pub sampler: BatchSampler,
    pub datasets: Vec<usize>,
}

/// The samplers a run draws from: one over every dataset, or under
/// `prior_preservation` one over the instance datasets (it sets the pace:
/// steps and epochs) and one over the class (regularisation) datasets.
pub fn build_samplers(datasets: &[DatasetPlan], training: &TrainingConfig) -> (PlannedBatchSampler, Option<PlannedBatchSampler>) {
    let settings = BatchSamplerSettings {
        seed: training.seed,
        sampling: training.data_backend_sampling,
        caption_dropout_probability: training.caption_dropout_probability,
    };
    let make = |indices: Vec<usize>, label: &str| {
        let mut settings = settings;
        if !label.is_empty() {
            settings.seed = SeededRng::derived(training.seed, label).next_u64();
        }
        PlannedBatchSampler { sampler: BatchSampler::new(indices.iter().map(|&i| sampler_dataset(&datasets[i])).collect(), settings), datasets: indices }
    };
    // Eval datasets are held out: no sampler draws from them.
    let trained: Vec<usize> = (0..datasets.len()).filter(|&i| !datasets[i].is_eval).collect();
    let has_class_data = trained.iter().any(|&i| datasets[i].is_regularisation_data);
    let has_instance_data = trained.iter().any(|&i| !datasets[i].is_regularisation_data);
    if training.regularisation_mode == RegularisationMode::PriorPreservation && has_class_data && has_instance_data {
        let instance: Vec<usize> = trained.iter().copied().filter(|&i| !datasets[i].is_regularisation_data).collect();
        let class: Vec<usize> = trained.iter().copied().filter(|&i| datasets[i].is_regularisation_data).collect();
        (make(instance, ""), Some(make(class, "prior-sampler")))
    } else {
        (make(trained, ""), None)
    }
}

fn sampler_dataset(plan: &DatasetPlan) -> BatchSamplerDataset {
    let mut index_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, image) in plan.images.iter().enumerate() {
        index_of.entry(image.aspect_bucket.as_str()).or_default().push(index);
    }
    BatchSamplerDataset {
        id: plan.id.clone(),
        buckets: plan
            .buckets
            .iter()
            .map(|b| BatchSamplerBucket { key: b.aspect_bucket.clone(), images: index_of.remove(b.aspect_bucket.as_str()).unwrap_or_default() })
            .collect(),
        repeats: plan.repeats,
        probability: plan.probability,
        ignore_epochs: plan.ignore_epochs,
        batch_size: plan.train_batch_size,
        caption_variants: plan.images.iter().map(|i| i.caption_variants.len().max(1) as u32).collect(),
    }
}

pub(super) struct Schedule {
    pub(super) steps_per_epoch: u64,
    pub(super) total_steps: u64,
    pub(super) stops_on: StopsOn,
    pub(super) final_epoch: u64,
}

/// Runs the sampler forward (indices only, no pixels) to find the epoch
/// length and which limit stops training.
pub(super) fn simulate(training: &TrainingConfig, mut sampler: BatchSampler) -> Result<Schedule> {
    let accumulation = training.gradient_accumulation_steps.max(1) as u64;
    let max_batches = training.max_train_steps.map(|s| s * accumulation);
    if !sampler.epochs_can_end() && max_batches.is_none() {
        return Err(Error::Config {
            source_name: training.source_name.clone(),
            problems: vec!["every dataset has ignore_epochs, so epochs never end: set max_train_steps (MAX_NUM_STEPS)".into()],
        });
    }
    let mut batches = 0u64;
    let mut first_epoch_batches: Option<u64> = None;
    let mut epochs_done = 0u64;
    let mut stop: Option<(u64, StopsOn, u64)> = None;
    while stop.is_none() || (first_epoch_batches.is_none() && sampler.epochs_can_end()) {
        if batches >= MAX_SIMULATED_BATCHES {
            break;
        }
        let Some(batch) = sampler.next_batch() else { break };
        batches += 1;
        if batch.ends_epoch {
            epochs_done += 1;
            first_epoch_batches.get_or_insert(batches);
            if stop.is_none() && training.num_train_epochs == Some(epochs_done) {
                stop = Some((batches, StopsOn::Epochs, batch.epoch));
            }
        }
        if stop.is_none() && max_batches == Some(batches) {
            stop = Some((batches, StopsOn::MaxSteps, batch.epoch));
        }
    }
    let Some((stop_batches, stops_on, final_epoch)) = stop else {
        return Err(Error::Config {
            source_name: training.source_name.clone(),
            problems: vec![format!("training would not stop within {MAX_SIMULATED_BATCHES} batches; set max_train_steps")],
        });
    };
    Ok(Schedule {
        steps_per_epoch: first_epoch_batches.unwrap_or(batches).div_ceil(accumulation),
        total_steps: stop_batches.div_ceil(accumulation),
        stops_on,
        final_epoch,
    })
}
