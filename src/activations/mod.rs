//! Stage 3: the activation pass. Every prompt runs through the model (batched by length, right-padded) and
//! the input of every layer's o_proj at the prompt's last token is kept in f32. Results are cached on disk.

pub mod cache;

use candle_core::Device;

use crate::error::Result;
use crate::model::{Batch, Llama, Request, TextTokenizer};
use crate::progress::Progress;

/// o_proj inputs, `[rows][layers][width]` row-major, f32. Row i belongs to prompt i.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    pub rows: usize,
    pub layers: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl Activations {
    pub fn zeros(rows: usize, layers: usize, width: usize) -> Self {
        Activations { rows, layers, width, data: vec![0.0; rows * layers * width] }
    }

    /// One head's values for one prompt.
    pub fn head(&self, row: usize, layer: usize, head: usize, head_dim: usize) -> &[f32] {
        let start = (row * self.layers + layer) * self.width + head * head_dim;
        &self.data[start..start + head_dim]
    }

    fn set_layer_row(&mut self, row: usize, layer: usize, values: &[f32]) {
        let start = (row * self.layers + layer) * self.width;
        self.data[start..start + self.width].copy_from_slice(values);
    }
}

/// Runs every prompt and captures the o_proj inputs at its last token. Prompts are sorted by token length
/// and cut into batches of `batch_size`, so padding stays small; rows come back in the prompts' order.
pub fn capture_last_token(
    model: &Llama,
    tokenizer: &TextTokenizer,
    prompts: &[impl AsRef<str>],
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<Activations> {
    let c = &model.config;
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer.encode(p.as_ref())).collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (tokens[i].len(), i));
    let pad = c.pad_token_id.or(c.eos_token_ids.first().copied()).unwrap_or(0);
    let mut out = Activations::zeros(prompts.len(), c.num_layers, c.attn_width());
    progress.start(prompts.len() as u64, "prompts");
    for chunk in order.chunks(batch_size.max(1)) {
        let sequences: Vec<Vec<u32>> = chunk.iter().map(|&i| tokens[i].clone()).collect();
        let batch = Batch::right_padded(&sequences, pad, model.device())?;
        let last = batch.last_positions();
        let output = model.forward(&batch, &Request { capture_at: Some(&last), ..Default::default() })?;
        for (layer, captured) in output.o_proj_inputs.iter().enumerate() {
            let rows: Vec<Vec<f32>> = captured.to_device(&Device::Cpu)?.to_vec2()?;
            for (&prompt, values) in chunk.iter().zip(&rows) {
                out.set_layer_row(prompt, layer, values);
            }
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    Ok(out)
}
