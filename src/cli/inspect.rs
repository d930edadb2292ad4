//! `bake inspect`: what bake understands of a model, and what a bake of it costs on this machine.

use anyhow::Result;
use bake::activations::plan::Mode;
use bake::model::ModelFiles;
use clap::Args;

#[derive(Args)]
pub struct InspectArgs {
    /// A model folder, a Hub repo id `org/name[@revision]`, or a short name (see `bake models`).
    #[arg(long, short)]
    model: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let model = ModelFiles::open(&args.model)?;
    let report = bake::inspect::inspect(&model);
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
    println!("family       {} ({})", report.family.model_type(), report.architecture);
    for verdict in &report.runtimes {
        println!("runtime      {}", verdict.summary());
    }
    if let Some(warning) = &report.runtime_warning {
        println!("warning: {warning}");
    }
    println!("layers       {}", report.layers);
    println!("heads        {} ({} KV heads, head_dim {})", report.heads, report.kv_heads, report.head_dim);
    println!(
        "hidden       {} (FFN {}, o_proj in {})",
        report.hidden_size, report.intermediate_size, report.o_proj_in_features
    );
    println!("vocab        {}", report.vocab_size);
    println!("parameters   {} ({:.2} B)", report.parameters, report.parameters as f64 / 1e9);
    println!("dtype        {:?}", report.dtype);
    for f in &report.files {
        println!("file         {} ({:.3} GiB)", f.path, gib(f.bytes));
    }
    let m = &report.bake_memory_estimate;
    println!(
        "bake memory  ~{:.2} GiB (f32 weights {:.2} + mapped weights {:.2} + activations {:.2} + writer {:.2})",
        gib(m.total_bytes),
        gib(m.weights_f32_bytes),
        gib(m.mapped_weights_bytes),
        gib(m.activations_bytes),
        gib(m.writer_bytes)
    );
    println!("activations  full TruthfulQA set: {}", report.activation_plan.describe());
    let (plan, machine) = (&report.activation_plan, &report.this_machine);
    let gb = |b: u64| b as f64 / 1e9;
    match (machine.available_bytes, machine.mode) {
        (Some(a), Some(Mode::Resident)) => {
            println!("this machine ~{:.2} GB available: a bake runs resident", gb(a))
        }
        (Some(a), Some(Mode::Streamed)) => println!(
            "this machine ~{:.2} GB available: a bake runs layer-streamed (resident needs ~{:.2} GB)",
            gb(a),
            gb(plan.estimate.resident_bytes)
        ),
        (Some(a), None) => println!(
            "warning: this machine has ~{:.2} GB available, less than a bake needs (resident ~{:.2} GB, \
             streamed ~{:.2} GB): try --dtype bf16, a GPU, or a machine with more memory",
            gb(a),
            gb(plan.estimate.resident_bytes),
            gb(plan.estimate.streamed_bytes)
        ),
        (None, _) => println!("this machine: available memory unknown; give --max-memory to bake"),
    }
    Ok(())
}
