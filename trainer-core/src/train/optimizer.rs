//! AdamW as PyTorch computes it (decoupled weight decay, bias correction,
//! one global gradient-norm clip like `clip_grad_norm_`), over the module's
//! trainable parameters.
//!
//! Written here rather than taken from burn-optim because a run must be
//! able to save and restore every moment exactly (checkpoints and resume),
//! clip by the global norm (burn clips each tensor by its own norm), and
//! keep bf16 weights and state with stochastic rounding (`adamw_bf16`).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};

use super::tensor_file::HostTensor;
use crate::error::Result;
use crate::models::naming::{map_keyed, visit_keyed, KeyedMapper, KeyedVisitor};
use crate::rng::SeededRng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    /// Keep weights and moments in bf16, rounding stochastically.
    pub bf16: bool,
}

struct Moments {
    m: Tensor<1>,
    v: Tensor<1>,
}

pub struct AdamW {
    pub settings: AdamWSettings,
    moments: BTreeMap<String, Moments>,
    /// Optimizer steps taken (bias correction uses it).
    pub steps: u64,
    /// Gradients summed over the micro-batches of the current step.
    accumulated: BTreeMap<String, Tensor<1>>,
    /// Clipped gradients of a step begun by [`AdamW::begin_step`], taken
    /// by [`AdamW::apply`] module by module.
    pending: BTreeMap<String, Tensor<1>>,
}

/// Pulls each trainable parameter's gradient out of the backward result.
/// Keys start with the module's prefix (`text_encoder.` for the text
/// encoder), so several modules share one optimizer.
struct GradientReader<'a> {
    grads: &'a mut Gradients,
    scale: f64,
    out: Vec<(String, Tensor<1>)>,
}

impl KeyedVisitor for GradientReader<'_> {
    fn visit<const D: usize>(&mut self, key: &str, param: &Param<Tensor<D>>) {
        let value = param.val();
        if let Some(grad) = value.grad_remove(self.grads) {
            let count = grad.shape().num_elements();
            let grad = grad.cast(DType::F32).reshape([count]) * self.scale;
            self.out.push((key.to_string(), grad));
        }
    }
}

/// Writes updated parameters back into the module.
struct Updater<'a> {
    optimizer: &'a mut AdamW,
    grads: BTreeMap<String, Tensor<1>>,
    lr: f64,
    rounding_seed: u64,
    train_device: &'a Device,
}

impl KeyedMapper for Updater<'_> {
    fn map<const D: usize>(&mut self, key: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = self.grads.remove(key) else { return param };
        let value = param.val().without_autodiff();
        let dims = value.dims();
        let dtype = value.dtype();
        let flat = value.cast(DType::F32).reshape([grad.dims()[0]]);
        let updated = self.optimizer.update(key, flat, grad, self.lr, self.rounding_seed);
        let updated = updated.reshape(dims);
        let updated = if dtype == DType::F32 { updated } else { updated.cast(dtype) };
        param.map(|_| trainable_on(updated, self.train_device))
    }
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> Self {
        Self { settings, moments: BTreeMap::new(), steps: 0, accumulated: BTreeMap::new(), pending: BTreeMap::new() }
    }

    /// Adds one micro-batch's gradients (scaled by `scale`, 1/accumulation)
    /// of `module`'s trainable parameters, named `prefix` + module path.
    pub fn accumulate<M: Module>(&mut self, module: &M, prefix: &str, grads: &mut Gradients, scale: f64) {
        let mut reader = GradientReader { grads, scale, out: Vec::new() };
        visit_keyed(module, prefix, &mut reader);
        for (path, grad) in reader.out {
            let sum = match self.accumulated.remove(&path) {
                Some(previous) => previous + grad,
                None => grad,
            };
            self.accumulated.insert(path, sum);
        }
    }

    /// The gradients accumulated for the current step, by parameter path
    /// (flattened, f32).
    pub fn gradients(&self) -> &BTreeMap<String, Tensor<1>> {
        &self.accumulated
    }

    /// Drops the gradients accumulated for the current step (a step that failed).
    pub fn discard_gradients(&mut self) {
        self.accumulated.clear();
    }

    /// Abandons a step begun by [`begin_step`](Self::begin_step) before any
    /// parameter was updated: its gradients are dropped and the step count
    /// (AdamW's bias correction) is as before.
    pub fn discard_step(&mut self) {
        self.pending.clear();
        self.accumulated.clear();
        self.steps -= 1;
    }

    /// Applies the accumulated gradients to one module. Returns the global
    /// gradient norm before clipping, still on the device.
    pub fn step<M: Module>(&mut self, module: M, lr: f64, train_device: &Device) -> Result<(M, Option<Tensor<1>>)> {
        let norm = self.begin_step();
        let module = self.apply(module, "", lr, train_device);
        Ok((module, norm))
    }

    /// Starts an optimizer step: clips the accumulated gradients of every
    /// module by their global norm (one clip, like `clip_grad_norm_` over
    /// all parameter groups) and returns that norm, still on the device
    /// (clipping never waits for it). `None` when nothing has a gradient.
    pub fn begin_step(&mut self) -> Option<Tensor<1>> {
        let mut grads = std::mem::take(&mut self.accumulated);
        let norm = grads.values().map(|g| g.clone().square().sum()).reduce(|a, b| a + b)?.sqrt();
        if self.settings.max_grad_norm > 0.0 {
            // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above 1.
            let factor = (norm.clone().add_scalar(1e-6).recip() * self.settings.max_grad_norm).clamp_max(1.0);
            grads = grads.into_iter().map(|(path, g)| (path, g * factor.clone())).collect();
        }
        self.steps += 1;
        self.pending = grads;
        Some(norm)
    }

    /// Updates `module`'s parameters (named `prefix` + path) with the step
    /// begun by [`begin_step`](Self::begin_step), at learning rate `lr`.
    pub fn apply<M: Module>(&mut self, module: M, prefix: &str, lr: f64, train_device: &Device) -> M {
        let grads = std::mem::take(&mut self.pending);
        let rounding_seed = self.steps;
        let mut updater = Updater { optimizer: self, grads, lr, rounding_seed, train_device };
        let module = map_keyed(module, prefix, &mut updater);
        // What this module did not take belongs to the next module applied.
        self.pending = updater.grads;
        module
    }

    fn update(&mut self, path: &str, param: Tensor<1>, grad: Tensor<1>, lr: f64, rounding_seed: u64) -> Tensor<1> {
        let s = self.settings;
        let bf16 = s.bf16;
        let (m, v) = match self.moments.remove(path) {
            Some(Moments { m, v }) => (m.cast(DType::F32), v.cast(DType::F32)),
            None => (grad.zeros_like(), grad.zeros_like()),
        };
        let m = m * s.beta1 + grad.clone() * (1.0 - s.beta1);
        let v = v * s.beta2 + grad.square() * (1.0 - s.beta2);
        let t = self.steps as i32;
        let m_hat = m.clone() / (1.0 - s.beta1.powi(t));
        let v_hat = v.clone() / (1.0 - s.beta2.powi(t));
        let updated = param * (1.0 - lr * s.weight_decay) - m_hat / (v_hat.sqrt() + s.epsilon) * lr;
        if bf16 {
            let mut rng = SeededRng::derived(rounding_seed, &format!("adamw-bf16/{path}"));
            let moments = Moments { m: stochastic_bf16(m, &mut rng), v: stochastic_bf16(v, &mut rng) };
            self.moments.insert(path.to_string(), moments);
            stochastic_bf16(updated, &mut rng)
        } else {
            self.moments.insert(path.to_string(), Moments { m, v });
            updated
        }
    }

    /// The moments, for checkpoints (`<path>.exp_avg` / `.exp_avg_sq`, as f32).
    pub async fn state(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for (path, moments) in &self.moments {
            out.insert(format!("{path}.exp_avg"), HostTensor::from_tensor(moments.m.clone()).await?);
            out.insert(format!("{path}.exp_avg_sq"), HostTensor::from_tensor(moments.v.clone()).await?);
        }
        Ok(out)
    }

    pub fn load_state(&mut self, state: &BTreeMap<String, HostTensor>, steps: u64, device: &Device) -> Result<()> {
        self.moments.clear();
        self.steps = steps;
        for (name, m) in state {
            let Some(path) = name.strip_suffix(".exp_avg") else { continue };
            let Some(v) = state.get(&format!("{path}.exp_avg_sq")) else { continue };
            let mut m = m.to_tensor::<1>(device)?;
            let mut v = v.to_tensor::<1>(device)?;
            if self.settings.bf16 {
                m = m.cast(DType::BF16);
                v = v.cast(DType::BF16);
            }
            self.moments.insert(path.to_string(), Moments { m, v });
        }
        Ok(())
    }
}

