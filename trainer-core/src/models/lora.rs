//! LoRA: low-rank adapters on the model's Linear layers and convolutions.
//!
//! Every adaptable Linear layer is a [`LoraLinear`]: the frozen base layer plus an
//! optional adapter, `y = base(x) + (alpha / rank) * up(down(dropout(x)))`
//! (kohya's `networks/lora.py`, PEFT's `lora.Linear`). With DoRA
//! (`use_dora`) the adapter also learns a magnitude `m` per output feature
//! and the adapted weight's columns are rescaled to it, as PEFT's
//! `use_dora=True` computes it (docs/reference.md §4). Each layer knows its
//! diffusers module path, which is all the kohya export needs
//! (`lora_unet_` + path with `.` -> `_`). Every adaptable convolution is
//! a [`LoraConv2d`], which carries LyCORIS's LoCon pair.

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Device, Tensor, TensorData};

use super::conv::conv2d;
use super::layers::{in_dtype, project, Conv2d, Linear};
use crate::config::lycoris::{factorization, LycorisSettings};
use crate::rng::SeededRng;
use cpu_kernels::dropout::DropoutMask;

/// A Linear layer that can carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: Linear,
    pub lora: Option<LoraAdapter>,
    /// A LyCORIS LoKr adapter instead (`lora_type` lycoris).
    pub lokr: Option<LokrAdapter>,
    /// The diffusers module path (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    #[module(skip)]
    pub path: String,
}

/// The trainable low-rank pair. Weights are kept in burn's layout
/// (`[in, out]`); kohya files store the transposes.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// A, `[in, rank]` (kohya's `lora_down.weight` is `[rank, in]`).
    pub down: Param<Tensor<2>>,
    /// B, `[rank, out]` (kohya's `lora_up.weight` is `[out, rank]`).
    pub up: Param<Tensor<2>>,
    /// DoRA's magnitude `m`, `[out]` (kohya's `dora_scale` is `[out, 1]`).
    pub magnitude: Option<Param<Tensor<1>>>,
    #[module(skip)]
    pub alpha: f64,
    #[module(skip)]
    pub dropout: Option<DropoutSource>,
}

/// LyCORIS's LoKr: the weight change is `scale * kron(w1, w2)` in torch's
/// `[out, in]` layout, `w1` `[out_l, in_m]` holding the small factors of
/// the layer's sizes and `w2` `[out_k, in_n]` the large ones, or a
/// low-rank pair `w2_a @ w2_b` when `linear_dim` is small. The factors
/// are kept in torch's layout, as files store them.
#[derive(Module, Debug)]
pub struct LokrAdapter {
    pub w1: Param<Tensor<2>>,
    pub w2: Option<Param<Tensor<2>>>,
    /// `[out_k, linear_dim]`.
    pub w2_a: Option<Param<Tensor<2>>>,
    /// `[linear_dim, in_n]`.
    pub w2_b: Option<Param<Tensor<2>>>,
    /// As files store it: `linear_alpha`, or `linear_dim` when both factors are full.
    #[module(skip)]
    pub alpha: f64,
    /// `multiplier * alpha / linear_dim` (1 times the multiplier with full factors).
    #[module(skip)]
    pub scale: f64,
}

impl LokrAdapter {
    /// `w2`, rebuilt from its pair when low-rank.
    fn w2(&self) -> Tensor<2> {
        match (&self.w2, &self.w2_a, &self.w2_b) {
            (Some(w2), _, _) => w2.val(),
            (None, Some(a), Some(b)) => a.val().matmul(b.val()),
            _ => unreachable!("a LoKr adapter has w2 or its pair"),
        }
    }

    /// The weight change, in burn's `[in, out]` layout.
    pub fn delta(&self) -> Tensor<2> {
        kron(self.w1.val(), self.w2()).transpose() * self.scale
    }

    /// The rank of `w2`'s pair, when it is one.
    pub fn rank(&self) -> Option<usize> {
        self.w2_b.as_ref().map(|b| b.val().dims()[0])
    }
}

