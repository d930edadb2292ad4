//! `bake` (the default command, `bake run`): the whole pipeline into a baked folder; and `bake probe`: the ITI core
//! only, into `report.json` and the heatmap.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use bake::export::baked::{BakeOptions, Sharding};
use bake::export::manifest::Cost;
use bake::export::runtimes;
use bake::model::config::Family;
use bake::model::ModelFiles;
use bake::pipeline::{self, OutputKind, Resolved};
use bake::progress::Progress;
use clap::Args;

use super::args::{RunArgs, ShiftArgs};
use super::output::{note_leftover, staged};
use super::progress::Bars;

#[derive(Args)]
pub struct BakeArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    shift: ShiftArgs,
    /// Output folder for the baked checkpoint (written atomically); not needed with --dry-run.
    #[arg(long, short, required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// Replace an existing output folder, if bake wrote it (a folder bake did not write is never replaced).
    #[arg(long)]
    force: bool,
    /// Show the execution plan of the activation pass (mode, peak host memory, bytes read) and stop.
    #[arg(long)]
    dry_run: bool,
    /// Rewrite every tensor into shards of at most this size (KB/MB/GB: powers of 1000, as Hugging Face;
    /// KiB/MiB/GiB: powers of 1024). Without it the base's weight files are copied whole and the new biases
    /// go in one added file, which is faster.
    #[arg(long, value_parser = shard_size, allow_hyphen_values = true)]
    max_shard_size: Option<u64>,
}

/// `--max-shard-size`: at least 1 MB, or a model would be written as one file per tensor.
fn shard_size(text: &str) -> std::result::Result<u64, String> {
    match bake::units::parse_size(text)? {
        n if n < 1_000_000 => {
            Err(format!("`{text}`: expected at least 1MB (smaller shards would hold one tensor each)"))
        }
        n => Ok(n),
    }
}

#[derive(Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    shift: ShiftArgs,
    /// Folder for report.json and heatmap.png (created if missing; written atomically).
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing report folder, if bake wrote it.
    #[arg(long)]
    force: bool,
}

pub fn run(args: &BakeArgs, quiet: bool) -> Result<()> {
    let bars = Bars::new(quiet);
    let recipe = args.run.recipe(Some(&args.shift), None)?;
    let model = ModelFiles::open(&args.run.model)?;
    let run = Resolved::new(&model, &recipe, &args.run.run_options())?;
    let Some(out) = args.out.as_ref().filter(|_| !args.dry_run) else {
        // A dry run still checks the output it names, so that the real run will not be refused.
        if let Some(out) = &args.out {
            pipeline::check_output(out, args.force, &model, &recipe, OutputKind::Bake)?;
        }
        let plan = pipeline::plan_run(&model, &recipe, &run)?;
        println!("activation pass: {}", plan.describe());
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    };
    let staging = staged(out, args.force, (&model, &recipe), OutputKind::Bake, &bars)?;
    let outcome = pipeline::run_probe(&model, &recipe, &run, &bars)?;
    let cost_started = Instant::now();
    let cost = bake::scoring::cost::measure(&model, &recipe, &outcome.deltas, &run, &bars)?;
    let cost_seconds = cost_started.elapsed().as_secs_f64();
    let write_started = Instant::now();
    let sharding = args.max_shard_size.map_or(Sharding::KeepBase, Sharding::MaxBytes);
    let options = BakeOptions { sharding };
    let written =
        bake::export::baked::write_baked(&outcome.bake_input(&model, cost.as_ref()), staging, &options, &bars)?;
    let write_seconds = write_started.elapsed().as_secs_f64();
    // A damaging shift is a warning, which --quiet does not hide (after the write's own, about runtimes).
    if let Some(warning) = cost.as_ref().and_then(Cost::warning) {
        bars.warn(&warning);
    }
    bars.stage("done");
    note_leftover(&written.published, &bars);
    print_heads(&outcome);
    let seconds = Seconds { cost: cost_seconds, write: write_seconds, total: bars.started.elapsed().as_secs_f64() };
    print_bake_summary(args, (&outcome, cost.as_ref()), &written, model.config.family, seconds);
    Ok(())
}

