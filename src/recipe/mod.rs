//! The YAML recipe: every choice of an ITI bake, with the reference code's defaults in
//! `recipes/truthfulqa.yaml`. Unknown keys and wrong types are errors with line and column.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{BakeError, Result};
use yaml::{deepest_nesting, duplicate_key_line, without_location};

mod choices;
mod yaml;

pub use choices::{BatchTokens, DeviceChoice, DtypeChoice};

/// `recipes/truthfulqa.yaml`, built in: the recipe used when none is given.
pub const SHIPPED: &str = include_str!("../../recipes/truthfulqa.yaml");
/// How errors name the built-in recipe.
pub const SHIPPED_NAME: &str = "the built-in recipe (recipes/truthfulqa.yaml)";

const PROBE_PLACEHOLDERS: [&str; 2] = ["{question}", "{answer}"];
const TUNING_PLACEHOLDERS: [&str; 3] = ["{question}", "{answer}", "{other_question}"];
/// Deeper nesting is refused before parsing (a recipe needs 2 levels; YAML parsing of pathological nesting
/// is slow).
const MAX_NESTING: usize = 16;

/// How the truthful direction of a head is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DirectionKind {
    /// mean(true) − mean(false) over train ∪ validation (the paper's best).
    CenterOfMass,
    /// The probe's weight vector.
    Probe,
    /// A seeded random unit vector (a control).
    Random,
}

/// How heads or layers are ranked and shifted. Ordered as declared (ties between methods in a search go to the
/// earlier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum Method {
    /// Inference-Time Intervention (Li et al. 2023): a logistic probe per head ranks the heads, δ = α·σ·θ on
    /// the top K.
    #[default]
    #[serde(rename = "iti")]
    #[value(name = "iti")]
    Iti,
    /// Non-linear ITI (Samsung/NL-ITI, Interspeech 2024): an MLP probe per head ranks the heads, and the
    /// activations are averaged over each prompt's last `tokens` tokens; the shift is ITI's.
    #[serde(rename = "nl-iti")]
    #[value(name = "nl-iti")]
    NlIti,
    /// A mean-difference vector per layer added to the residual stream (CAA-style): a logistic probe of each
    /// layer's residual ranks the layers, δ = α·σ·θ on the top K, written as a down_proj bias.
    #[serde(rename = "residual")]
    #[value(name = "residual")]
    Residual,
}

