//! From a training config's text to one map of SimpleTuner option names:
//! env files (`KEY=value` lines with shell quoting and `$VAR` expansion,
//! env names mapped to option names), JSON and TOML objects (keys with or
//! without `--`), `${env:NAME}` placeholders, and aliases folded into the
//! canonical option name.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::{nearest, Diagnostics};

/// SimpleTuner env names -> option names.
const ENV_NAMES: &str = include_str!("env_names.tsv");
/// Every SimpleTuner option name (first word) and its aliases.
const SIMPLETUNER_OPTIONS: &str = include_str!("simpletuner_options.txt");

/// The env-file name -> option name table.
fn env_names() -> BTreeMap<&'static str, &'static str> {
    let mut names = BTreeMap::new();
    for line in ENV_NAMES.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        if let Some((env, option)) = line.split_once('\t') {
            names.entry(env).or_insert(option);
        }
    }
    names
}

/// Option name for every SimpleTuner option name or alias.
pub(super) fn option_aliases() -> BTreeMap<&'static str, &'static str> {
    let mut aliases = BTreeMap::new();
    for line in SIMPLETUNER_OPTIONS.lines().filter(|l| !l.starts_with('#')) {
        let mut words = line.split_whitespace();
        if let Some(name) = words.next() {
            aliases.insert(name, name);
            for alias in words {
                aliases.insert(alias, name);
            }
        }
    }
    aliases
}

/// Parses `KEY=value` lines as a shell would for simple assignments:
/// optional `export`, single or double quotes, `#` comments, `KEY+=more`,
/// `$VAR`/`${VAR}` from earlier lines or the environment.
pub fn parse_env_file(text: &str, env: &dyn Fn(&str) -> Option<String>, diagnostics: &mut Diagnostics) -> Vec<(String, String)> {
    let mut assignments: Vec<(String, String)> = Vec::new();
    for (number, raw_line) in text.lines().enumerate() {
        let line = raw_line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map(str::trim_start).unwrap_or(line);
        let Some(eq) = line.find('=') else {
            diagnostics.warn(format!("line {}: ignored, not a KEY=value assignment: {raw_line}", number + 1));
            continue;
        };
        let (mut key, append) = (&line[..eq], false);
        let append = if let Some(stripped) = key.strip_suffix('+') {
            key = stripped;
            true
        } else {
            append
        };
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || key.starts_with(|c: char| c.is_ascii_digit()) {
            diagnostics.warn(format!("line {}: ignored, '{key}' is not a variable name", number + 1));
            continue;
        }
        let lookup = |name: &str| assignments.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone()).or_else(|| env(name));
        let value = match shell_value(&line[eq + 1..], &lookup) {
            Ok(value) => value,
            Err(message) => {
                diagnostics.error(format!("line {}: {key}: {message}", number + 1));
                continue;
            }
        };
        let value = if append { lookup(key).unwrap_or_default() + &value } else { value };
        assignments.retain(|(k, _)| k != key);
        assignments.push((key.to_string(), value));
    }
    assignments
}

