//! The plan as a person reads it.

use std::fmt::Write as _;

use super::{Plan, StopsOn};
use crate::config::training::ModelType;

/// A config value as it is spelled in config files (`sd1x`, `adamw_bf16`).
fn config_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// The plan as a person reads it (the native runner's `plan` and the
/// browser app show this same text).
pub fn describe(plan: &Plan) -> String {
    let mut out = String::new();
    let model = plan.model.as_deref().unwrap_or("(no model set)");
    let _ = writeln!(out, "Burnbooth plan: {} {} training of {model}", config_name(&plan.model_family), config_name(&plan.model_type));
    let _ = writeln!(out, "Output: {}   seed: {}", plan.output_dir, plan.seed);
    for dataset in &plan.datasets {
        let role = if dataset.is_regularisation_data {
            "  [regularisation]"
        } else if dataset.is_eval {
            "  [eval: held out for the validation loss]"
        } else {
            ""
        };
        let _ = writeln!(out, "\nDataset '{}'{role}", dataset.id);
        let _ = writeln!(out, "  folder: {}", dataset.folder);
        let _ = writeln!(out, "  images: {} found, {} used, {} skipped", dataset.images_found, dataset.images_used, dataset.skipped.len());
        let _ = writeln!(
            out,
            "  repeats {}, probability {}, batch size {}, captions: {}{}",
            dataset.repeats,
            dataset.probability,
            dataset.train_batch_size,
            config_name(&dataset.caption_strategy),
            if dataset.ignore_epochs { ", ignore_epochs (does not hold epochs open)" } else { "" }
        );
        let _ = writeln!(out, "  buckets:");
        for bucket in &dataset.buckets {
            let _ = writeln!(
                out,
                "    {:>6}  {:>4}x{:<4}  {:>5} image(s)  {:>6} batch(es)/epoch",
                bucket.aspect_bucket, bucket.target_size[0], bucket.target_size[1], bucket.images, bucket.batches_per_epoch
            );
        }
        let _ = writeln!(out, "  batches per epoch: {}", dataset.batches_per_epoch);
        let mut examples: Vec<&str> = Vec::new();
        for image in &dataset.images {
            if !examples.contains(&image.caption.as_str()) {
                examples.push(&image.caption);
            }
            if examples.len() == 3 {
                break;
            }
        }
        let _ = writeln!(out, "  example captions: {}", examples.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", "));
        if let (Some(shuffle), Some(image)) = (&dataset.caption_shuffle, dataset.images.first()) {
            let variants = image.captions();
            let _ = writeln!(
                out,
                "  caption_shuffle: {} shuffled order(s) of each caption's tags (split on {}, the first {} kept in place{}); {} variant(s) of the first image's, e.g. {}",
                shuffle.count,
                config_name(&shuffle.split_on),
                shuffle.position_start,
                if shuffle.include_original { ", the caption as written too" } else { "" },
                variants.len(),
                variants.iter().take(3).map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
            );
        }
        if let Some(masks) = &dataset.masks {
            let missing = match masks.missing.len() {
                0 => String::new(),
                n => format!(
                    "; {n} without a mask train on the whole image: {}{}",
                    masks.missing.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    if n > 5 { ", ..." } else { "" }
                ),
            };
            let _ = writeln!(
                out,
                "  loss masks: '{}' ({}): {} of {} images have one (its red channel weighs the loss, dark = ignored){missing}",
                masks.id,
                masks.folder,
                masks.paired,
                dataset.images.len()
            );
        }
        for note in &dataset.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        if !dataset.skipped.is_empty() {
            let _ = writeln!(out, "  skipped:");
            for file in &dataset.skipped {
                let _ = writeln!(out, "    {}: {}", file.path, file.reason);
            }
        }
    }
    let _ = writeln!(out, "\nSteps per epoch: {}", plan.steps_per_epoch);
    let stop = match plan.stops_on {
        StopsOn::MaxSteps => format!("max_train_steps ({}) stops training, in epoch {}", plan.max_steps, plan.epochs),
        StopsOn::Epochs => format!("training stops when epoch {} ends", plan.epochs),
    };
    let _ = writeln!(out, "Total steps: {}  ({stop})", plan.max_steps);
    let _ = writeln!(out, "Batch: {} x {} accumulation step(s)", plan.train_batch_size, plan.gradient_accumulation_steps);
    if let Some(adapters) = &plan.adapters {
        let _ = writeln!(out, "Adapters: {adapters}");
    }
    let _ = writeln!(out, "Optimizer: {} ({})", config_name(&plan.optimizer.name), plan.optimizer.note);
    if let Some(ema) = &plan.ema {
        let ramp = match ema.warmup_steps {
            0 => "rising as t/(t+9) to it".to_string(),
            n => format!("a copy until step {n}, then"),
        };
        let exported = match plan.model_type {
            ModelType::Lora => "exported as a second LoRA, <name>-ema.safetensors",
            ModelType::Full => "exported as the model's weights",
        };
        let _ = writeln!(
            out,
            "EMA: decay {} ({ramp}), updated every {} step(s); validation: {}; {exported}",
            ema.decay,
            ema.update_interval,
            config_name(&ema.validation)
        );
    }
    let _ = writeln!(out, "Weights: {}", plan.precision.note);
    if let Some(lr) = plan.text_encoder_lr {
        let what = match plan.model_type {
            ModelType::Lora => "LoRA adapters train too",
            ModelType::Full => "all its weights train too",
        };
        let _ = writeln!(out, "Text encoder: {what} (peak learning rate {lr:e}, same schedule); captions are encoded every step");
    }
    let s = &plan.lr_schedule;
    let _ = writeln!(
        out,
        "Learning rate: {}, {:e} -> {:e} over {} steps (warmup {}); at 0/25/50/75/100%: {}",
        config_name(&s.kind),
        s.learning_rate,
        s.at(s.total_steps),
        s.total_steps,
        s.warmup_steps,
        [0.0, 0.25, 0.5, 0.75, 1.0].iter().map(|f| format!("{:.3e}", s.at((s.total_steps as f64 * f) as u64))).collect::<Vec<_>>().join(" ")
    );
    let _ = writeln!(out, "Regularisation mode: {}", config_name(&plan.regularisation_mode));
    if let Some(validation_loss) = &plan.validation_loss {
        let _ = writeln!(out, "Validation loss: {validation_loss}");
    }
    for warning in &plan.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    out
}
