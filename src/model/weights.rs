//! Memory-mapped safetensors checkpoints, one file or sharded, checked against the config before use.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use super::config::ModelConfig;
use crate::error::{BakeError, IoContext, Result};
use crate::io::dtype::StoredDtype;
use crate::io::names::{self, Attention, Mlp, Param};
pub use crate::io::safetensors::{INDEX_FILE, SINGLE_FILE};

/// Where one tensor's bytes live.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub file: usize,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    /// Byte range inside the file (absolute, header included).
    pub start: usize,
    pub end: usize,
}

/// All safetensors files of a checkpoint, mapped, with a name → location table.
pub struct Checkpoint {
    pub files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    pub tensors: BTreeMap<String, TensorEntry>,
}

impl Checkpoint {
    /// The weight files of a model folder: the shards an index lists, or `model.safetensors`.
    pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join(INDEX_FILE);
        if index.exists() {
            return shards_from_index(dir, &index);
        }
        let single = dir.join(SINGLE_FILE);
        if single.exists() {
            return Ok(vec![single]);
        }
        let has_pickles = std::fs::read_dir(dir)
            .at(dir)?
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".bin"));
        let message = if has_pickles {
            "only PyTorch pickle weights (*.bin) found; bake reads safetensors only. Convert with \
             `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`"
        } else {
            "no model.safetensors or model.safetensors.index.json found"
        };
        Err(BakeError::Unsupported { path: dir.into(), message: message.into() })
    }

    pub fn open(files: Vec<PathBuf>) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (index, path) in files.iter().enumerate() {
            let file = crate::io::fs::open_regular(path)?;
            // SAFETY: the map is read-only; bake never writes to its inputs, and the docs tell users not to
            // modify a checkpoint while bake reads it.
            let map = unsafe { Mmap::map(&file) }.at(path)?;
            for (name, entry) in read_header(path, index, &map)? {
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(BakeError::tensor(path, name, "stored in more than one file"));
                }
            }
            maps.push(map);
        }
        Ok(Checkpoint { files, maps, tensors })
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The raw little-endian bytes of a tensor, straight from the map.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.maps[entry.file][entry.start..entry.end]
    }

    pub fn file_of(&self, entry: &TensorEntry) -> &Path {
        &self.files[entry.file]
    }

    pub fn total_bytes(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum()
    }

    /// Hands the mapped pages of these tensors back to the kernel, so that a layer already read stops counting
    /// towards the process's resident memory. Absent names are ignored.
    pub fn release<S: AsRef<str>>(&self, names: &[S]) {
        for entry in names.iter().filter_map(|n| self.get(n.as_ref())) {
            // SAFETY: the map is a read-only view of a file that bake does not modify; dropping its pages only
            // means a later read faults them in again from the file, with the same contents.
            let _ = unsafe {
                self.maps[entry.file].unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    entry.start,
                    entry.end - entry.start,
                )
            };
        }
    }

    /// Names of every stored tensor of decoder layer `l`.
    pub fn layer_tensor_names(&self, l: usize) -> Vec<String> {
        self.tensors.keys().filter(|n| names::layer_of(n) == Some(l)).cloned().collect()
    }

    /// Bytes stored for decoder layer `l`.
    pub fn layer_bytes(&self, l: usize) -> u64 {
        self.tensors.iter().filter(|(n, _)| names::layer_of(n) == Some(l)).map(|(_, e)| (e.end - e.start) as u64).sum()
    }

    /// The dtype most of the parameters are stored in.
    pub fn dominant_dtype(&self) -> Option<StoredDtype> {
        let mut bytes: BTreeMap<&str, (StoredDtype, usize)> = BTreeMap::new();
        for e in self.tensors.values() {
            bytes.entry(e.dtype.safetensors_name()).or_insert((e.dtype, 0)).1 += e.end - e.start;
        }
        bytes.into_values().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// A tensor as an f32 candle tensor on `device`, after checking its shape.
    pub fn load_f32(&self, name: &str, shape: &[usize], device: &candle_core::Device) -> Result<candle_core::Tensor> {
        self.load_as(name, shape, candle_core::DType::F32, device)
    }

    /// A tensor as a candle tensor of `dtype` on `device`, after checking its shape. Its mapped pages are
    /// handed back once it is copied: the copy is what runs, and a resident model would otherwise hold its
    /// weights twice.
    pub fn load_as(
        &self,
        name: &str,
        shape: &[usize],
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        let entry = self.expect(name, shape)?;
        let raw = candle_core::Tensor::from_raw_buffer(self.bytes(entry), entry.dtype.candle(), shape, device)?;
        let converted = raw.to_dtype(dtype)?;
        self.release(&[name]);
        Ok(converted)
    }

    /// The entry of a tensor that must exist with this shape.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let Some(entry) = self.tensors.get(name) else {
            let where_ = self.files.first().and_then(|f| f.parent()).map(Path::to_path_buf).unwrap_or_default();
            return Err(BakeError::tensor(where_, name, "missing from the checkpoint"));
        };
        if entry.shape != shape {
            return Err(BakeError::tensor(
                self.file_of(entry),
                name,
                format!("shape {:?} contradicts config.json, which implies {:?}", entry.shape, shape),
            ));
        }
        Ok(entry)
    }

    /// Checks every tensor the config calls for (name, shape) and that all are floating point.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        let stored_layers = self.tensors.keys().filter_map(|n| names::layer_of(n)).max().map_or(0, |l| l + 1);
        if stored_layers != config.num_layers {
            return Err(BakeError::field(
                &config.path,
                "num_hidden_layers",
                format!("{} layers, but the checkpoint holds {stored_layers}", config.num_layers),
            ));
        }
        for spec in expected_tensors(config) {
            match (self.tensors.get(&spec.name), spec.required) {
                (None, false) => {}
                _ => {
                    self.expect(&spec.name, &spec.shape)?;
                }
            }
        }
        Ok(())
    }
}

