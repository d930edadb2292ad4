//! Stage 3: the activation pass. Every prompt runs through the model (batched by length, right-padded) and
//! the input of every layer's o_proj at the prompt's last token is kept in f32. Results are cached on disk.

pub mod cache;
pub mod plan;

use candle_core::Device;

use crate::error::Result;
use candle_core::Tensor;

use crate::model::{Batch, Llama, ModelFiles, Request, TextTokenizer};
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

/// Prompt indices cut into batches of `batch_size`, sorted by token length so padding stays small.
fn length_sorted_batches(tokens: &[Vec<u32>], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| (tokens[i].len(), i));
    order.chunks(batch_size.max(1)).map(<[usize]>::to_vec).collect()
}

fn padded_batch(tokens: &[Vec<u32>], chunk: &[usize], pad: u32, device: &Device) -> Result<Batch> {
    let sequences: Vec<Vec<u32>> = chunk.iter().map(|&i| tokens[i].clone()).collect();
    Batch::right_padded(&sequences, pad, device)
}

/// Copies one layer's captured rows `[batch, width]` to their prompts' rows.
fn store(out: &mut Activations, chunk: &[usize], layer: usize, captured: &Tensor) -> Result<()> {
    let rows: Vec<Vec<f32>> = captured.to_device(&Device::Cpu)?.to_vec2()?;
    for (&prompt, values) in chunk.iter().zip(&rows) {
        out.set_layer_row(prompt, layer, values);
    }
    Ok(())
}

/// Every prompt's token ids, as the activation pass (and its plan) read them.
pub fn tokenize(tokenizer: &TextTokenizer, prompts: &[impl AsRef<str>]) -> Result<Vec<Vec<u32>>> {
    prompts.iter().map(|p| tokenizer.encode(p.as_ref())).collect()
}

/// Runs every tokenized prompt and captures the o_proj inputs at its last token, with the whole model
/// resident. Rows come back in the prompts' order.
pub fn capture_last_token(model: &Llama, tokens: &[Vec<u32>], batch_size: usize, progress: &dyn Progress) -> Result<Activations> {
    let c = &model.config;
    let mut out = Activations::zeros(tokens.len(), c.num_layers, c.attn_width());
    progress.start(tokens.len() as u64, "prompts");
    for chunk in length_sorted_batches(tokens, batch_size) {
        let batch = padded_batch(tokens, &chunk, c.pad_id(), model.device())?;
        let last = batch.last_positions();
        let output = model.forward(&batch, &Request { capture_at: Some(&last), ..Default::default() })?;
        for (layer, captured) in output.o_proj_inputs.iter().enumerate() {
            store(&mut out, &chunk, layer, captured)?;
        }
        progress.advance(chunk.len() as u64);
    }
    progress.finish();
    Ok(out)
}

/// The same capture run layer by layer ([`Llama::capture_streamed`]): one layer's weights resident at a
/// time, every prompt's hidden states kept in memory between layers.
pub fn capture_last_token_streamed(
    files: &ModelFiles,
    device: &Device,
    tokens: &[Vec<u32>],
    batch_size: usize,
    progress: &dyn Progress,
) -> Result<Activations> {
    let c = &files.config;
    let chunks = length_sorted_batches(tokens, batch_size);
    let batches: Vec<(Batch, Vec<usize>)> = chunks
        .iter()
        .map(|chunk| padded_batch(tokens, chunk, c.pad_id(), device).map(|b| {
            let last = b.last_positions();
            (b, last)
        }))
        .collect::<Result<_>>()?;
    let mut out = Activations::zeros(tokens.len(), c.num_layers, c.attn_width());
    progress.start(c.num_layers as u64, "layers");
    Llama::capture_streamed(
        c.clone(),
        &files.checkpoint,
        device,
        &batches,
        |layer, i, captured| store(&mut out, &chunks[i], layer, &captured),
        |_| progress.advance(1),
    )?;
    progress.finish();
    Ok(out)
}
