//! Burnbooth's command-line runner.

use native_runner::{plan_command, sample_command, tools_command, train_command};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "native-runner", version, about = "Burnbooth: Dreambooth training for Stable Diffusion, natively")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what training would do (datasets, buckets, captions, steps) without loading a model.
    Plan(plan_command::PlanArgs),
    /// Generate an image from a prompt with a model (diffusers folder or single .safetensors file).
    Sample(sample_command::SampleArgs),
    /// Train a Dreambooth LoRA (or full fine-tune) from the training and dataloader configs.
    Train(train_command::TrainArgs),
    /// Fill the latent and text-embedding caches without training.
    Cache(train_command::TrainArgs),
    /// Find a rare instance token (one CLIP token with a weak prior), or check how a prompt tokenizes.
    FindToken(tools_command::FindTokenArgs),
    /// Generate a regularisation (class) image set with the base model, resumable, plus its dataloader entry.
    MakeReg(tools_command::MakeRegArgs),
}

fn main() -> ExitCode {
    native_runner::keep_freed_memory();
    native_runner::quiet_headless_vulkan();
    let cli = Cli::parse();
    native_runner::on_compute_pool(move || {
        let result = match cli.command {
            Command::Plan(args) => plan_command::run(args),
            Command::Sample(args) => sample_command::run(args),
            Command::Train(args) => train_command::run(args),
            Command::Cache(args) => train_command::run_cache(args),
            Command::FindToken(args) => tools_command::run_find_token(args),
            Command::MakeReg(args) => tools_command::run_make_reg(args),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        }
    })
}
