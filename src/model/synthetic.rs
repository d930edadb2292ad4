//! Randomly initialised LLaMA checkpoints, for tests and benchmarks that must not depend on downloads.
//! The values come from a fixed-seed generator, so the same shape always gives the same bytes.

use std::path::Path;

use super::config::ModelConfig;
use super::weights::expected_tensors;
use crate::error::{IoContext, Result};
use crate::io::dtype::StoredDtype;
use crate::io::safetensors::{write_checkpoint, Bytes, TensorBytes};
use crate::rng::SeededRng;

/// The shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub dtype: StoredDtype,
    pub tie_word_embeddings: bool,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            layers: 2,
            hidden: 32,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            intermediate: 64,
            vocab: 128,
            dtype: StoredDtype::F32,
            tie_word_embeddings: false,
            seed: 0,
        }
    }
}

impl SyntheticSpec {
    pub fn config_json(&self) -> serde_json::Value {
        let dtype = self.dtype.torch_name();
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        })
    }
}

/// Writes `config.json` and random weights (norms near 1, matrices scaled by 1/√fan_in) into `dir`, one
/// tensor in memory at a time.
pub fn write_synthetic_model(dir: &Path, spec: &SyntheticSpec, max_shard_bytes: u64) -> Result<()> {
    std::fs::create_dir_all(dir).at(dir)?;
    let config_path = dir.join("config.json");
    let config_text = serde_json::to_string_pretty(&spec.config_json()).expect("plain JSON");
    std::fs::write(&config_path, &config_text).at(&config_path)?;
    let config = ModelConfig::load(&config_path)?;
    let dtype = spec.dtype;
    let tensors: Vec<TensorBytes> = expected_tensors(&config)
        .into_iter()
        .filter(|t| t.required)
        .map(|t| {
            let numel: usize = t.shape.iter().product();
            let is_norm = t.shape.len() == 1;
            let scale = if is_norm { 0.1 } else { 1.0 / (*t.shape.last().unwrap() as f32).sqrt() };
            // Each tensor has its own generator, so that it can be made on its own, when it is written: a
            // model larger than memory streams to disk.
            let seed = spec.seed;
            let name = t.name.clone();
            let make = move || {
                let mut rng = SeededRng::for_purpose(seed, &name);
                let values = (0..numel).map(|_| {
                    let r = (rng.uniform() as f32 * 2.0 - 1.0) * scale;
                    if is_norm {
                        1.0 + r
                    } else {
                        r
                    }
                });
                dtype.encode(values)
            };
            let bytes = Bytes::Generated { len: numel * dtype.size_in_bytes(), make: Box::new(make) };
            TensorBytes { name: t.name, dtype, shape: t.shape, bytes }
        })
        .collect();
    write_checkpoint(dir, tensors, max_shard_bytes, &|_, _| {})?;
    Ok(())
}

/// The size of [`write_byte_level_tokenizer`]'s vocabulary: one token per byte.
pub const BYTE_LEVEL_VOCAB: usize = 256;

/// Writes `tokenizer.json`: GPT-2-style byte-level BPE with one token per byte and no merges, so that any
/// text tokenizes (one token per byte) with ids below [`BYTE_LEVEL_VOCAB`]. A real tokenizer of the
/// `tokenizers` format, small enough to make on the spot.
pub fn write_byte_level_tokenizer(dir: &Path) -> Result<()> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: serde_json::Map<String, serde_json::Value> =
        alphabet.iter().enumerate().map(|(id, c)| (c.to_string(), id.into())).collect();
    let byte_level =
        serde_json::json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
        "model": { "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                   "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                   "vocab": vocab, "merges": [] }
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&tokenizer).expect("plain JSON")).at(&path)
}
