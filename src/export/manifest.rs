//! `bake.json`, typed: what went into a bake, how, and what came out, each file with its sha256. Written by
//! the bake; read by `verify`, `push`, `eval` and `eval --card` through [`Manifest::read`].
//!
//! Fields serialize in declaration order (the key order of the file), so the same bake always gives the
//! same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{BakeError, Result};
use crate::io::dtype::StoredDtype;
use crate::io::fs::{limits, read_text};
use crate::io::listing::{FileListing, MANIFEST_FILE};
use crate::model::ModelFiles;
use crate::recipe::{Method, Recipe};

/// How a bake of `method` changes the base; recorded for people.
pub fn method_description(method: Method) -> &'static str {
    match method {
        Method::Iti => "inference-time intervention (Li et al. 2023), baked as o_proj biases b = W_o · δ",
        Method::NlIti => {
            "non-linear inference-time intervention (NL-ITI, Hoscilowicz et al. 2024), baked as o_proj biases b = W_o · δ"
        }
        Method::Residual => {
            "mean-difference vectors added to the residual stream (activation addition), baked as down_proj biases b = δ"
        }
    }
}

/// One changed key of `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigChange {
    /// The base's value (`null` when the base does not have the key).
    pub base: Option<Value>,
    pub baked: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `bake`.
    pub tool: String,
    pub tool_version: String,
    pub method: String,
    /// The Hub repository or the spec the base was given as.
    pub base_model: String,
    pub base_revision: Option<String>,
    pub recipe: Recipe,
    pub recipe_sha256: String,
    pub seed: u64,
    /// The dtype of the weights, the biases and the pyvene vectors.
    pub dtype: StoredDtype,
    /// Chosen heads `[layer, head]`, best first.
    pub heads: Vec<crate::probes::Head>,
    pub train_questions: Vec<usize>,
    pub val_questions: Vec<usize>,
    pub tuning_question: Vec<usize>,
    pub config_changes: BTreeMap<String, ConfigChange>,
    /// Tensors the base did not have.
    pub added_tensors: Vec<String>,
    /// `model/<file>` and `dataset/<config>/<file>` → sha256.
    pub inputs: BTreeMap<String, String>,
    pub outputs: FileListing,
    /// What the shift costs the model as a language model, measured by the bake (absent in bakes made before
    /// it did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// The evaluation section `bake eval --card` put into the model card, as it stands there; `bake verify`
    /// re-derives the card from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<String>,
}

/// What a bake costs the model: CE of the base and of the bake, and KL(base ‖ baked), per token, on a small
/// corpus sample, with the budget the recipe allows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    /// The built-in sample's name, or the recipe's corpus file.
    pub corpus: String,
    pub documents: usize,
    /// Tokens per document, at most (special tokens included).
    pub tokens_per_document: usize,
    /// On which device and in which dtype the model ran (the last digits depend on both).
    pub computed_on: String,
    pub ce_base: f64,
    pub ce_baked: f64,
    /// KL(base ‖ baked), nats per token.
    pub kl: f64,
    /// The recipe's `kl_budget`.
    pub kl_budget: f64,
}

impl Cost {
    /// The warning a bake over its KL budget prints, naming what finds a cheaper shift.
    pub fn warning(&self) -> Option<String> {
        (self.kl > self.kl_budget).then(|| {
            format!(
                "the shift costs KL {:.3} nats per token (CE {:.3} → {:.3}) on {}, over the recipe's kl_budget of {}: \
                 the model is damaged as a language model. `bake search` finds the heads (K) and strength (α) that \
                 buy the most truthfulness within the budget",
                self.kl, self.ce_base, self.ce_baked, self.corpus, self.kl_budget
            )
        })
    }

    /// One line for a summary: `KL 0.052 nats/token, CE 3.471 → 3.519 (20 documents × 128 tokens)`.
    pub fn summary(&self) -> String {
        format!(
            "KL {:.4} nats/token, CE {:.4} → {:.4} ({} documents × ≤{} tokens, budget {})",
            self.kl, self.ce_base, self.ce_baked, self.documents, self.tokens_per_document, self.kl_budget
        )
    }
}

