//! Forward throughput (tokens/s, logits for every position) of bake's CPU pass on SmolLM2.
//! Run through `scripts/bench.sh forward`, which measures transformers on the same prompts in the same run.
//!
//! Env: BAKE_SMOLLM2 (model folder), BAKE_BENCH_PROMPTS (a file, one prompt per line), BAKE_BENCH_BATCH.

use std::time::Instant;

use bake::model::{Batch, ModelFiles, Request};
use candle_core::Device;

fn main() {
    let model_dir = std::env::var("BAKE_SMOLLM2").expect("BAKE_SMOLLM2");
    let prompts_file = std::env::var("BAKE_BENCH_PROMPTS").expect("BAKE_BENCH_PROMPTS");
    let batch_size: usize = std::env::var("BAKE_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let files = ModelFiles::open(&model_dir).unwrap();
    let tokenizer = files.tokenizer().unwrap();
    let model = files.load(&Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = std::fs::read_to_string(prompts_file)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| tokenizer.encode(l).unwrap())
        .collect();
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    // Warm-up on one batch, then the timed pass over everything.
    let warm = Batch::right_padded(&prompts[..batch_size.min(prompts.len())], 0, &Device::Cpu).unwrap();
    model.forward(&warm, &Request { logits: true, ..Default::default() }).unwrap();
    let start = Instant::now();
    for chunk in prompts.chunks(batch_size) {
        let batch = Batch::right_padded(chunk, 0, &Device::Cpu).unwrap();
        model.forward(&batch, &Request { logits: true, ..Default::default() }).unwrap();
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"impl\": \"bake\", \"prompts\": {}, \"tokens\": {tokens}, \"seconds\": {seconds:.3}, \"tokens_per_s\": {:.1}}}",
        prompts.len(),
        tokens as f64 / seconds
    );
}
