//! Log-probability scoring of many sequences that share a long prefix, with or without the ITI shift.

use candle_core::{DType, Device, Tensor, D};

use super::mc::Item;
use crate::error::Result;
use crate::model::{Batch, Job, Pass, Runner, Shift, Site};
use crate::probes::Deltas;
use crate::progress::Progress;

/// Where the reference's runtime hook adds δ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookMode {
    /// Every position, as a baked o_proj bias does.
    EveryPosition,
    /// From the prompt's last token on (the reference's hook on multiple-choice prompts).
    FromPromptEnd,
}

/// δ per layer added at run time at the method's site (the o_proj input, or the residual stream).
#[derive(Clone)]
pub struct Hook {
    pub deltas: Vec<Option<Tensor>>,
    pub site: Site,
    pub mode: HookMode,
}

impl Hook {
    pub fn new(deltas: &Deltas, (site, mode): (Site, HookMode), device: &Device) -> Result<Self> {
        let deltas = deltas
            .iter()
            .map(|d| d.as_ref().map(|d| Tensor::from_slice(d, d.len(), device)).transpose())
            .collect::<candle_core::Result<_>>()?;
        Ok(Hook { deltas, site, mode })
    }

    fn shift(&self, from_position: Option<Vec<usize>>) -> Shift {
        Shift { per_layer: self.deltas.clone(), from_position }
    }
}

/// The base model as evaluated: with the hook or a bake's shift biases if it runs with them.
#[derive(Clone, Copy, Default)]
pub struct Variant<'a> {
    pub hook: Option<&'a Hook>,
    /// A bake of the base, as its biases at a site ([`crate::model::Request::biases`]).
    pub biases: Option<(Site, &'a [Option<Tensor>])>,
}

impl<'a> Variant<'a> {
    /// The base itself.
    pub fn plain() -> Self {
        Variant::default()
    }

    pub fn hooked(hook: &'a Hook) -> Self {
        Variant { hook: Some(hook), biases: None }
    }

    /// The bake whose biases at `site` (o_proj's or down_proj's) are `biases`, run on its base's weights.
    pub fn baked(site: Site, biases: &'a [Option<Tensor>]) -> Self {
        Variant { hook: None, biases: Some((site, biases)) }
    }

    fn job(&self, batch: Batch, shift: Option<Shift>) -> Job<'a> {
        let site = self.hook.map(|h| h.site).or(self.biases.map(|(site, _)| site)).unwrap_or_default();
        Job { batch, site, shift, biases: self.biases.map(|(_, biases)| biases) }
    }
}

/// Longest common prefix of all sequences.
fn common_prefix(items: &[Item]) -> usize {
    let Some(first) = items.first() else { return 0 };
    items
        .iter()
        .fold(first.ids.len(), |n, item| n.min(first.ids.iter().zip(&item.ids).take_while(|(a, b)| a == b).count()))
}

/// The pass that scores multiple-choice items, and where each item's scored logits lie in it.
pub struct McPass<'a> {
    pub pass: Pass<'a>,
    /// Tokens of the prefix every item shares (run once).
    shared: usize,
    /// Per job, its items (indices into the caller's list) and, per item, the logits row of each of its
    /// positions after the prefix.
    placed: Vec<Vec<(usize, Vec<usize>)>>,
    /// Whether each job is one prefix-tree row (else one right-padded row per item).
    trees: bool,
}

