//! Log-probability scoring of many sequences that share a long prefix, with or without the ITI shift.

use candle_core::{DType, Device, Tensor, D};

use super::mc::Item;
use crate::error::Result;
use crate::model::{Batch, Llama, Request, Shift};
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

/// δ per layer added at the o_proj input at run time.
#[derive(Clone)]
pub struct Hook {
    pub deltas: Vec<Option<Tensor>>,
    pub mode: HookMode,
}

impl Hook {
    pub fn new(deltas: &Deltas, mode: HookMode, device: &Device) -> Result<Self> {
        let deltas = deltas
            .iter()
            .map(|d| d.as_ref().map(|d| Tensor::from_slice(d, d.len(), device)).transpose())
            .collect::<candle_core::Result<_>>()?;
        Ok(Hook { deltas, mode })
    }

    fn shift(&self, from_position: Option<Vec<usize>>) -> Shift {
        Shift { per_layer: self.deltas.clone(), from_position }
    }
}

/// A model as evaluated: its weights, and the hook or a bake's o_proj biases if it runs with them.
#[derive(Clone, Copy)]
pub struct Variant<'a> {
    pub model: &'a Llama,
    pub hook: Option<&'a Hook>,
    /// A bake of this model, as its o_proj biases ([`crate::model::Request::o_proj_biases`]).
    pub biases: Option<&'a [Option<Tensor>]>,
}

impl<'a> Variant<'a> {
    pub fn plain(model: &'a Llama) -> Self {
        Variant { model, hook: None, biases: None }
    }

    pub fn hooked(model: &'a Llama, hook: &'a Hook) -> Self {
        Variant { model, hook: Some(hook), biases: None }
    }

    /// The bake whose o_proj biases are `biases`, run on its base's weights.
    pub fn baked(model: &'a Llama, biases: &'a [Option<Tensor>]) -> Self {
        Variant { model, hook: None, biases: Some(biases) }
    }

