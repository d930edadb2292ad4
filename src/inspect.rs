//! `bake inspect`: what bake understood of a model, and what a bake of it will cost (the activation pass's
//! plan for the full TruthfulQA set, so this sits above both the model and the activation stages).

use serde::Serialize;

use crate::activations::plan::{self, PassShape, Plan};
use crate::io::dtype::StoredDtype;
use crate::io::names;
use crate::model::ModelFiles;

/// Number of prompts the TruthfulQA recipe runs (5882 probe + 5918 tuning prompts).
pub const TRUTHFULQA_PROMPTS: u64 = 11_800;
/// The shipped recipe's activation pass as `bake --dry-run` reports it for SmolLM2 (LLaMA tokenizers give
/// about as many tokens): 403k prompt tokens, 148k after prefix sharing in batches of at most 768 tokens.
const TRUTHFULQA_PASS: PassShape = PassShape {
    probe_prompts: 5_882,
    prompts: TRUTHFULQA_PROMPTS as usize,
    tokens: 148_203,
    longest_batch: 768,
    attention_pairs: 112_579_753,
};

#[derive(Debug, Serialize)]
pub struct FileSummary {
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct MemoryEstimate {
    /// f32 weights held by the CPU activation pass.
    pub weights_f32_bytes: u64,
    /// The stored weights, memory-mapped; their pages count towards RSS while they are read.
    pub mapped_weights_bytes: u64,
    /// Captured o_proj inputs for the full TruthfulQA prompt set, f32.
    pub activations_bytes: u64,
    /// The largest tensor the writer holds at once (it streams everything else from the memory map).
    pub writer_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub model: String,
    pub hub_repo: Option<String>,
    pub folder: String,
    /// `llama`, `mistral`, `qwen2` or `qwen3`, and transformers' class.
    pub family: crate::model::config::Family,
    pub architecture: &'static str,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub o_proj_in_features: usize,
    pub parameters: u64,
    pub dtype: StoredDtype,
    pub tied_embeddings: bool,
    pub has_attention_biases: bool,
    pub files: Vec<FileSummary>,
    pub total_bytes: u64,
    pub bake_memory_estimate: MemoryEstimate,
    /// The activation pass over the full TruthfulQA set in both modes (no budget: resident is chosen).
    pub activation_plan: Plan,
    /// What this machine would do with that pass on the CPU in f32, by its available memory.
    pub this_machine: MachineVerdict,
    /// Whether transformers, vLLM and llama.cpp apply a bake's shift for this family, as measured.
    pub runtimes: Vec<crate::export::runtimes::Verdict>,
    /// Set when some runtime would serve a bake of this model without its shift.
    pub runtime_warning: Option<String>,
}

/// The mode the memory this machine has now allows (`None`: neither fits, or the memory is unknown).
#[derive(Debug, Clone, Serialize)]
pub struct MachineVerdict {
    pub available_bytes: Option<u64>,
    pub mode: Option<plan::Mode>,
}

pub fn inspect(model: &ModelFiles) -> Inspection {
    // On the CPU: `inspect` has no recipe naming a device.
    let compute = plan::Compute::cpu_f32();
    let rate = plan::measure_matmul_rate(&model.config, &compute).ok();
    let batch_tokens = plan::auto_batch_tokens(&model.config, &compute, None);
    let activation_plan = plan::plan(model, &TRUTHFULQA_PASS, &compute, batch_tokens, rate, None)
        .expect("without a budget a plan always exists");
    let available = plan::budget_for(&compute.device, None);
    let this_machine = MachineVerdict {
        available_bytes: available.map(|b| b.bytes),
        mode: available.and_then(|b| {
            plan::mode_for(activation_plan.estimate.resident_bytes, activation_plan.estimate.streamed_bytes, Some(b))
                .ok()
        }),
    };
    let c = &model.config;
    let ck = &model.checkpoint;
    let parameters: u64 = ck.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64).sum();
    let files: Vec<FileSummary> = ck
        .files
        .iter()
        .map(|p| FileSummary {
            path: p.display().to_string(),
            bytes: std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        })
        .collect();
    let activations_bytes = TRUTHFULQA_PROMPTS * (c.num_layers * c.attn_width()) as u64 * 4;
    let weights_f32_bytes = parameters * 4;
    let writer_bytes = ck.tensors.values().map(|e| (e.end - e.start) as u64).max().unwrap_or(0);
    let mapped_weights_bytes = ck.total_bytes();
    Inspection {
        model: model.location.spec.clone(),
        hub_repo: model.location.hub_repo.clone(),
        folder: model.location.dir.display().to_string(),
        family: c.family,
        architecture: c.family.architecture(),
        runtimes: crate::export::runtimes::verdicts(c.family, crate::model::Site::AttentionHeads),
        runtime_warning: crate::export::runtimes::warning(c.family),
        layers: c.num_layers,
        heads: c.num_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        o_proj_in_features: c.attn_width(),
        parameters,
        dtype: model.dtype(),
        tied_embeddings: c.tie_word_embeddings,
        has_attention_biases: ck.tensors.keys().any(|n| names::is_attention_bias(n)),
        total_bytes: files.iter().map(|f| f.bytes).sum(),
        files,
        activation_plan,
        this_machine,
        bake_memory_estimate: MemoryEstimate {
            weights_f32_bytes,
            mapped_weights_bytes,
            activations_bytes,
            writer_bytes,
            total_bytes: weights_f32_bytes + mapped_weights_bytes + activations_bytes + writer_bytes,
        },
    }
}
