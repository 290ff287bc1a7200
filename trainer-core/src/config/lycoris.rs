//! SimpleTuner's `lycoris_config` JSON (`lora_type` lycoris), as far as
//! Burnbooth trains it: LoKr on the UNet's Linear layers and LoCon (LoRA on
//! Linear layers and convolutions) (docs/reference.md §4, "LyCORIS").

use serde::Serialize;
use serde_json::{Map, Value};

/// The LyCORIS algorithms Burnbooth trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LycorisAlgo {
    /// Kronecker-factored weight changes (Linear layers).
    Lokr,
    /// LyCORIS's `lora`/`locon`: a low-rank pair on Linear layers and on
    /// convolutions (a `k x k` down convolution, a 1x1 up convolution).
    Locon,
}

impl LycorisAlgo {
    fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "lokr" => Some(Self::Lokr),
            "lora" | "locon" => Some(Self::Locon),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Lokr => "lokr",
            Self::Locon => "locon",
        }
    }
}

/// The layers one preset entry adapts, with its algorithm and `factor`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LycorisTarget {
    /// Ends of diffusers module paths (`to_q`, `ff.net.2`, `conv1`) or whole
    /// paths (`conv_in`).
    pub suffixes: Vec<String>,
    pub algo: LycorisAlgo,
    /// LoKr's `factor`.
    pub factor: i64,
}

impl LycorisTarget {
    fn matches(&self, path: &str) -> bool {
        self.suffixes.iter().any(|s| path == s || path.ends_with(&format!(".{s}")))
    }
}

/// A `lycoris_config` with `"algo"` `lokr`, `lora` or `locon`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LycorisSettings {
    /// The top-level `algo`; `module_algo_map` may choose another per class.
    pub algo: LycorisAlgo,
    /// `multiplier`, read as an integer as SimpleTuner reads it.
    pub multiplier: i64,
    /// `linear_dim`: LoCon's rank on Linear layers and 1x1 convolutions;
    /// LoKr's rank of `w2` when it is a low-rank pair.
    pub linear_dim: usize,
    /// `linear_alpha`, read as an integer as SimpleTuner reads it.
    pub linear_alpha: i64,
    /// `conv_dim`: LoCon's rank on convolutions wider than 1x1 (LyCORIS:
    /// `linear_dim` when missing or 0).
    pub conv_dim: usize,
    /// `conv_alpha` (LyCORIS: `linear_alpha` when missing or 0).
    pub conv_alpha: f64,
    /// `full_matrix`: LoKr's `w2` is always a full matrix.
    pub full_matrix: bool,
    /// The layers adapted, from `apply_preset`.
    pub targets: Vec<LycorisTarget>,
    /// The JSON as given, for the exported file's metadata.
    pub source: String,
}

