//! The optimizers, over the module's trainable parameters: AdamW as
//! PyTorch computes it (decoupled weight decay, bias correction), Prodigy
//! as prodigyopt 1.1 does and Adafactor as `torch.optim.Adafactor` does
//! (trainer-core/tests/optimizers.rs compares their first steps with
//! vectors from those libraries), after one global gradient-norm clip like
//! `clip_grad_norm_`.
//!
//! Written here rather than taken from burn-optim because a run must be
//! able to save and restore every moment exactly (checkpoints and resume),
//! clip by the global norm (burn clips each tensor by its own norm), and
//! keep bf16 weights and state with stochastic rounding (`adamw_bf16`).
//!
//! A step goes: [`Optimizer::accumulate`] per micro-batch,
//! [`Optimizer::begin_step`] (clip), [`Optimizer::prepare`] (Prodigy's
//! step size needs every parameter before any is updated), then
//! [`Optimizer::apply`] per module.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};

use super::tensor_file::HostTensor;
pub use crate::config::optimizer::{AdafactorSettings, ProdigySettings};
use crate::error::{Error, Result};
use crate::models::naming::{map_keyed, visit_keyed, KeyedMapper, KeyedVisitor};
use crate::rng::SeededRng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// Keep weights and moments in bf16, rounding stochastically.
    pub bf16: bool,
}

/// How parameters are updated from their gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    AdamW(AdamWSettings),
    Prodigy(ProdigySettings),
    Adafactor(AdafactorSettings),
}

impl Rule {
    /// The per-parameter state tensors this rule keeps, by name (as in
    /// checkpoints: `<parameter key>.<name>`, and as the Python libraries name them).
    fn state_names(&self) -> &'static [&'static str] {
        match self {
            Rule::AdamW(_) => &["exp_avg", "exp_avg_sq"],
            Rule::Prodigy(_) => &["exp_avg", "exp_avg_sq", "s", "p0"],
            Rule::Adafactor(_) => &["row_var", "col_var", "variance"],
        }
    }

    /// The name checkpoints record (AdamW's two forms share their state).
    pub fn name(&self) -> &'static str {
        match self {
            Rule::AdamW(_) => "adamw",
            Rule::Prodigy(_) => "prodigy",
            Rule::Adafactor(_) => "adafactor",
        }
    }
}

/// Prodigy's step-size estimate, shared by all parameters (prodigyopt's
/// group values). Host-side f64, as prodigyopt keeps them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProdigyEstimate {
    d: f64,
    d_max: f64,
    d_numerator: f64,
    /// Steps that updated the weights (bias correction counts these).
    k: u64,
    /// `d * lr * bias correction` of the step under way, from `d` before its update.
    dlr: f64,
    /// The step under way changes nothing (no gradient signal or a zero learning rate, as prodigyopt skips).
    skip: bool,
}

type ParamState = BTreeMap<&'static str, Tensor<1>>;

pub struct Optimizer {
    pub rule: Rule,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    state: BTreeMap<String, ParamState>,
    prodigy: Option<ProdigyEstimate>,
    /// Optimizer steps taken (bias correction and Adafactor's decay use it).
    pub steps: u64,
    /// Gradients summed over the micro-batches of the current step.
    accumulated: BTreeMap<String, Tensor<1>>,
    /// Clipped gradients of a step begun by [`Optimizer::begin_step`], taken
    /// by [`Optimizer::apply`] module by module.
    pending: BTreeMap<String, Tensor<1>>,
    /// [`Optimizer::prepare`] ran for the step under way.
    prepared: bool,
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

/// The trainable parameters' current values (flattened, f32, off the
/// autodiff graph).
struct TrainableValues<'a> {
    out: &'a mut BTreeMap<String, Tensor<1>>,
}

impl KeyedVisitor for TrainableValues<'_> {
    fn visit<const D: usize>(&mut self, key: &str, param: &Param<Tensor<D>>) {
        let value = param.val();
        if value.is_require_grad() {
            let value = value.without_autodiff();
            let count = value.shape().num_elements();
            self.out.insert(key.to_string(), value.cast(DType::F32).reshape([count]));
        }
    }
}

