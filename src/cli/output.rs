//! The output folder's sequence, one for every command that writes a folder: checked before any work (a folder
//! bake did not write is never replaced), staged beside it, and once the command has committed it, a word about
//! anything the swap left behind.

use std::path::Path;

use anyhow::Result;
use bake::io::output::{Published, Staging};
use bake::model::ModelFiles;
use bake::pipeline::{self, OutputKind};
use bake::progress::Progress;
use bake::recipe::Recipe;
use bake::scoring::plan::ScoringPlan;

/// Checks `out` and stages the new folder beside it, saying what the check found (an old run's leftovers, say).
pub fn staged(
    out: &Path,
    force: bool,
    inputs: (&ModelFiles, &Recipe),
    kind: OutputKind,
    progress: &dyn Progress,
) -> Result<Staging> {
    let staging = pipeline::check_output(out, force, inputs.0, inputs.1, kind)?.stage()?;
    staging.notes.iter().for_each(|n| progress.note(n));
    Ok(staging)
}

/// A replaced folder that could not be removed is worth saying, not failing for: the new output is in place.
pub fn note_leftover(published: &Published, progress: &dyn Progress) {
    if let Some((path, why)) = &published.leftover {
        progress.warn(&format!("the replaced folder is left at {} ({why}); remove it when convenient", path.display()));
    }
}

/// A dry run's answer: each plan in a sentence (and what the scoring plan covers, when it is not the whole
/// run), then both as JSON.
pub fn print_plans(
    activations: Option<&bake::activations::plan::Plan>,
    scoring: &ScoringPlan,
    covers: Option<&str>,
) -> Result<()> {
    if let Some(plan) = activations {
        println!("activation pass: {}", plan.describe());
    }
    println!("{}", scoring.describe());
    if let Some(covers) = covers {
        println!("note: {covers}");
    }
    let json = serde_json::json!({ "activation_pass": activations, "scoring": scoring });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(())
}
