//! `bake eval`: TruthfulQA MC1/MC2 (two protocols) and CE/KL on a text corpus, for the base, a baked folder, or
//! ITI fitted and applied fold by fold (the reference's 2-fold protocol); the scoring itself is [`crate::scoring`].

pub mod card;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::error::{BakeError, Result};
use crate::export::manifest::Manifest;
use crate::model::ModelFiles;
use crate::pipeline::{self, Resolved};
use crate::probes::Head;
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::scoring::folds::fold_splits;
use crate::scoring::logprobs::{Hook, HookMode, LanguageScores, Variant};
use crate::scoring::mc::McScores;
use crate::scoring::plan::ScoringPlan;
use crate::scoring::{read_inputs, set_up, McWork, ScoreOptions, Scorer, Workload};

/// Mean MC1 and MC2 of one protocol.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct McSummary {
    pub mc1: f64,
    pub mc2: f64,
    pub questions: usize,
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub name: String,
    /// Keyed by protocol name (`reference`, `leaderboard`).
    pub mc: BTreeMap<String, McSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fold {
    pub fold: usize,
    /// The held-out questions (indices in multiple_choice order) the rows are measured on.
    pub test_questions: Vec<usize>,
    pub heads: Vec<Head>,
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub questions: usize,
    /// Documents the CE and KL are averaged over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub documents: Option<usize>,
    /// Which documents of the corpus file were sampled (indices among its non-empty documents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub documents_picked: Option<Vec<usize>>,
    /// The result; with cross-validation, the unweighted mean over the folds.
    pub rows: Vec<Row>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<Fold>,
    pub timings: BTreeMap<String, f64>,
}

/// A baked folder is evaluated as its base's weights with its shift biases; `bake verify --base` (without
/// the forward run) proves that is what it is before anything is scored.
fn require_base_plus_biases(
    baked: &ModelFiles,
    model: &ModelFiles,
    base_hashes: Vec<(std::path::PathBuf, String)>,
    progress: &dyn Progress,
) -> Result<()> {
    progress.stage("eval: checking the baked folder is its base plus biases (bake verify --base)");
    let options = crate::verify::VerifyOptions {
        base: Some(model.location.spec.clone()),
        base_hashes: Some(base_hashes),
        ..Default::default()
    };
    let report = crate::verify::verify(&baked.location.dir, &options, &crate::progress::Silent)?;
    match report.mismatches.first() {
        None => Ok(()),
        Some(m) => Err(BakeError::content(
            &baked.location.dir,
            format!(
                "fails `bake verify --base {}` ({} mismatches; first: {}: {}), so it is not its base plus shift \
                 biases, which is how it is evaluated",
                model.location.spec,
                report.mismatches.len(),
                m.file,
                m.message
            ),
        )),
    }
}

/// The report of an evaluation over every loaded question that began at `started`.
fn report(scorer: &Scorer, model: &ModelFiles, rows: Vec<Row>, folds: Vec<Fold>, started: Instant) -> EvalReport {
    EvalReport {
        model: model.location.spec.clone(),
        questions: scorer.data.questions.len(),
        documents: scorer.corpus.as_ref().map(|c| c.documents.len()),
        documents_picked: scorer.corpus.as_ref().map(|c| c.picked.clone()),
        rows,
        folds,
        timings: BTreeMap::from([("total".to_string(), started.elapsed().as_secs_f64())]),
    }
}

fn summary(scores: &McScores, questions: Option<&[usize]>) -> McSummary {
    let (mc1, mc2, questions) = scores.mean_over(questions);
    McSummary { mc1, mc2, questions }
}

fn row(name: &str, scores: &[McScores], questions: Option<&[usize]>, language: Option<LanguageScores>) -> Row {
    Row {
        name: name.into(),
        mc: scores.iter().map(|s| (s.protocol.name().to_string(), summary(s, questions))).collect(),
        ce: language.map(|l| l.ce),
        kl: language.map(|l| l.kl),
    }
}

/// What an evaluation scores, per protocol: the base on every question and a bake beside it; or with `folds`,
/// the base, then per fold the bias and the hook on its held-out questions, and the folds' biases on the corpus.
fn workload(baked: bool, folds: Option<usize>) -> Workload {
    match folds {
        None => Workload { mc: vec![McWork::ALL; 1 + baked as usize], edited: baked as usize },
        Some(folds) => {
            let held_out = McWork { from_prompt_end: false, share: folds };
            let mut mc = vec![McWork::ALL];
            for _ in 0..folds {
                mc.extend([held_out, McWork { from_prompt_end: true, ..held_out }]);
            }
            Workload { mc, edited: folds }
        }
    }
}

