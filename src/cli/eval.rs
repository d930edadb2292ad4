//! `bake eval`: TruthfulQA MC1/MC2 (reference and leaderboard protocols) and CE/KL for the base, a baked folder
//! made from it, or ITI fitted and applied fold by fold; optionally into a baked folder's model card.

use std::path::PathBuf;

use anyhow::Result;
use bake::eval;
use bake::model::ModelFiles;
use bake::pipeline::{self, Resolved};
use bake::progress::Progress;
use bake::scoring::mc::{AnswerTokens, Instruction, Protocol};
use bake::scoring::ScoreOptions;
use clap::{Args, ValueEnum};

use super::args::{folds, RunArgs, ScoringArgs, ShiftArgs};
use super::output::{note_leftover, print_plans};
use super::progress::Bars;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    run: RunArgs,
    /// K and α of the ITI fitted in each fold (with --cv).
    #[command(flatten)]
    shift: ShiftArgs,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// A baked folder made from --model: evaluated beside the base (KL against the base).
    #[arg(long, conflicts_with = "cv")]
    baked: Option<PathBuf>,
    /// Cross-validate ITI over N contiguous folds (the reference uses 2): fit on the other folds, apply to the
    /// held-out one as a bias (every position) and as the reference's hook (from the prompt's end).
    #[arg(long, value_name = "N", value_parser = folds)]
    cv: Option<usize>,
    /// Which multiple-choice protocols to run.
    #[arg(long, value_enum, default_value = "both")]
    protocol: Protocols,
    /// The reference protocol's instruction prompt.
    #[arg(long, value_enum, default_value = "default")]
    instruction: Instruction,
    /// How answer tokens are found: from token offsets (any tokenizer), or the reference's
    /// `len(tok(prompt)) + 3` slice (LLaMA-1/2 tokenizers only).
    #[arg(long, value_enum, default_value = "offsets")]
    answer_tokens: AnswerTokens,
    /// Put the results table into the model card (README.md) of this baked folder, and its new hash into
    /// the folder's manifest.
    #[arg(long, value_name = "DIR")]
    card: Option<PathBuf>,
    /// Print the results as JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
    /// Print the plan (resident or layer-streamed, peak memory, FLOPs, time) and exit without running.
    #[arg(long)]
    dry_run: bool,
}

/// One protocol, or both.
#[derive(Clone, Copy, ValueEnum)]
enum Protocols {
    Reference,
    Leaderboard,
    Both,
}

impl Protocols {
    fn list(self) -> Vec<Protocol> {
        match self {
            Protocols::Reference => vec![Protocol::Reference],
            Protocols::Leaderboard => vec![Protocol::Leaderboard],
            Protocols::Both => vec![Protocol::Reference, Protocol::Leaderboard],
        }
    }
}

pub fn run(args: &EvalArgs, quiet: bool) -> Result<()> {
    let recipe = args.run.recipe(Some(&args.shift), Some(&args.scoring))?;
    let model = ModelFiles::open(&args.run.model)?;
    let compared = match (args.cv, &args.baked) {
        (Some(folds), _) => eval::card::Compared::CrossValidated { folds },
        (None, Some(_)) => eval::card::Compared::BakedAgainstBase,
        (None, None) => eval::card::Compared::Base,
    };
    if let Some(dir) = &args.card {
        // Before the evaluation, which takes minutes: the card must be intact and get only its own numbers.
        eval::card::check_target(dir, &model, compared, args.baked.as_deref(), &recipe)?;
    }
    let options = ScoreOptions {
        protocols: args.protocol.list(),
        instruction: args.instruction.text().into(),
        answer_tokens: args.answer_tokens,
    };
    let run = Resolved::new(&model, &recipe, &args.run.run_options())?;
    if args.dry_run {
        let activations = args.cv.map(|_| pipeline::plan_run(&model, &recipe, &run)).transpose()?;
        let scoring = eval::plan(&model, &recipe, (args.baked.is_some(), args.cv), &options, &run)?;
        return print_plans(activations.as_ref(), &scoring, None);
    }
    let bars = Bars::new(quiet);
    let report = match (args.cv, &args.baked) {
        (Some(folds), _) => eval::cross_validate(&model, &recipe, folds, &options, &run, &bars)?,
        (None, Some(dir)) => {
            let baked = ModelFiles::open(&dir.to_string_lossy())?;
            eval::evaluate(&model, Some(&baked), &recipe, &options, &run, &bars)?
        }
        (None, None) => eval::evaluate(&model, None, &recipe, &options, &run, &bars)?,
    };
    if let Some(dir) = &args.card {
        let published = eval::card::put_evaluation(dir, &eval::card::section(&report, compared))?;
        note_leftover(&published, &bars);
        bars.note(&format!("wrote the table into {}", dir.join("README.md").display()));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", eval::markdown_table(&report));
        let documents = report.documents.map(|d| format!(", CE/KL over {d} documents")).unwrap_or_default();
        println!("\n{} questions{documents}; {:.0} s", report.questions, report.timings["total"]);
    }
    Ok(())
}
