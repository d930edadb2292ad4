//! The scoring layer shared by `bake eval` and `bake search`: multiple-choice scores ([`mc`]), CE and KL on a text
//! corpus ([`corpus`], [`logprobs`]), under the base model or a shifted variant of it, and the reference's folds
//! ([`folds`]). Everything here reads its inputs first and loads the base once; a shift is applied to that one
//! model (as biases or as the reference's hook), never by loading a second.

pub mod corpus;
pub mod cost;
pub mod folds;
pub mod logprobs;
pub mod mc;
pub mod plan;

use crate::data::TruthfulQa;
use crate::error::Result;
use crate::model::{ModelFiles, Runner, TextTokenizer};
use crate::pipeline::Resolved;
use crate::progress::Progress;
use crate::recipe::Recipe;
use logprobs::{Hook, HookMode, LanguageScores, Variant};
use mc::{AnswerTokens, McScores, Protocol};
use plan::ScoringPlan;

/// How to score, beyond the recipe (dataset, limit, seed, batch size, device).
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub protocols: Vec<Protocol>,
    /// The reference protocol's instruction ("" for none).
    pub instruction: String,
    pub answer_tokens: AnswerTokens,
}

/// What an evaluation will score, for its [`ScoringPlan`]: the multiple-choice passes of each protocol and how
/// many edited variants the CE/KL pass compares with the base.
#[derive(Debug, Clone)]
pub struct Workload {
    pub mc: Vec<McWork>,
    pub edited: usize,
}

/// One multiple-choice pass of each protocol.
#[derive(Debug, Clone, Copy)]
pub struct McWork {
    /// Scored with the reference's hook from the prompt's end (padded rows rather than prefix trees).
    pub from_prompt_end: bool,
    /// On 1/`share` of the questions (a fold's held-out part; the first ones stand for any set of that size).
    pub share: usize,
}

impl McWork {
    /// Every question, as the base is scored.
    pub const ALL: McWork = McWork { from_prompt_end: false, share: 1 };
}

/// What every evaluation reads before any model work: the questions, the tokenizer, the corpus sample, and the
/// plan made from them. Read first, so that a bad dataset, corpus or option, or a model that does not fit, is
/// reported before the activation pass or the weights' loading (minutes for a 7B on the CPU).
pub struct Inputs {
    pub data: TruthfulQa,
    pub tokenizer: TextTokenizer,
    pub corpus: Option<corpus::Corpus>,
    pub plan: ScoringPlan,
}

