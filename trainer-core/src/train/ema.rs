//! An exponential moving average of the trained weights (`use_ema`), as
//! SimpleTuner's EMAModel keeps it: after optimizer step t (1-based),
//! `ema ← ema − (1 − decay_t)·(ema − weights)` on every
//! `ema_update_interval`-th step, where decay_t is 0 (a copy) for the first
//! step, then `min((t − 1 + 1)/(t − 1 + 10), ema_decay)`; with
//! `ema_warmup_steps` N it is 0 before step N and `ema_decay` from then on.
//! Only trainable tensors are averaged (the adapters of a LoRA run).

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};

use super::optimizer::trainable_on;
use super::tensor_file::HostTensor;
use crate::config::training::EmaSettings;
use crate::error::{Error, Result};
use crate::models::naming::{map_keyed, KeyedMapper};

/// Where EMA tensors are kept in a checkpoint's `trainable.safetensors`:
/// `ema.<key>` beside the weights' own keys.
pub const CHECKPOINT_PREFIX: &str = "ema.";

pub struct Ema {
    pub settings: EmaSettings,
    /// The averages by parameter key (flattened, f32, off the autodiff graph).
    averages: BTreeMap<String, Tensor<1>>,
}

/// Puts the averages into a copy of the module's trainable parameters.
struct WriteAverages<'a> {
    averages: &'a BTreeMap<String, Tensor<1>>,
    train_device: &'a Device,
}

impl KeyedMapper for WriteAverages<'_> {
    fn map<const D: usize>(&mut self, key: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(average) = self.averages.get(key) else { return param };
        let current = param.val();
        if !current.is_require_grad() {
            return param;
        }
        let (dims, dtype) = (current.dims(), current.dtype());
        let value = average.clone().reshape(dims).cast(dtype);
        param.map(|_| trainable_on(value, self.train_device))
    }
}

impl Ema {
    pub fn new(settings: EmaSettings) -> Self {
        Self { settings, averages: BTreeMap::new() }
    }

    /// The decay applied after optimizer step `step` (1-based), SimpleTuner's `get_decay`.
    pub fn decay_at(&self, step: u64) -> f64 {
        let s = &self.settings;
        if s.warmup_steps > 0 {
            return if step < s.warmup_steps { 0.0 } else { s.decay };
        }
        let since = step.saturating_sub(1) as f64;
        if since <= 0.0 {
            return 0.0;
        }
        ((1.0 + since) / (10.0 + since)).min(s.decay)
    }

    /// Whether step `step` updates the average (every `update_interval`-th).
    pub fn updates_at(&self, step: u64) -> bool {
        step.is_multiple_of(self.settings.update_interval.max(1))
    }

    /// Folds the weights after step `step` into the average. A weight seen
    /// for the first time starts the average.
    pub fn update(&mut self, values: BTreeMap<String, Tensor<1>>, step: u64) {
        if !self.updates_at(step) {
            return;
        }
        let decay = self.decay_at(step);
        for (key, value) in values {
            let average = match self.averages.remove(&key) {
                Some(average) if decay > 0.0 => average.clone() - (average - value) * (1.0 - decay),
                _ => value,
            };
            self.averages.insert(key, average);
        }
    }

    /// A copy of `module` whose trainable parameters (keys `prefix` + path)
    /// hold the averages.
    pub fn averaged<M: Module>(&self, module: M, prefix: &str, train_device: &Device) -> M {
        let mut writer = WriteAverages { averages: &self.averages, train_device };
        map_keyed(module, prefix, &mut writer)
    }

    /// Whether there is an average yet (after the first update).
    pub fn is_empty(&self) -> bool {
        self.averages.is_empty()
    }

    /// The averages for checkpoints, keyed [`CHECKPOINT_PREFIX`] + key, with their shapes flattened.
    pub async fn state(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for (key, average) in &self.averages {
            out.insert(format!("{CHECKPOINT_PREFIX}{key}"), HostTensor::from_tensor(average.clone()).await?);
        }
        Ok(out)
    }

    /// Restores [`state`](Self::state); `source` names the checkpoint for messages.
    pub fn load_state(&mut self, state: &BTreeMap<String, HostTensor>, device: &Device, source: &str) -> Result<()> {
        self.averages.clear();
        for (name, tensor) in state {
            let key = name
                .strip_prefix(CHECKPOINT_PREFIX)
                .ok_or_else(|| Error::Io { path: source.to_string(), message: format!("'{name}' is not an EMA tensor") })?;
            let flat = HostTensor { shape: vec![tensor.values.len()], values: tensor.values.clone() };
            self.averages.insert(key.to_string(), flat.to_tensor::<1>(device)?);
        }
        Ok(())
    }
}
