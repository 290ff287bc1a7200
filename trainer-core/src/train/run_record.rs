//! The output folder's record of the run that writes it (`run.json`): what
//! was trained (model, adapters), how (the training config) and on what
//! (each dataset's planned images). A new run into a folder that holds an
//! earlier one is refused unless it resumes or starts over (the old outputs
//! are moved aside, never deleted); a resumed run is compared with the
//! record and told what changed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::checkpoint::list;
use super::storage::{join, Storage};
use crate::error::{Error, Result};

pub const RUN_RECORD: &str = "run.json";
/// An export being written: it becomes the export once complete.
pub const PARTIAL: &str = ".partial";
/// The export being replaced, for the moment of the swap.
pub const REPLACED: &str = ".replaced";
const FORMAT: u32 = 1;

/// Settings a resumed run may change without remark: how long it runs and
/// how often it saves, validates or reports.
const FREE_TO_CHANGE: &[&str] = &[
    "max_train_steps",
    "num_train_epochs",
    "resume_from_checkpoint",
    "checkpoint_step_interval",
    "checkpoints_total_limit",
    "validation_step_interval",
    "validation_prompt",
    "user_prompt_library",
    "validation_prompts",
    "validation_negative_prompt",
    "validation_guidance",
    "validation_num_inference_steps",
    "validation_resolution",
    "validation_seed",
    "warnings",
    "source_name",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub format: u32,
    /// The weights trained from (component fingerprints).
    pub model: serde_json::Value,
    /// The trained parameters' layout: model type, LoRA rank, alpha and
    /// target layers, text-encoder training. A checkpoint fits only this.
    pub adapters: BTreeMap<String, String>,
    /// The training config as read.
    pub config: serde_json::Value,
    /// Each dataset's planned images (path, sizes, crop, caption), hashed.
    pub datasets: BTreeMap<String, String>,
}

impl RunRecord {
    pub fn new(model: serde_json::Value, adapters: BTreeMap<String, String>, config: serde_json::Value, datasets: BTreeMap<String, String>) -> Self {
        Self { format: FORMAT, model, adapters, config, datasets }
    }

    /// A short identity for serialisable content (planned images, layer lists).
    pub fn content_hash<T: Serialize>(content: &T) -> String {
        let text = serde_json::to_string(content).expect("record contents serialise");
        format!("{:x}", Sha256::digest(text.as_bytes()))
    }

    /// What differs from the `earlier` record: changes that make the
    /// checkpoint unusable (`Err`), or the ones worth saying (`Ok`).
    pub fn compare(&self, earlier: &RunRecord) -> std::result::Result<Vec<String>, Vec<String>> {
        let mut fatal = Vec::new();
        if self.model != earlier.model {
            fatal.push("the base model's weights differ from the ones this run started from".to_string());
        }
        for key in keys(&self.adapters, &earlier.adapters) {
            let (now, then) = (self.adapters.get(key), earlier.adapters.get(key));
            if now != then {
                fatal.push(format!("{key} was {} and is now {}", shown(then), shown(now)));
            }
        }
        if !fatal.is_empty() {
            return Err(fatal);
        }
        let mut notes = Vec::new();
        let empty = serde_json::Map::new();
        let (now, then) = (self.config.as_object().unwrap_or(&empty), earlier.config.as_object().unwrap_or(&empty));
        for key in keys(now, then) {
            if FREE_TO_CHANGE.contains(&key.as_str()) {
                continue;
            }
            if now.get(key) != then.get(key) {
                notes.push(format!("setting {key} was {} and is now {}", json_shown(then.get(key)), json_shown(now.get(key))));
            }
        }
        for id in keys(&self.datasets, &earlier.datasets) {
            match (self.datasets.get(id), earlier.datasets.get(id)) {
                (Some(_), None) => notes.push(format!("dataset '{id}' is new")),
                (None, Some(_)) => notes.push(format!("dataset '{id}' is gone")),
                (Some(a), Some(b)) if a != b => notes.push(format!("dataset '{id}' changed (images added, removed, resized or recaptioned)")),
                _ => {}
            }
        }
        Ok(notes)
    }
}

