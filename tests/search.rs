//! `bake search`: on SmolLM2 the chosen point's held-out numbers are what `bake eval --cv` measures for the
//! same K and α (and method, when several compete in one search), early discarding keeps the full grid's winner, a budget nothing meets chooses α = 0, the
//! written recipe round-trips and a card baked from it names the search; bad input fails before any model
//! weight is read.

mod common;

use std::path::Path;
use std::process::Command;

use bake::model::ModelFiles;
use bake::pipeline::{Resolved, RunOptions};
use bake::progress::Silent;
use bake::recipe::{CorpusSpec, Method, Recipe};
use bake::scoring::mc::{AnswerTokens, Protocol, INSTRUCTION_DEFAULT};
use bake::scoring::ScoreOptions;
use bake::search::{self, output, Objective, Reached, SearchOptions, SearchReport};

const QUESTIONS: usize = 12;
const DOCUMENTS: usize = 2;

fn eval_options() -> ScoreOptions {
    ScoreOptions {
        protocols: vec![Protocol::Reference],
        instruction: INSTRUCTION_DEFAULT.into(),
        answer_tokens: AnswerTokens::Offsets,
    }
}

fn recipe(corpus: &Path) -> Recipe {
    let mut recipe = Recipe::shipped();
    recipe.limit = Some(QUESTIONS);
    recipe.device = bake::recipe::DeviceChoice::Cpu;
    recipe.corpus = Some(CorpusSpec { documents: DOCUMENTS, tokens: 48, path: corpus.into() });
    recipe
}

fn options(early_discard: bool, kl_budget: f64) -> SearchOptions {
    SearchOptions {
        methods: vec![Method::Iti],
        heads: vec![4, 16],
        alphas: vec![0.0, 5.0, 20.0],
        kl_budget,
        ce_budget: None,
        objective: Objective::Mc2,
        folds: 2,
        trials: 2,
        early_discard,
        // 6 held-out questions per fold: the first rung scores 3 of them.
        min_rung_questions: 3,
        eval: eval_options(),
    }
}

/// What a command resolves from the model and the recipe, with the tests' activation cache.
fn resolved(model: &ModelFiles, recipe: &Recipe) -> Resolved {
    let options = RunOptions { cache_dir: Some(std::env::temp_dir().join("bake-test-cache")), max_memory: None };
    Resolved::new(model, recipe, &options).unwrap()
}

fn run(model: &ModelFiles, recipe: &Recipe, options: &SearchOptions) -> search::SearchOutcome {
    let options = options.clone().check(&model.config, recipe).unwrap();
    let outcome = search::search(model, recipe, &options, &resolved(model, recipe), &Silent).unwrap();
    eprintln!("search seconds: {:?}", outcome.timings);
    outcome
}

fn close(a: Option<f64>, b: Option<f64>, what: &str) {
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!((a - b).abs() <= 1e-6, "{what}: search {a}, eval --cv {b}");
}