/// The plan of [`evaluate`] (with a bake when `baked`) or of [`cross_validate`] (with `folds`): its inputs are
/// read and nothing is run.
pub fn plan(
    model: &ModelFiles,
    recipe: &Recipe,
    (baked, folds): (bool, Option<usize>),
    options: &ScoreOptions,
    run: &Resolved,
) -> Result<ScoringPlan> {
    Ok(read_inputs(model, recipe, options, &workload(baked, folds), run, &crate::progress::Silent)?.plan)
}

/// Evaluates the base model and, when given, a baked folder made from it.
pub fn evaluate(
    model: &ModelFiles,
    baked: Option<&ModelFiles>,
    recipe: &Recipe,
    options: &ScoreOptions,
    run: &Resolved,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let started = Instant::now();
    // The base is hashed once: for this early refusal of a bake of another base, and for the full check below.
    let base_hashes = baked.map(|_| model.input_hashes()).transpose()?;
    // Where the bake's shift sits (o_proj or down_proj biases) is its recipe's method's.
    let mut site = crate::model::Site::default();
    if let (Some(b), Some(hashes)) = (baked, &base_hashes) {
        let manifest = Manifest::read(&b.location.dir)?;
        manifest.check_base_hashes(model, hashes, &b.location.dir)?;
        site = manifest.recipe.method.site();
    }
    let inputs = read_inputs(model, recipe, options, &workload(baked.is_some(), None), run, progress)?;
    if let (Some(b), Some(hashes)) = (baked, base_hashes) {
        require_base_plus_biases(b, model, hashes, progress)?;
    }
    let scorer = set_up(model, run, inputs)?;
    let questions: Vec<usize> = (0..scorer.data.questions.len()).collect();
    // The bake runs as its base's weights with its own shift biases: one model in memory, not two.
    let (device, dtype) = (scorer.runner.device(), scorer.runner.dtype());
    let baked_biases = baked.map(|b| b.site_biases(site, device, dtype)).transpose()?;
    let baked_variant = baked_biases.as_deref().map(|biases| Variant::baked(site, biases));
    let mut base_scores = Vec::new();
    let mut baked_scores = Vec::new();
    for &protocol in &options.protocols {
        progress.stage(&format!("eval: {} protocol, base", protocol.name()));
        base_scores.push(scorer.score(Variant::plain(), protocol, &questions, options, recipe, progress)?);
        if let Some(variant) = baked_variant {
            progress.stage(&format!("eval: {} protocol, baked", protocol.name()));
            baked_scores.push(scorer.score(variant, protocol, &questions, options, recipe, progress)?);
        }
    }
    let edited: Vec<Variant> = baked_variant.into_iter().collect();
    let language = scorer.language(&edited, recipe, progress)?;
    let mut rows = vec![row("base", &base_scores, None, language.as_ref().map(|l| l.0))];
    if baked.is_some() {
        rows.push(row("baked", &baked_scores, None, language.as_ref().map(|l| l.1[0])));
    }
    Ok(report(&scorer, model, rows, Vec::new(), started))
}

