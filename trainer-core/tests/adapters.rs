//! Adapter variants against their reference libraries: a DoRA layer's
//! output, the gradients of a loss through it and its merged weight equal
//! PEFT's `use_dora=True` (scripts/make_dora_vectors.py); LoKr and LoCon
//! layers equal LyCORIS's modules (scripts/make_lokr_vectors.py,
//! scripts/make_locon_vectors.py). Float64 there, f32 here: relative
//! tolerance 1e-5 of each tensor's largest value.

use std::path::PathBuf;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use serde::Deserialize;
use trainer_core::models::layers::Linear;
use trainer_core::models::lora::{LoraAdapter, LoraLinear};
use trainer_core::train::export::dora_decompose;
use trainer_core::train::tensor_file::HostTensor;

#[derive(Deserialize)]
struct Shapes {
    #[serde(rename = "in")]
    input: usize,
    out: usize,
    rank: usize,
    batch: usize,
}

#[derive(Deserialize)]
struct DoraVectors {
    scaling: f64,
    weight: Vec<f64>,
    bias: Vec<f64>,
    #[serde(rename = "lora_A")]
    lora_a: Vec<f64>,
    #[serde(rename = "lora_B")]
    lora_b: Vec<f64>,
    magnitude: Vec<f64>,
    x: Vec<f64>,
    upstream: Vec<f64>,
    y: Vec<f64>,
    #[serde(rename = "grad_lora_A")]
    grad_lora_a: Vec<f64>,
    #[serde(rename = "grad_lora_B")]
    grad_lora_b: Vec<f64>,
    grad_magnitude: Vec<f64>,
    merged_weight: Vec<f64>,
    shapes: Shapes,
}

fn tensor<const D: usize>(values: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.iter().map(|v| *v as f32).collect::<Vec<f32>>(), shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_into_vec::<f64>().unwrap()
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let error = got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(error <= 1e-5 * scale, "{what}: differs from the reference by {error:.3e} (largest value {scale:.3e})");
}

#[test]
fn dora_matches_peft_forward_gradients_and_merge() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/dora.json");
    let v: DoraVectors = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let Shapes { input, out, rank, batch } = v.shapes;
    let device = Device::flex().autodiff();
    // PEFT keeps [out, in] weights; burn's layout is [in, out].
    let weight = tensor::<2>(&v.weight, [out, input], &device).transpose();
    let base = Linear { weight: Param::from_tensor(weight.clone()), bias: Some(Param::from_tensor(tensor(&v.bias, [out], &device))) };
    let mut layer = LoraLinear::new(base, "proj".into());
    let down = tensor::<2>(&v.lora_a, [rank, input], &device).transpose();
    let up = tensor::<2>(&v.lora_b, [out, rank], &device).transpose();

    // A fresh DoRA adapter (up zero) starts at the base layer's output.
    layer.attach(rank, v.scaling * rank as f64, 1, None, &device);
    layer.enable_dora();
    let x = tensor::<2>(&v.x, [batch, input], &device);
    assert_close("a fresh DoRA layer's output", &values(layer.forward(x.clone())), &values(layer.base.forward(x.clone())));

    let adapter = layer.lora.as_mut().unwrap();
    adapter.down = Param::from_tensor(down.clone());
    adapter.up = Param::from_tensor(up.clone());
    adapter.magnitude = Some(Param::from_tensor(tensor(&v.magnitude, [out], &device)));
    let adapter: &LoraAdapter = layer.lora.as_ref().unwrap();
    let (down, up, magnitude) = (adapter.down.val(), adapter.up.val(), adapter.magnitude.as_ref().unwrap().val());
    let y = layer.forward(x);
    assert_close("output", &values(y.clone()), &v.y);

    // The norm is a constant for backward (PEFT detaches it): the gradients show it.
    let grads = (y * tensor::<2>(&v.upstream, [batch, out], &device)).sum().backward();
    assert_close("gradient of lora_A", &values(down.grad(&grads).unwrap().transpose()), &v.grad_lora_a);
    assert_close("gradient of lora_B", &values(up.grad(&grads).unwrap().transpose()), &v.grad_lora_b);
    assert_close("gradient of the magnitude", &values(magnitude.grad(&grads).unwrap()), &v.grad_magnitude);

    // Merging the kohya form ([out, 1] dora_scale) gives PEFT's merged weight.
    let plain = Device::flex();
    let adapted = tensor::<2>(&v.weight, [out, input], &plain).transpose()
        + tensor::<2>(&v.lora_a, [rank, input], &plain).transpose().matmul(tensor::<2>(&v.lora_b, [out, rank], &plain).transpose()) * v.scaling;
    let dora_scale = HostTensor { shape: vec![out, 1], values: v.magnitude.iter().map(|m| *m as f32).collect() };
    let merged = dora_decompose(adapted, &dora_scale, &plain).unwrap();
    assert_close("merged weight", &values(merged.transpose()), &v.merged_weight);
    let wrong = HostTensor { shape: vec![out + 1, 1], values: vec![1.0; out + 1] };
    assert!(dora_decompose(tensor::<2>(&v.weight, [input, out], &plain), &wrong, &plain).unwrap_err().contains("dora_scale has shape"));
}

