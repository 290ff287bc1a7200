//! LoRA: low-rank adapters on the model's Linear layers.
//!
//! Every adaptable layer is a [`LoraLinear`]: the frozen base layer plus an
//! optional adapter, `y = base(x) + (alpha / rank) * up(down(dropout(x)))`
//! (kohya's `networks/lora.py`, PEFT's `lora.Linear`). Each layer knows its
//! diffusers module path, which is all the kohya export needs
//! (`lora_unet_` + path with `.` -> `_`).

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor, TensorData};

use super::layers::Linear;
use crate::rng::SeededRng;

/// A Linear layer that can carry a LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear {
    pub base: Linear,
    pub lora: Option<LoraAdapter>,
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
    #[module(skip)]
    pub alpha: f64,
    #[module(skip)]
    pub dropout: Option<DropoutSource>,
}

impl LoraAdapter {
    pub fn rank(&self) -> usize {
        self.down.val().dims()[1]
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `layer`: the adapted layer's path (names its dropout stream).
    fn forward<const D: usize>(&self, x: Tensor<D>, layer: &str) -> Tensor<D> {
        let x = match &self.dropout {
            Some(dropout) => dropout.apply(x, layer),
            None => x,
        };
        // bf16 adapters (adamw_bf16) compute in the activations' dtype.
        let dtype = x.dtype();
        let (down, up) = (self.down.val(), self.up.val());
        let (down, up) = if down.dtype() == dtype { (down, up) } else { (down.cast(dtype), up.cast(dtype)) };
        linear(linear(x, down, None), up, None) * self.scale()
    }
}

impl LoraLinear {
    pub fn new(base: Linear, path: String) -> Self {
        Self { base, lora: None, path }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match &self.lora {
            Some(lora) => self.base.forward(x.clone()) + lora.forward(x, &self.path),
            None => self.base.forward(x),
        }
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
        self.lora = Some(LoraAdapter { down: Param::from_tensor(down), up: Param::from_tensor(up), alpha, dropout });
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

/// LoRA dropout masks from seeded generators. Each mask is drawn from a
/// stream named by the training step, micro-batch, forward pass and layer
/// (path and shape), so a resumed run draws the same masks, the masks do
/// not depend on the backend, and gradient checkpointing, which runs a
/// stage's forward again, draws the mask the first run used.
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

    /// Turns dropout off (validation, parent predictions).
    pub fn stop(&self) {
        self.state.lock().expect("dropout lock").active = false;
    }

    fn apply<const D: usize>(&self, x: Tensor<D>, layer: &str) -> Tensor<D> {
        let state = self.state.lock().expect("dropout lock");
        if !state.active || state.probability <= 0.0 {
            return x;
        }
        let p = state.probability;
        let keep_scale = (1.0 / (1.0 - p)) as f32;
        let shape = x.dims();
        let (seed, step, micro) = state.stream;
        let mut rng = SeededRng::derived(seed, &format!("lora-dropout/{step}/{micro}/{}/{layer}/{shape:?}", state.forward));
        drop(state);
        let count: usize = shape.iter().product();
        let mask: Vec<f32> = (0..count).map(|_| if rng.next_f64() < p { 0.0 } else { keep_scale }).collect();
        let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
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
