//! Choosing how the activation pass runs: the whole model resident, or layer-streamed (one decoder layer's
//! weights at a time, every prompt's hidden states kept between layers). Estimates are of peak host memory.

use serde::Serialize;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::error::{BakeError, Result};
use crate::io::names;
use crate::model::{ModelConfig, ModelFiles};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Resident,
    Streamed,
}

/// The size of an activation pass, as [`crate::activations::PackedPrompts`] lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PassShape {
    pub prompts: usize,
    /// Of those, the labelled probe prompts (the rows the probe stage fits on).
    pub probe_prompts: usize,
    /// Tokens the model runs on (shared leading tokens count once per batch).
    pub tokens: usize,
    /// Tokens in the longest batch.
    pub longest_batch: usize,
    /// Query-key pairs the attention scores, summed over batches (a packed batch of t tokens scores t²).
    pub attention_pairs: u64,
}

/// The binary, the tokenizer, the dataset, allocator slack and candle's temporaries for one batch: measured
/// as the peak RSS beyond the terms the plan counts, on SmolLM2 (resident) and the 7B shape (streamed).
const OVERHEAD_BYTES: u64 = 64 << 20;
/// The checkpoint writer's buffer, one per shard written at a time.
const WRITE_BUFFER_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: Mode,
    /// The chosen mode's estimated peak host memory (the activation pass or the write step, whichever is
    /// larger).
    pub peak_host_bytes: u64,
    pub resident_bytes: u64,
    pub streamed_bytes: u64,
    /// Weight bytes read from disk by the activation pass (each stored byte once, in both modes).
    pub bytes_read: u64,
    /// Hidden states kept between layers in the streamed mode (f32).
    pub hidden_state_bytes: u64,
    pub budget_bytes: Option<u64>,
    pub pass: PassShape,
    /// Floating-point operations of the pass (matmuls only; they are most of its time).
    pub flops: f64,
    /// The device's f32 matmul rate as measured for this plan, and the pass's time at that rate.
    pub matmul_gflops: Option<f64>,
    pub estimated_seconds: Option<f64>,
}

/// The estimates for a pass of this shape, and the mode a `budget` allows: resident when it fits (it is
/// faster), else streamed, else an error giving both estimates.
pub fn plan(model: &ModelFiles, pass: &PassShape, matmul_gflops: Option<f64>, budget: Option<u64>) -> Result<Plan> {
    let c = &model.config;
    let ck = &model.checkpoint;
    let parameters: u64 = ck.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64).sum();
    let stored = ck.total_bytes();
    let captured = (pass.prompts * c.num_layers * c.attn_width()) as u64 * 4;
    let widened = |stored: u64| stored * 4 / model.dtype().size_in_bytes() as u64;
    // While a tensor is widened to f32, its mapped pages and a copy in the stored dtype exist beside the f32.
    let loading = |stored: u64| 2 * stored + widened(stored);
    let stored_bytes = |e: &crate::model::weights::TensorEntry| (e.end - e.start) as u64;
    let largest_tensor = ck.tensors.values().map(stored_bytes).max().unwrap_or(0);
    let largest_layer_tensor = ck
        .tensors
        .iter()
        .filter(|(n, _)| names::layer_of(n).is_some())
        .map(|(_, e)| stored_bytes(e))
        .max()
        .unwrap_or(0);
    let largest_layer_stored = (0..c.num_layers).map(|l| ck.layer_bytes(l)).max().unwrap_or(0);
    let embeddings_stored = ck.get(names::EMBED_TOKENS).map_or(0, stored_bytes);
    let hidden_state_bytes = (pass.tokens * c.hidden_size) as u64 * 4;
    // One batch's attention: the head-expanded mask, the scores and their softmax, each [heads, t, t] in f32,
    // plus the layer's activations at the MLP's width.
    let batch_scratch = (3 * c.num_heads * pass.longest_batch * pass.longest_batch
        + 4 * pass.longest_batch * c.intermediate_size) as u64
        * 4;
    // Each mode peaks either while loading (the captured rows are still untouched zero pages then) or at the
    // end of the pass, when every captured row has been written.
    let resident = (parameters * 4 - widened(largest_tensor) + loading(largest_tensor))
        .max(parameters * 4 + captured + batch_scratch)
        + OVERHEAD_BYTES;
    // Streamed, the embeddings are loaded first and dropped once every batch is embedded; then one layer at a
    // time is loaded whole (its mapped pages handed back after it ran) beside the hidden states.
    let streamed = (hidden_state_bytes + loading(embeddings_stored)).max(
        widened(largest_layer_stored)
            + largest_layer_stored
            + largest_layer_tensor
            + hidden_state_bytes
            + captured
            + batch_scratch,
    ) + OVERHEAD_BYTES;
    // After the pass (the model is gone by then): the probe stage holds the activations and, per thread,
    // one layer's rows head by head (probe prompts × attention width, plus an intercept column per head)
    // and one head's weighted copy; the write step one tensor at a time and each shard's write buffer.
    let threads = rayon::current_num_threads() as u64;
    let probe_rows = pass.probe_prompts as u64;
    let per_thread = probe_rows * (c.attn_width() + c.num_heads) as u64 * 4 + probe_rows * (c.head_dim + 1) as u64 * 4;
    let probe_stage = captured + threads * per_thread + OVERHEAD_BYTES;
    let write_step = largest_tensor + threads * WRITE_BUFFER_BYTES + OVERHEAD_BYTES;
    let after_pass = probe_stage.max(write_step);
    let (resident, streamed) = (resident.max(after_pass), streamed.max(after_pass));
    let flops = pass_flops(c, pass);
    let mode = match budget {
        None => Mode::Resident,
        Some(b) if resident <= b => Mode::Resident,
        Some(b) if streamed <= b => Mode::Streamed,
        Some(b) => {
            let gb = |x: u64| x as f64 / 1e9;
            return Err(BakeError::Invalid(format!(
                "--max-memory {:.2} GB: too small for this run (resident needs about {:.2} GB, layer-streamed {:.2} GB)",
                gb(b),
                gb(resident),
                gb(streamed)
            )));
        }
    };
    Ok(Plan {
        mode,
        peak_host_bytes: if mode == Mode::Resident { resident } else { streamed },
        resident_bytes: resident,
        streamed_bytes: streamed,
        bytes_read: stored,
        hidden_state_bytes,
        budget_bytes: budget,
        pass: *pass,
        flops,
        matmul_gflops,
        estimated_seconds: matmul_gflops.map(|rate| flops / (rate * 1e9)),
    })
}

