//! The YAML recipe: every choice of an ITI bake, with the reference code's defaults in
//! `recipes/truthfulqa.yaml`. Unknown keys and wrong types are errors with line and column.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{BakeError, Result};

/// `recipes/truthfulqa.yaml`, built in: the recipe used when none is given.
pub const SHIPPED: &str = include_str!("../recipes/truthfulqa.yaml");
/// How errors name the built-in recipe.
pub const SHIPPED_NAME: &str = "the built-in recipe (recipes/truthfulqa.yaml)";

const PROBE_PLACEHOLDERS: [&str; 2] = ["{question}", "{answer}"];
const TUNING_PLACEHOLDERS: [&str; 3] = ["{question}", "{answer}", "{other_question}"];
/// Deeper nesting is refused before parsing (a recipe needs 2 levels; YAML parsing of pathological nesting
/// is slow).
const MAX_NESTING: usize = 16;

/// How the truthful direction of a head is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectionKind {
    /// mean(true) − mean(false) over train ∪ validation (the paper's best).
    CenterOfMass,
    /// The probe's weight vector.
    Probe,
    /// A seeded random unit vector (a control).
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// `builtin` (the copy compiled into bake), a Hub dataset id, or a local folder with `multiple_choice/`
    /// and `generation/` in the HF layout.
    pub source: String,
    /// The split of both configs.
    pub split: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    /// Probe prompt for every mc2 choice; `{question}` and `{answer}` are filled in.
    pub probe: String,
    /// Tuning prompt for every generation answer; also `{other_question}`.
    pub tuning: String,
}

/// A whole recipe. Every field is documented in `recipes/truthfulqa.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub dataset: DatasetSpec,
    pub prompts: PromptSpec,
    /// Number of heads to shift (K).
    pub heads: usize,
    /// Shift strength in standard deviations (α).
    pub alpha: f64,
    pub direction: DirectionKind,
    /// Fraction of the questions held out to rank the probes.
    pub validation_ratio: f64,
    pub seed: u64,
    /// Which token's o_proj input is read: `last` (the prompt's last token) is the only one.
    pub position: Position,
    /// Prompts per forward pass when `bake eval` scores answers and documents.
    pub batch_size: usize,
    /// Most tokens in one batch of the activation pass (its prefix tree): a number, or `auto`.
    #[serde(default)]
    pub batch_tokens: BatchTokens,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// The dtype of the forward pass's matmuls: `auto`, `f32`, `bf16` or `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Only the first N questions in multiple_choice order (null: all).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The text corpus `bake eval` measures CE and KL on (null: none).
    #[serde(default)]
    pub corpus: Option<CorpusSpec>,
    /// Written by `bake search`: how K and α were chosen. A bake copies it into the model card and
    /// `bake.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchSummary>,
}

/// Where a recipe's K and α came from when `bake search` chose them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSummary {
    /// sha256 of the search's `search.json`.
    pub sha256: String,
    /// `mc2` or `mc1`, of the reference MC protocol.
    pub objective: String,
    pub folds: usize,
    pub questions: usize,
    pub candidates: usize,
    /// KL(base ‖ edited) per token, nats.
    pub kl_budget: f64,
    /// Most CE increase over the base, nats per token.
    #[serde(default)]
    pub ce_budget: Option<f64>,
    /// Held-out means over the folds of the chosen K and α, and of the base model.
    pub chosen: HeldOut,
    pub base: HeldOut,
}

/// Cross-validated numbers: MC1 and MC2 on the held-out questions, CE and KL on the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldOut {
    pub mc1: f64,
    pub mc2: f64,
    pub ce: f64,
    pub kl: f64,
}

/// How many tokens a batch of the activation pass may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchTokens {
    /// Chosen from the model's shape and the memory the run may use
    /// ([`crate::activations::plan::auto_batch_tokens`]).
    #[default]
    Auto,
    Fixed(usize),
}

impl Serialize for BatchTokens {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            BatchTokens::Auto => s.serialize_str("auto"),
            BatchTokens::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for BatchTokens {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(BatchTokens::Fixed(n as usize)),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for BatchTokens {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BatchTokens::Auto),
            n => n.parse().map(BatchTokens::Fixed).map_err(|_| format!("a number of tokens or `auto`, found `{n}`")),
        }
    }
}

impl std::fmt::Display for BatchTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            BatchTokens::Auto => f.write_str("auto"),
            BatchTokens::Fixed(n) => write!(f, "{n}"),
        }
    }
}

fn default_dtype() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    Last,
}

/// Which documents to read and how many tokens of each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    /// A `.jsonl` file (one document per line, in its `text` field) or a plain text file (documents separated
    /// by blank lines).
    pub path: PathBuf,
    /// How many documents are sampled (all when the file has fewer).
    #[serde(default = "default_documents")]
    pub documents: usize,
    /// Tokens per document, special tokens included.
    #[serde(default = "default_tokens")]
    pub tokens: usize,
}

impl CorpusSpec {
    /// `path` with the default sample: 100 documents × 128 tokens.
    pub fn new(path: PathBuf) -> Self {
        CorpusSpec { path, documents: default_documents(), tokens: default_tokens() }
    }
}