/// The layers inside the module classes a preset can name, as ends of
/// their diffusers paths.
fn class_layers(class: &str) -> Option<&'static [&'static str]> {
    match class {
        "Attention" | "CrossAttention" => Some(&["to_q", "to_k", "to_v", "to_out.0"]),
        "FeedForward" => Some(&["ff.net.0.proj", "ff.net.2"]),
        // proj_in/proj_out are 1x1 convolutions in SD 1.x, Linear layers after.
        "Transformer2DModel" => Some(&["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]),
        "ResnetBlock2D" => Some(&["conv1", "conv2", "conv_shortcut", "time_emb_proj"]),
        "Downsample2D" => Some(&["downsamplers.0.conv"]),
        "Upsample2D" => Some(&["upsamplers.0.conv"]),
        "TimestepEmbedding" => Some(&["time_embedding.linear_1", "time_embedding.linear_2", "add_embedding.linear_1", "add_embedding.linear_2"]),
        _ => None,
    }
}

/// The classes LyCORIS's default preset ("full") adapts in an SD UNet, and
/// the layers it names outright.
const FULL_PRESET_CLASSES: [&str; 5] = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"];
const FULL_PRESET_NAMES: [&str; 2] = ["conv_in", "conv_out"];

/// Module classes whose layers include convolutions.
fn has_convolutions(class: &str) -> bool {
    matches!(class, "ResnetBlock2D" | "Downsample2D" | "Upsample2D")
}

/// Reads a lycoris_config's text. Problems come back as messages naming the key.
pub fn parse_lycoris_config(text: &str) -> Result<(LycorisSettings, Vec<String>), Vec<String>> {
    let value: Value = serde_json::from_str(text).map_err(|e| vec![format!("not valid JSON: {e}")])?;
    let Value::Object(object) = value else { return Err(vec!["must be a JSON object such as {\"algo\": \"lokr\", \"factor\": 16, ...}".into()]) };
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let number = |key: &str, default: f64, problems: &mut Vec<String>| match object.get(key) {
        None | Some(Value::Null) => default,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(default),
        Some(other) => {
            problems.push(format!("'{key}' must be a number, not {other}"));
            default
        }
    };
    let flag = |key: &str, problems: &mut Vec<String>| match object.get(key) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            problems.push(format!("'{key}' must be true or false, not {other}"));
            false
        }
    };
    let algo = match object.get("algo").and_then(Value::as_str) {
        Some(name) => LycorisAlgo::parse(name).unwrap_or_else(|| {
            problems.push(format!(
                "algo '{name}' is not supported yet; Burnbooth trains \"lokr\" and \"locon\" (\"lora\") (use lora_type standard for plain LoRA and DoRA)"
            ));
            LycorisAlgo::Lokr
        }),
        None => {
            problems.push("'algo' is missing; Burnbooth trains \"lokr\" and \"locon\"".into());
            LycorisAlgo::Lokr
        }
    };
    // SimpleTuner casts these with int().
    let multiplier = number("multiplier", 1.0, &mut problems).trunc() as i64;
    let linear_dim = number("linear_dim", 4.0, &mut problems).trunc();
    let linear_alpha = number("linear_alpha", 1.0, &mut problems).trunc() as i64;
    // LyCORIS's create_lycoris: `int(conv_dim or linear_dim)`, `float(conv_alpha or linear_alpha)`.
    let conv_dim = match number("conv_dim", 0.0, &mut problems).trunc() {
        0.0 => linear_dim,
        dim => dim,
    };
    let conv_alpha = match number("conv_alpha", 0.0, &mut problems) {
        0.0 => linear_alpha as f64,
        alpha => alpha,
    };
    let full_matrix = flag("full_matrix", &mut problems);
    let factor = number("factor", -1.0, &mut problems) as i64;
    for (key, dim) in [("linear_dim", linear_dim), ("conv_dim", conv_dim)] {
        if dim < 1.0 {
            problems.push(format!("'{key}' must be at least 1, not {dim}"));
        }
    }
    for key in ["decompose_both", "use_tucker", "use_scalar", "rs_lora", "unbalanced_factorization", "bypass_mode", "dora_wd", "train_norm"] {
        if flag(key, &mut problems) {
            problems.push(format!("'{key}' is not supported yet; remove it or set it to false"));
        }
    }
    for key in ["dropout", "rank_dropout", "module_dropout"] {
        if number(key, 0.0, &mut problems) != 0.0 {
            problems.push(format!("'{key}' is not supported yet for LyCORIS adapters; remove it or set it to 0"));
        }
    }
    let known = [
        "algo",
        "multiplier",
        "linear_dim",
        "linear_alpha",
        "factor",
        "full_matrix",
        "apply_preset",
        "conv_dim",
        "conv_alpha",
        "decompose_both",
        "use_tucker",
        "use_scalar",
        "rs_lora",
        "unbalanced_factorization",
        "bypass_mode",
        "dora_wd",
        "train_norm",
        "dropout",
        "rank_dropout",
        "module_dropout",
    ];
    for key in object.keys().filter(|k| !known.contains(&k.as_str())) {
        warnings.push(format!("lycoris_config key '{key}' is not used by Burnbooth (ignored)"));
    }
    let targets = match object.get("apply_preset") {
        None | Some(Value::Null) => full_preset(algo, factor, &mut warnings),
        Some(Value::Object(preset)) => preset_targets(preset, algo, factor, &mut problems),
        Some(other) => {
            problems.push(format!("'apply_preset' must be an object with target_module and module_algo_map, not {other}"));
            Vec::new()
        }
    };
    if targets.iter().any(|t| t.algo == LycorisAlgo::Locon) && multiplier != 1 {
        problems.push(format!("'multiplier' {multiplier}: LoCon trains with multiplier 1 only (LoKr takes others)"));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let settings = LycorisSettings {
        algo,
        multiplier,
        linear_dim: linear_dim as usize,
        linear_alpha,
        conv_dim: conv_dim as usize,
        conv_alpha,
        full_matrix,
        targets,
        source: serde_json::to_string(&object).expect("serialises"),
    };
    Ok((settings, warnings))
}

/// LyCORIS's default preset: every Linear layer and convolution of the
/// UNet's blocks. LoKr adapts the Linear ones only here.
fn full_preset(algo: LycorisAlgo, factor: i64, warnings: &mut Vec<String>) -> Vec<LycorisTarget> {
    let mut targets: Vec<LycorisTarget> = FULL_PRESET_CLASSES
        .iter()
        .map(|class| LycorisTarget { suffixes: class_layers(class).expect("known").iter().map(|s| s.to_string()).collect(), algo, factor })
        .collect();
    targets.push(LycorisTarget { suffixes: FULL_PRESET_NAMES.iter().map(|s| s.to_string()).collect(), algo, factor });
    if algo == LycorisAlgo::Lokr {
        warnings.push(
            "lycoris_config has no apply_preset: LyCORIS would adapt every Linear layer and convolution of the UNet; Burnbooth's LoKr adapts the Linear ones and leaves the convolutions as they are (use algo locon to adapt those)"
                .into(),
        );
    }
    targets
}

fn preset_targets(preset: &Map<String, Value>, algo: LycorisAlgo, factor: i64, problems: &mut Vec<String>) -> Vec<LycorisTarget> {
    for key in preset.keys().filter(|k| !["target_module", "module_algo_map", "target_name", "enable_conv"].contains(&k.as_str())) {
        problems.push(format!("'apply_preset.{key}' is not supported yet (Burnbooth reads target_module, module_algo_map, target_name and enable_conv)"));
    }
    let names = |key: &str, problems: &mut Vec<String>| -> Vec<String> {
        match preset.get(key) {
            Some(Value::Array(names)) => names.iter().filter_map(|n| n.as_str().map(str::to_string)).collect(),
            None => Vec::new(),
            Some(other) => {
                problems.push(format!("'apply_preset.{key}' must be a list of names, not {other}"));
                Vec::new()
            }
        }
    };
    let mut classes = names("target_module", problems);
    let layer_names = names("target_name", problems);
    let enable_conv = match preset.get("enable_conv") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            problems.push(format!("'apply_preset.enable_conv' must be true or false, not {other}"));
            true
        }
    };
    let empty = Map::new();
    let algo_map = preset.get("module_algo_map").and_then(Value::as_object).unwrap_or(&empty);
    for class in algo_map.keys() {
        if !classes.contains(class) {
            classes.push(class.clone());
        }
    }
    let mut targets = Vec::new();
    for class in classes {
        let Some(layers) = class_layers(&class) else {
            problems.push(format!(
                "apply_preset names module class '{class}', which Burnbooth cannot adapt yet (it adapts Attention, FeedForward, Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D and TimestepEmbedding)"
            ));
            continue;
        };
        let settings = algo_map.get(&class).and_then(Value::as_object);
        let class_factor = settings.and_then(|s| s.get("factor")).and_then(Value::as_i64).unwrap_or(factor);
        let class_algo = match settings.and_then(|s| s.get("algo")).and_then(Value::as_str) {
            None => algo,
            Some(name) => match LycorisAlgo::parse(name) {
                Some(algo) => algo,
                None => {
                    problems.push(format!("apply_preset.module_algo_map.{class}.algo '{name}' is not supported yet; Burnbooth trains lokr and locon"));
                    continue;
                }
            },
        };
        if class_algo == LycorisAlgo::Lokr && has_convolutions(&class) && enable_conv {
            problems.push(format!(
                "LoKr on the convolutions of '{class}' is not supported yet: give it \"algo\": \"locon\" in apply_preset.module_algo_map, or set \"enable_conv\": false"
            ));
            continue;
        }
        let mut suffixes: Vec<String> = layers.iter().map(|s| s.to_string()).collect();
        if !enable_conv {
            // Without convolutions a resnet keeps its time_emb_proj; samplers keep nothing.
            suffixes.retain(|s| !s.contains("conv"));
        }
        if !suffixes.is_empty() {
            targets.push(LycorisTarget { suffixes, algo: class_algo, factor: class_factor });
        }
    }
    if !layer_names.is_empty() {
        targets.push(LycorisTarget { suffixes: layer_names, algo, factor });
    }
    if targets.is_empty() && problems.is_empty() {
        problems.push("apply_preset selects no module class: name Attention and/or FeedForward (or ResnetBlock2D for LoCon) in target_module".into());
    }
    targets
}