/// The Kronecker product of two matrices: `[a_rows * b_rows, a_cols * b_cols]`.
pub fn kron(a: Tensor<2>, b: Tensor<2>) -> Tensor<2> {
    let ([ar, ac], [br, bc]) = (a.dims(), b.dims());
    (a.reshape([ar, 1, ac, 1]) * b.reshape([1, br, 1, bc])).reshape([ar * br, ac * bc])
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.down.val().dims()[1]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `x` with this step's dropout mask (`layer`, the adapted layer's path,
    /// names its stream); `None` while dropout is off.
    fn dropped<const D: usize>(&self, x: &Tensor<D>, layer: &str) -> Option<Tensor<D>> {
        self.dropout.as_ref().filter(|d| d.is_active()).map(|dropout| dropout.apply(x.clone(), layer))
    }

    /// `scale * up(down(x))`, in `x`'s dtype (bf16 adapters under adamw_bf16
    /// compute in the activations' dtype).
    fn low_rank<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let (down, up) = (self.down.val(), self.up.val());
        let (down, up) = if down.dtype() == dtype { (down, up) } else { (down.cast(dtype), up.cast(dtype)) };
        project(project(x, down), up) * self.scale()
    }

    /// `m / ||W + scale * down @ up||` per output column of `weight`
    /// (`[in, out]`), `[1, out]` in f32. The norm is a constant for
    /// backward, with the adapter's part of it, as PEFT (and the DoRA
    /// paper, §4.3) do to save memory: gradients reach `m` directly and
    /// the adapter through its output.
    fn dora_factor(&self, magnitude: &Param<Tensor<1>>, weight: Tensor<2>) -> Tensor<2> {
        let norm = self.adapted_norms(weight).clamp_min(f32::MIN_POSITIVE as f64);
        let out = norm.dims()[1];
        in_dtype(magnitude.val(), DType::F32).reshape([1, out]) / norm
    }

    /// `||W + scale * down @ up||` per output column of `weight` (`[in,
    /// out]`), `[1, out]` in f32, outside the autodiff graph.
    fn adapted_norms(&self, weight: Tensor<2>) -> Tensor<2> {
        let f32 = |t: Tensor<2>| in_dtype(t.detach(), DType::F32);
        let delta = f32(self.down.val()).matmul(f32(self.up.val())) * self.scale();
        (f32(weight) + delta).square().sum_dim(0).sqrt()
    }
}

impl LoraLinear {
    /// PEFT's DoRA forward: `y = Wx + b + (f - 1) * W d(x) + f * scale * BA d(x)`
    /// with `f` the [`LoraAdapter::dora_factor`] and `d` the dropout (so
    /// without dropout `y = b + f * (W + scale * BA) x`).
    fn dora_forward<const D: usize>(&self, x: Tensor<D>, lora: &LoraAdapter, magnitude: &Param<Tensor<1>>) -> Tensor<D> {
        let dtype = x.dtype();
        let weight = in_dtype(self.base.weight.val(), dtype);
        let factor = lora.dora_factor(magnitude, self.base.weight.val());
        let out = factor.dims()[1];
        let mut shape = [1; D];
        shape[D - 1] = out;
        let factor = in_dtype(factor, dtype).reshape(shape);
        let wx = project(x.clone(), weight.clone());
        let (wx_dropped, adapted) = match lora.dropped(&x, &self.path) {
            Some(dropped) => (project(dropped.clone(), weight), lora.low_rank(dropped)),
            None => (wx.clone(), lora.low_rank(x)),
        };
        let y = wx + (factor.clone() - 1.0) * wx_dropped + factor * adapted;
        match &self.base.bias {
            Some(bias) => {
                let mut shape = [1; D];
                shape[D - 1] = out;
                y + in_dtype(bias.val(), dtype).reshape(shape)
            }
            None => y,
        }
    }

    pub fn new(base: Linear, path: String) -> Self {
        Self { base, lora: None, lokr: None, path }
    }

    /// Whether an adapter (LoRA, DoRA or LoKr) is attached.
    pub fn is_adapted(&self) -> bool {
        self.lora.is_some() || self.lokr.is_some()
    }

    /// Drops the adapter (the base layer alone).
    pub fn detach_adapter(&mut self) {
        self.lora = None;
        self.lokr = None;
    }

