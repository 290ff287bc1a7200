//! The training config, read from any of the three forms SimpleTuner users
//! have: an env file (`config.env`, `sdxl-env.sh`: `KEY=value` lines), a
//! `config.json` or a `config.toml` (option names with or without `--`).
//! All three become one map of SimpleTuner option names, read into
//! [`TrainingConfig`] by one function, so they behave identically.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::dataset::{resolve_path, DatasetDefaults, DatasetOptions};
use super::lycoris::LycorisSettings;
use super::optimizer::{apply_to_adafactor, apply_to_prodigy, parse_optimizer_config, AdafactorSettings, ProdigySettings};
use super::raw::{canonical_keys, env_to_map, expand_env_placeholders, object_to_map, option_aliases};
use super::values::Reader;
use crate::error::{nearest, Diagnostics, Error, Result};
use crate::models::config::PredictionType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Env,
    Json,
    Toml,
}

impl ConfigFormat {
    /// `.json` and `.toml` by extension; anything else (`.env`, `.sh`) is an env file.
    pub fn from_path(path: &str) -> Self {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".json") {
            Self::Json
        } else if lower.ends_with(".toml") {
            Self::Toml
        } else {
            Self::Env
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    Sd1x,
    Sd2x,
    Sdxl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Lora,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
    Polynomial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW with f32 weights and state.
    Adamw,
    /// AdamW with bf16 weights and state and stochastic rounding (SimpleTuner's
    /// `adamw_bf16`); f32 state on backends without bf16.
    AdamwBf16,
    /// Prodigy: Adam with an estimated step size ([`ProdigySettings`]).
    Prodigy,
    /// Adafactor as torch has it ([`AdafactorSettings`]).
    Adafactor,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetSampling {
    Uniform,
    AutoWeighting,
}

/// Which weights validation samples when EMA is kept (`ema_validation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmaValidation {
    /// The trained weights only.
    None,
    /// The EMA weights only.
    EmaOnly,
    /// Both, as two images (SimpleTuner's default).
    Comparison,
}

/// An exponential moving average of the trained weights (`use_ema`;
/// [`crate::train::ema`] has the formula). SimpleTuner's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EmaSettings {
    /// `ema_decay`, 0.995.
    pub decay: f64,
    /// `ema_update_interval`: update after every N-th optimizer step (1).
    pub update_interval: u64,
    /// `ema_warmup_steps`: copy the weights until this step, then decay at `decay` (0: the default ramp).
    pub warmup_steps: u64,
    /// `ema_validation`.
    pub validation: EmaValidation,
}

/// How datasets marked `is_regularisation_data` are trained (docs/reference.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegularisationMode {
    /// Ordinary training data.
    Mixed,
    /// Classic Dreambooth: instance and class loss in one step.
    PriorPreservation,
    /// The target is the base model's own prediction (adapter off).
    ParentPrediction,
}