/// One shell word: quotes removed, variables expanded (not in single quotes),
/// an unquoted ` #` starting a comment.
fn shell_value(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut chars = text.trim().chars().peekable();
    let mut quote: Option<char> = None;
    let mut previous_was_space = false;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if previous_was_space || out.is_empty() => break,
            (None, ' ' | '\t') => {
                previous_was_space = true;
                // Spaces outside quotes end the value (trailing comment or junk).
                continue;
            }
            (q, '\\') if q != Some('\'') => {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            (q, '$') if q != Some('\'') => {
                let braced = chars.peek() == Some(&'{');
                if braced {
                    chars.next();
                }
                let mut name = String::new();
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_alphanumeric() || n == '_' {
                        name.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                if braced && chars.next() != Some('}') {
                    return Err("unterminated ${...}".into());
                }
                if name.is_empty() {
                    out.push('$');
                } else {
                    out.push_str(&lookup(&name).unwrap_or_default());
                }
            }
            (_, c) => {
                if previous_was_space && quote.is_none() {
                    // `KEY=a b` is a command in a shell, not a value; keep the first word.
                    break;
                }
                out.push(c);
            }
        }
        previous_was_space = false;
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    Ok(out)
}

pub(super) fn env_to_map(text: &str, env: &dyn Fn(&str) -> Option<String>, diagnostics: &mut Diagnostics) -> Map<String, Value> {
    let names = env_names();
    let known_env: Vec<&str> = names.keys().copied().collect();
    let mut map = Map::new();
    for (key, value) in parse_env_file(text, env, diagnostics) {
        if key == "TRAINER_EXTRA_ARGS" {
            extra_args_to_map(&value, &mut map);
            continue;
        }
        match names.get(key.as_str()) {
            Some(option) => {
                map.insert(option.to_string(), Value::String(value));
            }
            None => {
                let hint = nearest(&key, known_env.iter().copied()).map(|n| format!("; did you mean {n}?")).unwrap_or_default();
                diagnostics.warn(format!("{key} is not a training setting{hint} (ignored)"));
            }
        }
    }
    map
}

/// `--key=value`, `--key value` and `--flag` words, as argparse reads them.
fn extra_args_to_map(args: &str, map: &mut Map<String, Value>) {
    let words: Vec<&str> = args.split_whitespace().collect();
    let mut i = 0;
    while i < words.len() {
        if let Some(option) = words[i].strip_prefix("--") {
            if let Some((key, value)) = option.split_once('=') {
                map.insert(key.to_string(), Value::String(value.to_string()));
            } else if i + 1 < words.len() && !words[i + 1].starts_with("--") {
                map.insert(option.to_string(), Value::String(words[i + 1].to_string()));
                i += 1;
            } else {
                map.insert(option.to_string(), Value::String("true".into()));
            }
        }
        i += 1;
    }
}

pub(super) fn object_to_map(value: Value, diagnostics: &mut Diagnostics) -> std::result::Result<Map<String, Value>, String> {
    let Value::Object(object) = value else {
        return Err("must be an object of option names and values".into());
    };
    let mut map = Map::new();
    for (key, value) in object {
        let name = key.trim_start_matches("--").to_string();
        if map.contains_key(&name) {
            diagnostics.warn(format!("'{key}' is given twice (with and without --); using the first"));
            continue;
        }
        map.insert(name, value);
    }
    Ok(map)
}

pub(super) fn expand_env_placeholders(map: Map<String, Value>, env: &dyn Fn(&str) -> Option<String>, diagnostics: &mut Diagnostics) -> Map<String, Value> {
    map.into_iter()
        .map(|(key, value)| {
            let value = match value {
                Value::String(s) if s.contains("{env:") => {
                    let context = super::placeholders::PlaceholderContext { model_family: "{model_family}", output_dir: "{output_dir}", env };
                    match super::placeholders::expand(&s, "", &context) {
                        Ok(expanded) => Value::String(expanded),
                        Err(message) => {
                            diagnostics.error(format!("'{key}' {message}"));
                            Value::String(s)
                        }
                    }
                }
                other => other,
            };
            (key, value)
        })
        .collect()
}

/// Resolves aliases (`validation_steps` -> `validation_step_interval`, ...)
/// so each option is read under its one name.
pub(super) fn canonical_keys(map: &Map<String, Value>, diagnostics: &mut Diagnostics) -> Map<String, Value> {
    let aliases = option_aliases();
    let mut out = Map::new();
    for (key, value) in map {
        let name = match key.as_str() {
            "learning_rate_end" => "lr_end",
            "regularization_mode" => "regularisation_mode",
            other => aliases.get(other).copied().unwrap_or(other),
        };
        if out.contains_key(name) {
            diagnostics.warn(format!("'{key}' sets '{name}' a second time; using the first value"));
            continue;
        }
        out.insert(name.to_string(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn env_file_syntax() {
        let text = "# comment\nexport A=1\nB=\"two words\" # trailing\nC='single $A'\nD=$A/x\nD+=y\nE=${B}!\nnot an assignment\n";
        let mut d = Diagnostics::default();
        let got = parse_env_file(text, &no_env, &mut d);
        let get = |k: &str| got.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("1"));
        assert_eq!(get("B"), Some("two words"));
        assert_eq!(get("C"), Some("single $A"));
        assert_eq!(get("D"), Some("1/xy"));
        assert_eq!(get("E"), Some("two words!"));
        assert_eq!(d.warnings.len(), 1, "{d}");
    }
}