/// The numbers `bake eval --cv 2` gives for K and α, next to the search's.
fn check_against_cross_validation(model: &ModelFiles, recipe: &Recipe, report: &SearchReport, candidate: usize) {
    let c = &report.candidates[candidate];
    let fixed = Recipe { method: c.method, heads: c.heads, alpha: c.alpha, ..recipe.clone() };
    let cv = bake::eval::cross_validate(model, &fixed, 2, &eval_options(), &resolved(model, &fixed), &Silent).unwrap();
    eprintln!("eval --cv seconds: {:?}", cv.timings);
    let bias_row = format!("{} (bias", c.method.name().to_uppercase());
    let row = cv.rows.iter().find(|r| r.name.starts_with(&bias_row)).unwrap();
    let mc = &row.mc["reference"];
    eprintln!("{}: search MC2 {:?} KL {:?}; eval --cv MC2 {} KL {:?}", c.point(), c.mc2, c.kl, mc.mc2, row.kl);
    close(c.mc1, Some(mc.mc1), "MC1");
    close(c.mc2, Some(mc.mc2), "MC2");
    close(c.ce, row.ce, "CE");
    close(c.kl, row.kl, "KL");
    for (fold, numbers) in common::zip_exact(&cv.folds, &c.folds) {
        assert_eq!(fold.heads, numbers.heads, "fold {}: the same heads", fold.fold);
    }
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn a_search_on_smollm2_measures_what_eval_cv_measures_and_keeps_the_full_grid_winner() {
    let (shared, dir) = (common::shared_dir(), common::smollm2_dir());
    let corpus = shared.join("data/wikitext2/test.jsonl");
    let model = ModelFiles::open(dir.to_str().unwrap()).unwrap();
    let recipe = recipe(&corpus);

    let halving = run(&model, &recipe, &options(true, 1.0)).report;
    let full = run(&model, &recipe, &options(false, 1.0)).report;
    eprintln!("{}", output::table(&halving));
    eprintln!("{}", output::table(&full));
    assert_eq!(halving.candidates.len(), 5, "(4, 0) once, then K ∈ {{4, 16}} × α ∈ {{5, 20}}");
    assert!(full.candidates.iter().all(|c| c.reached == Reached::Final));
    assert!(
        halving.candidates.iter().any(|c| matches!(c.reached, Reached::Rung { .. })),
        "the halving dropped nothing"
    );
    assert!(halving.cost.questions_scored < full.cost.questions_scored);
    assert_eq!(halving.chosen().point(), full.chosen().point(), "early discarding changed the winner");

    // The search measures what eval measures: the best shifted finalist, and the chosen point.
    let best_shifted = (0..halving.candidates.len())
        .filter(|&i| halving.candidates[i].alpha > 0.0 && halving.candidates[i].reached == Reached::Final)
        .max_by(|&a, &b| halving.candidates[a].mc2.unwrap().total_cmp(&halving.candidates[b].mc2.unwrap()))
        .unwrap();
    check_against_cross_validation(&model, &recipe, &halving, best_shifted);
    if halving.chosen != best_shifted {
        check_against_cross_validation(&model, &recipe, &halving, halving.chosen);
    }

    // No shift fits a budget of 1e-12 nats: "no shift" is the answer.
    let strict = run(&model, &recipe, &options(true, 1e-12)).report;
    assert_eq!(strict.chosen().alpha, 0.0);
    let shifted: Vec<&Reached> = strict.candidates.iter().filter(|c| c.alpha > 0.0).map(|c| &c.reached).collect();
    assert!(shifted.iter().all(|r| matches!(r, Reached::KlScreen | Reached::KlImplied)), "{shifted:?}");
    // α = 5 is measured for each K; over the budget there, α = 20 needs no measurement.
    assert_eq!(shifted, [&Reached::KlScreen, &Reached::KlScreen, &Reached::KlImplied, &Reached::KlImplied]);

    // recipe.yaml round-trips, names its search.json, and a bake's card made from it names the search.
    let out = tempfile::tempdir().unwrap();
    let outcome = search::SearchOutcome { report: halving.clone(), timings: vec![], candidate_seconds: vec![0.0; 5] };
    output::write_files(&outcome, out.path()).unwrap();
    let written = Recipe::load(&out.path().join("recipe.yaml")).unwrap();
    let json = std::fs::read(out.path().join("search.json")).unwrap();
    let sha = bake::io::hash::hex(&<sha2::Sha256 as sha2::Digest>::digest(&json));
    assert_eq!(written, output::chosen_recipe(&halving, &sha));
    assert_eq!((written.heads, written.alpha), (halving.chosen().heads, halving.chosen().alpha));
    assert_eq!(written.search.as_ref().unwrap().sha256, sha);
    let probed = bake::pipeline::run_probe(&model, &written, &resolved(&model, &written), &Silent).unwrap();
    let card = bake::export::card::model_card(&model, &probed.report, None);
    assert!(card.contains("## How K and α were chosen") && card.contains(&sha), "{card}");
    let png = std::fs::read(out.path().join("tradeoff.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

/// Methods compete in one search: the same folds and budget, one α = 0 candidate for all, and each method's
/// finalist measured as `bake eval --cv 2` with that method measures it.
#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn a_search_of_several_methods_measures_each_as_eval_cv_does() {
    let (shared, dir) = (common::shared_dir(), common::smollm2_dir());
    let model = ModelFiles::open(dir.to_str().unwrap()).unwrap();
    let recipe = recipe(&shared.join("data/wikitext2/test.jsonl"));
    let options = SearchOptions {
        methods: vec![Method::Iti, Method::Residual],
        heads: vec![2],
        alphas: vec![0.5, 5.0],
        ..options(false, 1.0)
    };
    let report = run(&model, &recipe, &options).report;
    eprintln!("{}", output::table(&report));
    let methods: Vec<(Method, f64)> = report.candidates.iter().map(|c| (c.method, c.alpha)).collect();
    let (iti, residual) = (Method::Iti, Method::Residual);
    assert_eq!(methods, [(iti, 0.0), (iti, 0.5), (iti, 5.0), (residual, 0.5), (residual, 5.0)]);
    assert!(output::table(&report).starts_with("| method | K |"));
    // (The iti candidates' numbers are held to `eval --cv` by the test above.)
    check_against_cross_validation(&model, &recipe, &report, 3);
    // The shifts differ: a residual vector per layer is not a head's.
    let numbers = |i: usize| (report.candidates[i].mc2, report.candidates[i].kl);
    assert_ne!(numbers(1), numbers(3));
    let chosen = output::chosen_recipe(&report, "0");
    assert_eq!(chosen.method, report.chosen().method, "recipe.yaml names the chosen method");
}

fn search_cli(inputs: &(std::path::PathBuf, std::path::PathBuf), root: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("search")
        .arg("--model")
        .arg(&inputs.0)
        .arg("--dataset")
        .arg(&inputs.1)
        .arg("--out")
        .arg(root.join("search"))
        .args(args)
        .env("BAKE_CACHE_DIR", root.join("cache"))
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A temporary folder with synthetic inputs and a corpus holding `text`.
fn synthetic_search(text: &str) -> (tempfile::TempDir, (std::path::PathBuf, std::path::PathBuf), std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let inputs = common::synthetic_inputs(root.path());
    let corpus = root.path().join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    (root, inputs, corpus)
}

#[test]
fn bad_search_input_is_a_clear_error_before_any_weight_is_read() {
    let (root, inputs, corpus) = synthetic_search("Bees make honey.\n\nThe sky is blue.\n");
    let c = corpus.to_str().unwrap();
    for (args, expected) in [
        (vec!["--corpus", c, "--heads", ""], "--heads"),
        (vec!["--corpus", c, "--alpha", "5,-1"], "'-1' for '--alpha <ALPHA>': expected a finite number ≥ 0"),
        (vec!["--corpus", c, "--heads", "2,100000"], "heads: K = 100000 is not between 1 and the model's"),
        (vec!["--corpus", c, "--kl-budget", "0"], "'0' for '--kl-budget <KL_BUDGET>': expected a number > 0"),
        (vec!["--corpus", c, "--ce-budget", "-0.5"], "'-0.5' for '--ce-budget <CE_BUDGET>': expected a number > 0"),
        (vec!["--corpus", c, "--folds", "1"], "'1' for '--folds <FOLDS>': expected a number of folds, at least 2"),
        (vec![], "needs a corpus"),
    ] {
        let (ok, stderr) = search_cli(&inputs, root.path(), &args);
        assert!(!ok && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!root.path().join("search").exists() && !root.path().join("cache").exists(), "{args:?} did work");
    }
    // The lists belong to `bake search`; a bake takes one K.
    let baked = root.path().join("baked");
    let out = common::bake_synthetic(root.path(), &inputs, &["--heads", "2,4", "--out", baked.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("'2,4' for '--heads <HEADS>'"), "{stderr}");
}

#[test]
fn a_corpus_smaller_than_asked_is_a_warning_and_the_recipe_says_what_was_measured() {
    let (root, inputs, corpus) = synthetic_search("Bees make honey and the sky is blue.\n");
    let args = ["--corpus", corpus.to_str().unwrap(), "--limit", "6", "--heads", "2", "--alpha", "0,5"];
    let (ok, stderr) = search_cli(&inputs, root.path(), &[&args[..], &["--documents", "2", "--quiet"]].concat());
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("has 1 usable documents") && stderr.contains("not the 2"),
        "{stderr}"
    );
    let search: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.path().join("search/search.json")).unwrap()).unwrap();
    let recipe = bake::recipe::Recipe::load(&root.path().join("search/recipe.yaml")).unwrap();
    assert_eq!(search["documents"], 1, "{search}");
    assert_eq!(recipe.corpus.unwrap().documents, 1);
}
