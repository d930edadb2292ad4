//! `bake`: find the attention heads of a LLaMA-family model that separate true from false answers, shift
//! them along a truthful direction (Inference-Time Intervention, Li et al. 2023), and bake the shift into
//! the checkpoint as `o_proj` biases.
//!
//! The modules follow the pipeline, each passing a typed value to the next, and each importing only those
//! before it (`tests/architecture.rs` checks this):
//! [`io`] (below every stage: safe input reading, the safetensors writer, hashing, dtypes, tensor names, Hub
//! downloads, output folders that never destroy what bake did not write), [`figure`] (plots as PNG and SVG)
//! and [`recipe`] (every choice) →
//! [`model`] (resolve, config, weights, forward pass: a `ModelFiles`, then a `Llama`) →
//! [`data`] (TruthfulQA and the prompt sets: `PromptSets`) →
//! [`activations`] (resident or layer-streamed capture: `Activations`) →
//! [`probes`] (probes, heads, directions, σ, δ: `HeadShift`s and per-layer deltas) →
//! [`surgery`] (δ → o_proj biases) → [`export`] (the baked folder and its typed manifest, from a `BakeInput`)
//! → [`pipeline`] (the stages in one call, shared by `bake`, `bake probe` and `bake eval --cv`) →
//! [`verify`] (a baked folder is base + diff) → [`hub`] (`bake push`) → [`eval`] (MC1/MC2, CE/KL,
//! cross-validation, the model card's results) → [`search`] (K and α chosen by cross-validation under a KL
//! budget).

pub mod activations;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod figure;
pub mod hub;
pub mod inspect;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod probes;
pub mod progress;
pub mod recipe;
pub mod rng;
pub mod search;
pub mod surgery;
pub mod units;
pub mod verify;

pub use error::{BakeError, Result};

/// The tool version, recorded in manifests and cache keys.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