/// A base file whose sha256 differs from the one the manifest recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseDifference {
    /// The manifest key (`model/config.json`, ...).
    pub key: String,
    pub recorded: Option<String>,
    pub found: String,
}

impl Manifest {
    /// Reads and checks `dir/bake.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = read_text(&path, limits::JSON)?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| BakeError::parse(&path, format!("not a bake manifest: {e}")))?;
        if manifest.tool != "bake" {
            return Err(BakeError::field(&path, "tool", format!("expected `bake`, found `{}`", manifest.tool)));
        }
        Ok(manifest)
    }

    /// Whether `dir/bake.json` is exactly what bake writes for the manifest it holds (no hand edits, not even
    /// of spacing): the test that bake wrote it.
    pub fn is_as_written(dir: &Path) -> bool {
        let text = read_text(&dir.join(MANIFEST_FILE), limits::JSON);
        match (text, Manifest::read(dir)) {
            (Ok(text), Ok(manifest)) => manifest.to_text() == text,
            _ => false,
        }
    }

    /// The file's text: pretty JSON and a final newline.
    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest serializes") + "\n"
    }

    /// The base's files (config and weights) whose sha256 differs from what this manifest recorded; empty
    /// when `base` is the model this folder was baked from. `hashes` are the base's [`ModelFiles::input_hashes`].
    pub fn base_differences(&self, base: &ModelFiles, hashes: &[(PathBuf, String)]) -> Vec<BaseDifference> {
        hashes
            .iter()
            .filter_map(|(path, found)| {
                let key = model_key(path, &base.location.dir);
                let recorded = self.inputs.get(&key).cloned();
                (recorded.as_deref() != Some(found.as_str())).then(|| BaseDifference {
                    key,
                    recorded,
                    found: found.clone(),
                })
            })
            .collect()
    }

    /// `Err` naming the first difference unless `base` is the model this folder was baked from.
    pub fn check_base(&self, base: &ModelFiles, manifest_dir: &Path) -> Result<()> {
        self.check_base_hashes(base, &base.input_hashes()?, manifest_dir)
    }

    /// [`Self::check_base`] with the base's [`ModelFiles::input_hashes`] already computed.
    pub fn check_base_hashes(
        &self,
        base: &ModelFiles,
        hashes: &[(PathBuf, String)],
        manifest_dir: &Path,
    ) -> Result<()> {
        match self.base_differences(base, hashes).first() {
            None => Ok(()),
            Some(d) => Err(BakeError::content(
                manifest_dir.join(MANIFEST_FILE),
                format!(
                    "baked from a different base: `{}` has sha256 {} in the manifest, {} in {}",
                    d.key,
                    d.recorded.as_deref().unwrap_or("(absent)"),
                    d.found,
                    base.location.dir.display()
                ),
            )),
        }
    }
}

/// The manifest key of a base model file: `model/` and its path inside the model folder, `/`-separated.
pub fn model_key(path: &Path, model_dir: &Path) -> String {
    format!("model/{}", relative(path, model_dir))
}

/// The manifest key of a dataset file: `dataset/<config>/<file>`.
pub fn dataset_key(path: &Path) -> String {
    let name =
        |p: Option<&Path>| p.and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("dataset/{}/{}", name(path.parent()), name(Some(path)))
}

/// `path` inside `dir`, `/`-separated.
pub fn relative(path: &Path, dir: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

/// Inputs recorded for a bake: the model's files (hashed before the run, or copied into the output) and
/// the dataset's.
pub fn inputs(
    model_dir: &Path,
    model_files: &[(PathBuf, String)],
    dataset_files: &[(PathBuf, String)],
) -> BTreeMap<String, String> {
    let mut inputs: BTreeMap<String, String> =
        model_files.iter().map(|(p, h)| (model_key(p, model_dir), h.clone())).collect();
    inputs.extend(dataset_files.iter().map(|(p, h)| (dataset_key(p), h.clone())));
    inputs
}
