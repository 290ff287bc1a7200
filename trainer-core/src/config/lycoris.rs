//! SimpleTuner's `lycoris_config` JSON (`lora_type` lycoris), as far as
//! Burnbooth trains it: LoKr on the UNet's Linear layers
//! (docs/reference.md §4, "LoKr").

use serde::Serialize;
use serde_json::{Map, Value};

/// Which Linear layers a LyCORIS preset adapts, and each one's `factor`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LokrTarget {
    /// Ends of diffusers module paths (`to_q`, `ff.net.2`).
    pub suffixes: Vec<String>,
    pub factor: i64,
}

/// A `lycoris_config` with `"algo": "lokr"`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LokrSettings {
    /// `multiplier`, read as an integer as SimpleTuner reads it.
    pub multiplier: i64,
    /// `linear_dim`: the rank of `w2` when it is a low-rank pair.
    pub linear_dim: usize,
    /// `linear_alpha`, read as an integer as SimpleTuner reads it.
    pub linear_alpha: i64,
    /// `full_matrix`: `w2` is always a full matrix.
    pub full_matrix: bool,
    /// The layers adapted, from `apply_preset`.
    pub targets: Vec<LokrTarget>,
    /// The JSON as given, for the exported file's metadata.
    pub source: String,
}

/// The Linear layers inside the module classes a preset can name.
fn class_layers(class: &str) -> Option<&'static [&'static str]> {
    match class {
        "Attention" | "CrossAttention" => Some(&["to_q", "to_k", "to_v", "to_out.0"]),
        "FeedForward" => Some(&["ff.net.0.proj", "ff.net.2"]),
        "Transformer2DModel" => Some(&["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]),
        _ => None,
    }
}

/// Reads a lycoris_config's text. Problems come back as messages naming the key.
pub fn parse_lycoris_config(text: &str) -> Result<(LokrSettings, Vec<String>), Vec<String>> {
    let value: Value = serde_json::from_str(text).map_err(|e| vec![format!("not valid JSON: {e}")])?;
    let Value::Object(object) = value else { return Err(vec!["must be a JSON object such as {\"algo\": \"lokr\", \"factor\": 16, ...}".into()]) };
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let number = |key: &str, default: f64, problems: &mut Vec<String>| match object.get(key) {
        None => default,
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
    match object.get("algo").and_then(Value::as_str) {
        Some("lokr") => {}
        Some(other) => problems.push(format!("algo '{other}' is not supported yet; Burnbooth trains \"lokr\" (use lora_type standard for LoRA and DoRA)")),
        None => problems.push("'algo' is missing; Burnbooth trains \"lokr\"".into()),
    }
    // SimpleTuner casts these with int().
    let multiplier = number("multiplier", 1.0, &mut problems).trunc() as i64;
    let linear_dim = number("linear_dim", 4.0, &mut problems).trunc();
    let linear_alpha = number("linear_alpha", 1.0, &mut problems).trunc() as i64;
    let full_matrix = flag("full_matrix", &mut problems);
    let factor = number("factor", -1.0, &mut problems) as i64;
    if linear_dim < 1.0 {
        problems.push(format!("'linear_dim' must be at least 1, not {linear_dim}"));
    }
    for key in ["decompose_both", "use_tucker", "use_scalar", "rs_lora", "unbalanced_factorization", "bypass_mode", "dora_wd", "train_norm"] {
        if flag(key, &mut problems) {
            problems.push(format!("'{key}' is not supported yet; remove it or set it to false"));
        }
    }
    for key in ["dropout", "rank_dropout", "module_dropout"] {
        if number(key, 0.0, &mut problems) != 0.0 {
            problems.push(format!("'{key}' is not supported yet for LoKr; remove it or set it to 0"));
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
        None | Some(Value::Null) => {
            warnings.push(
                "lycoris_config has no apply_preset: LyCORIS would adapt every Linear and convolution; Burnbooth adapts the transformers' Linear layers (attention, feed-forward, proj_in/proj_out), not convolutions"
                    .into(),
            );
            vec![LokrTarget { suffixes: class_layers("Transformer2DModel").expect("known").iter().map(|s| s.to_string()).collect(), factor }]
        }
        Some(Value::Object(preset)) => preset_targets(preset, factor, &mut problems),
        Some(other) => {
            problems.push(format!("'apply_preset' must be an object with target_module and module_algo_map, not {other}"));
            Vec::new()
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let settings = LokrSettings {
        multiplier,
        linear_dim: linear_dim as usize,
        linear_alpha,
        full_matrix,
        targets,
        source: serde_json::to_string(&object).expect("serialises"),
    };
    Ok((settings, warnings))
}

fn preset_targets(preset: &Map<String, Value>, factor: i64, problems: &mut Vec<String>) -> Vec<LokrTarget> {
    let mut classes: Vec<String> = match preset.get("target_module") {
        Some(Value::Array(names)) => names.iter().filter_map(|n| n.as_str().map(str::to_string)).collect(),
        None => Vec::new(),
        Some(other) => {
            problems.push(format!("'apply_preset.target_module' must be a list of module class names, not {other}"));
            Vec::new()
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
                "apply_preset names module class '{class}', which Burnbooth cannot adapt yet (it adapts Attention, FeedForward and Transformer2DModel's Linear layers)"
            ));
            continue;
        };
        let settings = algo_map.get(&class).and_then(Value::as_object);
        let class_factor = settings.and_then(|s| s.get("factor")).and_then(Value::as_i64).unwrap_or(factor);
        if let Some(algo) = settings.and_then(|s| s.get("algo")).and_then(Value::as_str) {
            if algo != "lokr" {
                problems.push(format!("apply_preset.module_algo_map.{class}.algo '{algo}' is not supported yet; Burnbooth trains lokr"));
            }
        }
        targets.push(LokrTarget { suffixes: layers.iter().map(|s| s.to_string()).collect(), factor: class_factor });
    }
    if targets.is_empty() && problems.is_empty() {
        problems.push("apply_preset selects no module class: name Attention and/or FeedForward in target_module".into());
    }
    targets
}

impl LokrSettings {
    /// The `factor` of the layer at `path`, when the preset adapts it.
    pub fn factor_for(&self, path: &str) -> Option<i64> {
        self.targets.iter().find(|t| t.suffixes.iter().any(|s| path.ends_with(&format!(".{s}")))).map(|t| t.factor)
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