/// Adds `module`'s trainable values to `into`, keyed `prefix` + path (as
/// gradients are): what [`Optimizer::prepare`] and the EMA read.
pub fn trainable_values<M: Module>(module: &M, prefix: &str, into: &mut BTreeMap<String, Tensor<1>>) {
    visit_keyed(module, prefix, &mut TrainableValues { out: into });
}

/// Writes updated parameters back into the module.
struct Updater<'a> {
    optimizer: &'a mut Optimizer,
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
        let updated = self.optimizer.update(key, flat, grad, &dims, self.lr, self.rounding_seed);
        let updated = updated.reshape(dims);
        let updated = if dtype == DType::F32 { updated } else { updated.cast(dtype) };
        param.map(|_| trainable_on(updated, self.train_device))
    }
}

impl Optimizer {
    pub fn new(rule: Rule, max_grad_norm: f64) -> Self {
        let prodigy = match rule {
            Rule::Prodigy(p) => Some(ProdigyEstimate { d: p.d0, d_max: p.d0, d_numerator: 0.0, k: 0, dlr: 0.0, skip: false }),
            _ => None,
        };
        Self { rule, max_grad_norm, state: BTreeMap::new(), prodigy, steps: 0, accumulated: BTreeMap::new(), pending: BTreeMap::new(), prepared: false }
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

    /// Abandons a step begun by [`begin_step`](Self::begin_step) before
    /// [`prepare`](Self::prepare): its gradients are dropped and the step
    /// count is as before.
    pub fn discard_step(&mut self) {
        self.pending.clear();
        self.accumulated.clear();
        self.steps -= 1;
    }

    /// One whole step for a single module: [`begin_step`](Self::begin_step),
    /// [`prepare`](Self::prepare), [`apply`](Self::apply). Returns the
    /// global gradient norm before clipping, still on the device.
    pub async fn step<M: Module>(&mut self, module: M, lr: f64, train_device: &Device) -> Result<(M, Option<Tensor<1>>)> {
        let norm = self.begin_step();
        let mut values = BTreeMap::new();
        trainable_values(&module, "", &mut values);
        self.prepare(values, lr).await?;
        let module = self.apply(module, "", lr, train_device);
        self.finish_step();
        Ok((module, norm))
    }

    /// Starts an optimizer step: clips the accumulated gradients of every
    /// module by their global norm (one clip, like `clip_grad_norm_` over
    /// all parameter groups) and returns that norm, still on the device
    /// (clipping never waits for it). `None` when nothing has a gradient.
    pub fn begin_step(&mut self) -> Option<Tensor<1>> {
        let mut grads = std::mem::take(&mut self.accumulated);
        let norm = grads.values().map(|g| g.clone().square().sum()).reduce(|a, b| a + b)?.sqrt();
        if self.max_grad_norm > 0.0 {
            // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above 1.
            let factor = (norm.clone().add_scalar(1e-6).recip() * self.max_grad_norm).clamp_max(1.0);
            grads = grads.into_iter().map(|(path, g)| (path, g * factor.clone())).collect();
        }
        self.steps += 1;
        self.pending = grads;
        self.prepared = false;
        Some(norm)
    }

    /// Reads what a rule needs from all parameters before any is updated:
    /// Prodigy's statistics over the parameters' current `values` (from
    /// [`trainable_values`]) and its new step size, at learning
    /// rate `lr` (one for all: Prodigy has a single step size). Other
    /// rules need nothing.
    pub async fn prepare(&mut self, values: BTreeMap<String, Tensor<1>>, lr: f64) -> Result<()> {
        self.prepared = true;
        let (Rule::Prodigy(p), Some(mut estimate)) = (self.rule, self.prodigy) else { return Ok(()) };
        let step = self.steps;
        let beta3 = p.beta3.unwrap_or(p.beta2.sqrt());
        let k = estimate.k as i32;
        let bias_correction = if p.use_bias_correction { (1.0 - p.beta2.powi(k + 1)).sqrt() / (1.0 - p.beta1.powi(k + 1)) } else { 1.0 };
        let d = estimate.d;
        estimate.dlr = d * lr * bias_correction;
        estimate.skip = lr <= 0.0;
        if estimate.skip {
            self.prodigy = Some(estimate);
            return Ok(());
        }
        let mut numerator_terms = Vec::new();
        let mut denominator_terms = Vec::new();
        let grads = std::mem::take(&mut self.pending);
        let mut coupled = BTreeMap::new();
        for (path, grad) in grads {
            let Some(value) = values.get(&path) else {
                coupled.insert(path, grad);
                continue;
            };
            let grad = if p.weight_decay != 0.0 && !p.decouple { grad + value.clone() * p.weight_decay } else { grad };
            let mut state = self.state.remove(&path).unwrap_or_else(|| {
                let zeros = grad.zeros_like();
                BTreeMap::from([("exp_avg", zeros.clone()), ("exp_avg_sq", zeros.clone()), ("s", zeros), ("p0", value.clone())])
            });
            let take = |state: &mut ParamState, name: &str| state.remove(name).expect("Prodigy state is complete");
            let p0 = take(&mut state, "p0");
            numerator_terms.push((grad.clone() * (p0.clone() - value.clone())).sum());
            state.insert("p0", p0);
            let exp_avg = take(&mut state, "exp_avg") * p.beta1 + grad.clone() * (d * (1.0 - p.beta1));
            let exp_avg_sq = take(&mut state, "exp_avg_sq") * p.beta2 + grad.clone().square() * (d * d * (1.0 - p.beta2));
            let s_rate = if p.safeguard_warmup { d / p.d0 * d } else { d / p.d0 * estimate.dlr };
            let s = take(&mut state, "s") * beta3 + grad.clone() * s_rate;
            denominator_terms.push(s.clone().abs().sum());
            state.insert("exp_avg", exp_avg);
            state.insert("exp_avg_sq", exp_avg_sq);
            state.insert("s", s);
            self.state.insert(path.clone(), state);
            coupled.insert(path, grad);
        }
        self.pending = coupled;
        let sums = match (numerator_terms.into_iter().reduce(|a, b| a + b), denominator_terms.into_iter().reduce(|a, b| a + b)) {
            (Some(numerator), Some(denominator)) => Tensor::cat(vec![numerator, denominator], 0),
            _ => {
                estimate.skip = true;
                self.prodigy = Some(estimate);
                return Ok(());
            }
        };
        let sums = sums
            .into_data_async()
            .await
            .map_err(|e| Error::Training { step, message: crate::error::device_failure("Prodigy's step-size statistics", e) })?
            .convert::<f64>()
            .try_into_vec::<f64>()
            .map_err(|e| Error::Training { step, message: format!("Prodigy's step-size statistics: {e:?}") })?;
        let (delta_numerator, denominator) = ((d / p.d0) * estimate.dlr * sums[0], sums[1]);
        if denominator == 0.0 {
            estimate.skip = true;
            self.prodigy = Some(estimate);
            return Ok(());
        }
        let numerator = estimate.d_numerator * beta3 + delta_numerator;
        // prodigy_steps (SimpleTuner): d keeps its value once that many steps are done.
        let adapting = p.prodigy_steps == 0 || estimate.k < p.prodigy_steps;
        if adapting {
            let d_hat = p.d_coef * numerator / denominator;
            let mut d = estimate.d;
            if d == p.d0 {
                d = d.max(d_hat);
            }
            estimate.d_max = estimate.d_max.max(d_hat);
            estimate.d = estimate.d_max.min(d * p.growth_rate);
        }
        estimate.d_numerator = numerator;
        self.prodigy = Some(estimate);
        Ok(())
    }

    /// Updates `module`'s parameters (named `prefix` + path) with the step
    /// begun by [`begin_step`](Self::begin_step), at learning rate `lr`
    /// (Prodigy's comes from [`prepare`](Self::prepare)).
    pub fn apply<M: Module>(&mut self, module: M, prefix: &str, lr: f64, train_device: &Device) -> M {
        assert!(self.prepared, "Optimizer::prepare must run between begin_step and apply");
        let grads = std::mem::take(&mut self.pending);
        let rounding_seed = self.steps;
        let mut updater = Updater { optimizer: self, grads, lr, rounding_seed, train_device };
        let module = map_keyed(module, prefix, &mut updater);
        // What this module did not take belongs to the next module applied.
        self.pending = updater.grads;
        module
    }

    /// Ends a step whose modules were all applied (Prodigy counts it).
    pub fn finish_step(&mut self) {
        if let Some(estimate) = self.prodigy.as_mut() {
            if !estimate.skip {
                estimate.k += 1;
            }
        }
        self.pending.clear();
        self.prepared = false;
    }

    fn update(&mut self, path: &str, param: Tensor<1>, grad: Tensor<1>, dims: &[usize], lr: f64, rounding_seed: u64) -> Tensor<1> {
        match self.rule {
            Rule::AdamW(s) => self.adamw(s, path, param, grad, lr, rounding_seed),
            Rule::Prodigy(p) => self.prodigy(p, path, param),
            Rule::Adafactor(a) => self.adafactor(a, path, param, grad, dims, lr),
        }
    }

    fn adamw(&mut self, s: AdamWSettings, path: &str, param: Tensor<1>, grad: Tensor<1>, lr: f64, rounding_seed: u64) -> Tensor<1> {
        let mut state = self.state.remove(path).unwrap_or_default();
        let (m, v) = match (state.remove("exp_avg"), state.remove("exp_avg_sq")) {
            (Some(m), Some(v)) => (m.cast(DType::F32), v.cast(DType::F32)),
            _ => (grad.zeros_like(), grad.zeros_like()),
        };
        let m = m * s.beta1 + grad.clone() * (1.0 - s.beta1);
        let v = v * s.beta2 + grad.square() * (1.0 - s.beta2);
        let t = self.steps as i32;
        let m_hat = m.clone() / (1.0 - s.beta1.powi(t));
        let v_hat = v.clone() / (1.0 - s.beta2.powi(t));
        let updated = param * (1.0 - lr * s.weight_decay) - m_hat / (v_hat.sqrt() + s.epsilon) * lr;
        let (m, v, updated) = if s.bf16 {
            let mut rng = SeededRng::derived(rounding_seed, &format!("adamw-bf16/{path}"));
            (stochastic_bf16(m, &mut rng), stochastic_bf16(v, &mut rng), stochastic_bf16(updated, &mut rng))
        } else {
            (m, v, updated)
        };
        self.state.insert(path.to_string(), BTreeMap::from([("exp_avg", m), ("exp_avg_sq", v)]));
        updated
    }

    /// prodigyopt's second loop: the moments were updated in
    /// [`prepare`](Self::prepare). (With beta1 = 0 the first moment is the
    /// gradient times d, which is what prodigyopt then steps by.)
    fn prodigy(&mut self, p: ProdigySettings, path: &str, param: Tensor<1>) -> Tensor<1> {
        let estimate = self.prodigy.expect("a Prodigy optimizer has its estimate");
        let state = self.state.get(path).expect("prepare made every updated parameter's state");
        if estimate.skip {
            return param;
        }
        let denominator = state["exp_avg_sq"].clone().sqrt().add_scalar(estimate.d * p.epsilon);
        let param = if p.weight_decay != 0.0 && p.decouple { param.clone() - param * (p.weight_decay * estimate.dlr) } else { param };
        param - state["exp_avg"].clone() / denominator * estimate.dlr
    }

    /// torch.optim.Adafactor's single-tensor step.
    fn adafactor(&mut self, a: AdafactorSettings, path: &str, param: Tensor<1>, grad: Tensor<1>, dims: &[usize], lr: f64) -> Tensor<1> {
        let t = self.steps as f64;
        let mut state = self.state.remove(path).unwrap_or_default();
        let new_weight = t.powf(a.beta2_decay); // 1 - beta2_t
        let rho = lr.min(1.0 / t.sqrt());
        let count = grad.dims()[0];
        // max(eps2, RMS(param)) * rho, on the device.
        let alpha = param.clone().square().mean().sqrt().clamp_min(a.epsilon2) * rho;
        let param = if a.weight_decay != 0.0 { param * (1.0 - lr * a.weight_decay) } else { param };
        let variance = if dims.len() > 1 {
            // Factored over the last two dimensions: rows [L, m, 1], columns [L, 1, n].
            let (m, n) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            let leading = count / (m * n);
            let squared = grad.clone().square().reshape([leading, m, n]);
            let lerp = |old: Option<Tensor<1>>, new: Tensor<3>| -> Tensor<3> {
                match old {
                    Some(old) => {
                        let old = old.reshape(new.dims());
                        old.clone() + (new - old) * new_weight
                    }
                    None => new * new_weight,
                }
            };
            let row = lerp(state.remove("row_var"), squared.clone().mean_dim(2));
            let col = lerp(state.remove("col_var"), squared.mean_dim(1));
            let estimate = row.clone().matmul(col.clone()) / row.clone().mean_dim(1).clamp_min(a.epsilon1);
            state.insert("row_var", row.reshape([leading * m]));
            state.insert("col_var", col.reshape([leading * n]));
            estimate.reshape([count])
        } else {
            let squared = grad.clone().square();
            let variance = match state.remove("variance") {
                Some(old) => old.clone() + (squared - old) * new_weight,
                None => squared * new_weight,
            };
            state.insert("variance", variance.clone());
            variance
        };
        self.state.insert(path.to_string(), state);
        let update = variance.clamp_min(a.epsilon1 * a.epsilon1).sqrt().recip() * grad;
        let denominator = (update.clone().square().mean().sqrt() / a.clip_threshold).clamp_min(1.0);
        param - update * (alpha / denominator)
    }

    /// The per-parameter state for checkpoints (`<path>.<name>`, as f32).
    pub async fn state(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for (path, state) in &self.state {
            for (name, tensor) in state {
                out.insert(format!("{path}.{name}"), HostTensor::from_tensor(tensor.clone().cast(DType::F32)).await?);
            }
        }
        Ok(out)
    }

    /// The state that is not per parameter (Prodigy's step size), for
    /// checkpoints: written as text, so that it resumes exactly.
    pub fn scalars(&self) -> BTreeMap<String, String> {
        let Some(e) = self.prodigy else { return BTreeMap::new() };
        BTreeMap::from([
            ("prodigy.d".to_string(), e.d.to_string()),
            ("prodigy.d_max".to_string(), e.d_max.to_string()),
            ("prodigy.d_numerator".to_string(), e.d_numerator.to_string()),
            ("prodigy.k".to_string(), e.k.to_string()),
        ])
    }

    /// Prodigy's current step size `d` (for the metrics).
    pub fn prodigy_d(&self) -> Option<f64> {
        self.prodigy.map(|e| e.d)
    }

    /// Restores [`state`](Self::state) and [`scalars`](Self::scalars) saved after `steps` steps.
    pub fn load_state(&mut self, state: &BTreeMap<String, HostTensor>, scalars: &BTreeMap<String, String>, steps: u64, device: &Device) -> Result<()> {
        self.state.clear();
        self.steps = steps;
        let bf16 = matches!(self.rule, Rule::AdamW(AdamWSettings { bf16: true, .. }));
        for (key, tensor) in state {
            let Some((path, name)) = self.rule.state_names().iter().find_map(|name| key.strip_suffix(&format!(".{name}")).map(|path| (path, *name))) else {
                return Err(Error::Io {
                    path: key.clone(),
                    message: format!("optimizer state tensor is not one {} keeps ({})", self.rule.name(), self.rule.state_names().join(", ")),
                });
            };
            let mut tensor = tensor.to_tensor::<1>(device)?;
            if bf16 {
                tensor = tensor.cast(DType::BF16);
            }
            self.state.entry(path.to_string()).or_default().insert(name, tensor);
        }
        if let Some(estimate) = self.prodigy.as_mut() {
            let read = |name: &str| -> Result<&String> {
                scalars.get(name).ok_or_else(|| Error::Io { path: "state.json".into(), message: format!("the checkpoint lacks Prodigy's '{name}'") })
            };
            let number = |name: &str| -> Result<f64> {
                read(name)?.parse::<f64>().map_err(|e| Error::Io { path: "state.json".into(), message: format!("Prodigy's '{name}': {e}") })
            };
            estimate.d = number("prodigy.d")?;
            estimate.d_max = number("prodigy.d_max")?;
            estimate.d_numerator = number("prodigy.d_numerator")?;
            estimate.k =
                read("prodigy.k")?.parse::<u64>().map_err(|e| Error::Io { path: "state.json".into(), message: format!("Prodigy's 'prodigy.k': {e}") })?;
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