    /// Adds a fresh LoKr adapter as LyCORIS makes one: the layer's sizes
    /// split by [`factorization`] with `factor`, `w1` uniform in
    /// ±1/sqrt(in_m) (kaiming_uniform with a=√5), `w2` (or `w2_b` of its
    /// pair) zero, so training starts from the base model.
    pub fn attach_lokr(&mut self, settings: &LycorisSettings, factor: i64, seed: u64, device: &Device) {
        let [d_in, d_out] = self.dims();
        let (in_m, in_n) = factorization(d_in, factor);
        let (out_l, out_k) = factorization(d_out, factor);
        let mut rng = SeededRng::derived(seed, &format!("lokr-init/{}", self.path));
        let mut uniform = |rows: usize, cols: usize| {
            let bound = 1.0 / (cols as f64).sqrt();
            let values: Vec<f32> = (0..rows * cols).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
            Param::from_tensor(Tensor::<2>::from_data(TensorData::new(values, [rows, cols]), device))
        };
        let w1 = uniform(out_l, in_m);
        let dim = settings.linear_dim;
        let low_rank = !settings.full_matrix && (dim as f64) < out_k.max(in_n) as f64 / 2.0;
        let (w2, w2_a, w2_b) = if low_rank {
            let a = uniform(out_k, dim);
            (None, Some(a), Some(Param::from_tensor(Tensor::<2>::zeros([dim, in_n], device))))
        } else {
            (Some(Param::from_tensor(Tensor::<2>::zeros([out_k, in_n], device))), None, None)
        };
        // LyCORIS: alpha 0 means the rank; with both factors full the scale is 1.
        let alpha = if !low_rank || settings.linear_alpha == 0 { dim as f64 } else { settings.linear_alpha as f64 };
        let scale = settings.multiplier as f64 * alpha / dim as f64;
        self.lokr = Some(LokrAdapter { w1, w2, w2_a, w2_b, alpha, scale });
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if let Some(lokr) = &self.lokr {
            let delta = in_dtype(lokr.delta(), x.dtype());
            return self.base.forward(x.clone()) + project(x, delta);
        }
        let Some(lora) = &self.lora else { return self.base.forward(x) };
        if let Some(magnitude) = &lora.magnitude {
            return self.dora_forward(x, lora, magnitude);
        }
        let adapted = lora.low_rank(lora.dropped(&x, &self.path).unwrap_or_else(|| x.clone()));
        self.base.forward(x) + adapted
    }

    /// `[in, out]` of the base layer.
    pub fn dims(&self) -> [usize; 2] {
        self.base.weight.val().dims()
    }

    /// Adds a fresh adapter initialised as kohya does: `down` uniform in
    /// ±1/sqrt(in) (kaiming_uniform with a=√5), `up` zero, so training starts
    /// from the base model. The values come from a generator seeded by the
    /// layer's path, so every backend starts from the same weights.
    pub fn attach(&mut self, rank: usize, alpha: f64, seed: u64, dropout: Option<DropoutSource>, device: &Device) {
        let [d_in, d_out] = self.dims();
        let bound = 1.0 / (d_in as f64).sqrt();
        let mut rng = SeededRng::derived(seed, &format!("lora-init/{}", self.path));
        let down: Vec<f32> = (0..d_in * rank).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        let down = Tensor::<2>::from_data(TensorData::new(down, [d_in, rank]), device);
        let up = Tensor::<2>::zeros([rank, d_out], device);
        self.lora = Some(LoraAdapter { down: Param::from_tensor(down), up: Param::from_tensor(up), magnitude: None, alpha, dropout });
    }

    /// Makes the adapter a DoRA one: its magnitude starts as the norms of
    /// the adapted weight's output columns (PEFT's initialisation; with
    /// `up` still zero, the base weight's), so training starts from the
    /// base model. Attach first.
    pub fn enable_dora(&mut self) {
        let Some(lora) = self.lora.as_mut() else { return };
        // Computed where the adapter lives (the training device), as a new leaf.
        let norms = lora.adapted_norms(self.base.weight.val());
        let out = norms.dims()[1];
        lora.magnitude = Some(Param::from_tensor(in_dtype(norms.reshape([out]), lora.down.val().dtype()).detach()));
    }
}

