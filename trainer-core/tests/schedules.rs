//! The noise schedules a scheduler config can name, against diffusers'
//! own (reference vectors from scripts/make_schedule_vectors.py), and the
//! config values that are refused.

mod common;

use common::*;
use trainer_core::models::config::{parse, SchedulerConfig};
use trainer_core::schedulers::{alphas_cumprod, SamplerKind, Scheduler};

fn vectors(schedule: &str) -> serde_json::Value {
    let path = format!("{}/tests/fixtures/schedules/{schedule}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// diffusers keeps betas and ᾱ in f32 (its cumulative product over 1000
/// steps drifts by about 1e-6 relative); ours are f64.
const TOLERANCE: f64 = 1e-4;
/// σ = sqrt((1 − ᾱ) / ᾱ): near t = 0, where ᾱ is within 5e-5 of 1 under
/// the cosine schedule, 1 − ᾱ keeps only about three digits in f32.
const SIGMA_TOLERANCE: f64 = 1e-3;

fn relative(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-30)
}

#[test]
fn every_beta_schedule_matches_diffusers() {
    for schedule in ["linear", "scaled_linear", "squaredcos_cap_v2"] {
        let reference = vectors(schedule);
        let mut config: SchedulerConfig = serde_json::from_value(reference["config"].clone()).unwrap();
        let alphas = alphas_cumprod(&config);
        for (index, want) in reference["alphas_cumprod"].as_object().unwrap() {
            let got = alphas[index.parse::<usize>().unwrap()];
            let want = want.as_f64().unwrap();
            assert!(relative(got, want) < TOLERANCE, "{schedule}: alphas_cumprod[{index}] = {got}, diffusers {want}");
        }
        config.steps_offset = 1;
        let ddim = Scheduler::new(SamplerKind::Ddim, &config, 10).unwrap();
        let want: Vec<f64> = reference["ddim_timesteps"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap()).collect();
        assert_eq!(ddim.timesteps, want, "{schedule}: DDIM timesteps");
        let euler = Scheduler::new(SamplerKind::Euler, &config, 10).unwrap();
        let want: Vec<f64> = reference["euler_sigmas"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect();
        assert_eq!(euler.sigmas.len(), want.len());
        for (got, want) in euler.sigmas.iter().zip(&want) {
            assert!(
                *want == 0.0 && *got == 0.0 || relative(*got, *want) < SIGMA_TOLERANCE,
                "{schedule}: Euler sigmas {:?} vs diffusers {want:?}",
                euler.sigmas
            );
        }
    }
}

#[test]
fn unknown_scheduler_values_are_refused_with_the_accepted_ones() {
    let cases = [
        (r#"{"beta_schedule": "cosine"}"#, "'beta_schedule' is 'cosine', which is not one of: linear, scaled_linear, squaredcos_cap_v2"),
        (r#"{"timestep_spacing": "even"}"#, "'timestep_spacing' is 'even', which is not one of: leading, trailing, linspace"),
        (r#"{"prediction_type": "flow"}"#, "'prediction_type' is 'flow', which is not one of: epsilon, v_prediction, sample"),
        (r#"{"rescale_betas_zero_snr": true}"#, "'rescale_betas_zero_snr' is true: zero-terminal-SNR schedules are not supported yet"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, "'trained_betas' is set"),
    ];
    // What SD's own configs hold parses.
    assert!(parse::<SchedulerConfig>(r#"{"rescale_betas_zero_snr": false, "trained_betas": null}"#, "x").is_ok());
    for (json, needle) in cases {
        let message = error_text(parse::<SchedulerConfig>(json, "model/scheduler/scheduler_config.json"));
        assert!(message.contains("model/scheduler/scheduler_config.json") && message.contains(needle), "{json} -> {message}");
    }
}
