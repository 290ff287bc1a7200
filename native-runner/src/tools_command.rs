//! `native-runner find-token` and `native-runner make-reg`: the rare-token
//! finder and the regularisation-set generator (trainer-core's `tools`).

use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use trainer_core::tools::{self, RegularisationSet, TokenReport};
use trainer_core::train::storage::DiskStorage;
use trainer_core::{block_on, Error, Result};

use crate::device::{load_model, pick};
use crate::sample_command::GenerateArgs;

#[derive(Args)]
pub struct FindTokenArgs {
    /// A diffusers model folder, or a single-file .safetensors checkpoint.
    #[arg(long)]
    model: String,
    /// How many candidates to show.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Shortest candidate, in letters.
    #[arg(long, default_value_t = 3)]
    min_chars: usize,
    /// Longest candidate, in letters (short tokens are easy to type).
    #[arg(long, default_value_t = 5)]
    max_chars: usize,
    /// Measure the prior inside "a photo of <token> <class>" (e.g. "man").
    #[arg(long)]
    class: Option<String>,
    /// Instead of searching, show how this text tokenizes and its prior
    /// (an instance prompt, a rare token, a celebrity's name). Repeatable.
    #[arg(long)]
    check: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// gpu, cpu-gpu or cpu.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn bar(template: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar
}

fn table(reports: &[TokenReport]) -> String {
    let mut out = format!("{:<14} {:>8}  {:<24} {:>9}  {}\n", "text", "token id", "pieces", "prior", "warning");
    for r in reports {
        let ids = r.ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        out += &format!("{:<14} {:>8}  {:<24} {:>9.6}  {}\n", r.text, ids, r.pieces.join(" | "), r.prior, r.warning.as_deref().unwrap_or(""));
    }
    out
}

pub fn run_find_token(args: FindTokenArgs) -> Result<()> {
    if args.min_chars == 0 || args.min_chars > args.max_chars {
        return Err(Error::Config { source_name: "--min-chars/--max-chars".into(), problems: vec!["need 1 <= --min-chars <= --max-chars".into()] });
    }
    let picked = pick(&args.device)?;
    eprintln!("{}", picked.reason);
    let device = picked.device.clone();
    let model = load_model(&args.model, None, &device, picked.inference_dtypes())?;
    let class = args.class.as_deref();
    let progress = bar("scoring [{bar:30}] {pos}/{len} ({per_sec}, {eta})");
    let mut on_progress = |done: usize, total: usize| {
        progress.set_length(total as u64);
        progress.set_position(done as u64);
    };
    let reports = if args.check.is_empty() {
        block_on(tools::find_tokens(&model, args.count, args.min_chars, args.max_chars, class, &device, &mut on_progress))
    } else {
        block_on(tools::score(&model, &args.check, class, &device, &mut on_progress))
    };
    progress.finish_and_clear();
    let reports = reports?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports).expect("serialises"));
        return Ok(());
    }
    let context = match class {
        Some(class) => format!("\"{} <token> {class}\" vs \"{} {class}\"", tools::TEMPLATE, tools::TEMPLATE),
        None => format!("\"{} <token>\" vs \"{}\"", tools::TEMPLATE, tools::TEMPLATE),
    };
    println!("prior = how far the token moves the text encoder's output ({context}); lower is a weaker prior, better for a new subject");
    print!("{}", table(&reports));
    Ok(())
}

#[derive(Args)]
pub struct MakeRegArgs {
    /// A diffusers model folder, or a single-file .safetensors checkpoint (the model you will train).
    #[arg(long)]
    model: String,
    /// How many images the folder should hold.
    #[arg(long)]
    count: usize,
    /// The folder; images already there are kept (the run resumes).
    #[arg(long)]
    out: String,
    /// Square size in pixels (default: the model's native size).
    #[arg(long)]
    resolution: Option<usize>,
    #[command(flatten)]
    generate: GenerateArgs,
    /// auto (a GPU when there is one, else the CPU backend), gpu, cpu-gpu or cpu.
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run_make_reg(args: MakeRegArgs) -> Result<()> {
    args.generate.sampler()?;
    if args.count == 0 {
        return Err(Error::Config { source_name: "--count".into(), problems: vec!["--count must be at least 1".into()] });
    }
    let picked = pick(&args.device)?;
    eprintln!("{}", picked.reason);
    let device = picked.device.clone();
    let loading = bar("{spinner} {msg}");
    loading.set_message(format!("loading {}", args.model));
    loading.enable_steady_tick(Duration::from_millis(120));
    let model = load_model(&args.model, None, &device, picked.inference_dtypes());
    loading.finish_and_clear();
    let model = model?;
    let side = args.resolution.unwrap_or(model.native_size());
    let request = args.generate.request(side, side)?;
    model.latent_shape(request.width, request.height)?;
    let set = RegularisationSet { request, count: args.count, folder: args.out.trim_end_matches('/').to_string() };
    let progress = bar("class images [{bar:30}] {pos}/{len} ({per_sec}, {eta}) {msg}");
    progress.set_length(args.count as u64);
    let made = block_on(tools::make_regularisation_set(&model, &set, &DiskStorage, &device, &mut |done, _, generated| {
        progress.set_message(if generated { "" } else { "(already there)" });
        progress.set_position(done as u64);
    }));
    progress.finish_and_clear();
    let made = made?;
    eprintln!("{made} image(s) generated, {} already there, in {}", args.count - made, set.folder);
    println!("Add this entry to your dataloader config (also written to {}); instance_data_dir and cache_dir_vae are as given here, relative paths resolve from the dataloader config's folder:", set.entry_path());
    println!("{}", serde_json::to_string_pretty(&set.dataloader_entry()).expect("serialises"));
    Ok(())
}