/// A convolution that can carry a LoCon adapter (LyCORIS's LoRA on
/// convolutions): `y = conv(x) + scale * up(down(x))` with `down` a
/// convolution of the base's kernel, stride and padding to `rank`
/// channels and `up` a 1x1 convolution back.
#[derive(Module, Debug)]
pub struct LoraConv2d {
    pub base: Conv2d,
    pub lora: Option<ConvLoraAdapter>,
    /// The diffusers module path (`down_blocks.0.resnets.1.conv2`).
    #[module(skip)]
    pub path: String,
}

/// LoCon's pair, in torch's layout as files store it.
#[derive(Module, Debug)]
pub struct ConvLoraAdapter {
    /// `[rank, in, k, k]` (`lora_down.weight`).
    pub down: Param<Tensor<4>>,
    /// `[out, rank, 1, 1]` (`lora_up.weight`).
    pub up: Param<Tensor<4>>,
    #[module(skip)]
    pub alpha: f64,
}

impl ConvLoraAdapter {
    pub fn rank(&self) -> usize {
        self.down.val().dims()[0]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// The weight change `scale * up @ down`, `[out, in, k, k]`.
    pub fn delta(&self) -> Tensor<4> {
        let [rank, d_in, k, _] = self.down.val().dims();
        let out = self.up.val().dims()[0];
        let product = self.up.val().reshape([out, rank]).matmul(self.down.val().reshape([rank, d_in * k * k]));
        product.reshape([out, d_in, k, k]) * self.scale()
    }
}

impl LoraConv2d {
    pub fn new(base: Conv2d, path: String) -> Self {
        Self { base, lora: None, path }
    }

    pub fn is_adapted(&self) -> bool {
        self.lora.is_some()
    }

    pub fn detach_adapter(&mut self) {
        self.lora = None;
    }

    /// `[out, in, k, k]` of the base convolution.
    pub fn dims(&self) -> [usize; 4] {
        self.base.weight.val().dims()
    }

    /// Adds a fresh LoCon pair as LyCORIS makes one: `down` uniform in
    /// ±1/sqrt(in * k * k) (kaiming_uniform with a=√5 over its fan-in),
    /// `up` zero, so training starts from the base model. Seeded by the
    /// layer's path, like [`LoraLinear::attach`].
    pub fn attach(&mut self, rank: usize, alpha: f64, seed: u64, device: &Device) {
        let [out, d_in, k, _] = self.dims();
        let fan_in = d_in * k * k;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut rng = SeededRng::derived(seed, &format!("lora-init/{}", self.path));
        let down: Vec<f32> = (0..rank * fan_in).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        let down = Tensor::<4>::from_data(TensorData::new(down, [rank, d_in, k, k]), device);
        let up = Tensor::<4>::zeros([out, rank, 1, 1], device);
        self.lora = Some(ConvLoraAdapter { down: Param::from_tensor(down), up: Param::from_tensor(up), alpha });
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let Some(lora) = &self.lora else { return self.base.forward(x) };
        let dtype = x.dtype();
        let (stride, padding) = (self.base.stride, self.base.padding);
        let down_options = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
        let hidden = conv2d(x.clone(), in_dtype(lora.down.val(), dtype), None, down_options);
        let adapted = conv2d(hidden, in_dtype(lora.up.val(), dtype), None, ConvOptions::new([1, 1], [0, 0], [1, 1], 1));
        self.base.forward(x) + adapted * lora.scale()
    }
}

/// Which layers get adapters, by the end of their diffusers path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTargets {
    pub suffixes: Vec<String>,
}

impl LoraTargets {
    /// The Dreambooth LoRA scripts' default: the attention projections.
    pub fn attention() -> Self {
        Self { suffixes: ["to_q", "to_k", "to_v", "to_out.0"].map(String::from).to_vec() }
    }

