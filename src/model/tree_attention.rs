//! Attention of a prefix-tree batch on the CPU, computed only where a token can look.
//!
//! In a tree a token sees the shared prompt prefix and its own ancestors, nothing else: a tree of T tokens
//! (the answers of a few questions) holds T·depth visible pairs, a small part of its T² (depth is an answer's
//! length, T the tokens of every answer of a batch). The dense path computes all T² scores, adds a `−∞`
//! mask and normalises `[heads, T, past + T]` blocks, and on two cores that was about a third of a
//! multiple-choice pass. Here the prefix part stays one dense product (every token sees all of it) and the
//! tree part is one dot product per visible pair; the softmax runs once over both parts, as the dense one.
//! On a GPU the dense products are the faster way and stay.

use rayon::prelude::*;

/// For each token of a tree, the tokens it attends to within the tree: its ancestors and itself, in order.
pub(super) struct Ancestors {
    /// Token i's list is `positions[start[i]..start[i + 1]]`.
    start: Vec<usize>,
    positions: Vec<u32>,
}

impl Ancestors {
    /// From each token's parent (parents come before their children).
    pub(super) fn of(parents: &[Option<usize>]) -> Self {
        let mut start = Vec::with_capacity(parents.len() + 1);
        let mut positions = Vec::new();
        start.push(0);
        for (i, parent) in parents.iter().enumerate() {
            if let Some(p) = *parent {
                let (from, to) = (start[p], start[p + 1]);
                positions.extend_from_within(from..to);
            }
            positions.push(i as u32);
            start.push(positions.len());
        }
        Ancestors { start, positions }
    }

    fn of_token(&self, i: usize) -> &[u32] {
        &self.positions[self.start[i]..self.start[i + 1]]
    }

    pub(super) fn len(&self) -> usize {
        self.start.len() - 1
    }
}

/// Shapes of one layer's attention over a tree.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Tokens of the shared prefix every tree token attends to.
    pub past: usize,
}

