//! The diffusers / transformers `config.json` of each component, read with
//! the libraries' own defaults. Sizes always come from here, never from
//! hard-coded model tables.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A setting with a fixed set of spellings, read into an enum once, where
/// the file is read: an unknown value is an error naming the key and the
/// accepted values, never a fallback.
pub trait Choice: Copy + PartialEq + 'static {
    /// The key the value is read from (for messages).
    const KEY: &'static str;
    /// Every accepted spelling and its value; the first spelling of a value
    /// is the one written back.
    const VALUES: &'static [(&'static str, Self)];

    /// The accepted spellings, one per value.
    fn accepted() -> Vec<&'static str> {
        let mut seen: Vec<Self> = Vec::new();
        let mut names = Vec::new();
        for (name, value) in Self::VALUES {
            if !seen.contains(value) {
                seen.push(*value);
                names.push(*name);
            }
        }
        names
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        Self::VALUES
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| format!("'{}' is '{text}', which is not one of: {}", Self::KEY, Self::accepted().join(", ")))
    }

    fn name(self) -> &'static str {
        Self::VALUES.iter().find(|(_, value)| *value == self).map(|(name, _)| *name).expect("every value has a spelling")
    }
}

/// Serialises a [`Choice`] as its name and reads it through `Choice::parse`.
macro_rules! choice_serde {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                <$type>::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A value that configs give either once or per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    pub fn get(&self, block: usize) -> T {
        match self {
            PerBlock::One(value) => value.clone(),
            PerBlock::Each(values) => values[block.min(values.len() - 1)].clone(),
        }
    }
}

fn default_norm_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_layers() -> usize {
    2
}
fn default_four() -> usize {
    4
}
fn default_transformer_layers() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_cross_attention() -> PerBlock<usize> {
    PerBlock::One(1280)
}

/// `unet/config.json` (UNet2DConditionModel).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_four")]
    pub in_channels: usize,
    #[serde(default = "default_four")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    /// Really the number of heads for SD 1.x/2.x/XL (a historic misnaming
    /// that diffusers keeps), unless `num_attention_heads` is set.
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default = "default_cross_attention")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

impl UNetConfig {
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(block)
    }

    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}

fn default_latent_channels() -> usize {
    4
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_three() -> usize {
    3
}
fn default_layers_vae() -> usize {
    1
}

/// `vae/config.json` (AutoencoderKL).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_vae")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// How much smaller latents are than images (8 for the real VAEs).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The text encoder's MLP activation (transformers' `hidden_act`): CLIP-L
/// (SD 1.x, SDXL's first encoder) uses quick GELU, OpenCLIP (SD 2.x,
/// SDXL's second) exact GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

impl Choice for ClipActivation {
    const KEY: &'static str = "hidden_act";
    const VALUES: &'static [(&'static str, Self)] = &[("quick_gelu", Self::QuickGelu), ("gelu", Self::Gelu)];
}
choice_serde!(ClipActivation);

fn default_act() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_positions() -> usize {
    77
}
fn default_clip_eps() -> f64 {
    1e-5
}

/// `text_encoder/config.json` (transformers CLIPTextConfig).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: ClipActivation,
    #[serde(default = "default_clip_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

/// How the training betas grow over the timesteps (diffusers' `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// Linear from `beta_start` to `beta_end`.
    Linear,
    /// Linear in sqrt(beta): what SD 1.x, 2.x and SDXL use.
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal (improved DDPM).
    SquaredcosCapV2,
}

impl Choice for BetaSchedule {
    const KEY: &'static str = "beta_schedule";
    const VALUES: &'static [(&'static str, Self)] =
        &[("linear", Self::Linear), ("scaled_linear", Self::ScaledLinear), ("squaredcos_cap_v2", Self::SquaredcosCapV2)];
}
choice_serde!(BetaSchedule);

/// How inference timesteps are spread over the training ones (diffusers'
/// `timestep_spacing`, "Common Diffusion Noise Schedules are Flawed", table 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl Choice for TimestepSpacing {
    const KEY: &'static str = "timestep_spacing";
    const VALUES: &'static [(&'static str, Self)] = &[("leading", Self::Leading), ("trailing", Self::Trailing), ("linspace", Self::Linspace)];
}
choice_serde!(TimestepSpacing);

/// What the UNet predicts (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise (SD 1.x, SD 2.x base, SDXL).
    Epsilon,
    /// The velocity sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀ (SD 2.x 768-v).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

impl Choice for PredictionType {
    const KEY: &'static str = "prediction_type";
    const VALUES: &'static [(&'static str, Self)] = &[("epsilon", Self::Epsilon), ("v_prediction", Self::VPrediction), ("sample", Self::Sample)];
}
choice_serde!(PredictionType);

/// `scheduler/scheduler_config.json`: what the sampling schedulers need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    #[serde(default = "default_prediction")]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub steps_offset: usize,
    /// None: each sampler's own default (diffusers' class default).
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    /// Schedules Burnbooth does not implement are refused by name rather
    /// than silently replaced by the plain one.
    #[serde(default, deserialize_with = "refuse_zero_snr", skip_serializing)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default, deserialize_with = "refuse_trained_betas", skip_serializing)]
    pub trained_betas: Option<()>,
}

fn refuse_zero_snr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<bool, D::Error> {
    match Option::<bool>::deserialize(deserializer)? {
        Some(true) => Err(serde::de::Error::custom("'rescale_betas_zero_snr' is true: zero-terminal-SNR schedules are not supported yet")),
        _ => Ok(false),
    }
}

fn refuse_trained_betas<'de, D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Option<()>, D::Error> {
    match Option::<serde_json::Value>::deserialize(deserializer)? {
        Some(value) if !value.is_null() => Err(serde::de::Error::custom("'trained_betas' is set: explicit beta lists are not supported yet")),
        _ => Ok(None),
    }
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.00085
}
fn default_beta_end() -> f64 {
    0.012
}
fn default_beta_schedule() -> BetaSchedule {
    BetaSchedule::ScaledLinear
}
fn default_prediction() -> PredictionType {
    PredictionType::Epsilon
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// Parses a component config, naming the file on error.
pub fn parse<T: for<'de> Deserialize<'de>>(text: &str, path: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Config { source_name: path.to_string(), problems: vec![e.to_string()] })
}
