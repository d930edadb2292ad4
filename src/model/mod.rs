//! Stage 1: find a model, read its config, map its weights, load its tokenizer, run it.

pub mod config;
pub mod forward;
pub mod inspect;
pub mod resolve;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;

pub use config::{ModelConfig, RopeScaling, StoredDtype};
pub use forward::{Batch, Llama, Output, Request, Shift};
pub use resolve::ModelLocation;
pub use tokenizer::TextTokenizer;
pub use weights::Checkpoint;

use crate::error::Result;

/// A resolved model whose config and weights have been checked against each other. Nothing is computed yet:
/// the weights stay memory-mapped until [`ModelFiles::load`].
pub struct ModelFiles {
    pub location: ModelLocation,
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
}

impl ModelFiles {
    /// Resolves `spec` (folder, Hub id or short name), reads `config.json` and validates every tensor.
    pub fn open(spec: &str) -> Result<Self> {
        let location = resolve::resolve(spec)?;
        let config = ModelConfig::load(&location.config_path())?;
        let checkpoint = Checkpoint::open(Checkpoint::weight_files(&location.dir)?)?;
        checkpoint.validate(&config)?;
        Ok(ModelFiles { location, config, checkpoint })
    }

    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        TextTokenizer::load(&self.location.tokenizer_path())
    }

    /// The weights as f32 tensors on `device`, ready to run.
    pub fn load(&self, device: &candle_core::Device) -> Result<Llama> {
        Llama::load(self.config.clone(), &self.checkpoint, device)
    }

    /// The dtype a baked copy is written in: the config's, or else the weights'.
    pub fn dtype(&self) -> StoredDtype {
        self.config.dtype.or(self.checkpoint.dominant_dtype()).unwrap_or(StoredDtype::F32)
    }
}
