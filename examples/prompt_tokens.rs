//! Prints the token ids of the shipped recipe's activation pass (probe prompts, then tuning prompts, as bake
//! runs them), so that a reference implementation can run exactly the same inputs (scripts/gpu-check.sh).
//!
//! cargo run --release --example prompt_tokens -- TOKENIZER_JSON [LIMIT] > prompts.json
//! Output: {"probe_prompts": N, "probe_questions": [question of each probe prompt], "tokens": [[ids], ...]}

use bake::activations::pass_inputs;
use bake::model::TextTokenizer;
use bake::recipe::Recipe;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(tokenizer) = args.first() else {
        anyhow::bail!("usage: prompt_tokens TOKENIZER_JSON [LIMIT]");
    };
    let mut recipe = Recipe::shipped();
    recipe.limit = args.get(1).map(|n| n.parse()).transpose()?;
    let inputs = pass_inputs(&recipe, &TextTokenizer::load(std::path::Path::new(tokenizer))?)?;
    println!("{}", serde_json::to_string(&inputs)?);
    Ok(())
}