#[derive(Deserialize)]
struct SavedTensor {
    shape: Vec<usize>,
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct LokrLayer {
    name: String,
    #[serde(rename = "in")]
    input: usize,
    out: usize,
    factor: i64,
    linear_dim: usize,
    linear_alpha: i64,
    full_matrix: bool,
    weight: Vec<f64>,
    bias: Vec<f64>,
    saved_keys: Vec<String>,
    saved_alpha: f64,
    parameters: std::collections::BTreeMap<String, SavedTensor>,
    x: Vec<f64>,
    y: Vec<f64>,
}

#[derive(Deserialize)]
struct Factorization {
    dimension: usize,
    factor: i64,
    result: (usize, usize),
}

#[derive(Deserialize)]
struct LokrVectors {
    layers: Vec<LokrLayer>,
    factorizations: Vec<Factorization>,
}

/// LoKr equals the LyCORIS library's LokrModule: the same factorisation of
/// the layer's sizes, the same factor shapes and saved names and alpha,
/// and the same output for the same factors (full factors scale 1,
/// a low-rank w2 alpha / rank).
#[test]
fn lokr_matches_lycoris() {
    use trainer_core::config::lycoris::{factorization, LycorisAlgo, LycorisSettings};
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/lokr.json");
    let v: LokrVectors = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for f in &v.factorizations {
        assert_eq!(factorization(f.dimension, f.factor), f.result, "factorization({}, {})", f.dimension, f.factor);
    }
    let device = Device::flex().autodiff();
    for case in &v.layers {
        let weight = tensor::<2>(&case.weight, [case.out, case.input], &device).transpose();
        let base = Linear { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(tensor(&case.bias, [case.out], &device))) };
        let mut layer = LoraLinear::new(base, "proj".into());
        let settings = LycorisSettings {
            algo: LycorisAlgo::Lokr,
            multiplier: 1,
            linear_dim: case.linear_dim,
            linear_alpha: case.linear_alpha,
            conv_dim: case.linear_dim,
            conv_alpha: case.linear_alpha as f64,
            full_matrix: case.full_matrix,
            targets: Vec::new(),
            source: String::new(),
        };
        layer.attach_lokr(&settings, case.factor, 1, &device);
        let x = tensor::<2>(&case.x, [3, case.input], &device);
        assert_close(&format!("{}: a fresh LoKr layer's output", case.name), &values(layer.forward(x.clone())), &values(layer.base.forward(x.clone())));
        let lokr = layer.lokr.as_mut().unwrap();
        assert_eq!(lokr.alpha, case.saved_alpha, "{}: alpha as saved", case.name);
        let ours = [("lokr_w1", Some(&mut lokr.w1)), ("lokr_w2", lokr.w2.as_mut()), ("lokr_w2_a", lokr.w2_a.as_mut()), ("lokr_w2_b", lokr.w2_b.as_mut())];
        let mut names = vec!["alpha".to_string()];
        for (name, param) in ours {
            let Some(param) = param else { continue };
            let theirs = case.parameters.get(name).unwrap_or_else(|| panic!("{}: LyCORIS has no {name}", case.name));
            assert_eq!(param.val().dims().to_vec(), theirs.shape, "{}: {name} shape", case.name);
            *param = Param::from_tensor(tensor::<2>(&theirs.values, [theirs.shape[0], theirs.shape[1]], &device));
            names.push(name.to_string());
        }
        names.sort();
        assert_eq!(names, case.saved_keys, "{}: the tensors a LyCORIS file holds for the layer", case.name);
        assert_close(&format!("{}: output", case.name), &values(layer.forward(x)), &case.y);
    }
}

#[derive(Deserialize)]
struct LoconLayer {
    name: String,
    weight_shape: Vec<usize>,
    stride: usize,
    padding: usize,
    weight: Vec<f64>,
    bias: Vec<f64>,
    rank: usize,
    alpha: f64,
    saved_keys: Vec<String>,
    saved_alpha: f64,
    scale: f64,
    init_bound: f64,
    parameters: std::collections::BTreeMap<String, SavedTensor>,
    x_shape: Vec<usize>,
    x: Vec<f64>,
    y: Vec<f64>,
}

#[derive(Deserialize)]
struct LoconVectors {
    layers: Vec<LoconLayer>,
}

