//! `bake`: find the attention heads of a LLaMA-family model that separate true from false answers, shift
//! them along a truthful direction (Inference-Time Intervention, Li et al. 2023), and bake the shift into
//! the checkpoint as `o_proj` biases.
//!
//! Stages, each passing a typed value to the next and importing only those before it (`tests/architecture.rs`
//! checks this): [`io`] (below every stage: safe input reading, the safetensors writer, hashing, dtypes, tensor
//! names, Hub downloads, output folders that never destroy what bake did not write), [`figure`] (plots as PNG and
//! SVG) and [`recipe`] (every choice) →
//! 1. [`model`] (resolve, config, weights, forward pass: a `ModelFiles`, then a `Llama`) →
//! 2. [`data`] (TruthfulQA and the prompt sets: `PromptSets`) →
//! 3. [`activations`] (resident or layer-streamed capture: `Activations`) →
//! 4. [`probes`] (probes, heads, directions, σ, δ: `HeadShift`s and per-layer deltas) →
//! 5. [`surgery`] (δ → o_proj biases) →
//! 6. [`export`] (the baked folder and its typed manifest, from a `BakeInput`).
//!
//! Above them: [`pipeline`] (stages 2–6 in one call: `bake`, `bake probe`) and [`inspect`] (what a bake will
//! cost), [`verify`] (the proof that a baked folder is base + diff, used by `push` and `eval` too), [`scoring`]
//! (MC1/MC2, CE/KL and the reference's folds, shared by eval and search), and the commands built on them, which
//! never import each other: [`hub`] (`bake push`), [`eval`] (`bake eval`, the model card's results) and [`search`]
//! (K and α chosen by cross-validation under a KL budget).

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
pub mod scoring;
pub mod search;
pub mod surgery;
pub mod units;
pub mod verify;

pub use error::{BakeError, Result};

/// The tool version, recorded in manifests and cache keys.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