/// A resolved training config. Defaults are SimpleTuner's registry defaults
/// unless a comment says otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct TrainingConfig {
    /// The file this was read from (for messages).
    pub source_name: String,
    pub model_family: ModelFamily,
    pub model_type: ModelType,
    pub pretrained_model_name_or_path: Option<String>,
    pub output_dir: String,
    /// The dataloader config path, resolved against the config file's folder.
    pub data_backend_config: String,
    /// Resolution, captions, batch size: what datasets use unless they say otherwise.
    #[serde(flatten)]
    pub dataset_options: DatasetOptions,
    /// Seeds sampling and training. Unset means 0 (SimpleTuner picks a time-based seed).
    pub seed: u64,
    pub gradient_accumulation_steps: u32,
    pub learning_rate: f64,
    pub lr_scheduler: LrSchedule,
    pub lr_warmup_steps: u64,
    pub lr_end: f64,
    pub lr_power: f64,
    pub lr_num_cycles: f64,
    pub optimizer: OptimizerKind,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    /// The EMA kept of the trained weights (`use_ema`).
    pub ema: Option<EmaSettings>,
    /// Prodigy's settings when `optimizer` is prodigy.
    pub prodigy: Option<ProdigySettings>,
    /// Adafactor's settings when `optimizer` is adafactor.
    pub adafactor: Option<AdafactorSettings>,
    /// Stop after this many optimizer steps (MAX_NUM_STEPS).
    pub max_train_steps: Option<u64>,
    /// Stop after this many epochs (NUM_EPOCHS). With both set, whichever comes first.
    pub num_train_epochs: Option<u64>,
    pub checkpoint_step_interval: u64,
    pub checkpoints_total_limit: u32,
    pub resume_from_checkpoint: Option<String>,
    pub validation_step_interval: u64,
    pub validation_prompt: Option<String>,
    /// `user_prompt_library`: a JSON file of `{"shortname": "prompt"}` sampled at each validation too.
    pub user_prompt_library: Option<String>,
    /// That file's prompts, (shortname, prompt), read by [`crate::config::load`].
    pub validation_prompts: Vec<(String, String)>,
    pub validation_negative_prompt: String,
    pub validation_guidance: f64,
    pub validation_num_inference_steps: u32,
    pub validation_resolution: String,
    pub validation_seed: Option<u64>,
    /// A validation image before the first step (the base model's).
    pub validation_on_startup: bool,
    /// The validation loss on the eval datasets every this many steps (`eval_steps_interval`; none: never).
    pub eval_steps_interval: Option<u64>,
    /// At most this many held-out images are scored (`num_eval_images`).
    pub num_eval_images: u64,
    /// Each is scored at this many timesteps, spaced as DDPM's `set_timesteps` spaces them (`eval_timesteps`).
    pub eval_timesteps: u32,
    pub lora_rank: u32,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// DoRA: the adapters also learn a magnitude per output feature (`use_dora`).
    pub use_dora: bool,
    /// `lora_type` lycoris: the adapters are LyCORIS's, as `lycoris_config` says.
    pub lycoris_config: Option<String>,
    /// That file's settings (LoKr, LoCon), read by [`crate::config::load`] (or set by the caller).
    pub lycoris: Option<LycorisSettings>,
    /// The text encoder trains too (`--train_text_encoder`): LoRA adapters on
    /// it in a LoRA run, all its weights in a full fine-tune (as
    /// Dreambooth's paper and diffusers' `train_dreambooth.py` do).
    pub train_text_encoder: bool,
    /// The text encoder's learning rate (`--text_encoder_lr`); the UNet's when unset.
    pub text_encoder_lr: Option<f64>,
    pub mixed_precision: String,
    pub gradient_checkpointing: bool,
    pub caption_dropout_probability: f64,
    pub offset_noise: bool,
    pub noise_offset: f64,
    pub noise_offset_probability: f64,
    pub snr_gamma: Option<f64>,
    pub prediction_type: Option<PredictionType>,
    pub data_backend_sampling: DatasetSampling,
    pub allow_dataset_oversubscription: bool,
    /// Images with more pixels are skipped unread (`max_image_pixels`,
    /// Burnbooth's own key; Pillow's limit by default).
    pub max_image_pixels: u64,
    pub regularisation_mode: RegularisationMode,
    pub prior_loss_weight: f64,
    pub aspect_bucket_alignment: u32,
    pub aspect_bucket_rounding: u32,
    /// Unknown dataset-config keys are errors rather than warnings.
    pub strict_config: bool,
    pub warnings: Vec<String>,
}

impl TrainingConfig {
    /// Reads a training config from its text. `source_name` is the file's
    /// path (its folder anchors a relative DATALOADER_CONFIG); `env` looks up
    /// environment variables for `${VAR}` and `{env:VAR}`.
    pub fn parse(text: &str, format: ConfigFormat, source_name: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let mut diagnostics = Diagnostics::default();
        let map = match format {
            ConfigFormat::Env => env_to_map(text, env, &mut diagnostics),
            ConfigFormat::Json => {
                let value: Value = serde_json::from_str(text).map_err(|e| config_error(source_name, format!("not valid JSON: {e}")))?;
                object_to_map(value, &mut diagnostics).map_err(|e| config_error(source_name, e))?
            }
            ConfigFormat::Toml => {
                let value: toml::Table = toml::from_str(text).map_err(|e| config_error(source_name, format!("not valid TOML: {e}")))?;
                let value = serde_json::to_value(value).map_err(|e| config_error(source_name, e.to_string()))?;
                object_to_map(value, &mut diagnostics).map_err(|e| config_error(source_name, e))?
            }
        };
        let map = expand_env_placeholders(map, env, &mut diagnostics);
        let base_dir = Path::new(source_name).parent().map(|p| p.to_string_lossy().into_owned());
        let config = read_config(&map, format == ConfigFormat::Env, source_name, base_dir.as_deref(), &mut diagnostics);
        let warnings = diagnostics.into_result(source_name)?;
        let mut config = config.expect("a config without errors is complete");
        config.warnings = warnings;
        Ok(config)
    }

