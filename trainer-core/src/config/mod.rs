//! SimpleTuner-compatible configuration: the training config (env file,
//! config.json, config.toml) and the dataloader config (JSON array).

pub mod dataset;
pub mod placeholders;
pub mod training;
pub mod values;