/// Reads the [`Inputs`] of an evaluation with `recipe` and plans `work` on the run's device within its budget
/// (refused when the model fits neither resident nor streamed); a corpus with fewer usable documents than the
/// recipe asks for is a warning.
pub fn read_inputs(
    model: &ModelFiles,
    recipe: &Recipe,
    options: &ScoreOptions,
    work: &Workload,
    run: &Resolved,
    progress: &dyn Progress,
) -> Result<Inputs> {
    progress.stage("eval: data");
    let data = TruthfulQa::load(&recipe.dataset.source, &recipe.dataset.split, recipe.limit)?;
    let tokenizer = model.tokenizer()?;
    let corpus = recipe.corpus.as_ref().map(|spec| corpus::load(spec, &tokenizer, recipe.seed)).transpose()?;
    if let (Some(spec), Some(c)) = (&recipe.corpus, &corpus) {
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
    let plan = plan_work(model, run, (recipe, options, work), (&data, &tokenizer, corpus.as_ref()))?;
    progress.note(&plan.describe());
    Ok(Inputs { data, tokenizer, corpus, plan })
}

/// The sizes of `work`'s passes over these inputs, and the plan for them.
fn plan_work(
    model: &ModelFiles,
    run: &Resolved,
    (recipe, options, work): (&Recipe, &ScoreOptions, &Workload),
    (data, tokenizer, corpus): (&TruthfulQa, &TextTokenizer, Option<&corpus::Corpus>),
) -> Result<ScoringPlan> {
    let device = &candle_core::Device::Cpu;
    let pad_id = model.config.pad_id();
    let from_prompt_end = Hook { deltas: Vec::new(), site: Default::default(), mode: HookMode::FromPromptEnd };
    let mut sizes = Vec::new();
    for &protocol in &options.protocols {
        // The items of each share of the questions, built once for every pass scoring that share.
        let mut sets = std::collections::BTreeMap::new();
        for w in &work.mc {
            let set = match sets.entry(w.share.max(1)) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let questions: Vec<usize> = (0..data.questions.len().div_ceil(*e.key())).collect();
                    let (instruction, answer_tokens) = (&options.instruction, options.answer_tokens);
                    e.insert(mc::build(protocol, data, &questions, tokenizer, instruction, answer_tokens)?)
                }
            };
            let variant = if w.from_prompt_end { Variant::hooked(&from_prompt_end) } else { Variant::plain() };
            sizes.push(logprobs::mc_pass(variant, &set.items, recipe.batch_size, pad_id, device)?.pass.size());
        }
    }
    if let Some(corpus) = corpus {
        let edited = vec![Variant::plain(); work.edited];
        sizes.push(logprobs::language_pass(&edited, &corpus.documents, recipe.batch_size, pad_id, device)?.size());
    }
    let compute = &run.compute;
    let rate = crate::activations::plan::measure_matmul_rate(&model.config, compute).ok();
    plan::plan(model, compute, &sizes, rate, run.budget())
}
/// What every evaluation scores with: its inputs and the base model, loaded once as its plan says.
pub struct Scorer<'a> {
    pub data: TruthfulQa,
    pub tokenizer: TextTokenizer,
    pub runner: Runner<'a>,
    pub pad_id: u32,
    pub corpus: Option<corpus::Corpus>,
}

/// Loads the base model beside the inputs read by [`read_inputs`], resident or streamed as their plan chose, in
/// the run's device and dtype.
pub fn set_up<'a>(model: &'a ModelFiles, run: &Resolved, inputs: Inputs) -> Result<Scorer<'a>> {
    let Inputs { data, tokenizer, corpus, plan } = inputs;
    let runner = Runner::load(model, &run.compute.device, run.compute.dtype, plan.estimate.mode)?;
    Ok(Scorer { data, tokenizer, runner, pad_id: model.config.pad_id(), corpus })
}

impl Scorer<'_> {
    /// The multiple-choice scores of `questions` under `variant`.
    pub fn score(
        &self,
        variant: Variant,
        protocol: Protocol,
        questions: &[usize],
        options: &ScoreOptions,
        recipe: &Recipe,
        progress: &dyn Progress,
    ) -> Result<McScores> {
        let set =
            mc::build(protocol, &self.data, questions, &self.tokenizer, &options.instruction, options.answer_tokens)?;
        let scores =
            logprobs::score_items(&self.runner, variant, &set.items, recipe.batch_size, self.pad_id, progress)?;
        Ok(set.combine(&scores))
    }

    /// CE and KL of the base and of each `edited` variant on the corpus (`None` without one).
    pub fn language(
        &self,
        edited: &[Variant],
        recipe: &Recipe,
        progress: &dyn Progress,
    ) -> Result<Option<(LanguageScores, Vec<LanguageScores>)>> {
        let Some(corpus) = &self.corpus else { return Ok(None) };
        progress.stage("eval: CE and KL");
        self.language_on(&corpus.documents, edited, recipe, progress).map(Some)
    }

    /// CE and KL of the base and of each `edited` variant on `documents`.
    pub fn language_on(
        &self,
        documents: &[Vec<u32>],
        edited: &[Variant],
        recipe: &Recipe,
        progress: &dyn Progress,
    ) -> Result<(LanguageScores, Vec<LanguageScores>)> {
        logprobs::language_scores(&self.runner, edited, documents, recipe.batch_size, self.pad_id, progress)
    }
}
