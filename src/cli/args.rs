//! The flag groups the commands share, each meaning one thing wherever it appears, and the recipe they resolve
//! to. A value is checked here by the rule its recipe field follows ([`bake::recipe::ranges`]), so a bad flag is
//! refused by clap, naming the flag, before anything runs.

use std::path::PathBuf;

use anyhow::Result;
use bake::pipeline::RunOptions;
use bake::recipe::{ranges, BatchTokens, DeviceChoice, DirectionKind, DtypeChoice, Overrides, Recipe};
use clap::Args;

/// The model, the recipe, and how the model is run: what every command that runs the model takes.
#[derive(Args)]
pub struct RunArgs {
    /// A model folder, a Hub repo id `org/name[@revision]`, or a short name (see `bake models`).
    #[arg(long, short)]
    pub model: String,
    /// The YAML recipe (default: the built-in recipes/truthfulqa.yaml).
    #[arg(long, short)]
    pub recipe: Option<PathBuf>,
    /// Seed for splits, tuning prompts and random directions (overrides the recipe).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Dataset folder or Hub id (overrides the recipe).
    #[arg(long)]
    pub dataset: Option<String>,
    /// Only the first N questions in multiple_choice order.
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,
    /// Most tokens in one batch of the activation pass, or auto (from the model's shape and the memory).
    #[arg(long, value_parser = batch_tokens)]
    pub batch_tokens: Option<BatchTokens>,
    /// cpu, cuda, cuda:N or auto (CUDA when built with it and a GPU is present).
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// The matmuls' dtype: auto (f32 on the CPU, the checkpoint's on a GPU), f32, bf16 or f16.
    #[arg(long)]
    pub dtype: Option<DtypeChoice>,
    /// How directions are found.
    #[arg(long, value_enum)]
    pub direction: Option<DirectionKind>,
    /// How heads (or layers) are ranked and shifted: iti (logistic probes on the last token), nl-iti (MLP probes
    /// on the mean of the last tokens) or residual (a vector per layer on the residual stream, as a down_proj
    /// bias) (overrides the recipe). `bake search` takes several, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub method: Vec<bake::recipe::Method>,
    /// Average each prompt's activations over its last N tokens (overrides the recipe; default: 1 for iti,
    /// 4 for nl-iti and residual).
    #[arg(long, value_parser = at_least_one)]
    pub tokens: Option<usize>,
    /// Do not read or write the activation cache ($BAKE_CACHE_DIR, default ~/.cache/bake/activations).
    #[arg(long)]
    pub no_cache: bool,
    /// Memory budget (e.g. 8GB = 8·10⁹ bytes, 8GiB = 8·2³⁰), of host memory on the CPU and of GPU memory on
    /// CUDA: the activation pass runs layer by layer when the whole model would not fit (see `bake --dry-run`).
    #[arg(long, value_parser = memory_size, allow_hyphen_values = true)]
    pub max_memory: Option<u64>,
}

/// One K and one α (bake, probe, eval --cv).
#[derive(Args)]
pub struct ShiftArgs {
    /// Shift strength α (overrides the recipe).
    #[arg(long, value_parser = alpha, allow_negative_numbers = true)]
    pub alpha: Option<f64>,
    /// Number of heads K (overrides the recipe).
    #[arg(long, value_parser = at_least_one)]
    pub heads: Option<usize>,
}

/// The K and α a search tries.
#[derive(Args)]
pub struct GridArgs {
    /// The α to try, comma-separated (default 0,2.5,5,10,15,20,30; for residual 0,0.25,0.5,1,2,3).
    #[arg(long, value_delimiter = ',', value_parser = alpha, allow_negative_numbers = true)]
    pub alpha: Vec<f64>,
    /// The K to try, comma-separated (default 8,16,32,48,64,96, up to the model's heads; for residual, layers
    /// 1,2,3,4,8).
    #[arg(long, value_delimiter = ',', value_parser = at_least_one)]
    pub heads: Vec<usize>,
}

/// What eval and search score: batches of answers and documents, and the corpus CE and KL are measured on.
#[derive(Args)]
pub struct ScoringArgs {
    /// Prompts per forward pass when answers and documents are scored.
    #[arg(long, value_parser = at_least_one)]
    pub batch_size: Option<usize>,
    /// Text corpus for CE and KL (.jsonl with a `text` field, or plain text).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Documents sampled from the corpus for CE and KL (overrides the recipe's `corpus.documents`).
    #[arg(long)]
    pub documents: Option<usize>,
}

