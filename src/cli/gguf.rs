//! `bake gguf`: a bake's shift written into a GGUF of its base (any quantization), for llama.cpp and ollama.

use std::path::PathBuf;

use anyhow::Result;
use bake::export::gguf::{GgufBake, Rewrite};
use bake::progress::Progress;
use clap::Args;

use super::progress::Bars;

#[derive(Args)]
pub struct GgufArgs {
    /// The baked folder (what `bake --out` wrote).
    bake: PathBuf,
    /// A GGUF of the bake's base model, in any quantization: llama.cpp's `llama` architecture (LLaMA, Mistral,
    /// SmolLM2) or `qwen2` (rewritten as `llama`, the graph that adds an attention output bias).
    #[arg(long)]
    gguf: PathBuf,
    /// The folder to write: the new GGUF, under the input's file name, and `outputs.json`.
    #[arg(long)]
    out: PathBuf,
    /// Replace OUT if bake wrote it.
    #[arg(long)]
    force: bool,
}

pub fn run(args: &GgufArgs, quiet: bool) -> Result<()> {
    let progress = Bars::new(quiet);
    let target = GgufBake::check_output(&args.out, args.force, &args.bake, &args.gguf)?;
    progress.stage("check");
    let bake = GgufBake::prepare(&args.bake, &args.gguf)?;
    if let Rewrite::Qwen2AsLlama = bake.rewrite {
        progress.note(
            "the GGUF is a qwen2 model, whose llama.cpp graph has no attention output bias: it is written as llama \
             (query and key rows reordered for llama's rotary layout; every other tensor as it is)",
        );
    }
    let staging = target.stage()?;
    staging.notes.iter().for_each(|n| progress.note(n));
    progress.stage("write");
    let path = bake.write(staging.path(), &progress)?;
    let published = staging.commit()?;
    super::output::note_leftover(&published, &progress);
    let written = published.out.join(path.file_name().expect("a file name"));
    println!(
        "wrote {}: {} layers gain {} (layers {}), every tensor of {} kept{}",
        written.display(),
        bake.biases.len(),
        bake::export::gguf::gguf_bias_name(bake.site, 0).trim_start_matches("blk.0."),
        bake.shifted_layers(),
        args.gguf.display(),
        match bake.rewrite {
            Rewrite::None => String::new(),
            Rewrite::Qwen2AsLlama => " (architecture qwen2 written as llama)".into(),
        }
    );
    Ok(())
}