pub fn probe(args: &ProbeArgs, quiet: bool) -> Result<()> {
    let recipe = args.run.recipe(Some(&args.shift), None)?;
    let model = ModelFiles::open(&args.run.model)?;
    let run = Resolved::new(&model, &recipe, &args.run.run_options())?;
    let bars = Bars::new(quiet);
    let staging = staged(&args.out, args.force, (&model, &recipe), OutputKind::Report, &bars)?;
    let outcome = pipeline::run_probe(&model, &recipe, &run, &bars)?;
    let published = pipeline::publish_probe_outputs(&outcome.report, staging)?;
    print_heads(&outcome);
    note_leftover(&published, &bars);
    bars.note(&format!("wrote {}", args.out.join("report.json").display()));
    Ok(())
}

fn print_heads(outcome: &pipeline::ProbeOutcome) {
    let r = &outcome.report;
    println!("{} probe prompts, {} tuning prompts, {} questions", r.probe_prompts, r.tuning_prompts, outcome.questions);
    println!("top heads (layer, head: validation accuracy, σ):");
    for &(l, h, sigma) in r.sigma.iter().take(10) {
        println!("  {l:>3}, {h:>3}: {:.3}, {sigma:.4}", r.val_accuracy[l][h]);
    }
    if r.heads.len() > 10 {
        println!("  ... and {} more", r.heads.len() - 10);
    }
}

/// Seconds of the steps after the probe stage, and of the whole run.
struct Seconds {
    cost: f64,
    write: f64,
    total: f64,
}

/// The end of a bake on stdout: where the stages' time went, what was written, what it costs, and what to run
/// next.
fn print_bake_summary(
    args: &BakeArgs,
    (outcome, cost): (&pipeline::ProbeOutcome, Option<&Cost>),
    written: &bake::export::baked::BakeWritten,
    family: Family,
    seconds: Seconds,
) {
    let timings = outcome.report.timings.clone().unwrap_or_default();
    let stages = ["data", "activations", "probes"].map(|s| (s, timings.get(s).copied().unwrap_or(0.0)));
    let bytes: u64 = written.files.iter().map(|f| f.bytes).sum();
    let out_path = &written.published.out;
    let (report, out, model) = (&outcome.report, out_path.display(), &args.run.model);
    println!();
    println!("  stage        time");
    for (stage, seconds) in stages.into_iter().chain([("cost", seconds.cost), ("write", seconds.write)]) {
        println!("  {stage:<12} {seconds:>6.1} s");
    }
    for (part, seconds) in &written.timings {
        println!("    {part:<13} {seconds:>4.1} s");
    }
    println!("  {:<12} {:>6.1} s", "total", seconds.total);
    println!();
    println!("  output       {out} ({} files, {})", written.files.len(), bake::units::format_bytes(bytes));
    let chosen = format!("{} (K)", report.recipe.method.units());
    println!("  {chosen:<12} {} of {}", report.heads.len(), report.layers * report.heads_per_layer);
    println!("  alpha        {}", report.recipe.alpha);
    println!("  method       {} ({})", report.recipe.method, report.recipe.describe_tokens());
    match cost {
        Some(cost) => println!("  cost         {}", cost.summary()),
        None => println!("  cost         not measured (see the warning above)"),
    }
    println!(
        "  questions    {} ({} probe prompts, {} tuning prompts)",
        outcome.questions, report.probe_prompts, report.tuning_prompts
    );
    println!("  figure       {}", out_path.join("heatmap.png").display());
    for verdict in runtimes::verdicts(family, report.recipe.method.site()) {
        println!("  runtime      {}", verdict.summary());
    }
    for warning in runtimes::warning(family).into_iter().chain(cost.and_then(Cost::warning)) {
        println!("warning: {warning}");
    }
    println!();
    println!("next:");
    let mut next = vec![
        ("prove it is exactly the base plus the shift", format!("bake verify {out} --base {model}")),
        ("TruthfulQA MC1/MC2 and CE/KL against the base", format!("bake eval --model {model} --baked {out}")),
        ("publish it on the Hub", format!("bake push {out} --repo your-org/NAME")),
    ];
    if runtimes::llama_cpp_applies(family) {
        next.push(("serve it with llama.cpp or ollama", format!("bake gguf {out} --gguf BASE.gguf --out {out}-gguf")));
    }
    for (why, command) in next {
        println!("  {why}:\n    {command}");
    }
}