fn default_documents() -> usize {
    100
}

fn default_tokens() -> usize {
    128
}

/// Command-line values that replace recipe fields.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub alpha: Option<f64>,
    pub heads: Option<usize>,
    pub seed: Option<u64>,
    pub dataset: Option<String>,
    pub limit: Option<usize>,
    pub batch_size: Option<usize>,
    pub batch_tokens: Option<BatchTokens>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub direction: Option<DirectionKind>,
    pub corpus: Option<std::path::PathBuf>,
}

impl Recipe {
    /// Reads a recipe file. A relative corpus path is taken relative to the recipe's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::io::fs::read_text(path, crate::io::fs::limits::RECIPE)?;
        let mut recipe = Self::parse(path, &text)?;
        if let (Some(corpus), Some(dir)) = (&mut recipe.corpus, path.parent()) {
            if corpus.path.is_relative() {
                corpus.path = dir.join(&corpus.path);
            }
        }
        Ok(recipe)
    }

    /// The built-in `recipes/truthfulqa.yaml`.
    pub fn shipped() -> Self {
        Self::parse(Path::new(SHIPPED_NAME), SHIPPED).expect("the shipped recipe is valid")
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        if let Some((line, depth)) = deepest_nesting(text).filter(|&(_, depth)| depth > MAX_NESTING) {
            return Err(BakeError::parse(
                path,
                format!("line {line}: nested {depth} levels deep; a recipe nests at most {MAX_NESTING} (the shipped one: 2)"),
            ));
        }
        let recipe: Recipe = serde_yaml::from_str(text).map_err(|e| {
            let at = match (duplicate_key_line(text, &e), e.location()) {
                (Some(line), _) => format!("line {line}: "),
                (None, Some(l)) => format!("line {}, column {}: ", l.line(), l.column()),
                (None, None) => String::new(),
            };
            BakeError::parse(path, format!("{at}{}", without_location(&e)))
        })?;
        recipe.validate(path)?;
        Ok(recipe)
    }

    /// Applies command-line values; each is checked as its recipe field is, and an error names the flag.
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        let flag = |name: &str, value: &dyn std::fmt::Display, check: std::result::Result<(), String>| {
            check.map_err(|expected| BakeError::Invalid(format!("--{name} {value}: expected {expected}")))
        };
        if let Some(v) = o.alpha {
            flag("alpha", &v, ranges::alpha(v))?;
            self.alpha = v;
        }
        if let Some(v) = o.heads {
            flag("heads", &v, ranges::at_least_one(v))?;
            self.heads = v;
        }
        if let Some(v) = o.seed {
            self.seed = v;
        }
        if let Some(v) = &o.dataset {
            self.dataset.source = v.clone();
        }
        if let Some(v) = o.limit {
            flag("limit", &v, ranges::at_least_one(v))?;
            self.limit = Some(v);
        }
        if let Some(v) = o.batch_size {
            flag("batch-size", &v, ranges::at_least_one(v))?;
            self.batch_size = v;
        }
        if let Some(v) = o.batch_tokens {
            flag("batch-tokens", &v, ranges::batch_tokens(v))?;
            self.batch_tokens = v;
        }
        if let Some(v) = &o.device {
            flag("device", v, ranges::device(v))?;
            self.device = v.clone();
        }
        if let Some(v) = &o.dtype {
            flag("dtype", v, ranges::dtype(v))?;
            self.dtype = v.clone();
        }
        if let Some(v) = o.direction {
            self.direction = v;
        }
        if let Some(v) = &o.corpus {
            self.corpus.get_or_insert_with(|| CorpusSpec::new(v.clone())).path = v.clone();
        }
        Ok(())
    }

    /// Checks the ranges that types cannot express. `path` names the recipe in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let field = |name: &str, check: std::result::Result<(), String>| {
            check.map_err(|expected| BakeError::field(path, name, format!("expected {expected}")))
        };
        field("alpha", ranges::alpha(self.alpha))?;
        field("heads", ranges::at_least_one(self.heads))?;
        if !(self.validation_ratio > 0.0 && self.validation_ratio < 1.0) {
            return field(
                "validation_ratio",
                Err(format!("a number between 0 and 1 (exclusive), found {}", self.validation_ratio)),
            );
        }
        field("batch_size", ranges::at_least_one(self.batch_size))?;
        if let Some(limit) = self.limit {
            field("limit", ranges::at_least_one(limit).map_err(|e| format!("{e}, or null for all")))?;
        }
        field("batch_tokens", ranges::batch_tokens(self.batch_tokens))?;
        field("device", ranges::device(&self.device))?;
        field("dtype", ranges::dtype(&self.dtype))?;
        for (name, template, keys) in [
            ("prompts.probe", &self.prompts.probe, &PROBE_PLACEHOLDERS[..]),
            ("prompts.tuning", &self.prompts.tuning, &TUNING_PLACEHOLDERS[..]),
        ] {
            field(name, check_template(template, keys))?;
        }
        Ok(())
    }

    /// A stable hash of the resolved recipe (for manifests).
    pub fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).expect("recipe serializes");
        crate::io::hash::hex(&Sha256::digest(json))
    }
}

