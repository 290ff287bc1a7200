//! The optimizers' own settings: Prodigy's and Adafactor's, read from
//! SimpleTuner's `optimizer_config` (`"d_coef=2,safeguard_warmup=true"`,
//! `--optimizer_config` in TRAINER_EXTRA_ARGS for env files) over
//! SimpleTuner's defaults for each (docs/reference.md §1.5).

use serde::Serialize;

/// Prodigy as prodigyopt 1.1 defines it (Adam whose step size `d` is
/// estimated from the distance travelled). `lr` multiplies `d`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProdigySettings {
    pub beta1: f64,
    pub beta2: f64,
    /// Decay of the step-size statistics; `sqrt(beta2)` when unset.
    pub beta3: Option<f64>,
    pub epsilon: f64,
    pub weight_decay: f64,
    /// AdamW-style decoupled weight decay (otherwise added to the gradient).
    pub decouple: bool,
    pub use_bias_correction: bool,
    /// Leaves the learning rate out of the statistics' denominator (steadier under warm-up).
    pub safeguard_warmup: bool,
    /// The initial step size.
    pub d0: f64,
    /// Multiplies the step-size estimate: the knob to tune.
    pub d_coef: f64,
    /// Limits how fast `d` may grow per step (infinite: no limit).
    pub growth_rate: f64,
    /// Stop adapting `d` after this many steps (0 = never stop; SimpleTuner's `prodigy_steps`).
    pub prodigy_steps: u64,
}

impl Default for ProdigySettings {
    /// SimpleTuner's defaults for `prodigy` (betas 0.9/0.99, no weight decay, no bias correction).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.99,
            beta3: None,
            epsilon: 1e-8,
            weight_decay: 0.0,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
            prodigy_steps: 0,
        }
    }
}

/// Adafactor as `torch.optim.Adafactor` defines it (SimpleTuner's
/// `torch-adafactor`): second moments factored into row and column means
/// for matrices and kernels, steps relative to the weights' RMS.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdafactorSettings {
    /// The second-moment decay is `1 - t^beta2_decay`.
    pub beta2_decay: f64,
    /// Floor of the variance estimate (squared); f32's epsilon when unset, as torch does for f32 weights.
    pub epsilon1: f64,
    /// Floor of the weights' RMS that scales each step.
    pub epsilon2: f64,
    /// Clipping threshold of the update's RMS (torch's `d`).
    pub clip_threshold: f64,
    pub weight_decay: f64,
}

impl Default for AdafactorSettings {
    fn default() -> Self {
        Self { beta2_decay: -0.8, epsilon1: f32::EPSILON as f64, epsilon2: 1e-3, clip_threshold: 1.0, weight_decay: 0.0 }
    }
}

/// One `key=value` of `optimizer_config`, typed as SimpleTuner types it
/// (numbers, `true`/`false`, `none`).
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    Number(f64),
    Bool(bool),
    None,
}

/// Splits `optimizer_config` into its entries. Problems are returned as messages.
pub fn parse_optimizer_config(text: &str) -> Result<Vec<(String, OptionValue)>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("optimizer_config entry '{part}' is not key=value"));
        };
        let (key, value) = (key.trim().to_string(), value.trim());
        let parsed = match value.to_ascii_lowercase().as_str() {
            "true" => OptionValue::Bool(true),
            "false" => OptionValue::Bool(false),
            "none" => OptionValue::None,
            "inf" => OptionValue::Number(f64::INFINITY),
            other => match other.parse::<f64>() {
                Ok(number) if number.is_finite() => OptionValue::Number(number),
                _ => return Err(format!("optimizer_config '{key}={value}': the value must be a number, true, false or none")),
            },
        };
        out.push((key, parsed));
    }
    Ok(out)
}

