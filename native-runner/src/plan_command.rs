//! `native-runner plan`: the resolved training plan, as text or JSON.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use trainer_core::config;
use trainer_core::plan::{describe, plan, PlanTarget};
use trainer_core::{Error, Result};

use crate::folder::FolderSource;

#[derive(Args)]
pub struct PlanArgs {
    /// The training config: an env file (config.env, sdxl-env.sh), config.json or config.toml.
    #[arg(long)]
    config: String,
    /// Use this dataloader config instead of the one the training config names.
    #[arg(long)]
    dataloader_config: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn read_text(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_string(), message: e.to_string() })
}

pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

pub fn run(args: PlanArgs) -> Result<()> {
    let (training, dataloader) = config::load(&args.config, args.dataloader_config.as_deref(), &read_text, &env_lookup)?;
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template("{msg:>24} [{bar:30}] {pos}/{len} images ({per_sec}, {eta})").expect("valid template").progress_chars("=> "));
    let mut on_progress = |p: trainer_core::plan::PlanProgress<'_>| {
        bar.set_message(p.dataset.to_string());
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
    };
    let open = |dataset: &config::dataset::ImageDatasetConfig| -> Result<Box<dyn trainer_core::data::source::ImageSource>> {
        Ok(Box::new(FolderSource::open(&dataset.id, &dataset.instance_data_dir)?))
    };
    // The wgpu backend has no bf16 storage.
    let result = plan(&training, &dataloader, &open, PlanTarget { has_bf16: false, has_f16: false }, &mut on_progress);
    bar.finish_and_clear();
    let plan = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan).expect("plan serialises"));
    } else {
        print!("{}", describe(&plan));
    }
    Ok(())
}
