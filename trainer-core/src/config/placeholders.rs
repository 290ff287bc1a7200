//! `{env:VAR}`, `{model_family}`, `{output_dir}` and `{id}` in config strings.

/// What placeholders expand to. `env` looks up environment variables (the
/// browser has none, so it passes a lookup that always answers `None`).
pub struct PlaceholderContext<'a> {
    pub model_family: &'a str,
    pub output_dir: &'a str,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// Expands the placeholders in `text`. An unset `{env:VAR}` is an error
/// naming the variable (SimpleTuner silently substitutes an empty string,
/// which turns into confusing path errors later). Unknown `{x}` stay as they are.
pub fn expand(text: &str, id: &str, context: &PlaceholderContext<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let name = &after[..end];
        match name {
            "model_family" => out.push_str(context.model_family),
            "output_dir" => out.push_str(context.output_dir),
            "id" => out.push_str(id),
            _ if name.starts_with("env:") => {
                let var = &name[4..];
                match (context.env)(var) {
                    Some(value) => out.push_str(&value),
                    None => return Err(format!("uses {{env:{var}}} but the environment variable {var} is not set")),
                }
            }
            _ => {
                out.push('{');
                out.push_str(name);
                out.push('}');
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(env: &dyn Fn(&str) -> Option<String>) -> PlaceholderContext<'_> {
        PlaceholderContext { model_family: "sdxl", output_dir: "/out", env }
    }

    #[test]
    fn expands_known_placeholders_and_keeps_unknown_ones() {
        let env = |name: &str| (name == "HOME_DATA").then(|| "/data".to_string());
        let got = expand("{env:HOME_DATA}/{model_family}/{id}-{output_dir}{other}", "subject", &context(&env)).unwrap();
        assert_eq!(got, "/data/sdxl/subject-/out{other}");
    }

    #[test]
    fn unset_env_variable_is_named() {
        let env = |_: &str| None;
        let err = expand("{env:DATA_ROOT}/x", "a", &context(&env)).unwrap_err();
        assert!(err.contains("DATA_ROOT"), "{err}");
    }
}
