//! Errors that name the file, key, dataset or tensor at fault.

use std::fmt;

/// Everything that can go wrong while reading configs or planning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One or more problems in a config file. Every problem found is listed,
    /// so a user can fix them all in one go.
    #[error("{}", format_problems(.source_name, .problems))]
    Config { source_name: String, problems: Vec<String> },
    /// A problem with a dataset as found on disk (missing folder, no usable images, ...).
    #[error("dataset '{dataset}': {message}")]
    Dataset { dataset: String, message: String },
    /// Reading a file failed.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// An image could not be read or decoded.
    #[error("{path}: {reason}")]
    Image { path: String, reason: String },
    /// Training had to stop (a NaN loss, an interrupted run, ...).
    #[error("training stopped at step {step}: {message}")]
    Training { step: u64, message: String },
}

fn format_problems(source_name: &str, problems: &[String]) -> String {
    if problems.len() == 1 {
        return format!("{source_name}: {}", problems[0]);
    }
    let mut text = format!("{source_name}: {} problems:", problems.len());
    for problem in problems {
        text.push_str("\n  - ");
        text.push_str(problem);
    }
    text
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Collects warnings and errors while a config is read, so that all problems
/// are reported together.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    pub warnings: Vec<String>,
    pub errors: Vec<String>,
}

impl Diagnostics {
    pub fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }

    pub fn error(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    /// Turns collected errors into an [`Error::Config`] for `source_name`.
    pub fn into_result(self, source_name: &str) -> Result<Vec<String>> {
        if self.errors.is_empty() {
            Ok(self.warnings)
        } else {
            Err(Error::Config { source_name: source_name.to_string(), problems: self.errors })
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for error in &self.errors {
            writeln!(f, "error: {error}")?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        Ok(())
    }
}

/// The known name closest to `name` (edit distance), if it is close enough to
/// be a plausible typo.
pub fn nearest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for candidate in known {
        let distance = edit_distance(name, candidate);
        if best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(2)).map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// What to change when the device ran out of memory.
pub const MEMORY_ADVICE: &str = "the device ran out of memory: lower TRAIN_BATCH_SIZE or the dataset resolution, \
enable gradient checkpointing (gradient_checkpointing=true), keep MIXED_PRECISION on (f16 base weights on GPUs), \
or train a LoRA instead of the full model";

const MEMORY_MARKERS: [&str; 5] = ["can't allocate buffer", "out of device memory", "out-of-memory", "out of memory", "outofmemory"];

/// Whether a device error (cubecl's allocation failures, as burn reports
/// them on readback or in a panic) means the device ran out of memory.
pub fn is_out_of_memory(message: &str) -> bool {
    let lower = message.to_lowercase();
    MEMORY_MARKERS.iter().any(|m| lower.contains(m))
}

/// The message for a failed readback of `what` from the device. When the
/// device ran out of memory: [`MEMORY_ADVICE`] and cubecl's reason (its
/// full report lists every kernel the failure skipped: hundreds of lines).
pub fn device_failure(what: &str, error: impl fmt::Debug) -> String {
    let details = format!("{error:?}");
    if !is_out_of_memory(&details) {
        return format!("reading {what} back from the device failed: {details}");
    }
    let reason = details.lines().map(str::trim).find(|line| MEMORY_MARKERS.iter().any(|m| line.to_lowercase().contains(m))).unwrap_or("out of memory");
    format!("{MEMORY_ADVICE} (computing {what}: {reason})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_but_not_unrelated_words() {
        let known = ["instance_prompt", "repeats", "crop_style"];
        assert_eq!(nearest("instance_promt", known), Some("instance_prompt"));
        assert_eq!(nearest("repeat", known), Some("repeats"));
        assert_eq!(nearest("zzzzzzzzzzzz", known), None);
    }
}
