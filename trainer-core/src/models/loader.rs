//! Builds model modules from checkpoint tensors, by name.
//!
//! Model code asks the loader for each tensor under its diffusers name and
//! the shape the model config implies; the loader finds it in the files
//! (through a renaming for single-file checkpoints), checks the shape and
//! collects every problem (missing, mis-shaped, unexpected tensors) so one
//! error lists them all. In dry-run mode nothing is read: the loader only
//! records the names and shapes the model needs, which is how
//! [`expected_keys`](super) lists a real model's tensors without allocating it.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Param, ParamId};
use burn::nn::{GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig};
use burn::tensor::{DType, Device, Tensor, TensorData};

use sha2::{Digest, Sha256};

use super::layers::{Conv2d, Embedding, Linear};
use super::lora::{LoraConv2d, LoraLinear};
use super::safetensors_file::SafetensorsFile;
use crate::error::{Error, Result};

/// Maps a model tensor name (diffusers layout) to its name in the file.
pub type Rename<'a> = Box<dyn Fn(&str) -> String + 'a>;

/// The checkpoint name of each loaded parameter (diffusers naming), by the
/// parameter's id, so trained weights can be saved under the names they
/// were loaded from. `transposed`: burn stores Linear weights as [in, out].
pub type ParamNames = std::collections::HashMap<ParamId, (String, bool)>;

/// Named tensors: a safetensors file, or a view that renames or splits the
/// tensors of one (OpenCLIP's packed q/k/v).
pub trait TensorSource {
    fn path(&self) -> &str;
    fn tensor_names(&self) -> Vec<String>;
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    fn values(&self, name: &str) -> Result<Vec<f32>>;
}

impl TensorSource for SafetensorsFile {
    fn path(&self) -> &str {
        &self.path
    }

    fn tensor_names(&self) -> Vec<String> {
        self.names().map(str::to_string).collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|i| i.shape.clone())
    }

    fn values(&self, name: &str) -> Result<Vec<f32>> {
        self.to_f32(name)
    }
}

pub struct Loader<'a> {
    files: Vec<&'a dyn TensorSource>,
    /// Which file holds each tensor name.
    index: BTreeMap<String, usize>,
    rename: Rename<'a>,
    pub device: Device,
    dry_run: bool,
    /// Fill every tensor with seeded random values instead of reading files
    /// (benchmarks and tests of untrained shapes).
    random: Option<crate::rng::SeededRng>,
    /// Model name -> shape, in request order.
    pub requested: Vec<(String, Vec<usize>)>,
    used: BTreeSet<String>,
    problems: Vec<String>,
    /// Names, shapes and a sample of the values of everything loaded: the
    /// component's identity for cache keys.
    fingerprint: Sha256,
    /// Checkpoint name of every parameter made.
    pub names: ParamNames,
    /// Storage dtype of weight matrices and kernels (rank 2 and up); norms
    /// and biases stay f32. See [`super::layers`].
    weight_dtype: DType,
    /// The key segments of the current [`Scope`].
    scope: Vec<String>,
}

/// The loader under one more key segment, as candle's `vb.pp(name)`:
/// names asked of it are relative to the scope, which ends when this is
/// dropped. Derefs to the [`Loader`], so scopes nest:
/// `ResnetBlock2D::load(&mut loader.pp("resnets").pp(j), ..)`.
pub struct Scope<'l, 'a> {
    loader: &'l mut Loader<'a>,
}

impl<'a> std::ops::Deref for Scope<'_, 'a> {
    type Target = Loader<'a>;
    fn deref(&self) -> &Loader<'a> {
        self.loader
    }
}

impl<'a> std::ops::DerefMut for Scope<'_, 'a> {
    fn deref_mut(&mut self) -> &mut Loader<'a> {
        self.loader
    }
}

impl Drop for Scope<'_, '_> {
    fn drop(&mut self) {
        self.loader.scope.pop();
    }
}

