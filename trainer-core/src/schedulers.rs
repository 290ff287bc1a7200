//! Sampling schedulers: DDIM, Euler, Euler ancestral and DPM++ 2M (with or
//! without Karras sigmas), with diffusers' timestep spacings, so that a run
//! from the same starting latents follows diffusers step for step.

use burn::tensor::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::models::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
}

impl SamplerKind {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().replace('-', "_").as_str() {
            "ddim" => Self::Ddim,
            "euler" => Self::Euler,
            "euler_a" | "euler_ancestral" => Self::EulerAncestral,
            "dpmpp_2m" | "dpm++_2m" => Self::DpmPp2m,
            "dpmpp_2m_karras" | "dpm++_2m_karras" => Self::DpmPp2mKarras,
            other => {
                return Err(Error::Config {
                    source_name: "--sampler".into(),
                    problems: vec![format!("unknown sampler '{other}': use ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras")],
                })
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }
}

/// ᾱ_t for every training timestep.
pub fn alphas_cumprod(config: &SchedulerConfig) -> Vec<f64> {
    let n = config.num_train_timesteps;
    let betas: Vec<f64> = match config.beta_schedule {
        BetaSchedule::Linear => (0..n).map(|i| config.beta_start + (config.beta_end - config.beta_start) * i as f64 / (n - 1) as f64).collect(),
        BetaSchedule::ScaledLinear => {
            let (a, b) = (config.beta_start.sqrt(), config.beta_end.sqrt());
            (0..n).map(|i| (a + (b - a) * i as f64 / (n - 1) as f64).powi(2)).collect()
        }
        // ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2) sampled at i/N, each beta
        // 1 − ᾱ((i+1)/N) / ᾱ(i/N) capped at 0.999 (diffusers'
        // betas_for_alpha_bar; the beta_start/beta_end keys are unused).
        BetaSchedule::SquaredcosCapV2 => {
            let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
            (0..n).map(|i| (1.0 - alpha_bar((i + 1) as f64 / n as f64) / alpha_bar(i as f64 / n as f64)).min(0.999)).collect()
        }
    };
    let mut product = 1.0;
    betas
        .iter()
        .map(|beta| {
            product *= 1.0 - beta;
            product
        })
        .collect()
}

/// The config's spacing, or the sampler class's own default.
fn spacing(config: &SchedulerConfig, class_default: TimestepSpacing) -> TimestepSpacing {
    config.timestep_spacing.unwrap_or(class_default)
}

/// diffusers' `np.round`: half to even.
fn round(x: f64) -> f64 {
    x.round_ties_even()
}

/// Timesteps for `steps` inference steps (as floats: Euler may interpolate).
pub fn timesteps(config: &SchedulerConfig, steps: usize, spacing: TimestepSpacing) -> Vec<f64> {
    let t = config.num_train_timesteps as f64;
    let n = steps as f64;
    match spacing {
        TimestepSpacing::Trailing => {
            let ratio = t / n;
            (0..steps).map(|i| round(t - i as f64 * ratio) - 1.0).collect()
        }
        TimestepSpacing::Linspace => (0..steps).rev().map(|i| if steps == 1 { 0.0 } else { (t - 1.0) * i as f64 / (n - 1.0) }).collect(),
        TimestepSpacing::Leading => {
            let ratio = (config.num_train_timesteps / steps) as f64;
            (0..steps).rev().map(|i| round(i as f64 * ratio) + config.steps_offset as f64).collect()
        }
    }
}

/// σ for every training timestep: sqrt((1-ᾱ)/ᾱ).
fn full_sigmas(alphas: &[f64]) -> Vec<f64> {
    alphas.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// Linear interpolation of σ at fractional timesteps (np.interp).
fn interp_sigma(t: f64, sigmas: &[f64]) -> f64 {
    let t = t.clamp(0.0, (sigmas.len() - 1) as f64);
    let low = t.floor() as usize;
    let high = (low + 1).min(sigmas.len() - 1);
    let w = t - low as f64;
    sigmas[low] * (1.0 - w) + sigmas[high] * w
}

/// diffusers' `_sigma_to_t`: log-σ interpolation back to a timestep.
fn sigma_to_t(sigma: f64, full: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let logs: Vec<f64> = full.iter().map(|s| s.ln()).collect();
    let mut low = 0;
    for (i, l) in logs.iter().enumerate() {
        if log_sigma - l >= 0.0 {
            low = i;
        }
    }
    let low = low.min(logs.len() - 2);
    let high = low + 1;
    let w = ((logs[low] - log_sigma) / (logs[low] - logs[high])).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// A scheduler set up for one sampling run.
pub struct Scheduler {
    pub kind: SamplerKind,
    pub prediction: PredictionType,
    /// Timesteps given to the model, one per step.
    pub timesteps: Vec<f64>,
    /// σ per step and a final 0 (Euler and DPM++ families).
    pub sigmas: Vec<f64>,
    alphas: Vec<f64>,
    final_alpha: f64,
    step_ratio: usize,
    spacing: TimestepSpacing,
    /// DPM++ 2M: the previous step's denoised estimate.
    previous_x0: Option<Tensor<4>>,
}

impl Scheduler {
    pub fn new(kind: SamplerKind, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let prediction = config.prediction_type;
        if steps == 0 {
            return Err(Error::Config { source_name: "--steps".into(), problems: vec!["at least one step is needed".into()] });
        }
        let alphas = alphas_cumprod(config);
        let full = full_sigmas(&alphas);
        let final_alpha = if config.set_alpha_to_one { 1.0 } else { alphas[0] };
        let default_spacing = if kind == SamplerKind::Ddim { TimestepSpacing::Leading } else { TimestepSpacing::Linspace };
        let spacing = spacing(config, default_spacing);
        let (timesteps, sigmas) = match kind {
            SamplerKind::Ddim => (timesteps(config, steps, spacing), Vec::new()),
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let ts = timesteps(config, steps, spacing);
                let mut sigmas: Vec<f64> = ts.iter().map(|t| interp_sigma(*t, &full)).collect();
                sigmas.push(0.0);
                (ts, sigmas)
            }
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => {
                let t = config.num_train_timesteps;
                // DPM-Solver works on N+1 points and drops the last.
                let mut ts: Vec<f64> = match spacing {
                    TimestepSpacing::Leading => {
                        let ratio = (t / (steps + 1)) as f64;
                        (0..=steps).rev().map(|i| round(i as f64 * ratio) + config.steps_offset as f64).collect()
                    }
                    TimestepSpacing::Trailing => timesteps(config, steps, TimestepSpacing::Trailing),
                    TimestepSpacing::Linspace => (0..=steps).rev().map(|i| round((t - 1) as f64 * i as f64 / steps as f64)).collect(),
                };
                ts.truncate(steps);
                let mut sigmas: Vec<f64> = ts.iter().map(|t| interp_sigma(*t, &full)).collect();
                if kind == SamplerKind::DpmPp2mKarras {
                    sigmas = karras(full[0], full[full.len() - 1], steps);
                    ts = sigmas.iter().map(|s| round(sigma_to_t(*s, &full))).collect();
                }
                sigmas.push(0.0);
                (ts, sigmas)
            }
        };
        Ok(Self { kind, prediction, timesteps, sigmas, alphas, final_alpha, step_ratio: config.num_train_timesteps / steps, spacing, previous_x0: None })
    }

    /// What the starting noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let max = self.sigmas.iter().cloned().fold(0.0, f64::max);
                // diffusers: σ_max for linspace and trailing spacing, else sqrt(σ_max² + 1).
                if matches!(self.spacing, TimestepSpacing::Linspace | TimestepSpacing::Trailing) {
                    max
                } else {
                    (max * max + 1.0).sqrt()
                }
            }
            _ => 1.0,
        }
    }

    /// Scales the sample before the model sees it.
    pub fn scale_model_input(&self, sample: Tensor<4>, step: usize) -> Tensor<4> {
        match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let sigma = self.sigmas[step];
                sample / (sigma * sigma + 1.0).sqrt()
            }
            _ => sample,
        }
    }

    /// One denoising step. `noise` is needed by Euler ancestral only.
    pub fn step(&mut self, model_output: Tensor<4>, step: usize, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
        match self.kind {
            SamplerKind::Ddim => self.ddim_step(model_output, step, sample),
            SamplerKind::Euler | SamplerKind::EulerAncestral => self.euler_step(model_output, step, sample, noise),
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => self.dpm_step(model_output, step, sample),
        }
    }

    fn ddim_step(&self, output: Tensor<4>, step: usize, sample: Tensor<4>) -> Tensor<4> {
        let t = self.timesteps[step] as usize;
        let a_t = self.alphas[t];
        let a_prev = t.checked_sub(self.step_ratio).map(|p| self.alphas[p]).unwrap_or(self.final_alpha);
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => ((sample.clone() - output.clone() * (1.0 - a_t).sqrt()) / a_t.sqrt(), output),
            PredictionType::VPrediction => {
                (sample.clone() * a_t.sqrt() - output.clone() * (1.0 - a_t).sqrt(), output * a_t.sqrt() + sample * (1.0 - a_t).sqrt())
            }
            PredictionType::Sample => (output.clone(), (sample - output * a_t.sqrt()) / (1.0 - a_t).sqrt()),
        };
        x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt()
    }

    fn euler_step(&self, output: Tensor<4>, step: usize, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
        let sigma = self.sigmas[step];
        let next = self.sigmas[step + 1];
        let x0 = match self.prediction {
            PredictionType::Epsilon => sample.clone() - output * sigma,
            PredictionType::VPrediction => output * (-sigma / (sigma * sigma + 1.0).sqrt()) + sample.clone() / (sigma * sigma + 1.0),
            PredictionType::Sample => output,
        };
        let derivative = (sample.clone() - x0) / sigma;
        if self.kind == SamplerKind::EulerAncestral {
            let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).max(0.0).sqrt();
            let down = (next * next - up * up).max(0.0).sqrt();
            let stepped = sample + derivative * (down - sigma);
            return match noise {
                Some(noise) if up > 0.0 => stepped + noise * up,
                _ => stepped,
            };
        }
        sample + derivative * (next - sigma)
    }

    fn dpm_step(&mut self, output: Tensor<4>, step: usize, sample: Tensor<4>) -> Tensor<4> {
        let sigma = self.sigmas[step];
        let next = self.sigmas[step + 1];
        let alpha_sigma = |s: f64| {
            let alpha = 1.0 / (s * s + 1.0).sqrt();
            (alpha, s * alpha)
        };
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let x0 = match self.prediction {
            PredictionType::Epsilon => (sample.clone() - output * sigma_t) / alpha_t,
            PredictionType::VPrediction => sample.clone() * alpha_t - output * sigma_t,
            PredictionType::Sample => output,
        };
        let (alpha_next, sigma_next) = alpha_sigma(next);
        let lambda = |alpha: f64, s: f64| alpha.ln() - s.ln();
        let last = step + 1 == self.timesteps.len();
        // First order on the first step and on the last (final σ is zero).
        let result = if next == 0.0 || last || self.previous_x0.is_none() {
            if next == 0.0 {
                x0.clone()
            } else {
                let h = lambda(alpha_next, sigma_next) - lambda(alpha_t, sigma_t);
                sample * (sigma_next / sigma_t) - x0.clone() * (alpha_next * ((-h).exp() - 1.0))
            }
        } else {
            let previous = self.previous_x0.clone().expect("checked above");
            let (alpha_prev, sigma_prev) = alpha_sigma(self.sigmas[step - 1]);
            let h = lambda(alpha_next, sigma_next) - lambda(alpha_t, sigma_t);
            let h0 = lambda(alpha_t, sigma_t) - lambda(alpha_prev, sigma_prev);
            let r0 = h0 / h;
            let d1 = (x0.clone() - previous) / r0;
            let factor = alpha_next * ((-h).exp() - 1.0);
            sample * (sigma_next / sigma_t) - x0.clone() * factor - d1 * (0.5 * factor)
        };
        self.previous_x0 = Some(x0);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::Choice;

    fn sd_config(spacing: Option<&str>) -> SchedulerConfig {
        SchedulerConfig { steps_offset: 1, timestep_spacing: spacing.map(|s| TimestepSpacing::parse(s).unwrap()), ..Default::default() }
    }

    fn close(got: &[f64], want: &[f64], tolerance: f64) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tolerance, "{got:?} vs {want:?}");
        }
    }

    // Reference vectors: docs/reference.md §3 (scaled_linear, N = 10).
    #[test]
    fn leading_and_trailing_spacing() {
        let leading = timesteps(&sd_config(None), 10, TimestepSpacing::Leading);
        close(&leading, &[901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0], 0.0);
        let trailing = timesteps(&sd_config(None), 10, TimestepSpacing::Trailing);
        close(&trailing, &[999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0], 0.0);
    }

    #[test]
    fn euler_sigmas_match_diffusers() {
        let s = Scheduler::new(SamplerKind::Euler, &sd_config(Some("leading")), 10).unwrap();
        close(&s.sigmas, &[8.3907, 5.1344, 3.3478, 2.2929, 1.6237, 1.1682, 0.8357, 0.5741, 0.3462, 0.0413, 0.0], 1e-4);
        assert!((s.init_noise_sigma() - 8.4501).abs() < 1e-4);
        let s = Scheduler::new(SamplerKind::Euler, &sd_config(Some("linspace")), 10).unwrap();
        close(&s.timesteps, &[999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0], 1e-9);
        close(&s.sigmas, &[14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292, 0.0], 1e-4);
        assert!((s.init_noise_sigma() - 14.6146).abs() < 1e-4);
    }

    #[test]
    fn dpm_timesteps_and_sigmas_match_diffusers() {
        let s = Scheduler::new(SamplerKind::DpmPp2m, &sd_config(Some("linspace")), 10).unwrap();
        close(&s.timesteps, &[999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0], 0.0);
        close(&s.sigmas, &[14.6146, 8.3028, 5.0878, 3.3211, 2.2765, 1.6183, 1.1644, 0.8328, 0.5717, 0.3439, 0.0], 1e-4);
        let s = Scheduler::new(SamplerKind::DpmPp2m, &sd_config(Some("leading")), 10).unwrap();
        close(&s.timesteps, &[901.0, 811.0, 721.0, 631.0, 541.0, 451.0, 361.0, 271.0, 181.0, 91.0], 0.0);
        let s = Scheduler::new(SamplerKind::DpmPp2mKarras, &sd_config(Some("linspace")), 10).unwrap();
        close(&s.timesteps, &[999.0, 916.0, 815.0, 687.0, 523.0, 327.0, 146.0, 41.0, 7.0, 0.0], 0.0);
        close(&s.sigmas, &[14.6146, 9.1029, 5.4784, 3.1686, 1.7494, 0.9141, 0.4469, 0.2014, 0.0819, 0.0292, 0.0], 1e-4);
    }
}
