//! `report.json` (every number another tool needs to replay the probe stage) and the accuracy heatmap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{BakeError, IoContext, Result};

#[derive(Debug, Clone, Serialize)]
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
    pub heads: Vec<[usize; 2]>,
    /// Question indices (multiple_choice order).
    pub train_questions: Vec<usize>,
    pub val_questions: Vec<usize>,
    /// For question i, the question appended to its tuning prompts.
    pub tuning_question: Vec<usize>,
    /// `[layer, head, σ]` per chosen head.
    pub sigma: Vec<(usize, usize, f64)>,
    /// Per shifted layer, δ in o_proj-input layout (`num_heads * head_dim` values).
    pub delta: BTreeMap<String, Vec<f32>>,
    /// Seconds per stage. Left out of reports inside a baked folder, which must be byte-reproducible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<BTreeMap<String, f64>>,
}

/// The files of a probe report, as `bake probe --out` and a bake write them.
pub const FILES: &[&str] = &["report.json", "heatmap.png"];

impl ProbeReport {
    /// Writes [`FILES`] into `dir`; returns their paths.
    pub fn write_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let paths: Vec<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
        self.write_json(&paths[0])?;
        self.write_heatmap(&paths[1])?;
        Ok(paths)
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("report serializes") + "\n";
        std::fs::write(path, text).at(path)
    }

    /// A layers × heads heatmap of validation accuracy (dark = low, bright = high), chosen heads outlined.
    pub fn write_heatmap(&self, path: &Path) -> Result<()> {
        const CELL: usize = 12;
        let (rows, cols) = (self.layers, self.heads_per_layer);
        let (width, height) = (cols * CELL, rows * CELL);
        let values = self.val_accuracy.iter().flatten();
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let mut pixels = vec![0u8; width * height * 3];
        for (layer, row) in self.val_accuracy.iter().enumerate() {
            for (head, &acc) in row.iter().enumerate() {
                let t = if hi > lo { (acc - lo) / (hi - lo) } else { 0.5 };
                let chosen = self.heads.contains(&[layer, head]);
                for y in 0..CELL {
                    for x in 0..CELL {
                        let edge = x == 0 || y == 0 || x == CELL - 1 || y == CELL - 1;
                        let colour = if chosen && edge { [255, 40, 40] } else { colour_map(t) };
                        let at = ((layer * CELL + y) * width + head * CELL + x) * 3;
                        pixels[at..at + 3].copy_from_slice(&colour);
                    }
                }
            }
        }
        let file = std::fs::File::create(path).at(path)?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let png_error = |e: png::EncodingError| match e {
            png::EncodingError::IoError(e) => BakeError::io(path, e),
            other => BakeError::Encode { path: path.into(), message: other.to_string() },
        };
        let mut writer = encoder.write_header().map_err(png_error)?;
        writer.write_image_data(&pixels).map_err(png_error)?;
        writer.finish().map_err(png_error)
    }
}

/// A perceptually ordered dark-blue → green → yellow ramp (viridis-like), t in [0, 1].
fn colour_map(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] =
        [[68.0, 1.0, 84.0], [59.0, 82.0, 139.0], [33.0, 145.0, 140.0], [94.0, 201.0, 98.0], [253.0, 231.0, 37.0]];
    let x = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f64;
    let mix = |c: usize| (STOPS[i][c] * (1.0 - f) + STOPS[i + 1][c] * f).round() as u8;
    [mix(0), mix(1), mix(2)]
}
