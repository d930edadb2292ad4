//! Writes a randomly initialised LLaMA checkpoint (for benchmarks that need a model of a given size).
//!
//! cargo run --release --example synthetic_model -- OUT LAYERS HIDDEN HEADS KV_HEADS HEAD_DIM FFN VOCAB DTYPE [TOKENIZER]
//! e.g. a ~1B model with SmolLM2's tokenizer:
//! cargo run --release --example synthetic_model -- /tmp/llama-1b 16 2048 16 16 128 5632 49152 bf16 $BAKE_SMOLLM2/tokenizer.json

use bake::io::dtype::StoredDtype;
use bake::model::synthetic::{write_synthetic_model, SyntheticSpec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 9 {
        eprintln!(
            "usage: synthetic_model OUT LAYERS HIDDEN HEADS KV_HEADS HEAD_DIM FFN VOCAB bf16|f16|f32 [TOKENIZER]"
        );
        std::process::exit(2);
    }
    let n = |i: usize| -> usize { args[i].parse().unwrap_or_else(|_| panic!("argument {i} must be a number")) };
    let dtype = match args[8].as_str() {
        "bf16" => StoredDtype::Bf16,
        "f16" => StoredDtype::F16,
        _ => StoredDtype::F32,
    };
    let spec = SyntheticSpec {
        layers: n(1),
        hidden: n(2),
        heads: n(3),
        kv_heads: n(4),
        head_dim: n(5),
        intermediate: n(6),
        vocab: n(7),
        dtype,
        tie_word_embeddings: false,
        seed: 1,
    };
    let out = std::path::Path::new(&args[0]);
    write_synthetic_model(out, &spec, 2 << 30).unwrap();
    if let Some(tokenizer) = args.get(9) {
        std::fs::copy(tokenizer, out.join("tokenizer.json")).unwrap();
    }
    eprintln!("wrote {}", out.display());
}
