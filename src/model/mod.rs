//! Stage 1: find a model, read its config, map its weights, load its tokenizer, run it.

pub mod batch;
pub mod config;
pub mod forward;
pub mod resolve;
pub mod runner;
pub mod synthetic;
pub mod tokenizer;
mod tree_attention;
pub mod weights;

pub use crate::io::names::Site;
pub use batch::Batch;
pub use config::{ModelConfig, RopeScaling};
pub use forward::{Llama, Output, Prefix, Request, Shift};
pub use resolve::ModelLocation;
pub use runner::{Job, Mode, Pass, PassSize, Runner};
pub use tokenizer::TextTokenizer;
pub use weights::Checkpoint;

use crate::error::Result;
use crate::io::dtype::StoredDtype;
use crate::recipe::{DeviceChoice, DtypeChoice};

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
        Ok(TextTokenizer::load(&self.location.tokenizer_path())?.for_vocabulary(self.config.vocab_size))
    }

    /// The weights as f32 tensors on `device`, ready to run.
    pub fn load(&self, device: &candle_core::Device) -> Result<Llama> {
        Llama::load(self, device, candle_core::DType::F32)
    }

    /// The weights on `device`, their matmuls to run in `dtype`.
    pub fn load_as(&self, device: &candle_core::Device, dtype: candle_core::DType) -> Result<Llama> {
        Llama::load(self, device, dtype)
    }

    /// Every layer's bias at `site` (o_proj's, or down_proj's for the residual; `None` where a layer has none)
    /// on `device` in `dtype`, as [`Self::load_as`] loads it: with a base's weights ([`Request::biases`]), a
    /// bake's biases run the bake.
    pub fn site_biases(
        &self,
        site: Site,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> Result<Vec<Option<candle_core::Tensor>>> {
        (0..self.config.num_layers)
            .map(|l| {
                let name = crate::io::names::Layer(l).shift_bias(site);
                match self.checkpoint.get(&name) {
                    Some(_) => self.checkpoint.load_as(&name, &[self.config.hidden_size], dtype, device).map(Some),
                    None => Ok(None),
                }
            })
            .collect()
    }

    /// The dtype a baked copy is written in: the config's, or else the weights'.
    pub fn dtype(&self) -> StoredDtype {
        self.config.dtype.or(self.checkpoint.dominant_dtype()).unwrap_or(StoredDtype::F32)
    }
}

impl ModelFiles {
    /// sha256 of `config.json` and every weight file, hashed in parallel (used for cache keys and manifests).
    pub fn input_hashes(&self) -> Result<Vec<(std::path::PathBuf, String)>> {
        use rayon::prelude::*;
        let mut files = vec![self.location.config_path()];
        files.extend(self.checkpoint.files.iter().cloned());
        files.into_par_iter().map(|p| crate::io::hash::sha256_file(&p).map(|h| (p, h))).collect()
    }
}

/// The matmuls' dtype a recipe's choice means on `device` for a checkpoint stored in `stored`: `auto` is f32 on
/// the CPU (candle's CPU matmul has no bf16 kernel and widens to f32 anyway; f32 is also what the tests compare
/// against transformers in) and the checkpoint's own dtype on a GPU.
pub fn pick_dtype(choice: DtypeChoice, device: &candle_core::Device, stored: StoredDtype) -> candle_core::DType {
    use candle_core::DType;
    match choice {
        DtypeChoice::F32 => DType::F32,
        DtypeChoice::Bf16 => DType::BF16,
        DtypeChoice::F16 => DType::F16,
        DtypeChoice::Auto if device.is_cpu() => DType::F32,
        DtypeChoice::Auto => stored.candle(),
    }
}

/// Creates the device a recipe's choice names. Each CUDA device created gets an id of its own, and tensors of
/// two cannot meet: a command calls this once (see [`crate::pipeline::Resolved`]).
pub fn pick_device(choice: DeviceChoice) -> Result<candle_core::Device> {
    let cuda_index = match choice {
        DeviceChoice::Cpu => return Ok(candle_core::Device::Cpu),
        DeviceChoice::Auto if candle_core::utils::cuda_is_available() => 0,
        DeviceChoice::Auto => return Ok(candle_core::Device::Cpu),
        DeviceChoice::Cuda(index) => index.unwrap_or(0),
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(crate::error::BakeError::Invalid(format!(
            "device `{choice}`: this bake was built without CUDA (rebuild with `--features cuda`) or no GPU is present"
        )));
    }
    Ok(candle_core::Device::new_cuda(cuda_index)?)
}
