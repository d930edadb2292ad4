//! Stage 3: the activation pass. Every prompt runs through the model and the input of every layer's o_proj
//! at the prompt's last token is kept in f32. Results are cached on disk.
//!
//! Prompts are sorted by their token ids and each batch is packed as a prefix tree ([`Batch::prefix_tree`]):
//! the TruthfulQA prompts of one question all begin with "Q: {question} A:", so that part is computed once
//! per batch instead of once per prompt, and nothing is padded. Over the whole recipe this halves the
//! tokens the model runs on.

pub mod cache;
pub mod plan;

use std::sync::Arc;

use candle_core::Device;

use crate::error::Result;
use candle_core::Tensor;

use crate::model::{Batch, Llama, ModelFiles, Request, TextTokenizer};
use crate::progress::Progress;
use plan::PassShape;

/// Bumped whenever the pass computes its values differently (batching, kernels, operation order), so that
/// activations cached by an older build are not reused: 2 = prefix-tree batches.
pub const PASS_VERSION: u32 = 2;

/// o_proj inputs, `[rows][layers][width]` row-major, f32. Row i belongs to prompt i.
///
/// Sets split from one pass ([`Activations::split_rows`]) share its buffer, so the pass's captured values
/// exist once in memory however they are divided.
#[derive(Debug, Clone)]
pub struct Activations {
    pub rows: usize,
    pub layers: usize,
    pub width: usize,
    buffer: Arc<Vec<f32>>,
    /// Where row 0 of this set starts in `buffer`.
    offset: usize,
}

impl PartialEq for Activations {
    fn eq(&self, other: &Self) -> bool {
        (self.rows, self.layers, self.width) == (other.rows, other.layers, other.width) && self.data() == other.data()
    }
}

impl Activations {
    pub fn zeros(rows: usize, layers: usize, width: usize) -> Self {
        Self::from_vec(rows, layers, width, zeroed_buffer(rows * layers * width))
    }

    /// `data` holds `rows × layers × width` values.
    pub fn from_vec(rows: usize, layers: usize, width: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * layers * width, "activation buffer of the wrong size");
        Activations { rows, layers, width, buffer: Arc::new(data), offset: 0 }
    }

    /// Every value, row by row.
    pub fn data(&self) -> &[f32] {
        &self.buffer[self.offset..self.offset + self.rows * self.layers * self.width]
    }

    /// One head's values for one prompt.
    pub fn head(&self, row: usize, layer: usize, head: usize, head_dim: usize) -> &[f32] {
        let start = (row * self.layers + layer) * self.width + head * head_dim;
        &self.data()[start..start + head_dim]
    }

    /// The first `first` rows and the rest, sharing this set's buffer (nothing is copied).
    pub fn split_rows(self, first: usize) -> (Activations, Activations) {
        assert!(first <= self.rows, "split past the last row");
        let per_row = self.layers * self.width;
        let head = Activations { rows: first, buffer: Arc::clone(&self.buffer), ..self.clone() };
        let tail = Activations { rows: self.rows - first, offset: self.offset + first * per_row, ..self };
        (head, tail)
    }

    /// The first value that is NaN or infinite: (row, layer, index in the layer's width, value).
    pub fn first_non_finite(&self) -> Option<(usize, usize, usize, f32)> {
        let data = self.data();
        let at = data.iter().position(|v| !v.is_finite())?;
        let (row, rest) = (at / (self.layers * self.width), at % (self.layers * self.width));
        Some((row, rest / self.width, rest % self.width, data[at]))
    }

    fn set_layer_row(&mut self, row: usize, layer: usize, values: &[f32]) {
        let start = self.offset + (row * self.layers + layer) * self.width;
        let buffer = Arc::get_mut(&mut self.buffer).expect("a set is captured before it is shared");
        buffer[start..start + self.width].copy_from_slice(values);
    }
}

