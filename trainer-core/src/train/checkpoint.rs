//! Checkpoints: the trainable weights, the optimizer's moments and where
//! the run is (step, sampler positions), in one folder per step under
//! `<output_dir>/checkpoints/`. A checkpoint is written into a `.partial`
//! folder and renamed when complete, so a crash or `kill -9` mid-write leaves
//! the previous checkpoints intact and no half-written one that looks whole.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optimizer::trainable_on;
use super::storage::{join, Storage};
use super::tensor_file::{self, HostTensor};
use crate::data::batch_sampler::BatchSamplerState;
use crate::error::{Error, Result};
use crate::models::naming::{map_keyed, visit_keyed, KeyedMapper, KeyedVisitor};

const PREFIX: &str = "checkpoint-";
const PARTIAL: &str = ".partial";
/// What a complete checkpoint folder holds.
const FILES: [&str; 3] = ["trainable.safetensors", "optimizer.safetensors", "state.json"];

/// The checkpoint layout this version writes and reads. 2: tensors named
/// by their diffusers keys ([`crate::models::naming`]); 1 (Burnbooth before
/// 2026-11-30, no `format` in `state.json`): by burn's field paths.
pub const CHECKPOINT_FORMAT: u32 = 2;

fn first_format() -> u32 {
    1
}

/// Where the run is, saved as `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    /// The layout ([`CHECKPOINT_FORMAT`]).
    #[serde(default = "first_format")]
    pub format: u32,
    /// Optimizer steps completed.
    pub step: u64,
    pub epoch: u64,
    pub sampler: BatchSamplerState,
    /// The class-image sampler under prior preservation.
    pub prior_sampler: Option<BatchSamplerState>,
    pub model_type: String,
    pub lora_rank: Option<u32>,
    /// The optimizer whose state `optimizer.safetensors` holds (absent
    /// before Prodigy and Adafactor: AdamW).
    #[serde(default = "adamw")]
    pub optimizer: String,
    /// The optimizer's state that is not per parameter (Prodigy's step size), as exact text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub optimizer_scalars: BTreeMap<String, String>,
}

fn adamw() -> String {
    "adamw".into()
}

pub struct Checkpoint {
    pub path: String,
    pub state: RunState,
    pub trainable: BTreeMap<String, HostTensor>,
    pub optimizer: BTreeMap<String, HostTensor>,
}

pub fn checkpoints_dir(output_dir: &str) -> String {
    join(output_dir, "checkpoints")
}

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix(PREFIX).filter(|rest| !rest.ends_with(PARTIAL)).and_then(|rest| rest.parse().ok())
}

/// Complete checkpoints, oldest first: (step, path).
pub fn list(storage: &dyn Storage, output_dir: &str) -> Result<Vec<(u64, String)>> {
    let dir = checkpoints_dir(output_dir);
    let found: Vec<(u64, String)> = storage.list(&dir)?.into_iter().filter_map(|name| step_of(&name).map(|step| (step, join(&dir, &name)))).collect();
    // A folder copied file by file (the browser's OPFS has no folder rename)
    // counts once all of its files are there.
    let mut complete = Vec::new();
    for (step, path) in found {
        let mut whole = true;
        for file in FILES {
            whole &= storage.exists(&join(&path, file))?;
        }
        if whole {
            complete.push((step, path));
        }
    }
    let mut found = complete;
    found.sort();
    Ok(found)
}

/// Writes a checkpoint, then keeps at most `keep` (0 = all). `between_files`
/// runs after each file (tests use it to kill the process mid-write).
pub fn save(storage: &dyn Storage, output_dir: &str, checkpoint: &Checkpoint, keep: u32, between_files: &dyn Fn()) -> Result<String> {
    // A checkpoint with NaN or infinite weights would be resumed from, and
    // pruning would delete good ones in its favour: never write one.
    for (kind, tensors) in [("weight", &checkpoint.trainable), ("optimizer state", &checkpoint.optimizer)] {
        if let Some((name, _)) = tensors.iter().find(|(_, t)| t.values.iter().any(|v| !v.is_finite())) {
            return Err(Error::Training {
                step: checkpoint.state.step,
                message: format!("not saving a checkpoint: {kind} '{name}' has NaN or infinite values; the earlier checkpoints are kept"),
            });
        }
    }
    let dir = checkpoints_dir(output_dir);
    let name = format!("{PREFIX}{:08}", checkpoint.state.step);
    let partial = join(&dir, &format!("{name}{PARTIAL}"));
    let final_path = join(&dir, &name);
    storage.remove_all(&partial)?;
    let metadata = BTreeMap::from([("format".to_string(), "burnbooth-checkpoint-v1".to_string())]);
    storage.write(&join(&partial, "trainable.safetensors"), &tensor_file::write(&checkpoint.trainable, &metadata)?)?;
    between_files();
    storage.write(&join(&partial, "optimizer.safetensors"), &tensor_file::write(&checkpoint.optimizer, &metadata)?)?;
    between_files();
    let state = serde_json::to_vec_pretty(&checkpoint.state).expect("state serialises");
    storage.write(&join(&partial, "state.json"), &state)?;
    between_files();
    storage.remove_all(&final_path)?;
    storage.rename(&partial, &final_path)?;
    if keep > 0 {
        let all = list(storage, output_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep as usize)) {
            storage.remove_all(old)?;
        }
    }
    // Leftovers of interrupted writes.
    for name in storage.list(&dir)? {
        if name.ends_with(PARTIAL) {
            storage.remove_all(&join(&dir, &name))?;
        }
    }
    Ok(final_path)
}

