//! Stage 1: find a model, read its config, map its weights, load its tokenizer, run it.

pub mod config;
pub mod forward;
pub mod resolve;
pub mod synthetic;
pub mod tokenizer;
mod tree_attention;
pub mod weights;

pub use config::{ModelConfig, RopeScaling};
pub use forward::{Batch, Llama, Output, Prefix, Request, Shift};
pub use resolve::ModelLocation;
pub use tokenizer::TextTokenizer;
pub use weights::Checkpoint;

use crate::error::Result;
use crate::io::dtype::StoredDtype;

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

    /// Every layer's o_proj bias (`None` where a layer has none) on `device` in `dtype`, as [`Self::load_as`]
    /// loads it: with a base's weights ([`Request::o_proj_biases`]), a bake's biases run the bake.
    pub fn o_proj_biases(
        &self,
        device: &candle_core::Device,
        dtype: candle_core::DType,
    ) -> Result<Vec<Option<candle_core::Tensor>>> {
        use crate::io::names::{Attention, Layer, Param};
        (0..self.config.num_layers)
            .map(|l| {
                let name = Layer(l).attention(Attention::O, Param::Bias);
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

/// The dtype of the forward pass's matmuls named by a recipe or `--dtype`: `f32`, `bf16`, `f16` or `auto`,
/// which is f32 on the CPU (candle's CPU matmul has no bf16 kernel and widens to f32 anyway; f32 is also
/// what the tests compare against transformers in) and the checkpoint's own dtype on a GPU.
pub fn pick_dtype(spec: &str, device: &candle_core::Device, stored: StoredDtype) -> Result<candle_core::DType> {
    use candle_core::DType;
    Ok(match spec {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "auto" if device.is_cpu() => DType::F32,
        "auto" => stored.candle(),
        other => {
            return Err(crate::error::BakeError::Invalid(format!("dtype `{other}`: expected auto, f32, bf16 or f16")))
        }
    })
}

/// The device named by a recipe or `--device`: `cpu`, `cuda`, `cuda:N` or `auto`.
pub fn pick_device(spec: &str) -> Result<candle_core::Device> {
    use crate::error::BakeError;
    let cuda_index = match spec {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "auto" => {
            return Ok(if candle_core::utils::cuda_is_available() {
                candle_core::Device::new_cuda(0)?
            } else {
                candle_core::Device::Cpu
            })
        }
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => n,
            None => return Err(BakeError::Invalid(format!("device `{other}`: expected cpu, cuda, cuda:N or auto"))),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(BakeError::Invalid(format!(
            "device `{spec}`: this bake was built without CUDA (rebuild with `--features cuda`) or no GPU is present"
        )));
    }
    Ok(candle_core::Device::new_cuda(cuda_index)?)
}
