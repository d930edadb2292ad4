//! `bake verify`: prove a baked folder is exactly its base plus its diff. Exit 0: all hold; 1: a mismatch; 2: the
//! verification could not run.

use std::process::ExitCode;

use anyhow::Result;
use bake::progress::Progress;
use clap::Args;

use super::progress::Bars;

#[derive(Args)]
pub struct VerifyArgs {
    /// A baked folder, or a Hub repo id `org/name[@revision]` holding one.
    target: String,
    /// The base model (folder, Hub id or short name): enables the tensor, bias and config checks.
    #[arg(long)]
    base: Option<String>,
    /// Also run a forward pass: the logits must move away from the base's and equal base + δ.
    #[arg(long)]
    run: bool,
    /// Host memory the run check may use (e.g. 8GB); by default what is available. The base runs layer by
    /// layer when it does not fit whole.
    #[arg(long, value_parser = super::args::memory_size, allow_hyphen_values = true)]
    max_memory: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &VerifyArgs, quiet: bool) -> Result<ExitCode> {
    let dir = bake::verify::locate(&args.target)?;
    let options = bake::verify::VerifyOptions {
        base: args.base.clone(),
        run: args.run,
        max_memory: args.max_memory,
        ..Default::default()
    };
    let progress: Box<dyn Progress> =
        if args.json { Box::new(bake::progress::Silent) } else { Box::new(Bars::new(quiet)) };
    let report = bake::verify::verify(&dir, &options, progress.as_ref())?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "ok": report.ok(), "folder": report.folder, "scope": report.scope, "checks": report.checks, "mismatches": report.mismatches, "run_plan": report.run_plan })
        );
    } else {
        for m in &report.mismatches {
            let tensor = m.tensor.as_deref().map(|t| format!(" tensor `{t}`:")).unwrap_or_default();
            println!("FAIL [{}] {}:{tensor} {}", m.check, m.file, m.message);
        }
        let verdict = if report.ok() { "OK" } else { "FAILED" };
        println!(
            "{verdict}: {} ({} mismatches; checks: {})",
            report.folder,
            report.mismatches.len(),
            report.checks.join(", ")
        );
        if report.scope == bake::verify::Scope::SelfConsistency {
            println!(
                "note: self-consistency only: the files match bake.json, and the figures, the diff and the \
                 manifest's recipe and heads agree with report.json; but nothing was compared with the base model, \
                 so replaced weights, tokenizer, chat template or config with updated hashes would pass. To prove \
                 every file is exactly what the base and the shift give: bake verify {} --base MODEL",
                args.target
            );
        }
    }
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
