//! Stage 3: the activation pass. Every prompt runs through the model and every layer's activations at the
//! method's [`Site`] (the o_proj input, or the residual stream after the layer) at the prompt's last token (or
//! the mean over its last N tokens) are kept in f32. Results are cached on disk.
//!
//! Prompts are sorted by their token ids and each batch is packed as a prefix tree ([`Batch::prefix_tree`]):
//! the TruthfulQA prompts of one question all begin with "Q: {question} A:", so that part is computed once
//! per batch instead of once per prompt, and nothing is padded. Over the whole recipe this halves the
//! tokens the model runs on.

pub mod cache;
pub mod plan;

use std::sync::Arc;

use candle_core::{DType, Device};

use crate::error::Result;
use candle_core::Tensor;

use crate::model::{Batch, Llama, ModelFiles, Request, Site, TextTokenizer};
use crate::progress::Progress;
use plan::PassShape;

/// Bumped whenever the pass computes its values differently (batching, kernels, operation order), so that
/// activations cached by an older build are not reused: 2 = prefix-tree batches, 3 = batches bounded by
/// tokens, 4 = a tree's attention computed over the visible pairs only on the CPU.
pub const PASS_VERSION: u32 = 4;

/// Activations at one site (o_proj inputs, or residual streams), `[rows][layers][width]` row-major, f32. Row i
/// belongs to prompt i.
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

/// Prompts grouped into batches of at most `max_tokens` tree tokens each, packed as prefix trees. Sorting by
/// token ids puts prompts that share leading tokens side by side.
///
/// A token budget rather than a prompt count bounds what a batch costs: its attention scores grow with the
/// square of its tokens, and prompts differ in length by 10×.
pub struct PackedPrompts {
    batches: Vec<PackedBatch>,
}

struct PackedBatch {
    /// The prompts in this batch, by index into the caller's list.
    prompts: Vec<usize>,
    /// The tree tokens whose o_proj inputs are captured: each prompt's last `answer_tokens` (fewer when the
    /// prompt is shorter), prompt after prompt, first to last.
    capture: Vec<usize>,
    /// How many of `capture` each prompt owns.
    counts: Vec<usize>,
    batch: Batch,
}