/// The [`McPass`] of `items` under `variant`: the token prefix every item shares (instruction and primer) runs
/// once and its keys and values are reused by every batch.
pub fn mc_pass<'a>(
    variant: Variant<'a>,
    items: &[Item],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<McPass<'a>> {
    // The prefix must end before the first scored prediction, and before any shifted position.
    let mut shared = common_prefix(items);
    for item in items {
        shared = shared.min(item.answer_from - 1);
        if variant.hook.is_some_and(|h| h.mode == HookMode::FromPromptEnd) {
            shared = shared.min(item.prompt_last);
        }
    }
    let every_position = || variant.hook.filter(|h| h.mode == HookMode::EveryPosition).map(|h| h.shift(None));
    let prefix = match shared {
        0 => None,
        n => Some(variant.job(Batch::right_padded(&[items[0].ids[..n].to_vec()], pad_id, device)?, every_position())),
    };
    // Without a shift start, the answers of a question go through as one prefix tree: the question's tokens,
    // which its answers share, are computed once (about half the tokens of the reference protocol). A shift
    // from the prompt's end needs rows of their own (a start per sequence).
    let trees = variant.hook.is_none_or(|h| h.mode == HookMode::EveryPosition);
    let mut order: Vec<usize> = (0..items.len()).collect();
    if !trees {
        order.sort_by_key(|&i| (items[i].ids.len(), i));
    }
    let mut jobs = Vec::new();
    let mut placed = Vec::new();
    for chunk in order.chunks(batch_size.max(1)) {
        let suffixes: Vec<Vec<u32>> = chunk.iter().map(|&i| items[i].ids[shared..].to_vec()).collect();
        let rows: Vec<Vec<usize>> = if trees {
            let (batch, last) = Batch::prefix_tree(&suffixes, device)?;
            let rows = last.iter().map(|&l| batch.tree_path(l)).collect();
            jobs.push(variant.job(batch, every_position()));
            rows
        } else {
            let batch = Batch::right_padded(&suffixes, pad_id, device)?;
            let from = chunk.iter().map(|&i| items[i].prompt_last - shared).collect();
            jobs.push(variant.job(batch, variant.hook.map(|h| h.shift(Some(from)))));
            suffixes.iter().map(|s| (0..s.len()).collect()).collect()
        };
        placed.push(chunk.iter().copied().zip(rows).collect());
    }
    // Per item, its answer rows are picked, normalised and gathered: three copies of its longest answer's rows.
    let longest_answer = items.iter().map(|i| i.ids.len() - i.answer_from).max().unwrap_or(0);
    let pass = Pass { prefix, jobs, kept_positions: 0, working_positions: 3 * longest_answer };
    Ok(McPass { pass, shared, placed, trees })
}

/// Sum of each item's answer-token log-probabilities under `variant`.
pub fn score_items(
    runner: &Runner,
    variant: Variant,
    items: &[Item],
    batch_size: usize,
    pad_id: u32,
    progress: &dyn Progress,
) -> Result<Vec<f64>> {
    let mc = mc_pass(variant, items, batch_size, pad_id, runner.device())?;
    let mut scores = vec![0.0; items.len()];
    runner.logits(&mc.pass, progress, |j, logits| {
        for (k, (i, rows)) in mc.placed[j].iter().enumerate() {
            let item = &items[*i];
            let logits = logits.get(if mc.trees { 0 } else { k })?;
            // Position p predicts token p + 1.
            let first = item.answer_from - 1 - mc.shared;
            let count = item.ids.len() - item.answer_from;
            let picked: Vec<u32> = rows[first..first + count].iter().map(|&r| r as u32).collect();
            let picked = Tensor::from_vec(picked, count, logits.device())?;
            scores[*i] = sum_log_probs(&logits.index_select(&picked, 0)?, &item.ids[item.answer_from..])?;
        }
        Ok(())
    })?;
    Ok(scores)
}

/// Σ log softmax(logits[k])[targets[k]], in f64.
fn sum_log_probs(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let targets = Tensor::from_slice(targets, targets.len(), logits.device())?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// Cross-entropy and KL(base ‖ edited) per token on a set of documents.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LanguageScores {
    /// Mean over documents of the mean next-token negative log-likelihood.
    pub ce: f64,
    /// Mean over documents of Σ_positions KL(p_base ‖ p_edited) / positions; 0 for the base itself.
    pub kl: f64,
}