/// LoCon equals the LyCORIS library's LoConModule on convolutions (3x3,
/// 3x3 with stride 2, 1x1) and on a Linear layer: the same pair shapes and
/// saved names, alpha (0 meaning the rank) and scale, a down weight drawn
/// within kaiming-uniform's bound with the up weight zero (so a fresh
/// adapter changes nothing), and the same output for the same pair; the
/// weight change it exports (`delta`) gives that output when folded in.
#[test]
fn locon_matches_lycoris() {
    use trainer_core::config::lycoris::{LycorisAlgo, LycorisSettings};
    use trainer_core::models::layers::Conv2d;
    use trainer_core::models::lora::LoraConv2d;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/locon.json");
    let v: LoconVectors = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let device = Device::flex().autodiff();
    let shape4 = |s: &[usize]| -> [usize; 4] { s.try_into().unwrap() };
    for case in &v.layers {
        let kernel = if case.weight_shape.len() == 4 { case.weight_shape[2] } else { 1 };
        let settings = LycorisSettings {
            algo: LycorisAlgo::Locon,
            multiplier: 1,
            linear_dim: case.rank,
            linear_alpha: case.alpha as i64,
            conv_dim: case.rank,
            conv_alpha: case.alpha,
            full_matrix: false,
            targets: Vec::new(),
            source: String::new(),
        };
        let (rank, alpha) = settings.locon_rank_alpha(kernel);
        assert_eq!((rank, alpha), (case.rank, case.saved_alpha), "{}: rank and alpha as saved", case.name);
        let bias = Some(Param::from_tensor(tensor(&case.bias, [case.bias.len()], &device)));
        let (down_name, up_name) = ("lora_down.weight", "lora_up.weight");
        let (theirs_down, theirs_up) = (&case.parameters[down_name], &case.parameters[up_name]);
        let mut names = vec!["alpha".to_string(), down_name.to_string(), up_name.to_string()];
        names.sort();
        assert_eq!(names, case.saved_keys, "{}: the tensors a LyCORIS file holds for the layer", case.name);
        if case.weight_shape.len() == 2 {
            // Linear layers take the plain LoRA adapter, in burn's [in, out] layout.
            let [out, input] = [case.weight_shape[0], case.weight_shape[1]];
            let base = Linear { weight: Param::from_tensor(tensor::<2>(&case.weight, [out, input], &device).transpose()), bias };
            let mut layer = LoraLinear::new(base, "linear".into());
            layer.attach(rank, alpha, 1, None, &device);
            let lora = layer.lora.as_mut().unwrap();
            assert_eq!(lora.scale(), case.scale, "{}: scale", case.name);
            assert_eq!([lora.down.val().dims()[1], lora.down.val().dims()[0]].to_vec(), theirs_down.shape, "{}: lora_down shape", case.name);
            lora.down = Param::from_tensor(tensor::<2>(&theirs_down.values, [rank, input], &device).transpose());
            lora.up = Param::from_tensor(tensor::<2>(&theirs_up.values, [out, rank], &device).transpose());
            let x = tensor::<2>(&case.x, [case.x_shape[0], case.x_shape[1]], &device);
            assert_close(&format!("{}: output", case.name), &values(layer.forward(x)), &case.y);
            continue;
        }
        let weight = tensor::<4>(&case.weight, shape4(&case.weight_shape), &device);
        let base = Conv2d { weight: Param::from_tensor(weight), bias, stride: case.stride, padding: case.padding };
        let mut layer = LoraConv2d::new(base, "conv".into());
        layer.attach(rank, alpha, 1, &device);
        let x = tensor::<4>(&case.x, shape4(&case.x_shape), &device);
        assert_close(&format!("{}: a fresh LoCon layer's output", case.name), &values(layer.forward(x.clone())), &values(layer.base.forward(x.clone())));
        let lora = layer.lora.as_mut().unwrap();
        assert_eq!(lora.scale(), case.scale, "{}: scale", case.name);
        let fresh: Vec<f64> = values(lora.down.val());
        let largest = fresh.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(largest <= case.init_bound && largest > 0.8 * case.init_bound, "{}: down drawn within ±{} (largest {largest})", case.name, case.init_bound);
        assert!(values(lora.up.val()).iter().all(|v| *v == 0.0), "{}: up starts at zero", case.name);
        assert_eq!(lora.down.val().dims().to_vec(), theirs_down.shape, "{}: lora_down shape", case.name);
        assert_eq!(lora.up.val().dims().to_vec(), theirs_up.shape, "{}: lora_up shape", case.name);
        lora.down = Param::from_tensor(tensor::<4>(&theirs_down.values, shape4(&theirs_down.shape), &device));
        lora.up = Param::from_tensor(tensor::<4>(&theirs_up.values, shape4(&theirs_up.shape), &device));
        assert_close(&format!("{}: output", case.name), &values(layer.forward(x.clone())), &case.y);
        let delta = layer.lora.as_ref().unwrap().delta();
        let folded = Conv2d {
            weight: Param::from_tensor((layer.base.weight.val() + delta).detach()),
            bias: layer.base.bias.clone(),
            stride: case.stride,
            padding: case.padding,
        };
        assert_close(&format!("{}: output with the change folded in", case.name), &values(folded.forward(x)), &case.y);
    }
}
