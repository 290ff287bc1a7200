//! The batch sampler: determinism, repeats, ignore_epochs, probability,
//! auto-weighting and exact resume, on small synthetic datasets.

use trainer_core::config::training::DatasetSampling;
use trainer_core::data::batch_sampler::{Batch, BatchSampler, BatchSamplerBucket, BatchSamplerDataset, BatchSamplerSettings};

fn dataset(id: &str, buckets: &[usize], repeats: u32, batch_size: u32) -> BatchSamplerDataset {
    let mut next = 0;
    let buckets = buckets
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let images = (next..next + n).collect();
            next += n;
            BatchSamplerBucket { key: format!("{}", 0.5 + i as f64 * 0.25), images }
        })
        .collect();
    BatchSamplerDataset { id: id.into(), buckets, repeats, probability: 1.0, ignore_epochs: false, batch_size, caption_variants: vec![2; next] }
}

fn settings(seed: u64, sampling: DatasetSampling) -> BatchSamplerSettings {
    BatchSamplerSettings { seed, sampling, caption_dropout_probability: 0.1 }
}

fn draw(sampler: &mut BatchSampler, n: usize) -> Vec<Batch> {
    (0..n).map(|_| sampler.next_batch().unwrap()).collect()
}

fn two_datasets() -> Vec<BatchSamplerDataset> {
    vec![dataset("subject", &[3, 4], 2, 2), dataset("class", &[10], 0, 2)]
}

#[test]
fn same_seed_same_sequence_other_seed_other_sequence() {
    let a = draw(&mut BatchSampler::new(two_datasets(), settings(7, DatasetSampling::AutoWeighting)), 200);
    let b = draw(&mut BatchSampler::new(two_datasets(), settings(7, DatasetSampling::AutoWeighting)), 200);
    let c = draw(&mut BatchSampler::new(two_datasets(), settings(8, DatasetSampling::AutoWeighting)), 200);
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Caption variants and caption dropout are part of the sequence.
    assert!(a.iter().flat_map(|b| &b.samples).any(|s| s.caption_variant == 1));
    assert!(a.iter().flat_map(|b| &b.samples).any(|s| s.drop_caption));
}

#[test]
fn resuming_from_saved_state_continues_identically() {
    let mut sampler = BatchSampler::new(two_datasets(), settings(3, DatasetSampling::AutoWeighting));
    draw(&mut sampler, 37);
    let saved = serde_json::to_string(sampler.state()).unwrap();
    let rest = draw(&mut sampler, 100);
    let state = serde_json::from_str(&saved).unwrap();
    let mut resumed = BatchSampler::with_state(two_datasets(), settings(3, DatasetSampling::AutoWeighting), state);
    assert_eq!(draw(&mut resumed, 100), rest);
}

#[test]
fn an_epoch_sees_every_image_once_per_pass_from_one_bucket_per_batch() {
    let datasets = two_datasets();
    let mut sampler = BatchSampler::new(datasets.clone(), settings(11, DatasetSampling::AutoWeighting));
    let mut counts = [vec![0; 7], vec![0; 10]];
    loop {
        let batch = sampler.next_batch().unwrap();
        let bucket = &datasets[batch.dataset].buckets[batch.bucket];
        for sample in &batch.samples {
            assert!(bucket.images.contains(&sample.image), "a batch never mixes buckets");
        }
        // Count the images the pass really consumed (not top-ups): unique per batch.
        for sample in &batch.samples {
            counts[batch.dataset][sample.image] += 1;
        }
        if batch.ends_epoch {
            break;
        }
    }
    assert_eq!(sampler.epoch(), 2);
    // subject: 3 passes (repeats 2); bucket of 3 with batch 2 tops up once per pass.
    let subject_total: usize = counts[0].iter().sum();
    assert_eq!(subject_total, 3 * (4 + 4));
    assert!(counts[0].iter().all(|&c| c >= 3), "{:?}", counts[0]);
    assert!(counts[1].iter().all(|&c| c == 1), "{:?}", counts[1]);
}

#[test]
fn ignore_epochs_dataset_keeps_sampling_and_does_not_hold_the_epoch() {
    let mut datasets = vec![dataset("subject", &[2], 0, 1), dataset("class", &[50], 10, 1)];
    datasets[1].ignore_epochs = true;
    let mut sampler = BatchSampler::new(datasets, settings(5, DatasetSampling::Uniform));
    let mut class_batches_in_epoch_one = 0;
    let mut epoch_ends = 0;
    for _ in 0..40 {
        let batch = sampler.next_batch().unwrap();
        if batch.dataset == 1 && epoch_ends == 0 {
            class_batches_in_epoch_one += 1;
        }
        if batch.ends_epoch {
            assert_eq!(batch.dataset, 0, "only the subject set ends epochs");
            epoch_ends += 1;
        }
    }
    // With uniform weights the 2-image subject is exhausted long before the
    // 550-batch class set, yet epochs keep ending.
    assert!(epoch_ends >= 5, "{epoch_ends}");
    assert!(class_batches_in_epoch_one >= 1);
}

#[test]
fn probability_zero_is_never_sampled_and_weights_shape_the_mix() {
    let mut datasets = vec![dataset("a", &[100], 100, 1), dataset("b", &[100], 100, 1), dataset("never", &[5], 0, 1)];
    datasets[0].probability = 3.0;
    datasets[2].probability = 0.0;
    let batches = draw(&mut BatchSampler::new(datasets.clone(), settings(9, DatasetSampling::Uniform)), 4000);
    let count = |d: usize| batches.iter().filter(|b| b.dataset == d).count() as f64;
    assert_eq!(count(2), 0.0);
    let ratio = count(0) / count(1);
    assert!((2.6..3.4).contains(&ratio), "probability 3:1 gave {ratio}");

    // Auto-weighting multiplies by each dataset's batch count.
    datasets[0].probability = 1.0;
    datasets[1].repeats = 300; // ~3x the batches of dataset a
    let batches = draw(&mut BatchSampler::new(datasets, settings(9, DatasetSampling::AutoWeighting)), 4000);
    let count = |d: usize| batches.iter().filter(|b| b.dataset == d).count() as f64;
    let ratio = count(1) / count(0);
    assert!((2.5..3.5).contains(&ratio), "auto-weighting gave {ratio}");
}

#[test]
fn batches_rotate_through_buckets() {
    let mut sampler = BatchSampler::new(vec![dataset("a", &[4, 4, 4], 0, 2)], settings(1, DatasetSampling::Uniform));
    let buckets: Vec<usize> = draw(&mut sampler, 6).iter().map(|b| b.bucket).collect();
    assert_eq!(buckets, [0, 1, 2, 0, 1, 2]);
}
