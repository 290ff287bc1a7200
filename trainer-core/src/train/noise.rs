//! The training noise schedule (diffusers' DDPMScheduler as the Dreambooth
//! scripts use it): forward noising, the prediction target, min-SNR-γ
//! loss weights and the loss.

use burn::tensor::{Tensor, TensorData};

use crate::models::config::{PredictionType, SchedulerConfig};
use crate::schedulers::alphas_cumprod;

/// The mean squared error of `prediction` against `target` (`[batch, C, h,
/// w]`): each cell's error times its `mask` value (`[batch, 1, h, w]`,
/// masked loss), averaged over all cells of a sample (not over the mask's
/// area, as SimpleTuner does: a mostly dark mask weighs less), then over
/// the batch with the per-sample `weights` (`[batch, 1]`, min-SNR-γ).
pub fn regression_loss(prediction: Tensor<4>, target: Tensor<4>, mask: Option<Tensor<4>>, weights: Option<Tensor<2>>) -> Tensor<1> {
    let batch = prediction.dims()[0];
    let squared = (prediction - target).square();
    let squared = match mask {
        Some(mask) => squared * mask,
        None => squared,
    };
    let per_sample = squared.reshape([batch as i32, -1]).mean_dim(1);
    match weights {
        Some(weights) => (per_sample * weights).mean(),
        None => per_sample.mean(),
    }
}

#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    /// What the UNet learns to predict.
    pub prediction: PredictionType,
}

impl NoiseSchedule {
    /// From the model's scheduler config; `prediction_override` is the
    /// training config's `prediction_type`, when set.
    pub fn new(config: &SchedulerConfig, prediction_override: Option<PredictionType>) -> Self {
        Self { alphas_cumprod: alphas_cumprod(config), prediction: prediction_override.unwrap_or(config.prediction_type) }
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
    /// for epsilon, `min(SNR, γ) / (SNR + 1)` for v-prediction, `min(SNR, γ)`
    /// for sample prediction (diffusers' train_text_to_image.py).
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        match self.prediction {
            PredictionType::Epsilon => snr.min(gamma) / snr,
            PredictionType::VPrediction => snr.min(gamma) / (snr + 1.0),
            PredictionType::Sample => snr.min(gamma),
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

    /// What the UNet learns to predict: ε, v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0, or x_0.
    pub fn target(&self, latents: Tensor<4>, noise: Tensor<4>, timesteps: &[usize]) -> Tensor<4> {
        match self.prediction {
            PredictionType::Epsilon => noise,
            PredictionType::Sample => latents,
            PredictionType::VPrediction => {
                let signal = self.per_sample(timesteps, |t| self.coefficients(t).0, &latents);
                let sigma = self.per_sample(timesteps, |t| self.coefficients(t).1, &latents);
                noise * signal - latents * sigma
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;

    #[test]
    fn matches_the_reference_values() {
        // docs/reference.md §2.1 (diffusers 0.42.1).
        let schedule = NoiseSchedule::new(&SchedulerConfig::default(), None);
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

    fn tensor(values: Vec<f32>, shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// A masked cell adds nothing to the loss or its gradient: changing the
    /// target there changes neither; a mask of ones is no mask.
    #[test]
    fn masked_cells_add_nothing_to_the_loss_or_its_gradient() {
        let device = Device::flex().autodiff();
        let values = |seed: f32| (0..2 * 3 * 2 * 2).map(|i| (i as f32 * 0.37 + seed).sin()).collect::<Vec<f32>>();
        // The left column of each 2x2 grid hidden, the right one weighted 0.5 and 1.
        let mask = tensor([0.0, 0.5, 0.0, 0.5, 0.0, 1.0, 0.0, 1.0].to_vec(), [2, 1, 2, 2], &device);
        let target = tensor(values(1.0), [2, 3, 2, 2], &device);
        let mut changed = values(1.0);
        for (i, v) in changed.iter_mut().enumerate() {
            if i % 2 == 0 {
                *v += 5.0; // the hidden column's cells
            }
        }
        let changed = tensor(changed, [2, 3, 2, 2], &device);
        let gradient_of = |target: Tensor<4>, mask: Option<Tensor<4>>| {
            let prediction = tensor(values(0.0), [2, 3, 2, 2], &device).require_grad();
            let loss = regression_loss(prediction.clone(), target, mask, None);
            let grads = loss.backward();
            let gradient = prediction.grad(&grads).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
            (loss.into_scalar::<f32>(), gradient)
        };
        let (loss, gradient) = gradient_of(target.clone(), Some(mask.clone()));
        assert_eq!(gradient_of(changed.clone(), Some(mask.clone())), (loss, gradient.clone()), "the hidden cells' targets change nothing");
        assert!(gradient.iter().enumerate().all(|(i, g)| (i % 2 == 0) == (*g == 0.0)), "zero gradient exactly where hidden: {gradient:?}");
        assert_ne!(gradient_of(changed, None).0, gradient_of(target.clone(), None).0, "unmasked, the change is seen");
        let ones = tensor(vec![1.0; 8], [2, 1, 2, 2], &device);
        assert_eq!(gradient_of(target.clone(), Some(ones)), gradient_of(target, None), "a mask of ones is no mask");
    }
}
