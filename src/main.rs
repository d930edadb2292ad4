//! The `bake` command line: a thin layer over the `bake` library.

use std::process::ExitCode;

use anyhow::Result;
use bake::model::{inspect, resolve::ALIASES, ModelFiles};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "bake", version, about = "Bake Inference-Time Intervention into LLaMA checkpoints as o_proj biases")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what bake understands of a model: shapes, dtype, files, and the memory a bake needs.
    Inspect(InspectArgs),
    /// List the short model names (as in the reference code) and the Hub repositories behind them.
    Models,
}

#[derive(Args)]
struct InspectArgs {
    /// A model folder, a Hub repo id `org/name[@revision]`, or a short name (see `bake models`).
    #[arg(long, short)]
    model: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bake: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Inspect(args) => run_inspect(&args)?,
        Command::Models => {
            for (alias, repo) in ALIASES {
                println!("{alias:<22} {repo}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_inspect(args: &InspectArgs) -> Result<()> {
    let model = ModelFiles::open(&args.model)?;
    let report = inspect::inspect(&model);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("model        {}", report.model);
    if let Some(repo) = &report.hub_repo {
        println!("hub repo     {repo}");
    }
    println!("folder       {}", report.folder);
    println!("layers       {}", report.layers);
    println!("heads        {} ({} KV heads, head_dim {})", report.heads, report.kv_heads, report.head_dim);
    println!("hidden       {} (FFN {}, o_proj in {})", report.hidden_size, report.intermediate_size, report.o_proj_in_features);
    println!("vocab        {}", report.vocab_size);
    println!("parameters   {} ({:.2} B)", report.parameters, report.parameters as f64 / 1e9);
    println!("dtype        {:?}", report.dtype);
    for f in &report.files {
        println!("file         {} ({:.3} GiB)", f.path, gib(f.bytes));
    }
    let m = &report.bake_memory_estimate;
    println!(
        "bake memory  ~{:.2} GiB (f32 weights {:.2} + activations {:.2} + writer {:.2})",
        gib(m.total_bytes),
        gib(m.weights_f32_bytes),
        gib(m.activations_bytes),
        gib(m.writer_bytes)
    );
    Ok(())
}
