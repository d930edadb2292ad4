//! The scoring layer shared by `bake eval` and `bake search`: multiple-choice scores ([`mc`]), CE and KL on a text
//! corpus ([`corpus`], [`logprobs`]), under the base model or a shifted variant of it, and the reference's folds
//! ([`folds`]). Everything here reads its inputs first and loads the base once; a shift is applied to that one
//! model (as biases or as the reference's hook), never by loading a second.

pub mod corpus;
pub mod folds;
pub mod logprobs;
pub mod mc;

use crate::data::TruthfulQa;
use crate::error::{BakeError, Result};
use crate::model::{Llama, ModelFiles, TextTokenizer};
use crate::pipeline::Resolved;
use crate::progress::Progress;
use crate::recipe::Recipe;
use logprobs::{LanguageScores, Variant};
use mc::{AnswerTokens, McScores, Protocol};

/// How to score, beyond the recipe (dataset, limit, seed, batch size, device).
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub protocols: Vec<Protocol>,
    /// The reference protocol's instruction ("" for none).
    pub instruction: String,
    pub answer_tokens: AnswerTokens,
}

/// The memory an evaluation holds at its peak: the weights once in the matmuls' dtype, one tensor being
/// converted beside them, and a batch's logits with their log-probabilities and probabilities (f32, at most
/// [`LOGIT_TOKENS`] tokens a row). Refused before any model work when over the run's budget.
fn check_memory(model: &ModelFiles, run: &Resolved, recipe: &Recipe) -> Result<()> {
    let Some(budget) = run.budget() else { return Ok(()) };
    let compute = &run.compute;
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

/// What every evaluation reads before any model work: the questions, the tokenizer and the corpus sample.
/// Read first, with the memory check, so that a bad dataset, corpus or option, or a model that does not fit, is
/// reported before the activation pass or the weights' loading (minutes for a 7B on the CPU).
pub struct Inputs {
    pub data: TruthfulQa,
    pub tokenizer: TextTokenizer,
    pub corpus: Option<corpus::Corpus>,
}

/// Checks that scoring `model` fits the run's memory, then reads the [`Inputs`] of an evaluation with `recipe`; a
/// corpus with fewer usable documents than the recipe asks for is a warning.
pub fn read_inputs(model: &ModelFiles, recipe: &Recipe, run: &Resolved, progress: &dyn Progress) -> Result<Inputs> {
    check_memory(model, run, recipe)?;
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
    Ok(Inputs { data, tokenizer, corpus })
}

/// What every evaluation scores with: its inputs and the base model, loaded once.
pub struct Scorer {
    pub data: TruthfulQa,
    pub tokenizer: TextTokenizer,
    pub base: Llama,
    pub pad_id: u32,
    pub corpus: Option<corpus::Corpus>,
}

/// Loads the base model beside the inputs read by [`read_inputs`] (which checked that it fits the run's memory),
/// in the run's device and dtype.
pub fn set_up(model: &ModelFiles, run: &Resolved, inputs: Inputs) -> Result<Scorer> {
    let base = model.load_as(&run.compute.device, run.compute.dtype)?;
    let Inputs { data, tokenizer, corpus } = inputs;
    Ok(Scorer { data, tokenizer, base, pad_id: model.config.pad_id(), corpus })
}

impl Scorer {
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
        let scores = logprobs::score_items(variant, &set.items, recipe.batch_size, self.pad_id, progress)?;
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
        logprobs::language_scores(&self.base, edited, &corpus.documents, recipe.batch_size, self.pad_id, progress)
            .map(Some)
    }
}