/// `latest` (the newest complete checkpoint of `output_dir`) or a path.
pub fn resolve(storage: &dyn Storage, output_dir: &str, which: &str) -> Result<String> {
    if which == "latest" {
        return list(storage, output_dir)?
            .pop()
            .map(|(_, path)| path)
            .ok_or_else(|| Error::Io { path: checkpoints_dir(output_dir), message: "--resume latest: no complete checkpoint here".into() });
    }
    Ok(which.to_string())
}

pub fn load(storage: &dyn Storage, path: &str) -> Result<Checkpoint> {
    let read = |name: &str| -> Result<Vec<u8>> {
        let file = join(path, name);
        storage.read(&file)?.ok_or_else(|| Error::Io { path: file.clone(), message: "missing: not a complete Burnbooth checkpoint".into() })
    };
    let state_path = join(path, "state.json");
    let state: RunState = serde_json::from_slice(&read("state.json")?)
        .map_err(|e| Error::Io { path: state_path.clone(), message: format!("unreadable checkpoint state: {e}") })?;
    if state.format != CHECKPOINT_FORMAT {
        return Err(Error::Config {
            source_name: state_path,
            problems: vec![format!(
                "this checkpoint has format {} and this Burnbooth reads format {CHECKPOINT_FORMAT} (tensors named by their diffusers keys): \
                 finish the run with the Burnbooth that started it, or start over (--start-over keeps the old outputs in previous-N)",
                state.format
            )],
        });
    }
    let trainable = tensor_file::read(&join(path, "trainable.safetensors"), read("trainable.safetensors")?)?;
    let optimizer = tensor_file::read(&join(path, "optimizer.safetensors"), read("optimizer.safetensors")?)?;
    Ok(Checkpoint { path: path.to_string(), state, trainable, optimizer })
}

struct ReadTrainable {
    out: Vec<(String, Tensor<1>, Vec<usize>)>,
}

impl KeyedVisitor for ReadTrainable {
    fn visit<const D: usize>(&mut self, key: &str, param: &Param<Tensor<D>>) {
        let value = param.val();
        if value.is_require_grad() {
            let dims = value.dims().to_vec();
            let count: usize = dims.iter().product();
            self.out.push((key.to_string(), value.without_autodiff().cast(DType::F32).reshape([count]), dims));
        }
    }
}

/// The trainable parameters by key, on the host.
pub async fn trainable_tensors<M: Module>(module: &M) -> Result<BTreeMap<String, HostTensor>> {
    let mut reader = ReadTrainable { out: Vec::new() };
    visit_keyed(module, "", &mut reader);
    let mut out = BTreeMap::new();
    for (key, flat, shape) in reader.out {
        out.insert(key, HostTensor::from_flat(flat, shape).await?);
    }
    Ok(out)
}

struct WriteTrainable<'a> {
    values: &'a BTreeMap<String, HostTensor>,
    train_device: Device,
    problems: Vec<String>,
    restored: usize,
}

impl KeyedMapper for WriteTrainable<'_> {
    fn map<const D: usize>(&mut self, key: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let current = param.val();
        if !current.is_require_grad() {
            return param;
        }
        let Some(saved) = self.values.get(key) else {
            self.problems.push(format!("no saved value for trainable tensor '{key}'"));
            return param;
        };
        if saved.shape != current.dims().to_vec() {
            self.problems.push(format!("tensor '{key}' was saved with shape {:?}, this run has {:?}", saved.shape, current.dims()));
            return param;
        }
        let dtype = current.dtype();
        match saved.to_tensor::<D>(&self.train_device) {
            Ok(tensor) => {
                self.restored += 1;
                param.map(|_| trainable_on(tensor.cast(dtype), &self.train_device))
            }
            Err(e) => {
                self.problems.push(e.to_string());
                param
            }
        }
    }
}

/// Puts saved values into the module's trainable parameters; every
/// missing or mis-shaped tensor is reported.
pub fn restore_trainable<M: Module>(module: M, values: &BTreeMap<String, HostTensor>, train_device: &Device, source: &str) -> Result<M> {
    let mut writer = WriteTrainable { values, train_device: train_device.clone(), problems: Vec::new(), restored: 0 };
    let module = map_keyed(module, "", &mut writer);
    if writer.restored != values.len() {
        writer.problems.push(format!("the checkpoint has {} trainable tensors, this run {}", values.len(), writer.restored));
    }
    if writer.problems.is_empty() {
        Ok(module)
    } else {
        writer.problems.dedup();
        Err(Error::Config { source_name: source.to_string(), problems: writer.problems })
    }
}
