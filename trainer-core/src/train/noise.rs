//! The training noise schedule (diffusers' DDPMScheduler as the Dreambooth
//! scripts use it): forward noising, the prediction target and min-SNR-γ
//! loss weights.

use burn::tensor::{Tensor, TensorData};

use crate::error::{Error, Result};
use crate::models::config::SchedulerConfig;
use crate::schedulers::alphas_cumprod;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Epsilon,
    Velocity,
}

#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    pub target: Target,
}

impl NoiseSchedule {
    /// From the model's scheduler config; `prediction_override` is the
    /// training config's `prediction_type`, when set.
    pub fn new(config: &SchedulerConfig, prediction_override: Option<&str>) -> Result<Self> {
        let prediction = prediction_override.unwrap_or(&config.prediction_type);
        let target = match prediction {
            "epsilon" => Target::Epsilon,
            "v_prediction" | "v-prediction" | "v" => Target::Velocity,
            other => {
                return Err(Error::Config {
                    source_name: "prediction_type".into(),
                    problems: vec![format!("'{other}' is not supported (epsilon or v_prediction)")],
                })
            }
        };
        Ok(Self { alphas_cumprod: alphas_cumprod(config), target })
    }

    pub fn num_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))`.
    pub fn coefficients(&self, t: usize) -> (f64, f64) {
        let a = self.alphas_cumprod[t];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// Signal-to-noise ratio ᾱ / (1 - ᾱ).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// min-SNR-γ weight (train_dreambooth.py, kohya): `min(SNR, γ) / SNR`
    /// for epsilon, `min(SNR, γ) / (SNR + 1)` for v-prediction.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        match self.target {
            Target::Epsilon => snr.min(gamma) / snr,
            Target::Velocity => snr.min(gamma) / (snr + 1.0),
        }
    }

    /// Per-sample coefficient tensors `[batch, 1, 1, 1]`.
    fn per_sample(&self, timesteps: &[usize], pick: impl Fn(usize) -> f64, like: &Tensor<4>) -> Tensor<4> {
        let values: Vec<f32> = timesteps.iter().map(|&t| pick(t) as f32).collect();
        Tensor::from_data(TensorData::new(values, [timesteps.len(), 1, 1, 1]), &like.device())
    }

    /// `x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε` (DDPMScheduler.add_noise).
    pub fn add_noise(&self, latents: Tensor<4>, noise: Tensor<4>, timesteps: &[usize]) -> Tensor<4> {
        let signal = self.per_sample(timesteps, |t| self.coefficients(t).0, &latents);
        let sigma = self.per_sample(timesteps, |t| self.coefficients(t).1, &latents);
        latents * signal + noise * sigma
    }

    /// What the UNet learns to predict: ε, or v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0.
    pub fn target(&self, latents: Tensor<4>, noise: Tensor<4>, timesteps: &[usize]) -> Tensor<4> {
        match self.target {
            Target::Epsilon => noise,
            Target::Velocity => {
                let signal = self.per_sample(timesteps, |t| self.coefficients(t).0, &latents);
                let sigma = self.per_sample(timesteps, |t| self.coefficients(t).1, &latents);
                noise * signal - latents * sigma
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_values() {
        // diffusion-reference.md §3.1 (diffusers 0.42.1).
        let schedule = NoiseSchedule::new(&SchedulerConfig::default(), None).unwrap();
        let close = |got: f64, want: f64| assert!((got - want).abs() / want < 1e-4, "{got} vs {want}");
        close(schedule.alphas_cumprod[0], 0.99915);
        close(schedule.alphas_cumprod[499], 0.27767);
        close(schedule.alphas_cumprod[999], 0.0046601);
        close(schedule.snr(0), 1175.44);
        close(schedule.snr(499), 0.38441);
        close(schedule.snr(999), 0.0046819);
        // Below γ the weight is 1 for epsilon; above it γ/SNR.
        close(schedule.min_snr_weight(999, 5.0), 1.0);
        close(schedule.min_snr_weight(0, 5.0), 5.0 / 1175.44);
    }
}