impl PackedPrompts {
    /// A prompt longer than `max_tokens` runs in a batch of its own. Each prompt's activations are the mean over
    /// its last `answer_tokens` tokens (all of them when it has fewer, as NL-ITI averages).
    pub fn new(tokens: &[Vec<u32>], max_tokens: usize, answer_tokens: usize, device: &Device) -> Result<Self> {
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by(|&a, &b| tokens[a].cmp(&tokens[b]).then(a.cmp(&b)));
        let batches = chunks_within_budget(&order, tokens, max_tokens)
            .iter()
            .map(|chunk| {
                let sequences: Vec<&[u32]> = chunk.iter().map(|&i| tokens[i].as_slice()).collect();
                let (batch, last) = Batch::prefix_tree(&sequences, device)?;
                let tails: Vec<Vec<usize>> = last
                    .iter()
                    .map(|&l| {
                        let path = batch.tree_path(l);
                        path[path.len().saturating_sub(answer_tokens)..].to_vec()
                    })
                    .collect();
                let counts = tails.iter().map(Vec::len).collect();
                Ok(PackedBatch { prompts: chunk.to_vec(), capture: tails.concat(), counts, batch })
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

/// Splits prompts, sorted by their tokens, into runs whose prefix trees hold at most `max_tokens` tokens.
/// In sorted order a prompt shares the most leading tokens with the one before it, so it adds exactly its
/// length minus that common prefix to the tree.
fn chunks_within_budget<'a>(order: &'a [usize], tokens: &[Vec<u32>], max_tokens: usize) -> Vec<&'a [usize]> {
    let mut chunks = Vec::new();
    let (mut start, mut tree_tokens) = (0, 0);
    for (i, &prompt) in order.iter().enumerate() {
        let shared = match i {
            0 => 0,
            _ => common_prefix(&tokens[order[i - 1]], &tokens[prompt]),
        };
        let added = tokens[prompt].len() - shared;
        if i > start && tree_tokens + added > max_tokens {
            chunks.push(&order[start..i]);
            (start, tree_tokens) = (i, tokens[prompt].len());
        } else {
            tree_tokens += added;
        }
    }
    if start < order.len() {
        chunks.push(&order[start..]);
    }
    chunks
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Stores one layer's captured rows `[captured tokens, width]` as their prompts' rows: a prompt's row is the
/// mean of its tokens' (summed in f64, in token order), or its one token's values as they are.
fn store(out: &mut Activations, packed: &PackedBatch, layer: usize, captured: &Tensor) -> Result<()> {
    let rows: Vec<Vec<f32>> = captured.to_device(&Device::Cpu)?.to_vec2()?;
    let mut rows = rows.iter();
    for (&prompt, &count) in packed.prompts.iter().zip(&packed.counts) {
        let tokens: Vec<&Vec<f32>> = rows.by_ref().take(count).collect();
        match tokens[..] {
            [one] => out.set_layer_row(prompt, layer, one),
            _ => out.set_layer_row(prompt, layer, &mean_of_rows(&tokens)),
        }
    }
    Ok(())
}

/// The element-wise mean of equally long rows, summed in f64.
fn mean_of_rows(rows: &[&Vec<f32>]) -> Vec<f32> {
    let width = rows.first().map_or(0, |r| r.len());
    let n = rows.len() as f64;
    (0..width).map(|i| (rows.iter().map(|r| r[i] as f64).sum::<f64>() / n) as f32).collect()
}

/// Every prompt's token ids, as the activation pass (and its plan) read them.
pub fn tokenize(tokenizer: &TextTokenizer, prompts: &[impl AsRef<str>]) -> Result<Vec<Vec<u32>>> {
    prompts.iter().map(|p| tokenizer.encode(p.as_ref())).collect()
}

/// The inputs of a recipe's activation pass, for a reference implementation to run exactly the same ones
/// (`examples/prompt_tokens.rs`, `scripts/gpu-check.sh`).
#[derive(Debug, serde::Serialize)]
pub struct PassInputs {
    pub probe_prompts: usize,
    /// The question of each probe prompt (multiple_choice order).
    pub probe_questions: Vec<usize>,
    /// Probe prompts, then tuning prompts.
    pub tokens: Vec<Vec<u32>>,
}

pub fn pass_inputs(recipe: &crate::recipe::Recipe, tokenizer: &TextTokenizer) -> Result<PassInputs> {
    let data = crate::data::TruthfulQa::load(&recipe.dataset.source, &recipe.dataset.split, recipe.limit)?;
    let prompts = crate::data::build_prompt_sets(&data, &recipe.prompts, recipe.seed);
    Ok(PassInputs {
        probe_prompts: prompts.probe.len(),
        probe_questions: prompts.probe.iter().map(|p| p.question).collect(),
        tokens: tokenize(tokenizer, &prompts.texts())?,
    })
}

/// Runs every packed prompt and captures the activations at `site` at its last token (or their mean over its
/// last tokens), with the whole model resident. Rows come back in the prompts' order.
pub fn capture(model: &Llama, prompts: &PackedPrompts, site: Site, progress: &dyn Progress) -> Result<Activations> {
    let c = &model.config;
    let mut out = Activations::zeros(prompt_count(prompts), c.num_layers, c.width_at(site));
    progress.start(out.rows as u64, "prompts");
    run_resident(
        model,
        prompts,
        site,
        |packed, layer, captured| store(&mut out, packed, layer, captured),
        |packed| progress.advance(packed.prompts.len() as u64),
    )?;
    progress.finish();
    Ok(out)
}

/// Runs every packed batch through the resident model: `sink(batch, layer, captured)` receives each layer's
/// activations at `site` at the batch's captured tokens, `done(batch)` follows each batch.
fn run_resident(
    model: &Llama,
    prompts: &PackedPrompts,
    site: Site,
    mut sink: impl FnMut(&PackedBatch, usize, &Tensor) -> Result<()>,
    mut done: impl FnMut(&PackedBatch),
) -> Result<()> {
    for packed in &prompts.batches {
        let request = Request { site, capture_at: Some(&packed.capture), ..Default::default() };
        let output = model.forward(&packed.batch, &request)?;
        for (layer, captured) in output.captured.iter().enumerate() {
            sink(packed, layer, captured)?;
        }
        done(packed);
    }
    Ok(())
}

/// The same pass without the mean: every captured token's activations at `site` as a row of its own (each
/// prompt's last `answer_tokens` in order, prompt after prompt in the prompts' order), and how many rows each
/// prompt has. For checking the mean against an independent computation on exactly the values it averaged.
pub fn capture_each_token(model: &Llama, prompts: &PackedPrompts, site: Site) -> Result<(Activations, Vec<usize>)> {
    let c = &model.config;
    let mut counts = vec![0; prompt_count(prompts)];
    for packed in &prompts.batches {
        for (&prompt, &count) in packed.prompts.iter().zip(&packed.counts) {
            counts[prompt] = count;
        }
    }
    let first_row: Vec<usize> = counts.iter().scan(0, |next, &n| Some(std::mem::replace(next, *next + n))).collect();
    let mut out = Activations::zeros(counts.iter().sum(), c.num_layers, c.width_at(site));
    let sink = |packed: &PackedBatch, layer, captured: &Tensor| {
        let rows = packed.prompts.iter().flat_map(|&p| first_row[p]..first_row[p] + counts[p]);
        let values: Vec<Vec<f32>> = captured.to_device(&Device::Cpu)?.to_vec2()?;
        for (row, v) in rows.zip(&values) {
            out.set_layer_row(row, layer, v);
        }
        Ok(())
    };
    run_resident(model, prompts, site, sink, |_| {})?;
    Ok((out, counts))
}

/// The same capture run layer by layer ([`Llama::capture_streamed`]): one layer's weights resident at a
/// time, every batch's hidden states kept in memory between layers.
pub fn capture_streamed(
    files: &ModelFiles,
    (device, dtype): (&Device, DType),
    site: Site,
    prompts: &PackedPrompts,
    progress: &dyn Progress,
) -> Result<Activations> {
    let c = &files.config;
    let mut out = Activations::zeros(prompt_count(prompts), c.num_layers, c.width_at(site));
    let batches: Vec<(&Batch, &[usize])> = prompts.batches.iter().map(|p| (&p.batch, p.capture.as_slice())).collect();
    progress.start(c.num_layers as u64, "layers");
    Llama::capture_streamed(
        files,
        (device, dtype),
        site,
        &batches,
        |layer, i, captured| store(&mut out, &prompts.batches[i], layer, &captured),
        |_| progress.advance(1),
    )?;
    progress.finish();
    Ok(out)
}

fn prompt_count(prompts: &PackedPrompts) -> usize {
    prompts.batches.iter().map(|b| b.prompts.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens a prefix tree of these prompts holds: each distinct leading run once.
    fn tree_tokens(prompts: &[&Vec<u32>]) -> usize {
        let mut prefixes = std::collections::HashSet::new();
        prompts.iter().flat_map(|p| (1..=p.len()).map(move |n| &p[..n])).filter(|p| prefixes.insert(*p)).count()
    }

    fn prompts() -> Vec<Vec<u32>> {
        // Questions of 6 tokens with answers of 1 to 4 tokens each, one long prompt, one duplicate.
        let mut out = Vec::new();
        for q in 0..12u32 {
            for a in 0..5u32 {
                let mut p = vec![1, 100 + q, 200 + q, 300 + q, 400, 500];
                p.extend((0..=a % 4).map(|i| 1000 + 10 * a + i));
                out.push(p);
            }
        }
        out.push((0..90).collect());
        out.push(out[3].clone());
        out
    }

    #[test]
    fn batches_stay_within_the_token_budget_and_cover_every_prompt_once() {
        let tokens = prompts();
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by(|&a, &b| tokens[a].cmp(&tokens[b]).then(a.cmp(&b)));
        for budget in [1, 7, 20, 33, 64, 1000] {
            let chunks = chunks_within_budget(&order, &tokens, budget);
            assert_eq!(chunks.concat(), order, "budget {budget}: every prompt once, in sorted order");
            for chunk in &chunks {
                let members: Vec<&Vec<u32>> = chunk.iter().map(|&i| &tokens[i]).collect();
                let used = tree_tokens(&members);
                assert!(used <= budget || chunk.len() == 1, "budget {budget}: a batch of {used} tokens: {chunk:?}");
                let (batch, _) = Batch::prefix_tree(&members, &Device::Cpu).unwrap();
                assert_eq!(batch.len(), used, "the packed tree holds what the budget counted");
            }
            // Greedy: a batch closes only when the next prompt would not fit.
            for pair in chunks.windows(2) {
                let mut members: Vec<&Vec<u32>> = pair[0].iter().map(|&i| &tokens[i]).collect();
                members.push(&tokens[pair[1][0]]);
                assert!(tree_tokens(&members) > budget, "budget {budget}: a batch closed early");
            }
        }
        let whole = chunks_within_budget(&order, &tokens, 1000);
        assert_eq!(whole.len(), 1);
    }

    #[test]
    fn the_automatic_budget_follows_the_model_and_the_memory() {
        let config = |heads: usize, kv_heads: usize, hidden: usize, ffn: usize| {
            let json = serde_json::json!({
                "model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn,
                "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 2, "vocab_size": 100,
            });
            let serde_json::Value::Object(map) = json else { unreachable!() };
            crate::model::ModelConfig::from_map(std::path::Path::new("config.json"), map).unwrap()
        };
        let cpu = plan::Compute::cpu_f32();
        let smollm2 = config(9, 3, 576, 1536);
        let llama7b = config(32, 32, 4096, 11008);
        let auto = |c, memory| plan::auto_batch_tokens(c, &cpu, memory);
        // Attention within a quarter of the projections' FLOPs: 2(2·576² + 2·576·192 + 3·576·1536)/(16·576)
        // = 768 for SmolLM2's shape, whose scratch at 768 tokens (64 MB) is far below the allowance.
        assert_eq!(auto(&smollm2, None), 768);
        // The 7B shape is held back by the default 8 GiB (a 1 GiB scratch allowance), not by the waste.
        let big = auto(&llama7b, None);
        assert!(big % 64 == 0 && big > 768 && big < 6173, "{big}");
        assert!(auto(&llama7b, Some(64 << 30)) > big, "more memory, bigger batches");
        assert!(auto(&llama7b, Some(1 << 20)) == 64, "never below 64 tokens");
    }
}