/// Softmax attention of every tree token over the prefix and its ancestors. `q` is `[heads, t, head_dim]`
/// (already scaled), `k` and `v` are the tree's own `[kv_heads, t, head_dim]`, and `prefix_scores` is
/// `[heads, t, past]` (q·k against the prefix). `prefix_scores` becomes the prefix's softmax weights, to be
/// multiplied with the prefix's values by the caller; the tree's share of the output comes back as
/// `[heads, t, head_dim]`.
pub(super) fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    prefix_scores: &mut [f32],
    dims: Dims,
    tree: &Ancestors,
) -> Vec<f32> {
    let Dims { heads, kv_heads, head_dim: d, past } = dims;
    let t = tree.len();
    let group = heads / kv_heads;
    let mut out = vec![0.0f32; heads * t * d];
    // One prefix row per query row; a prefix of length 0 has empty rows.
    let prefix_rows: Vec<&mut [f32]> = if past == 0 {
        (0..heads * t).map(|_| &mut [][..]).collect()
    } else {
        prefix_scores.chunks_mut(past).collect()
    };
    out.par_chunks_mut(d).zip(prefix_rows.into_par_iter()).enumerate().for_each(|(row, (o, prefix))| {
        let (h, i) = (row / t, row % t);
        let kv = h / group;
        let query = &q[row * d..(row + 1) * d];
        let key = |j: usize| &k[(kv * t + j) * d..(kv * t + j + 1) * d];
        let value = |j: usize| &v[(kv * t + j) * d..(kv * t + j + 1) * d];
        let seen = tree.of_token(i);
        let mut own: Vec<f32> = seen.iter().map(|&j| dot(query, key(j as usize))).collect();
        let max = prefix.iter().chain(own.iter()).fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0.0f32;
        for x in prefix.iter_mut().chain(own.iter_mut()) {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        prefix.iter_mut().for_each(|x| *x *= inv);
        for (&j, &w) in seen.iter().zip(&own) {
            let w = w * inv;
            for (o, &x) in o.iter_mut().zip(value(j as usize)) {
                *o += w * x;
            }
        }
    });
    out
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: the compiler vectorises this, and it sums in a fixed order (deterministic).
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let tail: f32 = a[chunks * 8..].iter().zip(&b[chunks * 8..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// KV heads repeated for their query heads, as the forward pass repeats them.
    fn repeated(x: &Tensor, group: usize) -> Tensor {
        candle_transformers::utils::repeat_kv(x.unsqueeze(0).unwrap(), group).unwrap().squeeze(0).unwrap()
    }

    /// The dense reference: scores against prefix and tree, the forward pass's −∞ tree mask, softmax, values.
    fn dense(q: &Tensor, k: &Tensor, v: &Tensor, pk: &Tensor, pv: &Tensor, parents: &[Option<usize>]) -> Vec<f32> {
        let group = q.dim(0).unwrap() / k.dim(0).unwrap();
        let past = pk.dim(1).unwrap();
        let mask = super::super::batch::tree_mask(parents, past, &Device::Cpu).unwrap().squeeze(0).unwrap();
        let keys = Tensor::cat(&[&repeated(pk, group), &repeated(k, group)], 1).unwrap();
        let values = Tensor::cat(&[&repeated(pv, group), &repeated(v, group)], 1).unwrap();
        let scores = q.matmul(&keys.t().unwrap()).unwrap().broadcast_add(&mask).unwrap();
        let weights = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        weights.matmul(&values).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn check(parents: &[Option<usize>], past: usize, heads: usize, kv_heads: usize) {
        let (t, d) = (parents.len(), 16);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (heads, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kv_heads, t, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kv_heads, t, d), &dev).unwrap();
        let pk = Tensor::randn(0f32, 1.0, (kv_heads, past, d), &dev).unwrap();
        let pv = Tensor::randn(0f32, 1.0, (kv_heads, past, d), &dev).unwrap();
        let expected = dense(&q, &k, &v, &pk, &pv, parents);

        let group = heads / kv_heads;
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut prefix_scores =
            if past == 0 { Vec::new() } else { flat(&q.matmul(&repeated(&pk, group).t().unwrap()).unwrap()) };
        let dims = Dims { heads, kv_heads, head_dim: d, past };
        let own = attend(&flat(&q), &flat(&k), &flat(&v), &mut prefix_scores, dims, &Ancestors::of(parents));
        let from_prefix: Vec<f32> = if past == 0 {
            vec![0.0; own.len()]
        } else {
            let w = Tensor::from_vec(prefix_scores, (heads, t, past), &dev).unwrap();
            flat(&w.matmul(&repeated(&pv, group)).unwrap())
        };
        for (i, ((a, b), e)) in own.iter().zip(&from_prefix).zip(&expected).enumerate() {
            assert!((a + b - e).abs() < 1e-5, "element {i}: {} vs dense {e}", a + b);
        }
    }

    /// Two questions, each with branching answers, as `Batch::prefix_tree` lays them out.
    fn two_questions() -> Vec<Option<usize>> {
        vec![None, Some(0), Some(1), Some(2), Some(1), Some(4), Some(5), None, Some(7), Some(8), Some(8)]
    }

    #[test]
    fn equals_the_masked_dense_attention_with_a_prefix_and_grouped_heads() {
        check(&two_questions(), 7, 6, 2);
    }

    #[test]
    fn equals_the_masked_dense_attention_without_a_prefix() {
        check(&two_questions(), 0, 4, 4);
    }

    #[test]
    fn a_chain_is_causal_attention() {
        let chain: Vec<Option<usize>> = (0..9usize).map(|i| i.checked_sub(1)).collect();
        check(&chain, 3, 2, 1);
        let ancestors = Ancestors::of(&chain);
        assert_eq!(ancestors.of_token(4), &[0, 1, 2, 3, 4]);
    }
}