/// A tensor a LLaMA checkpoint has (or may have) according to its config.
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub required: bool,
}

/// Every tensor of a LLaMA checkpoint, in HF naming. Biases are optional: absent means zero.
pub fn expected_tensors(c: &ModelConfig) -> Vec<TensorSpec> {
    let spec = |name: String, shape: Vec<usize>, required| TensorSpec { name, shape, required };
    let (h, a, kv, i, v) = (c.hidden_size, c.attn_width(), c.kv_width(), c.intermediate_size, c.vocab_size);
    let mut out = vec![spec(names::EMBED_TOKENS.into(), vec![v, h], true)];
    for l in 0..c.num_layers {
        let layer = names::Layer(l);
        out.push(spec(layer.input_norm(), vec![h], true));
        out.push(spec(layer.post_attention_norm(), vec![h], true));
        if c.family.has_head_norms() {
            for proj in [Attention::Q, Attention::K] {
                out.push(spec(layer.head_norm(proj), vec![c.head_dim], true));
            }
        }
        for (proj, rows, cols) in
            [(Attention::Q, a, h), (Attention::K, kv, h), (Attention::V, kv, h), (Attention::O, h, a)]
        {
            out.push(spec(layer.attention(proj, Param::Weight), vec![rows, cols], true));
            out.push(spec(layer.attention(proj, Param::Bias), vec![rows], false));
        }
        for (proj, rows, cols) in [(Mlp::Gate, i, h), (Mlp::Up, i, h), (Mlp::Down, h, i)] {
            out.push(spec(layer.mlp(proj, Param::Weight), vec![rows, cols], true));
            out.push(spec(layer.mlp(proj, Param::Bias), vec![rows], false));
        }
    }
    out.push(spec(names::FINAL_NORM.into(), vec![h], true));
    out.push(spec(names::LM_HEAD.into(), vec![v, h], !c.tie_word_embeddings));
    out
}

fn read_header(path: &Path, file: usize, map: &[u8]) -> Result<Vec<(String, TensorEntry)>> {
    let (header_len, metadata) = SafeTensors::read_metadata(map)
        .map_err(|e| BakeError::Safetensors { path: path.into(), message: describe_safetensors_error(&e, map) })?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            Dtype::BF16 => StoredDtype::Bf16,
            Dtype::F16 => StoredDtype::F16,
            Dtype::F32 => StoredDtype::F32,
            other => {
                return Err(BakeError::Unsupported {
                    path: path.into(),
                    message: format!(
                        "tensor `{name}` has dtype {other:?}; bake reads bf16, f16 and f32 weights. Quantized or \
                         integer checkpoints must be dequantized first (e.g. load in transformers with \
                         torch_dtype=bfloat16 and save_pretrained)"
                    ),
                })
            }
        };
        let (start, end) = info.data_offsets;
        out.push((
            name,
            TensorEntry { file, dtype, shape: info.shape.clone(), start: data_start + start, end: data_start + end },
        ));
    }
    Ok(out)
}

fn describe_safetensors_error(error: &SafeTensorError, map: &[u8]) -> String {
    let header_len = map.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    match (error, header_len) {
        (SafeTensorError::HeaderTooSmall, _) => format!("file is {} bytes, too short for a header", map.len()),
        (SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge, Some(n)) => {
            format!("header length {n} runs past the end of the file ({} bytes)", map.len())
        }
        (SafeTensorError::MetadataIncompleteBuffer, _) => {
            "the tensor data does not fill the file exactly (truncated download, or trailing bytes)".into()
        }
        (other, _) => other.to_string(),
    }
}

fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let mut shards = Vec::new();
    for (tensor, name) in index_entries(index)? {
        let shard = dir.join(&name);
        if !shard.exists() {
            return Err(BakeError::field(
                index,
                format!("weight_map.{tensor}"),
                format!("shard `{name}` is missing from {}", dir.display()),
            ));
        }
        if !shards.contains(&shard) {
            shards.push(shard);
        }
    }
    shards.sort();
    Ok(shards)
}

/// The shard files an index lists, each once, sorted.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = index_entries(index)?.into_iter().map(|(_, name)| name).collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// (tensor, shard file) pairs of an index, every file name checked to be a plain relative path.
fn index_entries(index: &Path) -> Result<Vec<(String, String)>> {
    let text = crate::io::fs::read_text(index, crate::io::fs::limits::JSON)?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| BakeError::parse(index, e))?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
        BakeError::field(index, "weight_map", "missing (expected an object tensor name → shard file)")
    })?;
    map.iter()
        .map(|(tensor, file)| {
            let field = || format!("weight_map.{tensor}");
            let name = file.as_str().ok_or_else(|| BakeError::field(index, field(), "expected a file name"))?;
            let inside = !name.is_empty() && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)));
            if !inside {
                return Err(BakeError::field(
                    index,
                    field(),
                    format!("`{name}` points outside the model folder; shard names must be plain relative paths"),
                ));
            }
            Ok((tensor.clone(), name.to_string()))
        })
        .collect()
}