/// Range checks shared by recipe fields and the flags that override them; `Err` says what was expected.
mod ranges {
    pub fn alpha(v: f64) -> Result<(), String> {
        if v >= 0.0 && v.is_finite() {
            Ok(())
        } else {
            Err(format!("a finite number ≥ 0, found {v}"))
        }
    }

    pub fn at_least_one(v: usize) -> Result<(), String> {
        if v >= 1 {
            Ok(())
        } else {
            Err("at least 1".into())
        }
    }

    pub fn batch_tokens(v: super::BatchTokens) -> Result<(), String> {
        match v {
            super::BatchTokens::Fixed(0) => Err("at least 1 token, or `auto`".into()),
            _ => Ok(()),
        }
    }

    pub fn dtype(v: &str) -> Result<(), String> {
        if matches!(v, "auto" | "f32" | "bf16" | "f16") {
            Ok(())
        } else {
            Err(format!("auto, f32, bf16 or f16, found `{v}`"))
        }
    }

    pub fn device(v: &str) -> Result<(), String> {
        let cuda_index = v.strip_prefix("cuda:").map(|n| n.parse::<usize>().is_ok());
        if matches!(v, "cpu" | "cuda" | "auto") || cuda_index == Some(true) {
            Ok(())
        } else {
            Err(format!("cpu, cuda, cuda:N or auto, found `{v}`"))
        }
    }
}

/// Every `{name}` of a template must be one of `known`, and each of `known` must appear.
fn check_template(template: &str, known: &[&str]) -> std::result::Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        if name_len > 0 && after[name_len..].starts_with('}') {
            let placeholder = &rest[open..open + name_len + 2];
            if !known.contains(&placeholder) {
                return Err(format!("only the placeholders {} ; `{placeholder}` is unknown", known.join(", ")));
            }
        }
        rest = after;
    }
    match known.iter().find(|k| !template.contains(*k)) {
        Some(missing) => Err(format!("a template containing {missing}")),
        None => Ok(()),
    }
}

/// The line and depth of the deepest nesting: indentation levels of block collections plus brackets of
/// flow collections (quoted text and comments aside). An estimate that never undercounts real nesting.
fn deepest_nesting(text: &str) -> Option<(usize, usize)> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut deepest: Option<(usize, usize)> = None;
    for (number, line) in text.lines().enumerate() {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        if flow == 0 {
            let indent = line.len() - content.len();
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut quote: Option<char> = None;
        for c in content.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            let depth = indents.len() + flow;
            if deepest.is_none_or(|(_, d)| depth > d) {
                deepest = Some((number + 1, depth));
            }
        }
    }
    deepest
}

/// serde_yaml's message without the ` at line L column C` it appends (the location is printed first).
fn without_location(error: &serde_yaml::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_string(),
        _ => message,
    }
}

/// serde_yaml reports a duplicate key at the line of the mapping that holds it; the line of the second
/// occurrence of the key is what a person needs.
fn duplicate_key_line(text: &str, error: &serde_yaml::Error) -> Option<usize> {
    let message = error.to_string();
    let key = message
        .split("duplicate field `")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .or_else(|| message.split("duplicate entry with key \"").nth(1)?.split('"').next())?;
    let from = error.location()?.line().saturating_sub(1);
    let is_key = |line: &str| {
        let content = line.trim_start();
        content.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(':'))
    };
    text.lines().enumerate().skip(from).filter(|(_, l)| is_key(l)).nth(1).map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_text() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/truthfulqa.yaml")).unwrap()
    }

    #[test]
    fn the_shipped_recipe_has_the_reference_defaults() {
        let r = Recipe::parse(Path::new("truthfulqa.yaml"), &default_text()).unwrap();
        assert_eq!((r.heads, r.alpha, r.seed, r.validation_ratio), (48, 15.0, 42, 0.2));
        assert_eq!(r.direction, DirectionKind::CenterOfMass);
        assert_eq!(r.prompts.probe, "Q: {question} A: {answer}");
        assert_eq!(r.prompts.tuning, "Q: {question} A: {answer} Q: {other_question}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_line_and_column() {
        let text = default_text().replace("heads: 48", "heads: 48\nhedas: 3");
        let e = Recipe::parse(Path::new("r.yaml"), &text).unwrap_err().to_string();
        assert!(e.contains("r.yaml") && e.contains("hedas") && e.contains("line"), "{e}");
        let text = default_text().replace("alpha: 15", "alpha: fifteen");
        let e = Recipe::parse(Path::new("r.yaml"), &text).unwrap_err().to_string();
        assert!(e.contains("alpha") && e.contains("line") && e.contains("column"), "{e}");
    }

    #[test]
    fn negative_alpha_is_refused() {
        let text = default_text().replace("alpha: 15", "alpha: -1");
        let e = Recipe::parse(Path::new("r.yaml"), &text).unwrap_err().to_string();
        assert!(e.contains("alpha") && e.contains("≥ 0"), "{e}");
    }
}
