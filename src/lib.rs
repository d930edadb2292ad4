//! `bake`: find the attention heads of a LLaMA-family model that separate true from false answers, shift
//! them along a truthful direction (Inference-Time Intervention, Li et al. 2023), and bake the shift into
//! the checkpoint as `o_proj` biases.
//!
//! The modules follow the pipeline, each passing a typed value to the next:
//! [`model`] (resolve, config, weights, forward pass: a `ModelFiles`, then a `Llama`) →
//! [`data`] (TruthfulQA and the prompt sets: `PromptSets`) →
//! [`activations`] (resident or layer-streamed capture: `Activations`) →
//! [`probes`] (probes, heads, directions, σ, δ: `HeadShift`s and per-layer deltas) →
//! [`surgery`] (δ → o_proj biases) → [`export`] (the baked folder and its manifest).
//! Around it: [`pipeline`] (the probe stages in one call), [`verify`] (a baked folder is base + diff),
//! [`eval`] (MC1/MC2, CE/KL, cross-validation) and [`hub`] (downloads and `bake push`).

pub mod activations;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod hub;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod probes;
pub mod progress;
pub mod recipe;
pub mod rng;
pub mod surgery;
pub mod units;
pub mod verify;

pub use error::{BakeError, Result};

/// The tool version, recorded in manifests and cache keys.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