impl RunArgs {
    /// The recipe with these flags applied, and K and α from `shift` and the scoring flags when a command takes
    /// them.
    pub fn recipe(&self, shift: Option<&ShiftArgs>, scoring: Option<&ScoringArgs>) -> Result<Recipe> {
        if self.method.len() > 1 {
            anyhow::bail!(
                "--method: expected one method here, found {}; `bake search --method iti,nl-iti,residual` compares \
                 several",
                self.method.len()
            );
        }
        self.recipe_of(shift, scoring)
    }

    /// The recipe with these flags applied, the first of `--method`'s methods in it, and every method `--method`
    /// names (the recipe's own when it names none): what `bake search` compares.
    pub fn recipe_and_methods(&self, scoring: &ScoringArgs) -> Result<(Recipe, Vec<bake::recipe::Method>)> {
        let recipe = self.recipe_of(None, Some(scoring))?;
        let mut methods = self.method.clone();
        if methods.is_empty() {
            methods.push(recipe.method);
        }
        if let Some(m) = methods.iter().enumerate().find_map(|(i, m)| methods[..i].contains(m).then_some(m)) {
            anyhow::bail!("--method: `{m}` is listed twice");
        }
        Ok((recipe, methods))
    }

    fn recipe_of(&self, shift: Option<&ShiftArgs>, scoring: Option<&ScoringArgs>) -> Result<Recipe> {
        let mut recipe = match &self.recipe {
            Some(path) => Recipe::load(path)?,
            None => Recipe::shipped(),
        };
        recipe.apply(&Overrides {
            alpha: shift.and_then(|s| s.alpha),
            heads: shift.and_then(|s| s.heads),
            seed: self.seed,
            dataset: self.dataset.clone(),
            limit: self.limit,
            batch_size: scoring.and_then(|s| s.batch_size),
            batch_tokens: self.batch_tokens,
            device: self.device,
            dtype: self.dtype,
            direction: self.direction,
            corpus: scoring.and_then(|s| s.corpus.clone()),
            method: self.method.first().copied(),
            tokens: self.tokens,
        })?;
        if let (Some(n), Some(corpus)) = (scoring.and_then(|s| s.documents), recipe.corpus.as_mut()) {
            corpus.documents = n;
        }
        Ok(recipe)
    }

    pub fn run_options(&self) -> RunOptions {
        RunOptions {
            cache_dir: (!self.no_cache).then(bake::activations::cache::default_dir),
            max_memory: self.max_memory,
        }
    }
}

/// A count of at least one (`--limit`, `--heads`, `--batch-size`).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    let n = text.parse::<usize>().map_err(|_| not_a_number("a whole number", text))?;
    ranges::at_least_one(n).map(|()| n).map_err(|expected| format!("expected {expected}"))
}

/// A number of cross-validation folds: at least 2 (one to fit on, one to measure).
pub fn folds(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        _ => Err("expected a number of folds, at least 2".into()),
    }
}

/// A budget in nats per token: finite and above 0.
pub fn nats(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err("expected a number > 0 (nats per token)".into()),
    }
}

/// α: finite and not negative.
pub fn alpha(text: &str) -> Result<f64, String> {
    let a = text.parse::<f64>().map_err(|_| not_a_number("a number", text))?;
    ranges::alpha(a).map(|()| a).map_err(|expected| format!("expected {expected}"))
}

fn batch_tokens(text: &str) -> Result<BatchTokens, String> {
    let tokens = text.parse::<BatchTokens>().map_err(|expected| format!("expected {expected}"))?;
    ranges::batch_tokens(tokens).map(|()| tokens).map_err(|expected| format!("expected {expected}"))
}

/// `--max-memory`: more than nothing.
pub(super) fn memory_size(text: &str) -> Result<u64, String> {
    match bake::units::parse_size(text)? {
        0 => Err(format!("`{text}`: expected more than 0 bytes")),
        n => Ok(n),
    }
}

/// Says what was expected, and where a list was given to a command that takes one value, whose it is.
fn not_a_number(what: &str, text: &str) -> String {
    match text.contains(',') {
        true => format!("expected {what}, found `{text}` (lists of K and α are for `bake search`)"),
        false => format!("expected {what}, found `{text}`"),
    }
}