/// A zeroed buffer for activations, backed by huge pages where the system allows it: the probe stage reads
/// each prompt's slice of a layer, rows tens of kilobytes apart, and with 4 KiB pages nearly every row would
/// cost a TLB miss.
pub fn zeroed_buffer(len: usize) -> Vec<f32> {
    let buffer = vec![0.0f32; len];
    #[cfg(target_os = "linux")]
    if len * 4 >= 4 << 20 {
        // SAFETY: advice on memory this Vec owns; it changes how the kernel backs the pages, not their contents.
        unsafe {
            libc::madvise(buffer.as_ptr() as *mut libc::c_void, len * 4, libc::MADV_HUGEPAGE);
        }
    }
    buffer
}

/// Prompts grouped into batches of at most `batch_size`, each packed as a prefix tree. Sorting by token ids
/// puts prompts that share leading tokens side by side.
pub struct PackedPrompts {
    batches: Vec<PackedBatch>,
}

struct PackedBatch {
    /// The prompts in this batch, by index into the caller's list.
    prompts: Vec<usize>,
    /// Per prompt, the tree token whose o_proj inputs are captured (its last token).
    last: Vec<usize>,
    batch: Batch,
}

impl PackedPrompts {
    pub fn new(tokens: &[Vec<u32>], batch_size: usize, device: &Device) -> Result<Self> {
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by(|&a, &b| tokens[a].cmp(&tokens[b]).then(a.cmp(&b)));
        let batches = order
            .chunks(batch_size.max(1))
            .map(|chunk| {
                let sequences: Vec<&[u32]> = chunk.iter().map(|&i| tokens[i].as_slice()).collect();
                let (batch, last) = Batch::prefix_tree(&sequences, device)?;
                Ok(PackedBatch { prompts: chunk.to_vec(), last, batch })
            })
            .collect::<Result<_>>()?;
        Ok(PackedPrompts { batches })
    }

    /// What the plan needs to know about the pass, the first `probe_prompts` prompts being the probe set.
    pub fn shape(&self, probe_prompts: usize) -> PassShape {
        PassShape {
            prompts: prompt_count(self),
            probe_prompts,
            tokens: self.batches.iter().map(|b| b.batch.len()).sum(),
            longest_batch: self.batches.iter().map(|b| b.batch.len()).max().unwrap_or(0),
            attention_pairs: self.batches.iter().map(|b| (b.batch.len() as u64).pow(2)).sum(),
        }
    }
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

/// Runs every packed prompt and captures the o_proj inputs at its last token, with the whole model resident.
/// Rows come back in the prompts' order.
pub fn capture_last_token(model: &Llama, prompts: &PackedPrompts, progress: &dyn Progress) -> Result<Activations> {
    let c = &model.config;
    let mut out = Activations::zeros(prompt_count(prompts), c.num_layers, c.attn_width());
    progress.start(out.rows as u64, "prompts");
    for packed in &prompts.batches {
        let output = model.forward(&packed.batch, &Request { capture_at: Some(&packed.last), ..Default::default() })?;
        for (layer, captured) in output.o_proj_inputs.iter().enumerate() {
            store(&mut out, &packed.prompts, layer, captured)?;
        }
        progress.advance(packed.prompts.len() as u64);
    }
    progress.finish();
    Ok(out)
}

/// The same capture run layer by layer ([`Llama::capture_streamed`]): one layer's weights resident at a
/// time, every batch's hidden states kept in memory between layers.
pub fn capture_last_token_streamed(
    files: &ModelFiles,
    device: &Device,
    prompts: &PackedPrompts,
    progress: &dyn Progress,
) -> Result<Activations> {
    let c = &files.config;
    let mut out = Activations::zeros(prompt_count(prompts), c.num_layers, c.attn_width());
    let batches: Vec<(&Batch, &[usize])> = prompts.batches.iter().map(|p| (&p.batch, p.last.as_slice())).collect();
    progress.start(c.num_layers as u64, "layers");
    Llama::capture_streamed(
        files,
        device,
        &batches,
        |layer, i, captured| store(&mut out, &prompts.batches[i].prompts, layer, &captured),
        |_| progress.advance(1),
    )?;
    progress.finish();
    Ok(out)
}

fn prompt_count(prompts: &PackedPrompts) -> usize {
    prompts.batches.iter().map(|b| b.prompts.len()).sum()
}
