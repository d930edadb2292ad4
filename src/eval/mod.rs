//! Stage 7: `bake eval`: TruthfulQA MC1/MC2 (two protocols) and CE/KL on a text corpus, for the base, a
//! baked folder, or ITI fitted and applied fold by fold (the reference's 2-fold protocol).

pub mod card;
pub mod corpus;
pub mod mc;
pub mod score;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::activations::plan::{budget_for, Compute};
use crate::data::TruthfulQa;
use crate::error::{BakeError, Result};
use crate::export::manifest::Manifest;
use crate::model::{Llama, ModelFiles, TextTokenizer};
use crate::pipeline::{self, Fit, ProbeOptions};
use crate::probes;
use crate::progress::Progress;
use crate::recipe::CorpusSpec;
use crate::recipe::Recipe;
use mc::{AnswerTokens, McScores, Protocol};
use score::{Hook, HookMode, LanguageScores, Variant};

/// The memory an evaluation holds at its peak: the weights once in the matmuls' dtype, one tensor being
/// converted beside them, and a batch's logits with their log-probabilities and probabilities (f32, at most
/// [`LOGIT_TOKENS`] tokens a row). Refused before loading when over the budget ([`budget_for`]).
fn check_memory(model: &ModelFiles, compute: &Compute, recipe: &Recipe, max_memory: Option<u64>) -> Result<()> {
    let Some(budget) = budget_for(&compute.device, max_memory) else { return Ok(()) };
    let ck = &model.checkpoint;
    let parameters: u64 = ck.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64).sum();
    let weights = parameters * compute.dtype.size_in_bytes() as u64;
    let largest = ck.tensors.values().map(|e| (e.end - e.start) as u64).max().unwrap_or(0);
    let logits = (recipe.batch_size.max(1) * LOGIT_TOKENS * model.config.vocab_size) as u64 * 4 * 3;
    let needed = weights + 2 * largest + logits + (64 << 20);
    if needed <= budget.bytes {
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    Err(BakeError::Invalid(format!(
        "evaluating {} needs about {:.2} GB (its weights in {} {:.2} GB, a batch's logits {:.2} GB), more than {}; \
         try dtype bf16, a smaller batch_size, or a GPU (scoring layer by layer is not implemented yet)",
        model.location.spec,
        gb(needed),
        compute.dtype_name(),
        gb(weights),
        gb(logits),
        budget.describe(if compute.device.is_cpu() { "host" } else { "device" })
    )))
}

/// The tokens a row of logits is counted at in [`check_memory`]: the reference cuts corpus documents to 128
/// tokens, and a multiple-choice batch's prefix tree holds fewer per answer.
const LOGIT_TOKENS: usize = 128;

/// How to evaluate, beyond the recipe (dataset, limit, seed, batch size, device).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub protocols: Vec<Protocol>,
    /// The reference protocol's instruction ("" for none).
    pub instruction: String,
    pub answer_tokens: AnswerTokens,
    /// CE and KL are measured when a corpus is given.
    pub corpus: Option<CorpusSpec>,
    /// The memory budget (`None`: what the device has).
    pub max_memory: Option<u64>,
}

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
    pub heads: Vec<[usize; 2]>,
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

/// What every evaluation reads before any model work: the questions, the tokenizer and the corpus sample.
/// Read first, so that a bad dataset, corpus or option is reported before the activation pass or the
/// weights' loading (minutes for a 7B on the CPU).
pub(crate) struct Inputs {
    pub data: TruthfulQa,
    pub tokenizer: TextTokenizer,
    pub corpus: Option<corpus::Corpus>,
}