    /// A request of this variant with `shift`.
    fn request(&self, shift: Option<&'a Shift>) -> Request<'a> {
        Request { shift, o_proj_biases: self.biases, ..Default::default() }
    }
}

/// Longest common prefix of all sequences.
fn common_prefix(items: &[Item]) -> usize {
    let Some(first) = items.first() else { return 0 };
    items
        .iter()
        .fold(first.ids.len(), |n, item| n.min(first.ids.iter().zip(&item.ids).take_while(|(a, b)| a == b).count()))
}

/// Sum of each item's answer-token log-probabilities. The token prefix every item shares (instruction and
/// primer) runs once; its keys and values are reused by every batch.
pub fn score_items(
    variant: Variant,
    items: &[Item],
    batch_size: usize,
    pad_id: u32,
    progress: &dyn Progress,
) -> Result<Vec<f64>> {
    let model = variant.model;
    // The prefix must end before the first scored prediction, and before any shifted position.
    let mut shared = common_prefix(items);
    for item in items {
        shared = shared.min(item.answer_from - 1);
        if variant.hook.is_some_and(|h| h.mode == HookMode::FromPromptEnd) {
            shared = shared.min(item.prompt_last);
        }
    }
    let every_position = variant.hook.filter(|h| h.mode == HookMode::EveryPosition).map(|h| h.shift(None));
    let prefix = match shared {
        0 => None,
        n => {
            let batch = Batch::right_padded(&[items[0].ids[..n].to_vec()], pad_id, model.device())?;
            let request = Request { keep_kv: true, ..variant.request(every_position.as_ref()) };
            model.forward(&batch, &request)?.prefix
        }
    };
    // Without a shift start, the answers of a question go through as one prefix tree: the question's tokens,
    // which its answers share, are computed once (about half the tokens of the reference protocol). A shift
    // from the prompt's end needs rows of their own (a start per sequence).
    let as_trees = variant.hook.is_none_or(|h| h.mode == HookMode::EveryPosition);
    let mut order: Vec<usize> = (0..items.len()).collect();
    if !as_trees {
        order.sort_by_key(|&i| (items[i].ids.len(), i));
    }
    let mut scores = vec![0.0; items.len()];
    progress.start(items.len() as u64, "answers");
    for chunk in order.chunks(batch_size.max(1)) {
        let suffixes: Vec<Vec<u32>> = chunk.iter().map(|&i| items[i].ids[shared..].to_vec()).collect();
        // Per item of the chunk: its logits row and, for each of its positions, the index of that row.
        let (logits, rows): (Vec<Tensor>, Vec<Vec<usize>>) = if as_trees {
            let (batch, last) = Batch::prefix_tree(&suffixes, model.device())?;
            let request = Request { prefix: prefix.as_ref(), logits: true, ..variant.request(every_position.as_ref()) };
            let logits = model.forward(&batch, &request)?.logits.expect("logits requested").get(0)?;
            (vec![logits; chunk.len()], last.iter().map(|&l| batch.tree_path(l)).collect())
        } else {
            let batch = Batch::right_padded(&suffixes, pad_id, model.device())?;
            let from = chunk.iter().map(|&i| items[i].prompt_last - shared).collect();
            let shift = variant.hook.map(|h| h.shift(Some(from)));
            let request = Request { prefix: prefix.as_ref(), logits: true, ..variant.request(shift.as_ref()) };
            let logits = model.forward(&batch, &request)?.logits.expect("logits requested");
            let per_row = (0..chunk.len()).map(|row| logits.get(row)).collect::<candle_core::Result<_>>()?;
            (per_row, suffixes.iter().map(|s| (0..s.len()).collect()).collect())
        };
        for (k, &i) in chunk.iter().enumerate() {
            let item = &items[i];
            // Position p predicts token p + 1.
            let first = item.answer_from - 1 - shared;
            let count = item.ids.len() - item.answer_from;
            let picked: Vec<u32> = rows[k][first..first + count].iter().map(|&r| r as u32).collect();
            let picked = Tensor::from_vec(picked, count, model.device())?;
            scores[i] = sum_log_probs(&logits[k].index_select(&picked, 0)?, &item.ids[item.answer_from..])?;
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
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

/// CE of the base and of every edited variant, and each edited variant's KL against the base, over
/// `documents` (token ids). Every document runs through the base once per batch, so no logits are stored.
pub fn language_scores(
    base: &Llama,
    edited: &[Variant],
    documents: &[Vec<u32>],
    batch_size: usize,
    pad_id: u32,
    progress: &dyn Progress,
) -> Result<(LanguageScores, Vec<LanguageScores>)> {
    let mut base_ce = 0.0;
    let mut sums = vec![(0.0, 0.0); edited.len()];
    progress.start(documents.len() as u64, "documents");
    for chunk in documents.chunks(batch_size.max(1)) {
        let batch = Batch::right_padded(chunk, pad_id, base.device())?;
        let logits = |v: Variant| -> Result<Tensor> {
            let shift = v.hook.map(|h| h.shift(None));
            let request = Request { logits: true, ..v.request(shift.as_ref()) };
            Ok(v.model.forward(&batch, &request)?.logits.expect("logits requested"))
        };
        let base_logits = logits(Variant::plain(base))?;
        // The base's log-probabilities and probabilities of each document, once for every edited variant.
        let mut base_docs = Vec::with_capacity(chunk.len());
        for (row, doc) in chunk.iter().enumerate() {
            let logp = candle_nn::ops::log_softmax(&base_logits.get(row)?.narrow(0, 0, doc.len())?, D::Minus1)?;
            base_ce += mean_next_token_nll_of(&logp, doc)?;
            base_docs.push((logp.exp()?, logp));
        }
        // One edited variant's logits at a time: a search compares dozens, each batch's logits are large.
        for (sum, &variant) in sums.iter_mut().zip(edited) {
            let edited_logits = logits(variant)?;
            for (row, doc) in chunk.iter().enumerate() {
                let logq = candle_nn::ops::log_softmax(&edited_logits.get(row)?.narrow(0, 0, doc.len())?, D::Minus1)?;
                sum.0 += mean_next_token_nll_of(&logq, doc)?;
                let (p, logp) = &base_docs[row];
                sum.1 += mean_kl(p, logp, &logq)?;
            }
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
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
