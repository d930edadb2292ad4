//! Choosing how an evaluation holds the model: resident, or streamed one layer at a time when only that fits,
//! from the sizes of the passes it will run ([`PassSize`]). Like the activation pass's plan, it is made before
//! any model work and refuses, naming both estimates, when neither fits.

use serde::Serialize;

use crate::activations::plan::{layer_flops, Budget, Compute, Estimate, Peaks, WeightMemory, OVERHEAD_BYTES};
use crate::error::Result;
use crate::model::{ModelConfig, ModelFiles, PassSize};

/// How an evaluation runs the model, and what that costs.
#[derive(Debug, Clone, Serialize)]
pub struct ScoringPlan {
    #[serde(flatten)]
    pub estimate: Estimate,
    /// Passes over the model (each reads every layer once when streamed).
    pub passes: usize,
    /// Token positions run, summed over the passes.
    pub tokens: usize,
}

/// The plan for running `passes` (one at a time) with `model` on `compute` within `budget`.
pub fn plan(
    model: &ModelFiles,
    compute: &Compute,
    passes: &[PassSize],
    matmul_gflops: Option<f64>,
    budget: Option<Budget>,
) -> Result<ScoringPlan> {
    let c = &model.config;
    let weights = WeightMemory::of(model, compute);
    let dtype_bytes = compute.dtype_bytes();
    let vocabulary_row = c.vocab_size as u64 * 4;
    let largest = |f: &dyn Fn(&PassSize) -> u64| passes.iter().map(f).max().unwrap_or(0);
    let prefix_kv = |p: &PassSize| prefix_kv_bytes(c, p.prefix_tokens, dtype_bytes);
    let hidden_states = |p: &PassSize| ((p.tokens + p.prefix_tokens) * c.hidden_size) as u64 * dtype_bytes;
    // A layer's scratch on the largest batch (its attention over the prefix's keys too); then the head's
    // logits of that batch, beside what their consumer keeps and works in.
    let layer_scratch = |p: &PassSize| {
        let (tokens, row) = (p.largest_job + p.prefix_tokens, p.widest_row + p.prefix_tokens);
        compute.scratch_bytes(c, tokens, row, p.trees) + weights.widening(c, p.largest_job)
    };
    let kept = |p: &PassSize| p.kept_positions as u64 * vocabulary_row;
    let head = |p: &PassSize| (p.largest_job + p.kept_positions + p.working_positions) as u64 * vocabulary_row;
    // Resident, each batch runs the layers and then the head; what the consumer keeps lasts across batches.
    let resident = largest(&|p| weights.all + prefix_kv(p) + (layer_scratch(p) + kept(p)).max(head(p)));
    let resident = weights.loading_all.max(resident) + OVERHEAD_BYTES;
    // Streamed, the embeddings and head stay loaded (every pass embeds, and its logits come at the end); every
    // batch's hidden states go through one layer at a time, and once the last layer is dropped the head runs
    // batch by batch.
    let streamed = largest(&|p| {
        weights.embeddings_and_head
            + hidden_states(p)
            + prefix_kv(p)
            + (weights.one_layer + layer_scratch(p)).max(head(p))
    });
    let streamed = weights.loading_embeddings.max(streamed) + OVERHEAD_BYTES;
    let hidden_state_bytes = largest(&hidden_states);
    let flops = passes.iter().map(|p| pass_flops(c, p)).sum();
    let peaks = Peaks { resident, streamed, hidden_states: hidden_state_bytes, flops };
    Ok(ScoringPlan {
        estimate: Estimate::new("scoring", compute, peaks, matmul_gflops, budget)?,
        passes: passes.len(),
        tokens: passes.iter().map(|p| p.tokens + p.prefix_tokens).sum(),
    })
}

/// A prefix's keys and values, every layer's, KV heads repeated for each query head.
fn prefix_kv_bytes(c: &ModelConfig, tokens: usize, dtype_bytes: u64) -> u64 {
    2 * (c.num_layers * tokens * c.attn_width()) as u64 * dtype_bytes
}

/// Matmul FLOPs of a pass: every layer's, and the head's at every position.
fn pass_flops(c: &ModelConfig, p: &PassSize) -> f64 {
    layer_flops(c, p.tokens + p.prefix_tokens, p.attention_pairs)
        + 2.0 * p.tokens as f64 * (c.hidden_size * c.vocab_size) as f64
}

impl ScoringPlan {
    pub fn describe(&self) -> String {
        format!(
            "scoring: {} passes, {} tokens; {}{}",
            self.passes,
            self.tokens,
            self.estimate.describe_memory("one layer loaded at a time, every layer read once per pass"),
            self.estimate.describe_time()
        )
    }
}