impl LycorisSettings {
    /// The preset entry that adapts the layer at `path`, if any.
    pub fn target_for(&self, path: &str) -> Option<&LycorisTarget> {
        self.targets.iter().find(|t| t.matches(path))
    }

    /// LoCon's rank and alpha for a layer with `kernel` x `kernel` weights
    /// (1 for Linear layers): LyCORIS gives 1x1 kernels the linear ones.
    /// Alpha 0 means the rank (no scaling).
    pub fn locon_rank_alpha(&self, kernel: usize) -> (usize, f64) {
        let (rank, alpha) = if kernel == 1 { (self.linear_dim, self.linear_alpha as f64) } else { (self.conv_dim, self.conv_alpha) };
        (rank, if alpha == 0.0 { rank as f64 } else { alpha })
    }

    /// Whether any entry trains `algo`.
    pub fn uses(&self, algo: LycorisAlgo) -> bool {
        self.targets.iter().any(|t| t.algo == algo)
    }
}

/// LyCORIS's `factorization(dimension, factor)`: `(small, large)` with
/// `small * large == dimension`. A positive `factor` that divides the
/// dimension is taken as it is; otherwise the most square split whose
/// smaller side is at most `factor` (any, for -1).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let (m, n) = (factor as usize, dimension / factor as usize);
        return if m > n { (n, m) } else { (m, n) };
    }
    let limit = if factor < 0 { dimension } else { factor as usize };
    let (mut m, mut n) = (1, dimension);
    while m < n {
        let mut next = m + 1;
        while !dimension.is_multiple_of(next) {
            next += 1;
        }
        if next > limit {
            break;
        }
        (m, n) = (next, dimension / next);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}
