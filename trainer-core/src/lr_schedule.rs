//! Learning-rate schedules: the rate at each optimizer step.

use serde::Serialize;

use crate::config::training::{LrSchedule, TrainingConfig};

/// A schedule with everything it needs to give the rate at any step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LearningRateSchedule {
    pub kind: LrSchedule,
    pub learning_rate: f64,
    pub lr_end: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub power: f64,
    pub num_cycles: f64,
}

impl LearningRateSchedule {
    pub fn from_config(config: &TrainingConfig, total_steps: u64) -> Self {
        Self {
            kind: config.lr_scheduler,
            learning_rate: config.learning_rate,
            lr_end: config.lr_end,
            warmup_steps: config.lr_warmup_steps,
            total_steps,
            power: config.lr_power,
            num_cycles: config.lr_num_cycles,
        }
    }

    /// The rate for optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        let lr = self.learning_rate;
        let warmup = self.warmup_steps;
        if self.kind != LrSchedule::Constant && step < warmup {
            return lr * step as f64 / warmup.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup.min(step)) as f64 / decay_steps).min(1.0);
        match self.kind {
            LrSchedule::Constant | LrSchedule::ConstantWithWarmup => lr,
            // diffusers' linear schedule decays to zero.
            LrSchedule::Linear => lr * (1.0 - progress),
            LrSchedule::Polynomial => self.lr_end + (lr - self.lr_end) * (1.0 - progress).powf(self.power),
            LrSchedule::Cosine => self.lr_end + (lr - self.lr_end) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            LrSchedule::CosineWithRestarts => {
                if progress >= 1.0 {
                    return self.lr_end;
                }
                let cycle_progress = (self.num_cycles.max(1.0) * progress).fract();
                self.lr_end + (lr - self.lr_end) * 0.5 * (1.0 + (std::f64::consts::PI * cycle_progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: LrSchedule, warmup: u64) -> LearningRateSchedule {
        LearningRateSchedule { kind, learning_rate: 4e-6, lr_end: 4e-7, warmup_steps: warmup, total_steps: 1000, power: 1.0, num_cycles: 1.0 }
    }

    #[test]
    fn polynomial_decays_from_lr_to_lr_end() {
        let s = schedule(LrSchedule::Polynomial, 0);
        assert_eq!(s.at(0), 4e-6);
        assert!((s.at(500) - 2.2e-6).abs() < 1e-15);
        assert!((s.at(1000) - 4e-7).abs() < 1e-18);
        assert!((s.at(5000) - 4e-7).abs() < 1e-18);
    }

    #[test]
    fn warmup_ramps_linearly() {
        let s = schedule(LrSchedule::ConstantWithWarmup, 100);
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(50) - 2e-6).abs() < 1e-18);
        assert_eq!(s.at(100), 4e-6);
        assert_eq!(s.at(999), 4e-6);
    }

    #[test]
    fn cosine_ends_at_lr_end() {
        let s = schedule(LrSchedule::Cosine, 0);
        assert!((s.at(500) - 2.2e-6).abs() < 1e-15);
        assert!((s.at(1000) - 4e-7).abs() < 1e-18);
    }
}