impl Method {
    /// The name recipes, flags and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Method::Iti => "iti",
            Method::NlIti => "nl-iti",
            Method::Residual => "residual",
        }
    }

    /// Where the method reads activations and adds its shift.
    pub fn site(self) -> crate::io::names::Site {
        match self {
            Method::Iti | Method::NlIti => crate::io::names::Site::AttentionHeads,
            Method::Residual => crate::io::names::Site::Residual,
        }
    }

    /// What the recipe's `heads` (K) counts for this method.
    pub fn units(self) -> &'static str {
        match self {
            Method::Iti | Method::NlIti => "heads",
            Method::Residual => "layers",
        }
    }

    /// How many of a prompt's last tokens its activations average when the recipe does not say: NL-ITI's
    /// published TruthfulQA setting probes the mean of the last 4, and bake's residual vectors take the same
    /// answer tokens (a mean-difference vector is read over the answer, not one token of it).
    pub fn default_tokens(self) -> usize {
        match self {
            Method::Iti => 1,
            Method::NlIti | Method::Residual => 4,
        }
    }

    fn is_default(&self) -> bool {
        *self == Method::default()
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The default `kl_budget`: KL(base ‖ baked) per token, in nats, above which a bake warns, and the budget
/// `bake search` keeps within. The reference's own ITI runs sit between 0.06 and 1.08 (its Llama-2-7B-chat at
/// the defaults: 0.65, with CE 2.51 → 2.82, a visible loss of fluency); 0.1 keeps the next-token distribution
/// on ordinary text close to the base's while leaving room for a useful shift.
pub const DEFAULT_KL_BUDGET: f64 = 0.1;

fn default_kl_budget() -> f64 {
    DEFAULT_KL_BUDGET
}

fn is_default_kl_budget(v: &f64) -> bool {
    *v == DEFAULT_KL_BUDGET
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
    /// `iti` (the default) or `nl-iti`. Left out of the serialized recipe when it is the default, so recipes
    /// (and their hashes) from before methods existed are unchanged.
    #[serde(default, skip_serializing_if = "Method::is_default")]
    pub method: Method,
    /// The activations of a prompt are the mean over its last N tokens (null: the method's default, 1 for
    /// `iti`, 4 for `nl-iti`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
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
    pub device: DeviceChoice,
    /// The dtype of the forward pass's matmuls: `auto`, `f32`, `bf16` or `f16`.
    #[serde(default)]
    pub dtype: DtypeChoice,
    /// Only the first N questions in multiple_choice order (null: all).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The text corpus `bake eval` measures CE and KL on (null: none).
    #[serde(default)]
    pub corpus: Option<CorpusSpec>,
    /// KL(base ‖ baked) per token, nats, above which a bake warns that it damages the model.
    #[serde(default = "default_kl_budget", skip_serializing_if = "is_default_kl_budget")]
    pub kl_budget: f64,
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
    pub device: Option<DeviceChoice>,
    pub dtype: Option<DtypeChoice>,
    pub direction: Option<DirectionKind>,
    pub corpus: Option<std::path::PathBuf>,
    pub method: Option<Method>,
    pub tokens: Option<usize>,
}

impl Recipe {
    /// How a prompt's activations are read, for people: `last token` or `mean of the last N tokens`.
    pub fn describe_tokens(&self) -> String {
        match self.answer_tokens() {
            1 => "last token".into(),
            n => format!("mean of the last {n} tokens"),
        }
    }

    /// How many of each prompt's last tokens its activations average: the recipe's `tokens`, or the method's
    /// default.
    pub fn answer_tokens(&self) -> usize {
        self.tokens.unwrap_or(self.method.default_tokens())
    }

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

    /// Applies values given in place of the recipe's; each is checked as its recipe field is (the command line
    /// checks them first, with the same [`ranges`], and names the flag).
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        let flag = |name: &str, value: &dyn std::fmt::Display, check: std::result::Result<(), String>| {
            check.map_err(|expected| {
                BakeError::Invalid(format!("{name} = {value} (in place of the recipe's): expected {expected}"))
            })
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
            flag("batch_size", &v, ranges::at_least_one(v))?;
            self.batch_size = v;
        }
        if let Some(v) = o.batch_tokens {
            flag("batch_tokens", &v, ranges::batch_tokens(v))?;
            self.batch_tokens = v;
        }
        if let Some(v) = o.device {
            self.device = v;
        }
        if let Some(v) = o.dtype {
            self.dtype = v;
        }
        if let Some(v) = o.direction {
            self.direction = v;
        }
        if let Some(v) = o.method {
            self.method = v;
        }
        if let Some(v) = o.tokens {
            flag("tokens", &v, ranges::at_least_one(v))?;
            self.tokens = Some(v);
        }
        if let Some(v) = &o.corpus {
            self.corpus.get_or_insert_with(|| CorpusSpec::new(v.clone())).path = v.clone();
        }
        if let Some(expected) = self.direction_conflict() {
            return Err(BakeError::Invalid(format!(
                "direction = {:?} with method {}: expected {expected}",
                self.direction, self.method
            )));
        }
        Ok(())
    }

    /// What `direction` must be instead, when the method has no such direction.
    fn direction_conflict(&self) -> Option<String> {
        (self.method == Method::NlIti && self.direction == DirectionKind::Probe).then(|| {
            "center_of_mass or random with method nl-iti (its MLP probe has no weight vector to shift along)".into()
        })
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
        if let Some(expected) = self.direction_conflict() {
            return field("direction", Err(expected));
        }
        if let Some(tokens) = self.tokens {
            field(
                "tokens",
                ranges::at_least_one(tokens).map_err(|e| format!("{e}, or null for the method's default")),
            )?;
        }
        if !(self.kl_budget > 0.0 && self.kl_budget.is_finite()) {
            return field("kl_budget", Err(format!("a number > 0 (nats per token), found {}", self.kl_budget)));
        }
        if let Some(limit) = self.limit {
            field("limit", ranges::at_least_one(limit).map_err(|e| format!("{e}, or null for all")))?;
        }
        field("batch_tokens", ranges::batch_tokens(self.batch_tokens))?;
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
pub mod ranges {
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