fn keys<'m, V>(a: impl IntoIterator<Item = (&'m String, V)>, b: impl IntoIterator<Item = (&'m String, V)>) -> std::collections::BTreeSet<&'m String> {
    a.into_iter().map(|(k, _)| k).chain(b.into_iter().map(|(k, _)| k)).collect()
}

fn shown(value: Option<&String>) -> String {
    value.cloned().unwrap_or_else(|| "unset".into())
}

fn json_shown(value: Option<&serde_json::Value>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "unset".into())
}

/// What a run does with an output folder that may hold an earlier run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputUse {
    /// A new run: the folder must hold no earlier run.
    New,
    /// Continue the run the folder holds.
    Resume,
    /// Move the earlier run's outputs aside and start afresh.
    StartOver,
}

/// Whether `output_dir` holds an earlier run: its record, metrics or
/// checkpoints (caches alone are shareable and do not count).
pub fn holds_a_run(storage: &dyn Storage, output_dir: &str) -> Result<bool> {
    Ok(storage.exists(&join(output_dir, RUN_RECORD))? || storage.exists(&join(output_dir, "metrics.jsonl"))? || !list(storage, output_dir)?.is_empty())
}

/// Readies `output_dir` for a run. `New` into a folder that holds a run is
/// refused with what to do; `StartOver` moves every entry but the caches
/// into `previous-N/` and returns that folder.
pub fn prepare_output(storage: &dyn Storage, output_dir: &str, output_use: OutputUse) -> Result<Option<String>> {
    if output_use == OutputUse::Resume || !holds_a_run(storage, output_dir)? {
        return Ok(None);
    }
    if output_use == OutputUse::New {
        let checkpoints = list(storage, output_dir)?.len();
        return Err(Error::Config {
            source_name: output_dir.to_string(),
            problems: vec![format!(
                "this output folder holds an earlier run ({checkpoints} checkpoint(s), its metrics and exports): continue it with --resume latest, \
                 or pass --start-over to move its outputs to a previous-N folder inside it and start afresh (nothing is deleted)"
            )],
        });
    }
    let entries = storage.list(output_dir)?;
    let mut n = 1;
    while entries.contains(&format!("previous-{n}")) {
        n += 1;
    }
    let aside = join(output_dir, &format!("previous-{n}"));
    for entry in entries {
        // Caches are keyed by content and shared; earlier set-asides stay where they are.
        if entry == "cache" || entry.starts_with("previous-") || entry.starts_with('.') {
            continue;
        }
        storage.rename(&join(output_dir, &entry), &join(&aside, &entry))?;
    }
    Ok(Some(aside))
}

/// Tidies what a killed run left in `output_dir`: half-written exports
/// (`*.partial`) go; an export caught mid-swap (`*.replaced` without its
/// replacement) is put back. Returns what was done.
pub fn clean_interrupted_writes(storage: &dyn Storage, output_dir: &str) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let entries = storage.list(output_dir)?;
    for entry in &entries {
        let path = join(output_dir, entry);
        if entry.ends_with(PARTIAL) {
            storage.remove_all(&path)?;
            notes.push(format!("removed {path}, an export a stopped run had not finished"));
        } else if let Some(base) = entry.strip_suffix(REPLACED) {
            if entries.iter().any(|e| e == base) {
                storage.remove_all(&path)?;
            } else {
                storage.rename(&path, &join(output_dir, base))?;
                notes.push(format!("restored {}, the export a stopped run was replacing", join(output_dir, base)));
            }
        }
    }
    Ok(notes)
}

/// Reads the folder's record, if it has one.
pub fn read(storage: &dyn Storage, output_dir: &str) -> Result<Option<RunRecord>> {
    let path = join(output_dir, RUN_RECORD);
    let Some(bytes) = storage.read(&path)? else { return Ok(None) };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Config { source_name: path, problems: vec![format!("not a run record Burnbooth can read: {e}")] })
}

pub fn write(storage: &dyn Storage, output_dir: &str, record: &RunRecord) -> Result<()> {
    storage.write(&join(output_dir, RUN_RECORD), &serde_json::to_vec_pretty(record).expect("records serialise"))
}
