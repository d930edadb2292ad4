//! Choosing how the activation pass runs: the whole model resident, or layer-streamed (one decoder layer's
//! weights at a time, every prompt's hidden states kept between layers). Estimates are of peak host memory.

use serde::Serialize;

use crate::error::{BakeError, Result};
use crate::model::ModelFiles;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Resident,
    Streamed,
}

/// Allocator slack, the tokenizer, the dataset and candle's temporaries for one batch.
const OVERHEAD_BYTES: u64 = 300 << 20;

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
}

/// The estimates for `prompts` prompts of `tokens` tokens in all, and the mode a `budget` allows: resident
/// when it fits (it is faster), else streamed, else an error giving both estimates.
pub fn plan(model: &ModelFiles, prompts: usize, tokens: usize, budget: Option<u64>) -> Result<Plan> {
    let c = &model.config;
    let ck = &model.checkpoint;
    let parameters: u64 = ck.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64).sum();
    let stored = ck.total_bytes();
    let captured = (prompts * c.num_layers * c.attn_width()) as u64 * 4;
    let largest_layer_stored = (0..c.num_layers).map(|l| ck.layer_bytes(l)).max().unwrap_or(0);
    let largest_layer_f32 = largest_layer_stored * 4 / model.dtype().size_in_bytes() as u64;
    let embeddings_f32 = (c.vocab_size * c.hidden_size) as u64 * 4;
    let hidden_state_bytes = (tokens * c.hidden_size) as u64 * 4;
    // The write step maps every stored weight while it copies them; the activations are gone by then.
    let write_step = stored + OVERHEAD_BYTES;
    let resident = (parameters * 4 + stored + captured + OVERHEAD_BYTES).max(write_step);
    let streamed = (embeddings_f32.max(largest_layer_f32 + largest_layer_stored) + hidden_state_bytes + captured + OVERHEAD_BYTES).max(write_step);
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
    })
}

impl Plan {
    pub fn describe(&self) -> String {
        let gb = |x: u64| x as f64 / 1e9;
        let how = match self.mode {
            Mode::Resident => "resident (all layers loaded)",
            Mode::Streamed => "layer-streamed (one layer loaded at a time)",
        };
        let budget = self.budget_bytes.map(|b| format!(" ≤ budget {:.2} GB", gb(b))).unwrap_or_default();
        format!(
            "{how}: peak host memory ~{:.2} GB{budget} (resident ~{:.2} GB, streamed ~{:.2} GB incl. {:.2} GB of hidden states); reads {:.2} GB of weights",
            gb(self.peak_host_bytes),
            gb(self.resident_bytes),
            gb(self.streamed_bytes),
            gb(self.hidden_state_bytes),
            gb(self.bytes_read)
        )
    }
}