/// Rounds f32 values to bf16 stochastically: down or up to the two nearest
/// bf16 values with probabilities that make the rounding unbiased, so tiny
/// updates are not lost to round-to-nearest. Uniform draws come from the
/// seeded generator, so the result does not depend on the backend.
pub fn stochastic_bf16(x: Tensor<1>, rng: &mut SeededRng) -> Tensor<1> {
    let count = x.dims()[0];
    let device = x.device();
    // bf16 keeps 8 significant bits: the spacing at |x| is 2^(floor(log2|x|) - 7).
    let magnitude = x.clone().abs().clamp_min(1e-30);
    let exponent = (magnitude.log() / std::f64::consts::LN_2).floor();
    let spacing = (exponent - 7.0).mul_scalar(std::f64::consts::LN_2).exp();
    let lower = (x.clone() / spacing.clone()).floor() * spacing.clone();
    let fraction = (x - lower.clone()) / spacing.clone();
    let draws: Vec<f32> = (0..count).map(|_| rng.next_f64() as f32).collect();
    let draws = Tensor::<1>::from_data(TensorData::new(draws, [count]), &device);
    let round_up = draws.lower(fraction);
    let rounded = lower.clone().mask_where(round_up, lower + spacing);
    rounded.cast(DType::BF16)
}

/// A tensor as a trainable leaf on the training device (autodiff, with the
/// device's gradient-checkpointing strategy: tensors with different
/// strategies cannot be combined).
pub fn trainable_on<const D: usize>(tensor: Tensor<D>, train_device: &Device) -> Tensor<D> {
    frozen_on(tensor, train_device).require_grad()
}

/// A constant on the training device.
pub fn frozen_on<const D: usize>(tensor: Tensor<D>, train_device: &Device) -> Tensor<D> {
    let tensor = tensor.autodiff();
    match train_device.gradient_checkpointing_strategy() {
        Some(strategy) => tensor.with_gradient_checkpointing_strategy(strategy),
        None => tensor,
    }
}

/// Moves every parameter onto the training device: trainable leaves, or
/// frozen constants.
pub struct ToTrainDevice<'a> {
    pub device: &'a Device,
    pub trainable: bool,
}

impl ModuleMapper for ToTrainDevice<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (device, trainable) = (self.device, self.trainable);
        param.map(|t| {
            let t = frozen_on(t.without_autodiff(), device);
            if trainable {
                t.require_grad()
            } else {
                t
            }
        })
    }
}
