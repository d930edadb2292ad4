//! Token ids of several prompts packed for one forward pass, and the masks that keep each prompt to itself.
//!
//! Batches are right-padded rows or one prefix-tree row ([`Batch::prefix_tree`]). With a causal mask a real
//! token never attends to a later position, so padding at the end cannot change any real token's result; the
//! key-padding mask only keeps the padded rows finite. In a tree, a token attends only to its ancestors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{BakeError, Result};

/// Token ids of several prompts for one forward pass: right-padded rows, or one row holding a prefix tree.
#[derive(Clone)]
pub struct Batch {
    /// `[rows, t]`.
    pub ids: Tensor,
    /// Real tokens per row.
    pub lengths: Vec<usize>,
    /// For a prefix-tree batch (one row): each token's parent, `None` for a first token.
    pub(super) parents: Option<Vec<Option<usize>>>,
}

impl Batch {
    pub fn right_padded(sequences: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let width = sequences.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 || sequences.iter().any(Vec::is_empty) {
            return Err(empty_prompt());
        }
        let mut flat = Vec::with_capacity(sequences.len() * width);
        for s in sequences {
            flat.extend_from_slice(s);
            flat.resize(flat.len() + width - s.len(), pad_id);
        }
        let ids = Tensor::from_vec(flat, (sequences.len(), width), device)?;
        Ok(Batch { ids, lengths: sequences.iter().map(Vec::len).collect(), parents: None })
    }

    /// Packs sequences into one row as a prefix tree: leading tokens that several sequences share are stored,
    /// and computed, once. Each token keeps its position in the sequences that hold it and attends to its
    /// ancestors only, so every sequence's tokens see exactly what they would see alone; no padding either.
    /// Returns the batch and, per sequence, the index of its last token in the row.
    pub fn prefix_tree<S: AsRef<[u32]>>(sequences: &[S], device: &Device) -> Result<(Self, Vec<usize>)> {
        let mut ids = Vec::new();
        let mut parents = Vec::new();
        let mut nodes: HashMap<(Option<usize>, u32), usize> = HashMap::new();
        let mut last = Vec::with_capacity(sequences.len());
        for sequence in sequences {
            let mut node = None;
            for &token in sequence.as_ref() {
                let next = *nodes.entry((node, token)).or_insert_with(|| {
                    ids.push(token);
                    parents.push(node);
                    ids.len() - 1
                });
                node = Some(next);
            }
            last.push(node.ok_or_else(empty_prompt)?);
        }
        let t = ids.len();
        let ids = Tensor::from_vec(ids, (1, t), device)?;
        Ok((Batch { ids, lengths: vec![t], parents: Some(parents) }, last))
    }

    /// The tokens (indices in the row) of the sequence of a prefix-tree batch that ends at `last`, first to
    /// last.
    pub fn tree_path(&self, last: usize) -> Vec<usize> {
        let Some(parents) = &self.parents else { return Vec::new() };
        let mut path = vec![last];
        while let Some(parent) = parents[*path.last().expect("never empty")] {
            path.push(parent);
        }
        path.reverse();
        path
    }

    /// Per row, the index (`row * t + position`, as [`Request::capture_at`] takes it) of its last real token.
    pub fn last_tokens(&self) -> Vec<usize> {
        let t = self.ids.dim(1).unwrap_or(0);
        self.lengths.iter().enumerate().map(|(row, n)| row * t + n - 1).collect()
    }

    /// Tokens in the batch, padding included.
    pub fn len(&self) -> usize {
        self.ids.elem_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn empty_prompt() -> BakeError {
    BakeError::Invalid("cannot run the model on an empty prompt".into())
}

/// `[b, 1, t, past + t]`: 0 where query i may attend key j (every prefix key; j ≤ i among the batch's own
/// keys, if j is a real token), −∞ elsewhere.
pub(super) fn attention_mask(lengths: &[usize], past: usize, t: usize, device: &Device) -> Result<Tensor> {
    let mut mask = Vec::with_capacity(lengths.len() * t * (past + t));
    for &n in lengths {
        for i in 0..t {
            mask.extend(std::iter::repeat_n(0.0f32, past));
            // A padded query row still sees the real tokens before it, so it stays finite.
            mask.extend((0..t).map(|j| if j <= i && j < n { 0.0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Ok(Tensor::from_vec(mask, (lengths.len(), 1, t, past + t), device)?)
}

/// Each token's position in its sequences: its depth in the tree (parents come before their children).
pub(super) fn tree_depths(parents: &[Option<usize>]) -> Vec<usize> {
    let mut depths: Vec<usize> = Vec::with_capacity(parents.len());
    for parent in parents {
        let depth = parent.map_or(0, |p| depths[p] + 1);
        depths.push(depth);
    }
    depths
}

/// `[1, 1, t, past + t]`: 0 where token i may attend: every token of a prefix of `past` tokens, and token j
/// of the tree when j is i or one of its ancestors; −∞ elsewhere.
pub(super) fn tree_mask(parents: &[Option<usize>], past: usize, device: &Device) -> Result<Tensor> {
    let (t, width) = (parents.len(), past + parents.len());
    let mut mask = vec![f32::NEG_INFINITY; t * width];
    for i in 0..t {
        mask[i * width..i * width + past].fill(0.0);
        let mut node = Some(i);
        while let Some(j) = node {
            mask[i * width + past + j] = 0.0;
            node = parents[j];
        }
    }
    Ok(Tensor::from_vec(mask, (1, 1, t, width), device)?)
}

/// `[b, t, 1]`: 1 from each sequence's start position on, 0 before.
pub(super) fn position_mask(from: &[usize], t: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = from.iter().flat_map(|&p| (0..t).map(move |i| if i >= p { 1.0 } else { 0.0 })).collect();
    Ok(Tensor::from_vec(values, (from.len(), t, 1), device)?.to_dtype(DType::F32)?)
}