/// The pass that measures CE and KL: per batch of documents, the base, then each edited variant.
pub fn language_pass<'a>(
    edited: &[Variant<'a>],
    documents: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<Pass<'a>> {
    let mut jobs = Vec::new();
    let mut largest = 0;
    for chunk in documents.chunks(batch_size.max(1)) {
        let batch = Batch::right_padded(chunk, pad_id, device)?;
        largest = largest.max(batch.ids.elem_count());
        for variant in std::iter::once(&Variant::plain()).chain(edited) {
            jobs.push(variant.job(batch.clone(), variant.hook.map(|h| h.shift(None))));
        }
    }
    // The base's log-probabilities and probabilities of a batch are kept while its edited variants run; one
    // document at a time is normalised and compared (six copies of its rows, the KL's in f64).
    let longest_document = documents.iter().map(Vec::len).max().unwrap_or(0);
    Ok(Pass { prefix: None, jobs, kept_positions: 2 * largest, working_positions: 6 * longest_document })
}

/// CE of the base and of every edited variant, and each edited variant's KL against the base, over
/// `documents` (token ids). The base's log-probabilities of a batch are kept only while its edited variants'
/// batches run, so no logits are stored beyond one batch's.
pub fn language_scores(
    runner: &Runner,
    edited: &[Variant],
    documents: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    progress: &dyn Progress,
) -> Result<(LanguageScores, Vec<LanguageScores>)> {
    let pass = language_pass(edited, documents, batch_size, pad_id, runner.device())?;
    let chunks: Vec<&[Vec<u32>]> = documents.chunks(batch_size.max(1)).collect();
    let mut base_ce = 0.0;
    let mut sums = vec![(0.0, 0.0); edited.len()];
    // The base's log-probabilities and probabilities of each document of the current batch.
    let mut base_docs: Vec<(Tensor, Tensor)> = Vec::new();
    runner.logits(&pass, progress, |j, logits| {
        let (chunk, variant) = (chunks[j / (1 + edited.len())], j % (1 + edited.len()));
        if variant == 0 {
            base_docs.clear();
        }
        for (row, doc) in chunk.iter().enumerate() {
            let logq = candle_nn::ops::log_softmax(&logits.get(row)?.narrow(0, 0, doc.len())?, D::Minus1)?;
            let ce = mean_next_token_nll_of(&logq, doc)?;
            match variant {
                0 => {
                    base_ce += ce;
                    base_docs.push((logq.exp()?, logq));
                }
                v => {
                    let (p, logp) = &base_docs[row];
                    sums[v - 1].0 += ce;
                    sums[v - 1].1 += mean_kl(p, logp, &logq)?;
                }
            }
        }
        Ok(())
    })?;
    let n = documents.len().max(1) as f64;
    Ok((
        LanguageScores { ce: base_ce / n, kl: 0.0 },
        sums.into_iter().map(|(ce, kl)| LanguageScores { ce: ce / n, kl: kl / n }).collect(),
    ))
}

/// Σ_t KL(p_t ‖ q_t) / T over the rows of `[T, vocab]` probabilities `p` (with their logs) and log-probabilities
/// `logq`.
fn mean_kl(p: &Tensor, logp: &Tensor, logq: &Tensor) -> Result<f64> {
    let kl = (p * (logp - logq)?)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(kl / p.dim(0)? as f64)
}

/// Mean negative log-likelihood of each next token, over the real tokens of one sequence of `logits [t, vocab]`.
pub fn mean_next_token_nll(logits: &Tensor, ids: &[u32]) -> Result<f64> {
    let n = ids.len();
    if n < 2 {
        return Ok(0.0);
    }
    mean_next_token_nll_of(&candle_nn::ops::log_softmax(&logits.narrow(0, 0, n - 1)?, D::Minus1)?, ids)
}

/// The same from log-probabilities `[≥ n − 1, vocab]` (row p: the distribution of token p + 1).
pub fn mean_next_token_nll_of(logp: &Tensor, ids: &[u32]) -> Result<f64> {
    let n = ids.len();
    if n < 2 {
        return Ok(0.0);
    }
    let targets = Tensor::from_slice(&ids[1..], n - 1, logp.device())?;
    let picked = logp.narrow(0, 0, n - 1)?.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(-(picked.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?))
}
