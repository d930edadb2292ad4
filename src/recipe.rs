//! The YAML recipe: every choice of an ITI bake, with the reference code's defaults in
//! `recipes/truthfulqa.yaml`. Unknown keys and wrong types are errors with line and column.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{BakeError, IoContext, Result};
pub use crate::eval::corpus::CorpusSpec;

/// `recipes/truthfulqa.yaml`, built in: the recipe used when none is given.
pub const SHIPPED: &str = include_str!("../recipes/truthfulqa.yaml");

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
    /// A Hub dataset id, or a local folder with `multiple_choice/` and `generation/` in the HF layout.
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
    /// Prompts per forward pass.
    pub batch_size: usize,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// Only the first N questions in multiple_choice order (null: all).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The text corpus `bake eval` measures CE and KL on (null: none).
    #[serde(default)]
    pub corpus: Option<CorpusSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    Last,
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
    pub device: Option<String>,
    pub direction: Option<DirectionKind>,
    pub corpus: Option<std::path::PathBuf>,
}

impl Recipe {
    /// Reads a recipe file. A relative corpus path is taken relative to the recipe's folder.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
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
        Self::parse(Path::new("recipes/truthfulqa.yaml"), SHIPPED).expect("the shipped recipe is valid")
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let recipe: Recipe = serde_yaml::from_str(text).map_err(|e| {
            let at = e.location().map(|l| format!("line {}, column {}: ", l.line(), l.column())).unwrap_or_default();
            BakeError::parse(path, format!("{at}{e}"))
        })?;
        recipe.validate(path)?;
        Ok(recipe)
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.alpha { self.alpha = v }
        if let Some(v) = o.heads { self.heads = v }
        if let Some(v) = o.seed { self.seed = v }
        if let Some(v) = &o.dataset { self.dataset.source = v.clone() }
        if let Some(v) = o.limit { self.limit = Some(v) }
        if let Some(v) = o.batch_size { self.batch_size = v }
        if let Some(v) = &o.device { self.device = v.clone() }
        if let Some(v) = o.direction { self.direction = v }
        if let Some(v) = &o.corpus {
            self.corpus.get_or_insert_with(|| CorpusSpec::new(v.clone())).path = v.clone();
        }
    }

    /// Checks the ranges that types cannot express. `path` names the recipe in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, expected: &str| Err(BakeError::field(path, field, expected.to_string()));
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return bad("alpha", &format!("a number ≥ 0, found {}", self.alpha));
        }
        if self.heads == 0 {
            return bad("heads", "at least 1");
        }
        if !(self.validation_ratio > 0.0 && self.validation_ratio < 1.0) {
            return bad("validation_ratio", &format!("between 0 and 1 (exclusive), found {}", self.validation_ratio));
        }
        if self.batch_size == 0 {
            return bad("batch_size", "at least 1");
        }
        if self.limit == Some(0) {
            return bad("limit", "at least 1 question, or null for all");
        }
        for (field, template, keys) in [
            ("prompts.probe", &self.prompts.probe, &["{question}", "{answer}"][..]),
            ("prompts.tuning", &self.prompts.tuning, &["{question}", "{answer}", "{other_question}"][..]),
        ] {
            if let Some(missing) = keys.iter().find(|k| !template.contains(*k)) {
                return bad(field, &format!("a template containing {missing}"));
            }
        }
        Ok(())
    }

    /// A stable hash of the resolved recipe (for manifests).
    pub fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).expect("recipe serializes");
        crate::export::shards::hex(&Sha256::digest(json))
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