/// Matmul FLOPs of the capture pass: every layer's projections for every token, and the attention's two
/// products (scores, weighted values) for every query-key pair the batches score.
fn pass_flops(c: &ModelConfig, pass: &PassShape) -> f64 {
    let (h, a, kv, i) = (c.hidden_size as f64, c.attn_width() as f64, c.kv_width() as f64, c.intermediate_size as f64);
    let per_token = 2.0 * (2.0 * h * a + 2.0 * h * kv + 3.0 * h * i);
    let attention = 4.0 * pass.attention_pairs as f64 * (c.num_heads * c.head_dim) as f64;
    (pass.tokens as f64 * per_token + attention) * c.num_layers as f64
}

/// The device's f32 matmul rate in GFLOP/s, on the MLP's shape at a typical batch (capped so that measuring
/// needs at most ~150 MB), over about 0.2 s after a warm-up.
pub fn measure_matmul_rate(c: &ModelConfig, device: &Device) -> Result<f64> {
    let (m, k, n) = (512, c.hidden_size.min(4096), c.intermediate_size.min(8192));
    let x = Tensor::ones((m, k), DType::F32, device)?;
    let w = Tensor::ones((n, k), DType::F32, device)?;
    let product = || -> Result<()> {
        x.matmul(&w.t()?)?;
        Ok(device.synchronize()?)
    };
    product()?;
    let start = Instant::now();
    let mut reps = 0u32;
    while reps < 3 || start.elapsed() < Duration::from_millis(200) {
        product()?;
        reps += 1;
    }
    Ok(2.0 * (m * k * n) as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9)
}

impl Plan {
    pub fn describe(&self) -> String {
        let gb = |x: u64| x as f64 / 1e9;
        let how = match self.mode {
            Mode::Resident => "resident (all layers loaded)",
            Mode::Streamed => "layer-streamed (one layer loaded at a time)",
        };
        let budget = self.budget_bytes.map(|b| format!(" ≤ budget {:.2} GB", gb(b))).unwrap_or_default();
        let time = match (self.estimated_seconds, self.matmul_gflops) {
            (Some(s), Some(rate)) => format!(
                "; {:.1} TFLOP, ~{} of matmuls at the measured {rate:.0} GFLOP/s",
                self.flops / 1e12,
                duration(s)
            ),
            _ => format!("; {:.1} TFLOP", self.flops / 1e12),
        };
        format!(
            "{} prompts, {} tokens after prefix sharing; {how}: peak host memory ~{:.2} GB{budget} (resident ~{:.2} GB, streamed ~{:.2} GB incl. {:.2} GB of hidden states); reads {:.2} GB of weights{time}",
            self.pass.prompts,
            self.pass.tokens,
            gb(self.peak_host_bytes),
            gb(self.resident_bytes),
            gb(self.streamed_bytes),
            gb(self.hidden_state_bytes),
            gb(self.bytes_read)
        )
    }
}

fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}
