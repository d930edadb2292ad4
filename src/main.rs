//! The `bake` command line: a thin layer over the `bake` library. Each command's flags, and what it prints, are
//! in `src/cli/` (one file per command, the flag groups they share in `cli/args.rs`); the library does the work
//! and reports progress through [`bake::progress::Progress`].

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use bake::model::resolve::ALIASES;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bake",
    version,
    about = "Bake Inference-Time Intervention into LLaMA checkpoints as o_proj biases",
    override_usage = "bake --model <MODEL> --recipe <RECIPE> --out <OUT> [OPTIONS]\n       bake <COMMAND>",
    after_help = "Without a command, bake runs the whole pipeline (see `bake run --help`):\n  \
                  bake --model llama2_chat_7B --recipe recipes/truthfulqa.yaml --out honest-llama2-chat-7b"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print no progress on stderr (warnings and errors still are); results still go to stdout.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Bake: activations, probes, shifts, then the checkpoint with o_proj biases (the default command).
    Run(cli::bake::BakeArgs),
    /// Show what bake understands of a model: shapes, dtype, files, and the memory a bake needs.
    Inspect(cli::inspect::InspectArgs),
    /// List the short model names (as in the reference code) and the Hub repositories behind them.
    Models,
    /// Run the ITI core (activations, probes, heads, shifts) and write report.json and heatmap.png.
    Probe(cli::bake::ProbeArgs),
    /// Publish a baked folder to the Hugging Face Hub in one commit (only files the remote lacks), then check
    /// the remote weights' LFS sha256 against the manifest. Token: HF_TOKEN or the HF token file.
    Push(cli::push::PushArgs),
    /// TruthfulQA MC1/MC2 (reference and leaderboard protocols) and CE/KL: the base, a baked folder made
    /// from it (--baked), or ITI fitted and applied fold by fold (--cv 2).
    Eval(cli::eval::EvalArgs),
    /// Prove a baked folder (or Hub repo) is exactly its base plus its diff. Exit 0: all hold; 1: a mismatch;
    /// 2: verification could not run.
    Verify(cli::verify::VerifyArgs),
    /// Choose K and α by cross-validation under a KL budget: search.json, tradeoff.png and a recipe.yaml
    /// that `bake --recipe` bakes.
    Search(cli::search::SearchArgs),
    /// Write a bake's shift into a GGUF of its base (any quantization) for llama.cpp and ollama: every tensor
    /// kept byte for byte, plus an attn_output.bias per shifted layer.
    Gguf(cli::gguf::GgufArgs),
}

/// candle allocates a fresh buffer for every tensor operation and frees it right after. glibc returns such
/// buffers to the kernel (mmap'd ones at once, the heap's top past 128 KiB), so the next operation pays page
/// faults and zeroing again: about 15% of the activation pass. Keeping freed memory in the heap for reuse
/// costs no extra peak memory, since the next batch needs the same sizes.
fn keep_freed_buffers_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum; larger buffers are still mapped.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Rust ignores SIGPIPE, so `bake ... | head` would panic on the closed pipe; like other Unix tools, bake
/// should simply end there.
fn end_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    keep_freed_buffers_for_reuse();
    end_quietly_on_closed_pipe();
    // `bake --model ...` without a command means `bake run --model ...`; global flags may come first
    // (`bake --quiet gguf ...` names a command).
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let global = |a: &&std::ffi::OsString| matches!(a.to_str(), Some("-q" | "--quiet"));
    let first = argv.iter().skip(1).find(|a| !global(a)).and_then(|a| a.to_str()).unwrap_or("");
    if first.starts_with('-') && !["-h", "--help", "-V", "--version"].contains(&first) {
        argv.insert(1, "run".into());
    }
    let cli = Cli::parse_from(argv);
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
        Command::Run(args) => cli::bake::run(&args, cli.quiet)?,
        Command::Inspect(args) => cli::inspect::run(&args)?,
        Command::Probe(args) => cli::bake::probe(&args, cli.quiet)?,
        Command::Verify(args) => return cli::verify::run(&args, cli.quiet),
        Command::Eval(args) => cli::eval::run(&args, cli.quiet)?,
        Command::Search(args) => cli::search::run(&args, cli.quiet)?,
        Command::Push(args) => cli::push::run(&args, cli.quiet)?,
        Command::Gguf(args) => cli::gguf::run(&args, cli.quiet)?,
        Command::Models => {
            for (alias, repo) in ALIASES {
                println!("{alias:<22} {repo}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