/// Reads the [`Inputs`] of an evaluation of `model` with `recipe`; a corpus with fewer usable documents than
/// the recipe asks for is a warning.
pub(crate) fn read_inputs(
    model: &ModelFiles,
    recipe: &Recipe,
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<Inputs> {
    progress.stage("eval: data");
    let data = TruthfulQa::load(&recipe.dataset.source, &recipe.dataset.split, recipe.limit)?;
    let tokenizer = model.tokenizer()?;
    let corpus = options.corpus.as_ref().map(|spec| corpus::load(spec, &tokenizer, recipe.seed)).transpose()?;
    if let (Some(spec), Some(c)) = (&options.corpus, &corpus) {
        if c.documents.len() < spec.documents {
            progress.warn(&format!(
                "{} has {} usable documents (of at least 2 tokens), not the {} asked for; CE and KL are \
                 measured on {}",
                spec.path.display(),
                c.documents.len(),
                spec.documents,
                c.documents.len()
            ));
        }
    }
    Ok(Inputs { data, tokenizer, corpus })
}

/// What every evaluation scores with: its inputs and the base model.
pub(crate) struct Setup {
    pub data: TruthfulQa,
    pub tokenizer: TextTokenizer,
    pub base: Llama,
    pub pad_id: u32,
    pub corpus: Option<corpus::Corpus>,
}

/// A baked folder is evaluated as its base's weights with its o_proj biases; `bake verify --base` (without
/// the forward run) proves that is what it is before anything is scored.
fn require_base_plus_biases(baked: &ModelFiles, model: &ModelFiles, progress: &dyn Progress) -> Result<()> {
    progress.stage("eval: checking the baked folder is its base plus biases (bake verify --base)");
    let options = crate::verify::VerifyOptions { base: Some(model.location.spec.clone()), run: false };
    let report = crate::verify::verify(&baked.location.dir, &options, &crate::progress::Silent)?;
    match report.mismatches.first() {
        None => Ok(()),
        Some(m) => Err(BakeError::Invalid(format!(
            "{}: fails `bake verify --base {}` ({} mismatches; first: {}: {}), so it is not its base plus o_proj \
             biases, which is how it is evaluated",
            baked.location.dir.display(),
            model.location.spec,
            report.mismatches.len(),
            m.file,
            m.message
        ))),
    }
}

/// Loads the base model beside the inputs read by [`read_inputs`], in the recipe's device and dtype, after
/// checking that it fits the memory budget.
pub(crate) fn set_up(model: &ModelFiles, recipe: &Recipe, options: &EvalOptions, inputs: Inputs) -> Result<Setup> {
    let compute = pipeline::compute_for(model, recipe)?;
    check_memory(model, &compute, recipe, options.max_memory)?;
    let base = model.load_as(&compute.device, compute.dtype)?;
    let Inputs { data, tokenizer, corpus } = inputs;
    Ok(Setup { data, tokenizer, base, pad_id: model.config.pad_id(), corpus })
}

impl Setup {
    /// The report of an evaluation over every loaded question that began at `started`.
    fn report(&self, model: &ModelFiles, rows: Vec<Row>, folds: Vec<Fold>, started: Instant) -> EvalReport {
        EvalReport {
            model: model.location.spec.clone(),
            questions: self.data.questions.len(),
            documents: self.corpus.as_ref().map(|c| c.documents.len()),
            documents_picked: self.corpus.as_ref().map(|c| c.picked.clone()),
            rows,
            folds,
            timings: BTreeMap::from([("total".to_string(), started.elapsed().as_secs_f64())]),
        }
    }

    pub fn score(
        &self,
        variant: Variant,
        protocol: Protocol,
        questions: &[usize],
        options: &EvalOptions,
        recipe: &Recipe,
        progress: &dyn Progress,
    ) -> Result<McScores> {
        let set =
            mc::build(protocol, &self.data, questions, &self.tokenizer, &options.instruction, options.answer_tokens)?;
        let scores = score::score_items(variant, &set.items, recipe.batch_size, self.pad_id, progress)?;
        Ok(set.combine(&scores))
    }

    fn language(
        &self,
        edited: &[Variant],
        recipe: &Recipe,
        progress: &dyn Progress,
    ) -> Result<Option<(LanguageScores, Vec<LanguageScores>)>> {
        let Some(corpus) = &self.corpus else { return Ok(None) };
        progress.stage("eval: CE and KL");
        score::language_scores(&self.base, edited, &corpus.documents, recipe.batch_size, self.pad_id, progress)
            .map(Some)
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

/// Evaluates the base model and, when given, a baked folder made from it.
pub fn evaluate(
    model: &ModelFiles,
    baked: Option<&ModelFiles>,
    recipe: &Recipe,
    options: &EvalOptions,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let started = Instant::now();
    if let Some(b) = baked {
        Manifest::read(&b.location.dir)?.check_base(model, &b.location.dir)?;
    }
    let inputs = read_inputs(model, recipe, options, progress)?;
    if let Some(b) = baked {
        require_base_plus_biases(b, model, progress)?;
    }
    let setup = set_up(model, recipe, options, inputs)?;
    let questions: Vec<usize> = (0..setup.data.questions.len()).collect();
    // The bake runs as its base's weights with its own o_proj biases: one model in memory, not two.
    let baked_biases = baked.map(|b| b.o_proj_biases(setup.base.device(), setup.base.dtype())).transpose()?;
    let baked_variant = baked_biases.as_deref().map(|biases| Variant::baked(&setup.base, biases));
    let mut base_scores = Vec::new();
    let mut baked_scores = Vec::new();
    for &protocol in &options.protocols {
        progress.stage(&format!("eval: {} protocol, base", protocol.name()));
        base_scores.push(setup.score(Variant::plain(&setup.base), protocol, &questions, options, recipe, progress)?);
        if let Some(variant) = baked_variant {
            progress.stage(&format!("eval: {} protocol, baked", protocol.name()));
            baked_scores.push(setup.score(variant, protocol, &questions, options, recipe, progress)?);
        }
    }
    let edited: Vec<Variant> = baked_variant.into_iter().collect();
    let language = setup.language(&edited, recipe, progress)?;
    let mut rows = vec![row("base", &base_scores, None, language.as_ref().map(|l| l.0))];
    if baked.is_some() {
        rows.push(row("baked", &baked_scores, None, language.as_ref().map(|l| l.1[0])));
    }
    Ok(setup.report(model, rows, Vec::new(), started))
}

/// Contiguous folds in multiple_choice order, the first ones one longer (numpy's `array_split`).
pub fn contiguous_folds(n: usize, k: usize) -> Vec<Vec<usize>> {
    let (size, extra) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = size + usize::from(i < extra);
            start += len;
            (start - len..start).collect()
        })
        .collect()
}

/// One fold of the reference's cross-validation: ITI is fitted on `train` (split 80/20 into probe training
/// and validation questions, σ over all of `train`) and measured on `test`.
pub struct FoldSplit {
    pub test: Vec<usize>,
    pub train: Vec<usize>,
    pub split: probes::Split,
}

impl FoldSplit {
    /// What the probe stage fits on for this fold.
    pub fn fit<'a>(&'a self, prepared: &'a pipeline::Prepared) -> Fit<'a> {
        Fit { prepared, split: &self.split, sigma_questions: Some(&self.train) }
    }
}

/// The folds of `n` questions, each with enough training questions; `flag` names the option in errors.
pub fn fold_splits(n: usize, folds: usize, recipe: &Recipe, flag: &str) -> Result<Vec<FoldSplit>> {
    if folds < 2 || folds > n {
        return Err(BakeError::Invalid(format!(
            "{flag} {folds}: expected between 2 and the number of questions ({n})"
        )));
    }
    contiguous_folds(n, folds)
        .into_iter()
        .enumerate()
        .map(|(i, test)| {
            let train: Vec<usize> = (0..n).filter(|q| !test.contains(q)).collect();
            probes::check_question_count(
                train.len(),
                recipe.validation_ratio,
                &format!("the training part of fold {i}"),
            )?;
            let split = probes::split_among(&train, recipe.validation_ratio, recipe.seed);
            Ok(FoldSplit { test, train, split })
        })
        .collect()
}

/// The reference's cross-validation: per fold, heads, directions and σ are fitted on the other folds (80/20
/// train/validation) and the shift is applied to the held-out fold, as a bias at every position and as the
/// reference's hook from the prompt's end. CE and KL use the every-position shift (the reference's hook edits
/// every position of a plain document too), so both ITI rows of a fold share them.
pub fn cross_validate(
    model: &ModelFiles,
    recipe: &Recipe,
    folds: usize,
    options: &EvalOptions,
    probe_options: &ProbeOptions,
    progress: &dyn Progress,
) -> Result<EvalReport> {
    let started = Instant::now();
    pipeline::check_recipe_heads(model, recipe)?;
    let inputs = read_inputs(model, recipe, options, progress)?;
    let n = inputs.data.questions.len();
    let plan = fold_splits(n, folds, recipe, "--cv")?;
    let prepared = pipeline::prepare(model, recipe, probe_options, progress)?;
    let setup = set_up(model, recipe, options, inputs)?;
    let mut fitted = Vec::new();
    for (i, fold) in plan.iter().enumerate() {
        progress.stage(&format!("eval: fold {i}: probes"));
        let f = pipeline::fit_shifts(recipe, &fold.fit(&prepared))?;
        let device = setup.base.device();
        let hooks = (
            Hook::new(&f.deltas, HookMode::EveryPosition, device)?,
            Hook::new(&f.deltas, HookMode::FromPromptEnd, device)?,
        );
        fitted.push((f.chosen, hooks));
    }
    let fold_questions: Vec<Vec<usize>> = plan.into_iter().map(|f| f.test).collect();

    let all: Vec<usize> = (0..n).collect();
    let mut base_scores = Vec::new();
    let mut fold_scores: Vec<(Vec<McScores>, Vec<McScores>)> = vec![(Vec::new(), Vec::new()); folds];
    for &protocol in &options.protocols {
        progress.stage(&format!("eval: {} protocol, base", protocol.name()));
        base_scores.push(setup.score(Variant::plain(&setup.base), protocol, &all, options, recipe, progress)?);
        for (i, ((_, (bias, hook)), test)) in fitted.iter().zip(&fold_questions).enumerate() {
            let (bias_out, hook_out) = &mut fold_scores[i];
            for (mode, variant_hook, out) in [("bias", bias, bias_out), ("hook", hook, hook_out)] {
                progress.stage(&format!("eval: {} protocol, fold {i}, ITI as {mode}", protocol.name()));
                out.push(setup.score(
                    Variant::hooked(&setup.base, variant_hook),
                    protocol,
                    test,
                    options,
                    recipe,
                    progress,
                )?);
            }
        }
    }
    let edited: Vec<Variant> = fitted.iter().map(|(_, (bias, _))| Variant::hooked(&setup.base, bias)).collect();
    let language = setup.language(&edited, recipe, progress)?;

    let mut fold_reports = Vec::new();
    for (i, test) in fold_questions.iter().enumerate() {
        let base_language = language.as_ref().map(|l| l.0);
        let fold_language = language.as_ref().map(|l| l.1[i]);
        fold_reports.push(Fold {
            fold: i,
            test_questions: test.clone(),
            heads: fitted[i].0.iter().map(|&(l, h)| [l, h]).collect(),
            rows: vec![
                row("base", &base_scores, Some(test), base_language),
                row("ITI (bias, every position)", &fold_scores[i].0, None, fold_language),
                row("ITI (hook, from prompt end)", &fold_scores[i].1, None, fold_language),
            ],
        });
    }
    Ok(setup.report(model, mean_rows(&fold_reports), fold_reports, started))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_contiguous_like_array_split() {
        let f = contiguous_folds(817, 2);
        assert_eq!((f[0].len(), f[1].len()), (409, 408));
        assert_eq!((f[0][0], f[0][408], f[1][0], f[1][407]), (0, 408, 409, 816));
    }
}