impl<'a> Loader<'a> {
    pub fn new(files: Vec<&'a dyn TensorSource>, rename: Rename<'a>, device: Device) -> Self {
        let mut index = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            for name in file.tensor_names() {
                index.insert(name, i);
            }
        }
        Self {
            files,
            index,
            rename,
            device,
            dry_run: false,
            random: None,
            requested: Vec::new(),
            used: BTreeSet::new(),
            problems: Vec::new(),
            fingerprint: Sha256::new(),
            names: ParamNames::new(),
            weight_dtype: DType::F32,
            scope: Vec::new(),
        }
    }

    /// Names under `segment` (a field or a list index) until the returned
    /// scope is dropped.
    pub fn pp(&mut self, segment: impl std::fmt::Display) -> Scope<'_, 'a> {
        self.scope.push(segment.to_string());
        Scope { loader: self }
    }

    /// The full key of `name` in the current scope.
    pub fn key(&self, name: &str) -> String {
        match self.scope.is_empty() {
            true => name.to_string(),
            false => format!("{}.{name}", self.scope.join(".")),
        }
    }

    /// A loader that reads nothing and records what the model needs.
    pub fn dry_run(device: Device) -> Self {
        let mut loader = Self::new(Vec::new(), Box::new(|name| name.to_string()), device);
        loader.dry_run = true;
        loader
    }

    /// A loader that makes every tensor up: normal values with standard
    /// deviation 0.02 (norm weights 1), from a seed.
    pub fn random(seed: u64, device: Device) -> Self {
        let mut loader = Self::new(Vec::new(), Box::new(|name| name.to_string()), device);
        loader.random = Some(crate::rng::SeededRng::new(seed));
        loader
    }

    /// Stores weight matrices and kernels in `dtype` (f16 for frozen base
    /// weights). Changes the fingerprint, so caches made with other weights'
    /// precision are not reused.
    pub fn with_weight_dtype(mut self, dtype: DType) -> Self {
        if dtype != DType::F32 {
            self.fingerprint.update(format!("weights stored as {dtype:?}").as_bytes());
        }
        self.weight_dtype = dtype;
        self
    }

    fn describe_files(&self) -> String {
        self.files.iter().map(|f| f.path()).collect::<Vec<_>>().join(", ")
    }

    /// Values of one tensor, shape-checked. `None` (and a recorded problem)
    /// when missing or mis-shaped.
    fn values(&mut self, name: &str, shape: &[usize]) -> Option<Vec<f32>> {
        self.requested.push((name.to_string(), shape.to_vec()));
        if self.dry_run {
            return None;
        }
        if let Some(rng) = &mut self.random {
            let count: usize = shape.iter().product();
            let is_norm_scale = shape.len() == 1 && name.ends_with(".weight");
            let values: Vec<f32> = (0..count)
                .map(|_| {
                    let (u1, u2) = (rng.next_f64().max(f64::MIN_POSITIVE), rng.next_f64());
                    let normal = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                    (if is_norm_scale { 1.0 + 0.02 * normal } else { 0.02 * normal }) as f32
                })
                .collect();
            self.add_to_fingerprint(name, shape, &values);
            return Some(values);
        }
        let file_name = (self.rename)(name);
        let Some(&file_index) = self.index.get(file_name.as_str()) else {
            let shown = if file_name == name { format!("'{name}'") } else { format!("'{file_name}' (model tensor '{name}')") };
            self.problems.push(format!("missing tensor {shown}, shape {shape:?}"));
            return None;
        };
        let file = self.files[file_index];
        let stored = file.shape(&file_name).expect("indexed");
        let same = stored == shape;
        // 1x1 convolutions stored where a linear layer is expected, and the reverse.
        let squeezable =
            stored.iter().filter(|d| **d != 1).eq(shape.iter().filter(|d| **d != 1)) && stored.iter().product::<usize>() == shape.iter().product::<usize>();
        if !same && !squeezable {
            self.problems.push(format!("tensor '{file_name}' has shape {stored:?} but the model config needs {shape:?}"));
            self.used.insert(file_name);
            return None;
        }
        self.used.insert(file_name.clone());
        match file.values(&file_name) {
            Ok(values) => {
                self.add_to_fingerprint(name, shape, &values);
                Some(values)
            }
            Err(error) => {
                self.problems.push(error.to_string());
                None
            }
        }
    }

    /// Hashing every value of a multi-GB model would take seconds; a strided
    /// sample (plus names and shapes) changes whenever the weights do.
    fn add_to_fingerprint(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        self.fingerprint.update(name.as_bytes());
        self.fingerprint.update(format!("{shape:?}").as_bytes());
        for value in values.iter().step_by(251).chain(values.last()) {
            self.fingerprint.update(value.to_le_bytes());
        }
    }

    /// The identity of what was loaded so far (hex SHA-256).
    pub fn fingerprint(&self) -> String {
        hex(&self.fingerprint.clone().finalize())
    }

    /// A tensor of the given shape, named `name` in the current scope.
    pub fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Tensor<D> {
        let key = self.key(name);
        self.tensor_at(&key, shape)
    }

    fn tensor_at<const D: usize>(&mut self, key: &str, shape: [usize; D]) -> Tensor<D> {
        match self.values(key, &shape) {
            Some(values) => {
                let dtype = if D >= 2 { self.weight_dtype } else { DType::F32 };
                Tensor::from_data(TensorData::new(values, shape), (&self.device, dtype))
            }
            // Placeholder: dry runs never compute, and failed loads end in an error.
            None => Tensor::zeros([0; D], &self.device),
        }
    }

    /// A parameter named `name` in the current scope.
    pub fn param<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Param<Tensor<D>> {
        let key = self.key(name);
        let param = Param::from_tensor(self.tensor_at(&key, shape));
        self.names.insert(param.id, (key, false));
        param
    }

    /// `nn.Linear` `name` (PyTorch stores the weight as [out, in]; burn as [in, out]).
    pub fn linear(&mut self, name: &str, d_in: usize, d_out: usize, bias: bool) -> Linear {
        let mut layer = self.pp(name);
        let key = layer.key("weight");
        let weight = Param::from_tensor(layer.tensor_at(&key, [d_out, d_in]).transpose());
        layer.names.insert(weight.id, (key, true));
        Linear { weight, bias: bias.then(|| layer.param("bias", [d_out])) }
    }

    /// A Linear layer that can take a LoRA adapter, which is named by the
    /// layer's key.
    pub fn lora_linear(&mut self, name: &str, d_in: usize, d_out: usize, bias: bool) -> LoraLinear {
        let key = self.key(name);
        LoraLinear::new(self.linear(name, d_in, d_out, bias), key)
    }

    pub fn conv2d(&mut self, name: &str, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize) -> Conv2d {
        let mut layer = self.pp(name);
        Conv2d { weight: layer.param("weight", [c_out, c_in, kernel, kernel]), bias: Some(layer.param("bias", [c_out])), stride, padding }
    }

    /// A convolution that can take a LoCon adapter, named by the layer's key.
    pub fn lora_conv2d(&mut self, name: &str, c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize) -> LoraConv2d {
        let key = self.key(name);
        LoraConv2d::new(self.conv2d(name, c_in, c_out, kernel, stride, padding), key)
    }

    pub fn group_norm(&mut self, name: &str, groups: usize, channels: usize, epsilon: f64) -> GroupNorm {
        let mut norm = GroupNormConfig::new(groups, channels).with_epsilon(epsilon).init(&self.device);
        let mut layer = self.pp(name);
        norm.gamma = Some(layer.param("weight", [channels]));
        norm.beta = Some(layer.param("bias", [channels]));
        norm
    }

    pub fn layer_norm(&mut self, name: &str, dim: usize, epsilon: f64) -> LayerNorm {
        let mut norm = LayerNormConfig::new(dim).with_epsilon(epsilon).init(&self.device);
        let mut layer = self.pp(name);
        norm.gamma = layer.param("weight", [dim]);
        norm.beta = Some(layer.param("bias", [dim]));
        norm
    }

    /// `nn.Embedding` `name` (its table is `name.weight`).
    pub fn embedding(&mut self, name: &str, count: usize, dim: usize) -> Embedding {
        Embedding { weight: self.pp(name).param("weight", [count, dim]) }
    }

    /// Tensors in the files that nothing used, except those `ignore` accepts.
    pub fn unused(&self, ignore: &dyn Fn(&str) -> bool) -> Vec<String> {
        self.index.keys().filter(|name| !self.used.contains(*name) && !ignore(name)).cloned().collect()
    }

    /// Ends loading: every missing, mis-shaped and unexpected tensor in one error.
    pub fn finish(self, what: &str, ignore: &dyn Fn(&str) -> bool) -> Result<()> {
        let mut problems = self.problems.clone();
        let unused = self.unused(ignore);
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(8).map(String::as_str).collect();
            problems.push(format!(
                "{} unexpected tensor(s) for this model config: {}{}",
                unused.len(),
                shown.join(", "),
                if unused.len() > 8 { ", ..." } else { "" }
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Error::Config { source_name: format!("{what} ({})", self.describe_files()), problems })
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