    /// Every layer the UNet can adapt: attention, feed-forward and the
    /// transformers' linear projections.
    pub fn all_linear() -> Self {
        Self { suffixes: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"].map(String::from).to_vec() }
    }

    /// Parses SimpleTuner-style target names: a list of module names, or the
    /// presets `attention` (default) and `all`.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        match text {
            "" | "default" | "attention" | "attn" => return Ok(Self::attention()),
            "all" | "all+ffs" | "all_linear" => return Ok(Self::all_linear()),
            _ => {}
        }
        let known = Self::all_linear().suffixes;
        let mut suffixes = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let name = match name {
                "to_out" => "to_out.0",
                "ff.net.0" | "ff_in" => "ff.net.0.proj",
                "ff_out" => "ff.net.2",
                other => other,
            };
            if !known.iter().any(|k| k == name) {
                return Err(format!("unknown LoRA target '{name}' (known: {}, or the presets attention, all)", known.join(", ")));
            }
            suffixes.push(name.to_string());
        }
        Ok(Self { suffixes })
    }

    /// Text-encoder layers for the same choice: the attention projections,
    /// plus the MLP when the UNet's feed-forward layers are targeted.
    pub fn matches_text(&self, path: &str) -> bool {
        let attention = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"];
        let with_mlp = self.suffixes.iter().any(|s| s.starts_with("ff."));
        attention.iter().any(|s| path.ends_with(s)) || (with_mlp && (path.ends_with("mlp.fc1") || path.ends_with("mlp.fc2")))
    }

    pub fn matches(&self, path: &str) -> bool {
        self.suffixes.iter().any(|s| path.ends_with(&format!(".{s}")))
    }
}

/// LoRA dropout masks keyed by name. Each mask's key is drawn from a
/// stream named by the training step, micro-batch, forward pass and layer
/// (path and shape), and the mask is made from the key on the tensor's
/// device (`models/dropout.rs`), so a resumed run draws the same masks, the
/// masks do not depend on the backend, and gradient checkpointing, which
/// runs a stage's forward again, draws the mask the first run used.
#[derive(Debug, Clone)]
pub struct DropoutSource {
    state: Arc<Mutex<DropoutState>>,
}

#[derive(Debug)]
struct DropoutState {
    probability: f64,
    /// `seed/step/micro-batch` of the current step.
    stream: (u64, u64, u64),
    /// Forward passes begun in this step ([`DropoutSource::begin_forward`]).
    forward: u64,
    active: bool,
}

impl DropoutSource {
    pub fn new(probability: f64) -> Self {
        Self { state: Arc::new(Mutex::new(DropoutState { probability, stream: (0, 0, 0), forward: 0, active: false })) }
    }

    /// Turns dropout on for a training step (or micro-batch).
    pub fn start_step(&self, seed: u64, step: u64, micro_batch: u64) {
        let mut state = self.state.lock().expect("dropout lock");
        state.stream = (seed, step, micro_batch);
        state.forward = 0;
        state.active = true;
    }

    /// Starts a new forward pass within the step: the next pass through
    /// the same layers draws new masks.
    pub fn begin_forward(&self) {
        self.state.lock().expect("dropout lock").forward += 1;
    }

    /// Whether masks are drawn now (a training forward with dropout above 0).
    pub fn is_active(&self) -> bool {
        let state = self.state.lock().expect("dropout lock");
        state.active && state.probability > 0.0
    }

    /// Turns dropout off (validation, parent predictions).
    pub fn stop(&self) {
        self.state.lock().expect("dropout lock").active = false;
    }

    fn apply<const D: usize>(&self, x: Tensor<D>, layer: &str) -> Tensor<D> {
        let state = self.state.lock().expect("dropout lock");
        if !state.active || state.probability <= 0.0 {
            return x;
        }
        let (seed, step, micro) = state.stream;
        let label = format!("lora-dropout/{step}/{micro}/{}/{layer}/{:?}", state.forward, x.dims());
        let mask = DropoutMask::new(SeededRng::derived(seed, &label).next_u64(), state.probability);
        drop(state);
        let mask = super::dropout::mask_like(&x, mask);
        x * mask
    }
}

/// The kohya name of a UNet module path (`lora_unet_down_blocks_0_..._to_q`).
pub fn kohya_unet_name(path: &str) -> String {
    format!("lora_unet_{}", path.replace('.', "_"))
}

/// The kohya name of a text-encoder module path under `prefix`: `lora_te_`
/// for SD 1.x/2.x's one encoder, `lora_te1_`/`lora_te2_` for SDXL's two
/// (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`).
pub fn kohya_text_name(prefix: &str, path: &str) -> String {
    format!("{prefix}{}", path.replace('.', "_"))
}
