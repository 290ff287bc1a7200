//! Typed reading of loosely typed config values, with errors that name the
//! owner (a dataset id or the training config), the key and the value.
//!
//! JSON configs get strict types: `"true"` for a boolean or `"2"` for a
//! number is accepted with a warning; anything else is an error. Env files
//! carry only strings, so there strings are the natural form and convert
//! silently.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::error::{nearest, Diagnostics};
use crate::models::config::Choice;

pub struct Reader<'a> {
    /// How problems name the owner, e.g. "dataset 'subject'".
    pub owner: String,
    map: &'a Map<String, Value>,
    used: BTreeSet<String>,
    /// Whether values come from a text-only format (env files).
    strings_are_natural: bool,
    pub diagnostics: &'a mut Diagnostics,
}

impl<'a> Reader<'a> {
    pub fn new(owner: String, map: &'a Map<String, Value>, strings_are_natural: bool, diagnostics: &'a mut Diagnostics) -> Self {
        Self { owner, map, used: BTreeSet::new(), strings_are_natural, diagnostics }
    }

    pub fn error(&mut self, message: impl AsRef<str>) {
        let message = format!("{}: {}", self.owner, message.as_ref());
        self.diagnostics.error(message);
    }

    pub fn warn(&mut self, message: impl AsRef<str>) {
        let message = format!("{}: {}", self.owner, message.as_ref());
        self.diagnostics.warn(message);
    }

    /// The value under the first of `names` present (a key and its aliases),
    /// marking all of them as known. JSON `null` counts as absent.
    pub fn raw(&mut self, names: &[&str]) -> Option<(String, &'a Value)> {
        let mut found: Option<(String, &'a Value)> = None;
        for name in names {
            self.used.insert(name.to_string());
            if let Some(value) = self.map.get(*name) {
                if value.is_null() {
                    continue;
                }
                match &found {
                    None => found = Some((name.to_string(), value)),
                    Some((first, _)) => {
                        let first = first.clone();
                        self.warn(format!("both '{first}' and its alias '{name}' are set; using '{first}'"));
                    }
                }
            }
        }
        found
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|v| !v.is_null())
    }

    pub fn bool(&mut self, names: &[&str]) -> Option<bool> {
        let (key, value) = self.raw(names)?;
        match value {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => {
                    self.lenient(&key, value, "true");
                    Some(true)
                }
                "false" => {
                    self.lenient(&key, value, "false");
                    Some(false)
                }
                _ => {
                    self.error(format!("'{key}' must be true or false, not {value}"));
                    None
                }
            },
            _ => {
                self.error(format!("'{key}' must be true or false, not {value}"));
                None
            }
        }
    }

    /// A number for which `valid` holds; otherwise an error saying it must
    /// be `rule` (for example "between 0 and 1").
    pub fn f64_where(&mut self, names: &[&str], valid: impl Fn(f64) -> bool, rule: &str) -> Option<f64> {
        let value = self.f64(names)?;
        if valid(value) {
            Some(value)
        } else {
            self.error(format!("'{}' must be {rule}, not {value}", names[0]));
            None
        }
    }

    pub fn f64(&mut self, names: &[&str]) -> Option<f64> {
        let (key, value) = self.raw(names)?;
        match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(number) if number.is_finite() => {
                    self.lenient(&key, value, s.trim());
                    Some(number)
                }
                _ => {
                    self.error(format!("'{key}' must be a number, not {value}"));
                    None
                }
            },
            _ => {
                self.error(format!("'{key}' must be a number, not {value}"));
                None
            }
        }
    }

    /// An integer; `min` is the smallest allowed value.
    pub fn int(&mut self, names: &[&str], min: i64) -> Option<i64> {
        let (key, value) = self.raw(names)?;
        let parsed = match value {
            Value::Number(n) => n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
            Value::String(s) => {
                let parsed = s.trim().parse::<i64>().ok();
                if parsed.is_some() {
                    self.lenient(&key, value, s.trim());
                }
                parsed
            }
            _ => None,
        };
        match parsed {
            Some(number) if number >= min => Some(number),
            Some(number) => {
                self.error(format!("'{key}' must be at least {min}, not {number}"));
                None
            }
            None => {
                self.error(format!("'{key}' must be a whole number, not {value}"));
                None
            }
        }
    }

    pub fn string(&mut self, names: &[&str]) -> Option<String> {
        let (key, value) = self.raw(names)?;
        match value {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.error(format!("'{key}' must be a string, not {value}"));
                None
            }
        }
    }

    /// A setting read into its enum (compared case-insensitively).
    pub fn choice_of<T: Choice>(&mut self, names: &[&str]) -> Option<T> {
        let text = self.string(names)?;
        match T::parse(&text.trim().to_ascii_lowercase()) {
            Ok(value) => Some(value),
            Err(_) => {
                self.error(format!("'{}' is '{text}', which is not one of: {}", names[0], T::accepted().join(", ")));
                None
            }
        }
    }

    /// A string that must be one of `choices` (compared case-insensitively).
    pub fn choice(&mut self, names: &[&str], choices: &[&str]) -> Option<String> {
        let text = self.string(names)?;
        let lower = text.trim().to_ascii_lowercase();
        if choices.contains(&lower.as_str()) {
            Some(lower)
        } else {
            let key = names[0];
            self.error(format!("'{key}' is '{text}', which is not one of: {}", choices.join(", ")));
            None
        }
    }

    /// A string or a list of strings.
    pub fn strings(&mut self, names: &[&str]) -> Option<Vec<String>> {
        let (key, value) = self.raw(names)?;
        match value {
            Value::String(s) => Some(vec![s.clone()]),
            Value::Array(items) if items.iter().all(Value::is_string) => Some(items.iter().map(|v| v.as_str().unwrap().to_string()).collect()),
            _ => {
                self.error(format!("'{key}' must be a string or a list of strings, not {value}"));
                None
            }
        }
    }

    fn lenient(&mut self, key: &str, value: &Value, written: &str) {
        if !self.strings_are_natural {
            self.warn(format!("'{key}' is the string {value}; write it as {written} without quotes"));
        }
    }

    /// Marks keys as known without reading them (accepted for compatibility).
    pub fn accept(&mut self, names: &[&str]) {
        for name in names {
            self.used.insert(name.to_string());
        }
    }

    /// Keys present in the map that nothing read or accepted.
    pub fn unknown_keys(&self) -> Vec<String> {
        self.map.keys().filter(|k| !self.used.contains(k.as_str())).cloned().collect()
    }

    /// Reports every key nothing read: a warning (or, when `strict`, an
    /// error) naming the key and the nearest known key.
    pub fn report_unknown(&mut self, strict: bool) {
        let known: Vec<String> = self.used.iter().cloned().collect();
        for key in self.unknown_keys() {
            let hint = nearest(&key, known.iter().map(String::as_str)).map(|n| format!("; did you mean '{n}'?")).unwrap_or_default();
            let message = format!("unknown key '{key}'{hint}");
            if strict {
                self.error(message);
            } else {
                self.warn(format!("{message} (ignored)"));
            }
        }
    }
}
