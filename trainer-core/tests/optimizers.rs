//! The optimizers' first steps equal the Python libraries' (torch's AdamW,
//! prodigyopt's Prodigy, torch's Adafactor), from vectors made by
//! scripts/make_optimizer_vectors.py: the same problem (four parameters
//! shaped like a linear weight, a conv kernel, a bias and a zero LoRA `up`),
//! the same global-norm clip and a learning rate that changes every step.
//! Saving the state after a few steps and loading it into a fresh
//! optimizer continues the run bit for bit.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;
use trainer_core::block_on;
use trainer_core::config::optimizer::{AdafactorSettings, ProdigySettings};
use trainer_core::train::optimizer::{trainable_on, AdamWSettings, Optimizer, Rule};

#[derive(Module, Debug)]
struct Weight2 {
    weight: Param<Tensor<2>>,
}

#[derive(Module, Debug)]
struct Weight4 {
    weight: Param<Tensor<4>>,
}

#[derive(Module, Debug)]
struct Bias {
    bias: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
struct Up {
    up: Param<Tensor<2>>,
}

/// Keys `linear.weight`, `conv.weight`, `norm.bias`, `lora.up`, as in the vectors.
#[derive(Module, Debug)]
struct Toy {
    linear: Weight2,
    conv: Weight4,
    norm: Bias,
    lora: Up,
}

#[derive(Deserialize)]
struct Step {
    lr: f64,
    grad_norm: f64,
    params: BTreeMap<String, Vec<f64>>,
    d: Option<f64>,
}

#[derive(Deserialize)]
struct Vectors {
    settings: serde_json::Map<String, serde_json::Value>,
    max_grad_norm: f64,
    shapes: BTreeMap<String, Vec<usize>>,
    initial: BTreeMap<String, Vec<f64>>,
    target: BTreeMap<String, Vec<f64>>,
    weight: BTreeMap<String, Vec<f64>>,
    steps: Vec<Step>,
}

fn vectors(case: &str) -> Vectors {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optimizers").join(format!("{case}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn tensor<const D: usize>(values: &[f64], shape: &[usize], device: &Device) -> Tensor<D> {
    let values: Vec<f32> = values.iter().map(|v| *v as f32).collect();
    Tensor::from_data(TensorData::new(values, shape.to_vec()), device)
}

fn toy(v: &Vectors, train_device: &Device) -> Toy {
    toy_from(v, &v.initial, train_device)
}

/// The problem's parameters with the given values.
fn toy_from(v: &Vectors, values: &BTreeMap<String, Vec<f64>>, train_device: &Device) -> Toy {
    let device = train_device.clone().without_autodiff();
    let p = |name: &str| (&values[name][..], &v.shapes[name][..]);
    Toy {
        linear: Weight2 { weight: Param::from_tensor(trainable_on(tensor(p("linear.weight").0, p("linear.weight").1, &device), train_device)) },
        conv: Weight4 { weight: Param::from_tensor(trainable_on(tensor(p("conv.weight").0, p("conv.weight").1, &device), train_device)) },
        norm: Bias { bias: Param::from_tensor(trainable_on(tensor(p("norm.bias").0, p("norm.bias").1, &device), train_device)) },
        lora: Up { up: Param::from_tensor(trainable_on(tensor(p("lora.up").0, p("lora.up").1, &device), train_device)) },
    }
}

/// sum(weight * (p - target)^2) / 2 + 10 sum(p^3) over the four parameters.
fn loss(toy: &Toy, v: &Vectors, train_device: &Device) -> Tensor<1> {
    let device = train_device.clone().without_autodiff();
    let term = |p: Tensor<1>, name: &str| {
        let n = p.dims()[0];
        let target = trainable_on(tensor::<1>(&v.target[name], &[n], &device), train_device).detach();
        let weight = trainable_on(tensor::<1>(&v.weight[name], &[n], &device), train_device).detach();
        (weight * (p.clone() - target).square()).sum() / 2.0 + p.powi_scalar(3).sum() * 10.0
    };
    let flat = |p: Tensor<2>| {
        let n = p.shape().num_elements();
        p.reshape([n])
    };
    let conv = toy.conv.weight.val();
    let conv_count = conv.shape().num_elements();
    term(flat(toy.linear.weight.val()), "linear.weight")
        + term(conv.reshape([conv_count]), "conv.weight")
        + term(toy.norm.bias.val(), "norm.bias")
        + term(flat(toy.lora.up.val()), "lora.up")
}

fn values_of(toy: &Toy) -> BTreeMap<String, Vec<f64>> {
    let read = |t: Tensor<1>| t.without_autodiff().into_data().convert::<f64>().try_into_vec::<f64>().unwrap();
    let flat2 = |p: Tensor<2>| {
        let n = p.shape().num_elements();
        p.reshape([n])
    };
    let conv = toy.conv.weight.val();
    let n = conv.shape().num_elements();
    BTreeMap::from([
        ("linear.weight".to_string(), read(flat2(toy.linear.weight.val()))),
        ("conv.weight".to_string(), read(conv.reshape([n]))),
        ("norm.bias".to_string(), read(toy.norm.bias.val())),
        ("lora.up".to_string(), read(flat2(toy.lora.up.val()))),
    ])
}

fn number(settings: &serde_json::Map<String, serde_json::Value>, key: &str) -> f64 {
    settings[key].as_f64().unwrap_or_else(|| panic!("setting {key}"))
}

fn rule(case: &str, v: &Vectors) -> Rule {
    let s = &v.settings;
    let flag = |key: &str| s[key].as_bool().unwrap();
    if case.starts_with("adamw") {
        Rule::AdamW(AdamWSettings {
            beta1: s["betas"][0].as_f64().unwrap(),
            beta2: s["betas"][1].as_f64().unwrap(),
            epsilon: number(s, "eps"),
            weight_decay: number(s, "weight_decay"),
            bf16: false,
        })
    } else if case.starts_with("prodigy") {
        let defaults = ProdigySettings::default();
        Rule::Prodigy(ProdigySettings {
            beta1: s["betas"][0].as_f64().unwrap(),
            beta2: s["betas"][1].as_f64().unwrap(),
            beta3: None,
            epsilon: number(s, "eps"),
            weight_decay: number(s, "weight_decay"),
            decouple: flag("decouple"),
            use_bias_correction: flag("use_bias_correction"),
            safeguard_warmup: flag("safeguard_warmup"),
            d0: s.get("d0").and_then(|d| d.as_f64()).unwrap_or(1e-6),
            d_coef: number(s, "d_coef"),
            growth_rate: s.get("growth_rate").and_then(|g| g.as_f64()).unwrap_or(f64::INFINITY),
            prodigy_steps: defaults.prodigy_steps,
        })
    } else {
        Rule::Adafactor(AdafactorSettings {
            beta2_decay: number(s, "beta2_decay"),
            epsilon1: s["eps"][0].as_f64().unwrap(),
            epsilon2: s["eps"][1].as_f64().unwrap(),
            clip_threshold: number(s, "d"),
            weight_decay: number(s, "weight_decay"),
        })
    }
}

/// One step of the test problem; returns the gradient norm.
fn step(optimizer: &mut Optimizer, toy: Toy, v: &Vectors, lr: f64, train_device: &Device) -> (Toy, f32) {
    let loss = loss(&toy, v, train_device);
    optimizer.accumulate(&toy, "", &mut loss.backward(), 1.0);
    let (toy, norm) = block_on(optimizer.step(toy, lr, train_device)).unwrap();
    (toy, norm.unwrap().into_scalar::<f32>())
}

/// Runs `case` and compares every step's parameters with the reference:
/// each parameter's change from its initial value, relative to its largest
/// change (the changes are what an optimizer computes; Prodigy's first
/// ones are about 1e-6 of weights about 0.05).
fn check_against_reference(case: &str, tolerance: f64) {
    let v = vectors(case);
    let train_device = Device::flex().autodiff();
    let mut toy = toy(&v, &train_device);
    let mut optimizer = Optimizer::new(rule(case, &v), v.max_grad_norm);
    for (i, expected) in v.steps.iter().enumerate() {
        let (next, norm) = step(&mut optimizer, toy, &v, expected.lr, &train_device);
        toy = next;
        assert!(
            ((norm as f64 - expected.grad_norm) / expected.grad_norm).abs() < 1e-5,
            "{case} step {}: gradient norm {norm} vs {}",
            i + 1,
            expected.grad_norm
        );
        if let Some(d) = expected.d {
            let ours = optimizer.prodigy_d().unwrap();
            assert!(((ours - d) / d).abs() < tolerance, "{case} step {}: Prodigy's d is {ours}, prodigyopt's {d}", i + 1);
        }
        for (name, ours) in values_of(&toy) {
            let (initial, theirs) = (&v.initial[&name], &expected.params[&name]);
            let scale = theirs.iter().zip(initial).fold(0f64, |m, (t, i)| m.max((t - i).abs()));
            let error = ours.iter().zip(theirs).fold(0f64, |m, (o, t)| m.max((o - t).abs()));
            assert!(scale > 0.0, "{case} step {}: {name} did not move in the reference", i + 1);
            assert!(error <= tolerance * scale, "{case} step {}: {name} differs by {error:.3e}, {:.2e} of its change {scale:.3e}", i + 1, error / scale);
        }
    }
}

#[test]
fn adamw_matches_torch() {
    check_against_reference("adamw", 1e-4);
}

#[test]
fn prodigy_matches_prodigyopt() {
    check_against_reference("prodigy", 2e-3);
    check_against_reference("prodigy_bias_correction_safeguard_decay", 2e-3);
}

#[test]
fn adafactor_matches_torch() {
    check_against_reference("adafactor", 1e-4);
    check_against_reference("adafactor_decay_clip", 1e-4);
}

/// Saving the state after three steps and loading it into a new optimizer
/// (as resuming a checkpoint does) gives the same next steps, bit for bit.
#[test]
fn every_optimizer_resumes_exactly_from_saved_state() {
    for case in ["adamw", "prodigy_bias_correction_safeguard_decay", "adafactor_decay_clip"] {
        let v = vectors(case);
        let train_device = Device::flex().autodiff();
        let device = train_device.clone().without_autodiff();
        let mut toy = toy(&v, &train_device);
        let mut optimizer = Optimizer::new(rule(case, &v), v.max_grad_norm);
        for expected in &v.steps[..3] {
            toy = step(&mut optimizer, toy, &v, expected.lr, &train_device).0;
        }
        let saved_state = block_on(optimizer.state()).unwrap();
        let saved_scalars = optimizer.scalars();
        let saved_values = values_of(&toy);
        let mut resumed = Optimizer::new(rule(case, &v), v.max_grad_norm);
        resumed.load_state(&saved_state, &saved_scalars, optimizer.steps, &device).unwrap();
        // The resumed run starts from the saved weights.
        let mut other = toy_from(&v, &saved_values, &train_device);
        for expected in &v.steps[3..] {
            toy = step(&mut optimizer, toy, &v, expected.lr, &train_device).0;
            other = step(&mut resumed, other, &v, expected.lr, &train_device).0;
            assert_eq!(values_of(&toy), values_of(&other), "{case}: the resumed optimizer takes the same steps");
        }
        assert_eq!(optimizer.prodigy_d(), resumed.prodigy_d());
    }
}

/// State saved by another optimizer is refused with the tensor's name.
#[test]
fn state_of_another_optimizer_is_refused_by_name() {
    let v = vectors("adamw");
    let train_device = Device::flex().autodiff();
    let toy = toy(&v, &train_device);
    let mut adamw = Optimizer::new(rule("adamw", &v), 1.0);
    step(&mut adamw, toy, &v, 1e-3, &train_device);
    let state = block_on(adamw.state()).unwrap();
    let a = vectors("adafactor");
    let mut adafactor = Optimizer::new(rule("adafactor", &a), 1.0);
    let error = adafactor.load_state(&state, &BTreeMap::new(), 1, &Device::flex()).unwrap_err().to_string();
    assert!(error.contains("conv.weight.exp_avg") && error.contains("adafactor"), "{error}");
}