/// The reference's cross-validation: per fold, heads, directions and σ are fitted on the other folds (80/20
/// train/validation) and the shift is applied to the held-out fold, as a bias at every position and as the
/// reference's hook from the prompt's end. CE and KL use the every-position shift (the reference's hook edits
/// every position of a plain document too), so both ITI rows of a fold share them.
pub fn cross_validate(
    model: &ModelFiles,
    recipe: &Recipe,
    folds: usize,
    options: &ScoreOptions,
    run: &Resolved,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let started = Instant::now();
    pipeline::check_recipe_heads(model, recipe)?;
    let inputs = read_inputs(model, recipe, options, &workload(false, Some(folds)), run, progress)?;
    let n = inputs.data.questions.len();
    let plan = fold_splits(n, folds, recipe)?;
    let prepared = pipeline::prepare(model, recipe, run, progress)?;
    let scorer = set_up(model, run, inputs)?;
    let mut fitted = Vec::new();
    for (i, fold) in plan.iter().enumerate() {
        progress.stage(&format!("eval: fold {i}: probes"));
        let f = pipeline::fit_shifts(recipe, &fold.fit(&prepared))?;
        let device = scorer.runner.device();
        let hooks = (
            Hook::new(&f.deltas, (recipe.method.site(), HookMode::EveryPosition), device)?,
            Hook::new(&f.deltas, (recipe.method.site(), HookMode::FromPromptEnd), device)?,
        );
        fitted.push((f.chosen, hooks));
    }
    let fold_questions: Vec<Vec<usize>> = plan.into_iter().map(|f| f.test).collect();

    let all: Vec<usize> = (0..n).collect();
    let mut base_scores = Vec::new();
    let mut fold_scores: Vec<(Vec<McScores>, Vec<McScores>)> = vec![(Vec::new(), Vec::new()); folds];
    for &protocol in &options.protocols {
        progress.stage(&format!("eval: {} protocol, base", protocol.name()));
        base_scores.push(scorer.score(Variant::plain(), protocol, &all, options, recipe, progress)?);
        for (i, ((_, (bias, hook)), test)) in fitted.iter().zip(&fold_questions).enumerate() {
            let (bias_out, hook_out) = &mut fold_scores[i];
            for (mode, variant_hook, out) in [("bias", bias, bias_out), ("hook", hook, hook_out)] {
                progress.stage(&format!("eval: {} protocol, fold {i}, ITI as {mode}", protocol.name()));
                out.push(scorer.score(Variant::hooked(variant_hook), protocol, test, options, recipe, progress)?);
            }
        }
    }
    let edited: Vec<Variant> = fitted.iter().map(|(_, (bias, _))| Variant::hooked(bias)).collect();
    let language = scorer.language(&edited, recipe, progress)?;

    let method = recipe.method.name().to_uppercase();
    let mut fold_reports = Vec::new();
    for (i, test) in fold_questions.iter().enumerate() {
        let base_language = language.as_ref().map(|l| l.0);
        let fold_language = language.as_ref().map(|l| l.1[i]);
        fold_reports.push(Fold {
            fold: i,
            test_questions: test.clone(),
            heads: fitted[i].0.clone(),
            rows: vec![
                row("base", &base_scores, Some(test), base_language),
                row(&format!("{method} (bias, every position)"), &fold_scores[i].0, None, fold_language),
                row(&format!("{method} (hook, from prompt end)"), &fold_scores[i].1, None, fold_language),
            ],
        });
    }
    Ok(report(&scorer, model, mean_rows(&fold_reports), fold_reports, started))
}

/// Unweighted mean of each row over the folds, as the reference aggregates.
fn mean_rows(folds: &[Fold]) -> Vec<Row> {
    let k = folds.len() as f64;
    let mean = |f: &dyn Fn(&Fold) -> f64| folds.iter().map(f).sum::<f64>() / k;
    folds[0]
        .rows
        .iter()
        .enumerate()
        .map(|(r, first)| Row {
            name: first.name.clone(),
            mc: first
                .mc
                .keys()
                .map(|p| {
                    let s = McSummary {
                        mc1: mean(&|f| f.rows[r].mc[p].mc1),
                        mc2: mean(&|f| f.rows[r].mc[p].mc2),
                        questions: folds.iter().map(|f| f.rows[r].mc[p].questions).sum(),
                    };
                    (p.clone(), s)
                })
                .collect(),
            ce: first.ce.map(|_| mean(&|f| f.rows[r].ce.unwrap_or(0.0))),
            kl: first.kl.map(|_| mean(&|f| f.rows[r].kl.unwrap_or(0.0))),
        })
        .collect()
}

/// The results as a markdown table: one column pair per protocol, then CE and KL.
pub fn markdown_table(report: &EvalReport) -> String {
    let protocols: Vec<String> = report.rows.first().map(|r| r.mc.keys().cloned().collect()).unwrap_or_default();
    let mut header = "| model |".to_string();
    let mut rule = "|---|".to_string();
    for p in &protocols {
        header.push_str(&format!(" MC1 ({p}) | MC2 ({p}) |"));
        rule.push_str("---|---|");
    }
    header.push_str(" CE | KL |");
    rule.push_str("---|---|");
    let mut out = format!("{header}\n{rule}\n");
    let number = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "—".into());
    for r in &report.rows {
        out.push_str(&format!("| {} |", r.name));
        for p in &protocols {
            let s = &r.mc[p];
            out.push_str(&format!(" {:.4} | {:.4} |", s.mc1, s.mc2));
        }
        out.push_str(&format!(" {} | {} |\n", number(r.ce), number(r.kl)));
    }
    out
}
