//! `bake search`: K and α chosen by cross-validation under a KL budget, into a folder holding `search.json`, the
//! trade-off figure and a `recipe.yaml` that `bake --recipe` bakes.

use std::path::PathBuf;

use anyhow::Result;
use bake::model::ModelFiles;
use bake::pipeline::{self, OutputKind, Resolved};
use bake::progress::Progress;
use bake::scoring::mc::{AnswerTokens, Protocol, INSTRUCTION_DEFAULT};
use bake::scoring::ScoreOptions;
use bake::search::{self, output, Objective, SearchOptions};
use clap::Args;

use super::args::{at_least_one, folds, nats, GridArgs, RunArgs, ScoringArgs};
use super::output::{note_leftover, print_plans, staged};
use super::progress::Bars;

#[derive(Args)]
pub struct SearchArgs {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    grid: GridArgs,
    #[command(flatten)]
    scoring: ScoringArgs,
    /// Folder for search.json, search.log, tradeoff.png/.svg and recipe.yaml (written atomically).
    #[arg(long, short, required_unless_present = "dry_run")]
    out: Option<PathBuf>,
    /// Replace an existing search folder, if bake wrote it.
    #[arg(long)]
    force: bool,
    /// Most KL(base ‖ edited) per token, in nats, on the corpus (mean of the folds).
    #[arg(long, default_value_t = search::DEFAULT_KL_BUDGET, value_parser = nats, allow_negative_numbers = true)]
    kl_budget: f64,
    /// Most CE increase over the base, in nats per token (default: none).
    #[arg(long, value_parser = nats, allow_negative_numbers = true)]
    ce_budget: Option<f64>,
    /// The held-out number maximised (reference MC protocol).
    #[arg(long, value_enum, default_value = "mc2")]
    objective: Objective,
    /// Contiguous folds of the questions, as `bake eval --cv`.
    #[arg(long, default_value_t = 2, value_parser = folds)]
    folds: usize,
    /// Most candidates measured on every held-out question and the whole corpus (the last rung of the halving).
    #[arg(long, default_value_t = search::DEFAULT_TRIALS, value_parser = at_least_one)]
    trials: usize,
    /// Evaluate every candidate on every question and document: no KL screen, no halving (slow; the
    /// reference the savings are measured against).
    #[arg(long)]
    full_grid: bool,
    /// Print the plan (the activation pass's, and scoring's memory) and exit without running.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(args: &SearchArgs, quiet: bool) -> Result<()> {
    let (recipe, methods) = args.run.recipe_and_methods(&args.scoring)?;
    if recipe.corpus.is_none() {
        anyhow::bail!(
            "bake search measures KL against a budget and needs a corpus: give --corpus FILE (.jsonl with a `text` \
             field, or plain text) or the recipe's `corpus:`"
        );
    }
    let model = ModelFiles::open(&args.run.model)?;
    for &method in &methods {
        pipeline::check_method(&model, method)?;
    }
    let options = SearchOptions {
        methods,
        heads: args.grid.heads.clone(),
        alphas: args.grid.alpha.clone(),
        kl_budget: args.kl_budget,
        ce_budget: args.ce_budget,
        objective: args.objective,
        folds: args.folds,
        trials: args.trials,
        early_discard: !args.full_grid,
        min_rung_questions: search::MIN_RUNG_QUESTIONS,
        eval: ScoreOptions {
            protocols: vec![Protocol::Reference],
            instruction: INSTRUCTION_DEFAULT.into(),
            answer_tokens: AnswerTokens::Offsets,
        },
    };
    // Before the activation pass, which takes minutes: every option, and the output folder.
    let options = options.check(&model.config, &recipe)?;
    let run = Resolved::new(&model, &recipe, &args.run.run_options())?;
    let Some(out) = args.out.as_ref().filter(|_| !args.dry_run) else {
        let activations = pipeline::plan_run(&model, &recipe, &run)?;
        let scoring = search::plan(&model, &recipe, &options, &run)?;
        let covers = "scoring's memory is that of the search's two largest passes (one candidate on a fold's \
                      held-out questions; every candidate's CE and KL beside the base's), and so are its FLOPs and \
                      time; how many passes run depends on what the halving drops";
        return print_plans(Some(&activations), &scoring, Some(covers));
    };
    let bars = Bars::new(quiet);
    let staging = staged(out, args.force, (&model, &recipe), OutputKind::Report, &bars)?;
    let outcome = search::search(&model, &recipe, &options, &run, &bars)?;
    output::write_files(&outcome, staging.path())?;
    let published = staging.commit()?;
    bars.stage("done");
    note_leftover(&published, &bars);
    print!("{}", output::table(&outcome.report));
    let chosen = outcome.report.chosen();
    println!("\nchosen: {} (see {})", chosen.point(), out.join("tradeoff.png").display());
    println!("bake it:\n  bake --model {} --recipe {} --out OUT", args.run.model, out.join("recipe.yaml").display());
    Ok(())
}