    /// The dataset fallbacks this config provides (SimpleTuner's globals).
    pub fn dataset_defaults(&self) -> DatasetDefaults {
        DatasetDefaults {
            model_family: self.model_family_name().to_string(),
            output_dir: self.output_dir.clone(),
            options: self.dataset_options.clone(),
            alignment: self.aspect_bucket_alignment,
            rounding: self.aspect_bucket_rounding,
            strict: self.strict_config,
            seed: self.seed,
        }
    }

    pub fn model_family_name(&self) -> &'static str {
        match self.model_family {
            ModelFamily::Sd1x => "sd1x",
            ModelFamily::Sd2x => "sd2x",
            ModelFamily::Sdxl => "sdxl",
        }
    }
}

fn config_error(source_name: &str, message: String) -> Error {
    Error::Config { source_name: source_name.to_string(), problems: vec![message] }
}

fn read_config(raw: &Map<String, Value>, from_env: bool, source_name: &str, base_dir: Option<&str>, diagnostics: &mut Diagnostics) -> Option<TrainingConfig> {
    let map = canonical_keys(raw, diagnostics);
    let mut r = Reader::new("training config".into(), &map, from_env, diagnostics);

    let model_family = match r.string(&["model_family"]).map(|s| s.to_ascii_lowercase()) {
        None => {
            r.error("'model_family' (MODEL_FAMILY) is missing: use sd1x, sd2x or sdxl");
            None
        }
        Some(family) => match family.as_str() {
            "sd1x" | "sd1" | "sd15" => Some(ModelFamily::Sd1x),
            "sd2x" | "sd2" | "sd21" => Some(ModelFamily::Sd2x),
            "sdxl" => Some(ModelFamily::Sdxl),
            other => {
                r.error(format!("model_family '{other}' is not supported; Burnbooth trains sd1x, sd2x and sdxl"));
                None
            }
        },
    };
    let model_type = match r.choice(&["model_type"], &["lora", "full"]).as_deref() {
        Some("lora") => ModelType::Lora,
        _ => ModelType::Full,
    };
    // A relative model path is relative to the config file, like the other paths.
    let pretrained = r.string(&["pretrained_model_name_or_path"]).filter(|s| !s.trim().is_empty()).map(|p| resolve_path(&p, base_dir));
    let output_dir = resolve_path(&r.string(&["output_dir"]).unwrap_or_else(|| "output".into()), base_dir);
    let data_backend_config = match r.string(&["data_backend_config"]) {
        Some(path) if !path.trim().is_empty() => resolve_path(&path, base_dir),
        _ => {
            r.error("'data_backend_config' (DATALOADER_CONFIG) is missing: it names the dataloader JSON file");
            String::new()
        }
    };

    let resolution = r.f64(&["resolution"]).unwrap_or(1024.0);
    let resolution_type = r.choice(&["resolution_type"], &["pixel", "area", "pixel_area"]).unwrap_or_else(|| "pixel_area".into());
    let minimum_image_size = r.f64(&["minimum_image_size"]).filter(|v| *v > 0.0);
    let caption_strategy = r.string(&["caption_strategy"]).unwrap_or_else(|| "filename".into());
    let instance_prompt = r.string(&["instance_prompt"]);
    let prepend_instance_prompt = r.bool(&["prepend_instance_prompt"]).unwrap_or(false);
    let only_instance_prompt = r.bool(&["only_instance_prompt"]).unwrap_or(false);

    let seed = r.int(&["seed"], i64::MIN).map(|s| s as u64).unwrap_or(0);
    let train_batch_size = r.int(&["train_batch_size"], 1).unwrap_or(4) as u32;
    let gradient_accumulation_steps = r.int(&["gradient_accumulation_steps"], 1).unwrap_or(1) as u32;
    let learning_rate = r.f64(&["learning_rate"]).unwrap_or(4e-7);
    if learning_rate <= 0.0 {
        r.error(format!("learning_rate must be positive, not {learning_rate}"));
    }
    let lr_end_given = r.has("lr_end");
    let lr_end = r.f64_where(&["lr_end"], |v| v >= 0.0, "at least 0").unwrap_or(4e-7);
    let lr_warmup_steps = r.int(&["lr_warmup_steps"], 0).unwrap_or(0) as u64;
    let lr_power = r.f64_where(&["lr_power"], |v| v > 0.0, "positive").unwrap_or(0.8);
    let lr_num_cycles = r.f64_where(&["lr_num_cycles"], |v| v > 0.0, "positive").unwrap_or(1.0);
    let schedule_text = r.string(&["lr_scheduler"]);
    let lr_scheduler = match schedule_text.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
        // LEARNING_RATE_END / LR_END alone means a decay toward it (docs/reference.md §1.1).
        None if lr_end_given => LrSchedule::Polynomial,
        None => LrSchedule::ConstantWithWarmup,
        Some(s) => match s.as_str() {
            "constant" if lr_warmup_steps > 0 => LrSchedule::ConstantWithWarmup,
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup,
            "linear" => LrSchedule::Linear,
            "cosine" | "cosine_with_warmup" => LrSchedule::Cosine,
            "cosine_with_restarts" => LrSchedule::CosineWithRestarts,
            "sine" => {
                r.warn("lr_scheduler 'sine' is treated as 'cosine'");
                LrSchedule::Cosine
            }
            "polynomial" => LrSchedule::Polynomial,
            other => {
                r.error(format!("lr_scheduler '{other}' is not one of: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"));
                LrSchedule::Constant
            }
        },
    };

    let optimizer = match r.string(&["optimizer"]).map(|s| s.trim().to_ascii_lowercase().replace('-', "_")).as_deref() {
        None | Some("adamw_bf16") | Some("adam_bfloat16") => OptimizerKind::AdamwBf16,
        Some("adamw") | Some("adamw_torch") | Some("optimi_adamw") => OptimizerKind::Adamw,
        Some("prodigy") => OptimizerKind::Prodigy,
        Some("torch_adafactor") => OptimizerKind::Adafactor,
        Some("adafactor") => {
            r.warn("optimizer 'adafactor': SimpleTuner has removed it; Burnbooth reads it as torch-adafactor (torch.optim.Adafactor)");
            OptimizerKind::Adafactor
        }
        Some(other) => {
            r.error(format!("optimizer '{other}' is not supported; use adamw, adamw_bf16, prodigy or torch-adafactor"));
            OptimizerKind::Adamw
        }
    };
    // SimpleTuner's adamw_bf16 defaults (optimizer_param.py): wd 1e-2, eps 1e-6.
    // Ranges as torch.optim.AdamW checks them.
    let beta = |v: f64| (0.0..1.0).contains(&v);
    let betas_given = r.has("adam_beta1") || r.has("optimizer_beta1") || r.has("adam_beta2") || r.has("optimizer_beta2");
    let adam_beta1 = r.f64_where(&["adam_beta1", "optimizer_beta1"], beta, "at least 0 and below 1").unwrap_or(0.9);
    let adam_beta2 = r.f64_where(&["adam_beta2", "optimizer_beta2"], beta, "at least 0 and below 1").unwrap_or(0.999);
    let adam_weight_decay = r.f64_where(&["adam_weight_decay"], |v| v >= 0.0, "at least 0").unwrap_or(1e-2);
    let adam_epsilon = r.f64_where(&["adam_epsilon"], |v| v > 0.0, "positive").unwrap_or(1e-6);
    let max_grad_norm = r.f64_where(&["max_grad_norm"], |v| v >= 0.0, "at least 0 (0 turns clipping off)").unwrap_or(2.0);
    let entries = match r.string(&["optimizer_config"]).map(|text| parse_optimizer_config(&text)) {
        None => Vec::new(),
        Some(Ok(entries)) => entries,
        Some(Err(problem)) => {
            r.error(problem);
            Vec::new()
        }
    };
    let prodigy_steps = r.int(&["prodigy_steps"], 0).map(|s| s as u64);
    let (mut prodigy, mut adafactor) = (None, None);
    let mut learning_rate = learning_rate;
    match optimizer {
        OptimizerKind::Prodigy => {
            let mut settings = ProdigySettings::default();
            if betas_given {
                (settings.beta1, settings.beta2) = (adam_beta1, adam_beta2);
            }
            settings.prodigy_steps = prodigy_steps.unwrap_or(0);
            match apply_to_prodigy(&mut settings, &entries) {
                // SimpleTuner gives Prodigy lr 1.0 whatever learning_rate says; optimizer_config's lr overrides it.
                Ok(lr) => {
                    let lr = lr.unwrap_or(1.0);
                    if r.has("learning_rate") && learning_rate != lr {
                        r.warn(format!(
                            "learning_rate {learning_rate} is not used by prodigy, which sets its own step size (d, starting at d0 {}) and multiplies it by {lr}; set optimizer_config lr=... to change that (as in SimpleTuner)",
                            settings.d0
                        ));
                    }
                    learning_rate = lr;
                }
                Err(problem) => r.error(problem),
            }
            prodigy = Some(settings);
        }
        OptimizerKind::Adafactor => {
            let mut settings = AdafactorSettings::default();
            if let Err(problem) = apply_to_adafactor(&mut settings, &entries) {
                r.error(problem);
            }
            adafactor = Some(settings);
        }
        OptimizerKind::Adamw | OptimizerKind::AdamwBf16 if !entries.is_empty() => {
            r.warn("optimizer_config is ignored by AdamW: set adam_beta1, adam_beta2, adam_weight_decay and adam_epsilon instead");
        }
        _ => {}
    }
    if prodigy_steps.is_some() && optimizer != OptimizerKind::Prodigy {
        r.warn("prodigy_steps is ignored: the optimizer is not prodigy");
    }
    if lr_scheduler == LrSchedule::Polynomial && lr_end >= learning_rate {
        r.error(format!("the polynomial schedule decays from learning_rate {learning_rate} to lr_end {lr_end}, so lr_end must be smaller"));
    }

    let ema = match r.bool(&["use_ema"]).unwrap_or(false) {
        true => {
            let decay = r.f64_where(&["ema_decay"], |v| (0.0..1.0).contains(&v), "at least 0 and below 1").unwrap_or(0.995);
            let update_interval = r.int(&["ema_update_interval"], 1).unwrap_or(1) as u64;
            let warmup_steps = r.int(&["ema_warmup_steps"], 0).unwrap_or(0) as u64;
            let validation = match r.choice(&["ema_validation"], &["none", "ema_only", "comparison"]).as_deref() {
                Some("none") => EmaValidation::None,
                Some("ema_only") => EmaValidation::EmaOnly,
                _ => EmaValidation::Comparison,
            };
            Some(EmaSettings { decay, update_interval, warmup_steps, validation })
        }
        false => {
            for key in ["ema_decay", "ema_update_interval", "ema_warmup_steps", "ema_validation"] {
                if r.has(key) {
                    r.accept(&[key]);
                    r.warn(format!("'{key}' is ignored: use_ema (USE_EMA) is not set"));
                }
            }
            None
        }
    };
    let max_train_steps = r.int(&["max_train_steps"], 0).filter(|s| *s > 0).map(|s| s as u64);
    let epochs_given = r.has("num_train_epochs");
    let mut num_train_epochs = r.int(&["num_train_epochs"], 0).map(|s| s as u64);
    if !epochs_given && max_train_steps.is_none() {
        num_train_epochs = Some(1);
    }
    let num_train_epochs = num_train_epochs.filter(|e| *e > 0);
    if max_train_steps.is_none() && num_train_epochs.is_none() {
        r.error("neither max_train_steps (MAX_NUM_STEPS) nor num_train_epochs (NUM_EPOCHS) is above 0: set at least one");
    }

    let checkpoint_step_interval = r.int(&["checkpoint_step_interval"], 0).unwrap_or(500) as u64;
    let checkpoints_total_limit = r.int(&["checkpoints_total_limit"], 0).unwrap_or(5) as u32;
    let resume_from_checkpoint = r.string(&["resume_from_checkpoint"]);
    let validation_step_interval = r.int(&["validation_step_interval"], 0).unwrap_or(100) as u64;
    let validation_prompt = r.string(&["validation_prompt"]);
    let user_prompt_library = r.string(&["user_prompt_library"]).filter(|p| !p.trim().is_empty()).map(|p| resolve_path(&p, base_dir));
    if let Some((key, value)) = r.raw(&["validation_prompt_library"]) {
        if !matches!(value, Value::Bool(false)) {
            r.warn(format!("'{key}': SimpleTuner's built-in prompt library is not included; list your prompts in a user_prompt_library JSON file"));
        }
    }
    let validation_negative_prompt = r.string(&["validation_negative_prompt"]).unwrap_or_else(|| "blurry, cropped, ugly".into());
    let validation_guidance = r.f64_where(&["validation_guidance"], |v| v >= 0.0, "at least 0").unwrap_or(7.5);
    let validation_num_inference_steps = r.int(&["validation_num_inference_steps"], 1).unwrap_or(30) as u32;
    let validation_resolution = match r.raw(&["validation_resolution"]) {
        Some((_, Value::String(s))) => s.clone(),
        Some((_, Value::Number(n))) => n.to_string(),
        Some((key, other)) => {
            let other = other.clone();
            r.error(format!("'{key}' must be a size such as 512 or 768x512, not {other}"));
            String::new()
        }
        None => "256".into(),
    };
    let validation_seed = r.int(&["validation_seed"], 0).map(|s| s as u64);
    let validation_on_startup = r.bool(&["validation_on_startup"]).unwrap_or(false);
    let eval_disabled = r.bool(&["eval_loss_disable"]).unwrap_or(false);
    let eval_steps_interval = r.int(&["eval_steps_interval"], 0).filter(|n| *n > 0 && !eval_disabled).map(|n| n as u64);
    let num_eval_images = r.int(&["num_eval_images"], 1).unwrap_or(4) as u64;
    let eval_timesteps = r.int(&["eval_timesteps"], 1).unwrap_or(28).min(1000) as u32;

    let lora_rank = r.int(&["lora_rank"], 1).unwrap_or(16) as u32;
    let lora_alpha = r.f64_where(&["lora_alpha"], |v| v > 0.0, "positive").unwrap_or(lora_rank as f64);
    let lora_dropout = r.f64_where(&["lora_dropout"], |v| (0.0..1.0).contains(&v), "at least 0 and below 1").unwrap_or(0.1);
    let use_dora = r.bool(&["use_dora"]).unwrap_or(false);
    let lycoris_config = match r.choice(&["lora_type"], &["standard", "lycoris"]).as_deref() {
        Some("lycoris") => {
            if model_type == ModelType::Full {
                r.error("lora_type lycoris needs model_type lora");
            }
            if use_dora {
                r.error("use_dora works with lora_type standard; Burnbooth's LyCORIS adapters (LoKr) have no DoRA yet");
            }
            // SimpleTuner's default path, relative to the config's folder like the other paths.
            let path = r.string(&["lycoris_config"]).unwrap_or_else(|| "config/lycoris_config.json".into());
            Some(resolve_path(&path, base_dir))
        }
        _ => {
            if r.has("lycoris_config") {
                r.accept(&["lycoris_config"]);
                r.warn("'lycoris_config' is ignored: lora_type is standard (set lora_type lycoris to use it)");
            }
            None
        }
    };
    if use_dora && model_type == ModelType::Full {
        r.error("use_dora: DoRA is a kind of LoRA; set model_type lora or leave use_dora unset");
    }
    let train_text_encoder = r.bool(&["train_text_encoder"]).unwrap_or(false);
    let text_encoder_lr = r.f64_where(&["text_encoder_lr"], |v| v > 0.0, "positive");
    if optimizer == OptimizerKind::Prodigy && text_encoder_lr.is_some_and(|rate| rate != learning_rate) {
        r.error("text_encoder_lr: prodigy estimates one step size for every parameter and cannot give the text encoder another learning rate (prodigyopt refuses it too); leave text_encoder_lr unset");
    }
    let mixed_precision = r.choice(&["mixed_precision"], &["no", "fp16", "bf16", "fp8"]).unwrap_or_else(|| "bf16".into());
    let gradient_checkpointing = r.bool(&["gradient_checkpointing"]).unwrap_or(true);
    let caption_dropout_probability = r.f64(&["caption_dropout_probability"]).unwrap_or(0.1);
    if !(0.0..=1.0).contains(&caption_dropout_probability) {
        r.error(format!("caption_dropout_probability must be between 0 and 1, not {caption_dropout_probability}"));
    }
    let offset_noise = r.bool(&["offset_noise"]).unwrap_or(false);
    let noise_offset = r.f64_where(&["noise_offset"], |v| v >= 0.0, "at least 0").unwrap_or(0.1);
    let noise_offset_probability = r.f64_where(&["noise_offset_probability"], |v| (0.0..=1.0).contains(&v), "between 0 and 1").unwrap_or(0.25);
    let snr_gamma = r.f64(&["snr_gamma"]).filter(|g| *g > 0.0);
    let prediction_type = r.choice_of::<PredictionType>(&["prediction_type"]);
    let data_backend_sampling = match r.choice(&["data_backend_sampling"], &["uniform", "auto-weighting", "auto_weighting"]).as_deref() {
        Some("uniform") => DatasetSampling::Uniform,
        _ => DatasetSampling::AutoWeighting,
    };
    let allow_dataset_oversubscription = r.bool(&["allow_dataset_oversubscription"]).unwrap_or(false);
    let max_image_pixels = r.int(&["max_image_pixels"], 1).map(|v| v as u64).unwrap_or(crate::data::probe::DEFAULT_MAX_IMAGE_PIXELS);
    let regularisation_mode = match r.choice(&["regularisation_mode"], &["mixed", "prior_preservation", "parent_prediction"]).as_deref() {
        Some("mixed") => RegularisationMode::Mixed,
        Some("prior_preservation") => RegularisationMode::PriorPreservation,
        Some("parent_prediction") => RegularisationMode::ParentPrediction,
        // SimpleTuner's behaviour: parent prediction for LoRA, plain data for full.
        _ if model_type == ModelType::Lora => RegularisationMode::ParentPrediction,
        _ => RegularisationMode::Mixed,
    };
    let prior_loss_weight = r.f64_where(&["prior_loss_weight"], |v| v >= 0.0, "at least 0").unwrap_or(1.0);
    let aspect_bucket_alignment = r.int(&["aspect_bucket_alignment"], 8).unwrap_or(64) as u32;
    let aspect_bucket_rounding = r.int(&["aspect_bucket_rounding"], 1).unwrap_or(2) as u32;
    let strict_config = r.bool(&["strict_config"]).unwrap_or(false);

    report_leftover_keys(&mut r, raw);
    let model_family = model_family?;
    Some(TrainingConfig {
        source_name: source_name.to_string(),
        model_family,
        model_type,
        pretrained_model_name_or_path: pretrained,
        output_dir,
        data_backend_config,
        dataset_options: DatasetOptions {
            resolution,
            resolution_type,
            minimum_image_size,
            caption_strategy,
            instance_prompt,
            prepend_instance_prompt,
            only_instance_prompt,
            train_batch_size,
        },
        seed,
        gradient_accumulation_steps,
        learning_rate,
        lr_scheduler,
        lr_warmup_steps,
        lr_end,
        lr_power,
        lr_num_cycles,
        optimizer,
        adam_beta1,
        adam_beta2,
        adam_weight_decay,
        adam_epsilon,
        max_grad_norm,
        ema,
        prodigy,
        adafactor,
        max_train_steps,
        num_train_epochs,
        checkpoint_step_interval,
        checkpoints_total_limit,
        resume_from_checkpoint,
        validation_step_interval,
        validation_prompt,
        user_prompt_library,
        validation_prompts: Vec::new(),
        validation_negative_prompt,
        validation_guidance,
        validation_num_inference_steps,
        validation_resolution,
        validation_seed,
        validation_on_startup,
        eval_steps_interval,
        num_eval_images,
        eval_timesteps,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        lycoris_config,
        lycoris: None,
        train_text_encoder,
        text_encoder_lr,
        mixed_precision,
        gradient_checkpointing,
        caption_dropout_probability,
        offset_noise,
        noise_offset,
        noise_offset_probability,
        snr_gamma,
        prediction_type,
        data_backend_sampling,
        allow_dataset_oversubscription,
        max_image_pixels,
        regularisation_mode,
        prior_loss_weight,
        aspect_bucket_alignment,
        aspect_bucket_rounding,
        strict_config,
        warnings: Vec::new(),
    })
}

/// SimpleTuner options Burnbooth does not use are noted; unknown names get a
/// suggestion.
fn report_leftover_keys(reader: &mut Reader<'_>, _raw: &Map<String, Value>) {
    let aliases = option_aliases();
    for key in reader.unknown_keys() {
        if aliases.contains_key(key.as_str()) {
            reader.warn(format!("'{key}' is a SimpleTuner option Burnbooth does not use (ignored)"));
        } else {
            let hint = nearest(&key, aliases.keys().copied()).map(|n| format!("; did you mean '{n}'?")).unwrap_or_default();
            reader.warn(format!("unknown option '{key}'{hint} (ignored)"));
        }
    }
}
