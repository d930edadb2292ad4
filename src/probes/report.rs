//! `report.json` (every number another tool needs to replay the probe stage) and the accuracy heatmap
//! (`heatmap.png`, `heatmap.svg`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::heatmap::Heatmap;
use crate::error::{IoContext, Result};
use crate::figure;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeReport {
    pub tool_version: String,
    pub model: String,
    pub recipe: crate::recipe::Recipe,
    pub layers: usize,
    pub heads_per_layer: usize,
    pub head_dim: usize,
    pub probe_prompts: usize,
    pub tuning_prompts: usize,
    /// `[layer][head]` validation accuracy of each probe.
    pub val_accuracy: Vec<Vec<f64>>,
    /// Chosen heads `[layer, head]`, best first.
    pub heads: Vec<super::Head>,
    /// Question indices (multiple_choice order).
    pub train_questions: Vec<usize>,
    pub val_questions: Vec<usize>,
    /// For question i, the question appended to its tuning prompts.
    pub tuning_question: Vec<usize>,
    /// `[layer, head, σ]` per chosen head.
    pub sigma: Vec<(usize, usize, f64)>,
    /// Per shifted layer, δ in o_proj-input layout (`num_heads * head_dim` values).
    pub delta: BTreeMap<String, Vec<f32>>,
    /// Seconds per stage, while the run holds them. Never written into a folder, which must be byte-reproducible:
    /// they go to `bake.log` or `probe.log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<BTreeMap<String, f64>>,
}

/// The files of a probe report, as `bake probe --out` and a bake write them.
pub const FILES: &[&str] = &["report.json", "heatmap.png", "heatmap.svg"];

impl ProbeReport {
    /// Writes [`FILES`] into `dir`; returns their paths.
    pub fn write_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut paths = Vec::new();
        for (name, bytes) in self.files(dir)? {
            let path = dir.join(name);
            std::fs::write(&path, bytes).at(&path)?;
            paths.push(path);
        }
        Ok(paths)
    }

    /// The bytes of each of [`FILES`] (for `dir`, named in errors): what [`Self::write_files`] writes and
    /// what `bake verify` re-derives a bake's copies from.
    pub fn files(&self, dir: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let heatmap = self.heatmap();
        Ok(vec![
            (FILES[0], self.json().into_bytes()),
            (FILES[1], figure::png_bytes(&heatmap, &dir.join(FILES[1]))?),
            (FILES[2], figure::svg_text(&heatmap, &dir.join(FILES[2]))?.into_bytes()),
        ])
    }

    /// `report.json`'s text: pretty JSON and a final newline.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes") + "\n"
    }

    /// Reads `report.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = crate::io::fs::read_text(path, crate::io::fs::limits::JSON)?;
        serde_json::from_str(&text)
            .map_err(|e| crate::error::BakeError::parse(path, format!("not a probe report: {e}")))
    }

    /// The layers × heads figure of validation accuracy (layers × 1 for the residual method), the chosen heads
    /// (layers) outlined.
    pub fn heatmap(&self) -> Heatmap<'_> {
        let model = Path::new(&self.model).file_name().map_or(self.model.clone(), |n| n.to_string_lossy().into_owned());
        let questions = self.train_questions.len() + self.val_questions.len();
        let (unit, columns) = match self.recipe.method.site() {
            crate::model::Site::AttentionHeads => ("attention head", "attention head"),
            crate::model::Site::Residual => ("layer's residual stream", "residual stream"),
        };
        Heatmap {
            accuracy: &self.val_accuracy,
            chosen: &self.heads,
            title: format!("Probe validation accuracy per {unit}"),
            subtitle: format!(
                "{model} · {questions} questions · K = {} {} outlined · α = {}",
                self.heads.len(),
                self.recipe.method.units(),
                self.recipe.alpha
            ),
            columns,
        }
    }
}