/// Applies `optimizer_config` entries to Prodigy's settings; returns the
/// learning rate it sets (`lr=`), if any.
pub fn apply_to_prodigy(settings: &mut ProdigySettings, entries: &[(String, OptionValue)]) -> Result<Option<f64>, String> {
    let mut lr = None;
    for (key, value) in entries {
        let number = |what: &str| match value {
            OptionValue::Number(n) => Ok(*n),
            _ => Err(format!("optimizer_config '{key}' must be a number ({what})")),
        };
        let flag = || match value {
            OptionValue::Bool(b) => Ok(*b),
            _ => Err(format!("optimizer_config '{key}' must be true or false")),
        };
        match key.as_str() {
            "lr" => lr = Some(positive(key, number("the multiplier of d")?)?),
            "beta1" => settings.beta1 = beta(key, number("0 to below 1")?)?,
            "beta2" => settings.beta2 = beta(key, number("0 to below 1")?)?,
            "beta3" => settings.beta3 = if *value == OptionValue::None { None } else { Some(beta(key, number("0 to below 1")?)?) },
            "eps" => settings.epsilon = positive(key, number("positive")?)?,
            "weight_decay" => settings.weight_decay = at_least_zero(key, number("at least 0")?)?,
            "decouple" => settings.decouple = flag()?,
            "use_bias_correction" => settings.use_bias_correction = flag()?,
            "safeguard_warmup" => settings.safeguard_warmup = flag()?,
            "d0" => settings.d0 = positive(key, number("positive")?)?,
            "d_coef" => settings.d_coef = positive(key, number("positive")?)?,
            "growth_rate" => settings.growth_rate = positive(key, number("positive")?)?,
            "prodigy_steps" => settings.prodigy_steps = at_least_zero(key, number("a step count")?)? as u64,
            other => return Err(unknown(other, PRODIGY_KEYS)),
        }
    }
    Ok(lr)
}

const PRODIGY_KEYS: &[&str] = &[
    "lr",
    "beta1",
    "beta2",
    "beta3",
    "eps",
    "weight_decay",
    "decouple",
    "use_bias_correction",
    "safeguard_warmup",
    "d0",
    "d_coef",
    "growth_rate",
    "prodigy_steps",
];
const ADAFACTOR_KEYS: &[&str] = &["beta2_decay", "eps1", "eps2", "d", "weight_decay"];

/// Applies `optimizer_config` entries to Adafactor's settings.
pub fn apply_to_adafactor(settings: &mut AdafactorSettings, entries: &[(String, OptionValue)]) -> Result<(), String> {
    for (key, value) in entries {
        let OptionValue::Number(number) = *value else {
            if key == "eps1" && *value == OptionValue::None {
                settings.epsilon1 = AdafactorSettings::default().epsilon1;
                continue;
            }
            return Err(format!("optimizer_config '{key}' must be a number"));
        };
        match key.as_str() {
            "beta2_decay" if number <= 0.0 => settings.beta2_decay = number,
            "beta2_decay" => return Err(format!("optimizer_config 'beta2_decay' must be at most 0, not {number}")),
            "eps1" => settings.epsilon1 = at_least_zero(key, number)?,
            "eps2" => settings.epsilon2 = at_least_zero(key, number)?,
            "d" if number >= 1.0 => settings.clip_threshold = number,
            "d" => return Err(format!("optimizer_config 'd' (the clipping threshold) must be at least 1, not {number}")),
            "weight_decay" => settings.weight_decay = at_least_zero(key, number)?,
            other => return Err(unknown(other, ADAFACTOR_KEYS)),
        }
    }
    Ok(())
}

fn unknown(key: &str, known: &[&str]) -> String {
    let hint = crate::error::nearest(key, known.iter().copied()).map(|n| format!("; did you mean '{n}'?")).unwrap_or_default();
    format!("optimizer_config key '{key}' is not one this optimizer takes ({}){hint}", known.join(", "))
}

fn beta(key: &str, v: f64) -> Result<f64, String> {
    if (0.0..1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("optimizer_config '{key}' must be at least 0 and below 1, not {v}"))
    }
}

fn positive(key: &str, v: f64) -> Result<f64, String> {
    if v > 0.0 {
        Ok(v)
    } else {
        Err(format!("optimizer_config '{key}' must be positive, not {v}"))
    }
}

fn at_least_zero(key: &str, v: f64) -> Result<f64, String> {
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("optimizer_config '{key}' must be at least 0, not {v}"))
    }
}
