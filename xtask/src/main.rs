//! `cargo xtask <command>`: the front door to the LLaVA workspace.
//!
//! Standard output carries only a command's result; logs and progress go to standard error.

mod bench;
mod demo;
mod model_cmds;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "LLaVA in Rust: inference, training and evaluation commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one forward pass and write logits, vision features, image features and pixels.
    Forward(model_cmds::ForwardArgs),
    /// Greedy or sampled generation with the KV cache; prints only the new text.
    Generate(model_cmds::GenerateArgs),
    /// Write a tiny random LLaVA checkpoint (llava-hf layout, LLaMA tokenizer).
    DemoModel(demo::DemoModelArgs),
    /// The bundled demo: write the demo checkpoint and run forward + generate on a demo photo.
    Demo,
    /// Compare the CPU backends on the small LLaVA shape (NdArray needs `--features ndarray`).
    BenchBackends(bench::BenchBackendsArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Forward(args) => model_cmds::forward(args),
        Command::Generate(args) => model_cmds::generate(args),
        Command::DemoModel(args) => demo::demo_model(args),
        Command::Demo => demo::demo(),
        Command::BenchBackends(args) => bench::bench_backends(args),
    }
}
