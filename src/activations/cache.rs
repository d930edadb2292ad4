//! The on-disk activation cache: one safetensors file per key, written to a temporary file and renamed, so
//! an interrupt never leaves a file that looks complete.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Activations;
use crate::error::{BakeError, IoContext, Result};
use crate::export::shards::{hex, write_safetensors, TensorBytes};
use crate::model::{Checkpoint, StoredDtype};

/// What an activation pass depends on; any change gives another key.
pub struct CacheKey<'a> {
    pub tool_version: &'a str,
    /// How the pass computes ([`super::PASS_VERSION`]) and its batch size: both change the last bits of the
    /// values, and a cache must give exactly what a fresh run would.
    pub pass_version: u32,
    pub batch_size: usize,
    /// sha256 of the model's config and weight files.
    pub model_hashes: &'a [String],
    pub dataset_fingerprint: &'a str,
    pub templates: &'a [&'a str],
    /// Every prompt text, in order (covers the seeded choice of tuning questions and `limit`).
    pub prompts: &'a [&'a str],
}

impl CacheKey<'_> {
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        let mut part = |label: &str, value: &str| {
            h.update(label.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value.as_bytes());
        };
        part("version", self.tool_version);
        part("pass", &format!("{} batch {}", self.pass_version, self.batch_size));
        self.model_hashes.iter().for_each(|m| part("model", m));
        part("dataset", self.dataset_fingerprint);
        self.templates.iter().for_each(|t| part("template", t));
        self.prompts.iter().for_each(|p| part("prompt", p));
        hex(&h.finalize())
    }
}

/// The default cache folder: `$BAKE_CACHE_DIR`, else `~/.cache/bake/activations`.
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BAKE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache/bake/activations")
}

pub fn path_for(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.safetensors"))
}

/// Named activation sets stored under one key.
pub fn load(path: &Path, names: &[&str]) -> Result<Option<Vec<Activations>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let file = Checkpoint::open(vec![path.to_path_buf()])?;
    let mut out = Vec::new();
    for name in names {
        let Some(entry) = file.get(name) else { return Ok(None) };
        let [rows, layers, width] = entry.shape[..] else {
            return Err(BakeError::tensor(path, *name, "expected 3 dimensions [prompts, layers, width]"));
        };
        if entry.dtype != StoredDtype::F32 {
            return Err(BakeError::tensor(path, *name, format!("stored as {:?}; the cache holds f32 only", entry.dtype)));
        }
        let data = file.bytes(entry).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        out.push(Activations { rows, layers, width, data });
    }
    Ok(Some(out))
}

pub fn store(path: &Path, sets: &[(&str, &Activations)], key: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).at(dir)?;
    let tensors: Vec<TensorBytes> = sets
        .iter()
        .map(|(name, a)| TensorBytes {
            name: name.to_string(),
            dtype: StoredDtype::F32,
            shape: vec![a.rows, a.layers, a.width],
            bytes: Cow::Owned(StoredDtype::F32.encode(a.data.iter().copied())),
        })
        .collect();
    let refs: Vec<&TensorBytes> = tensors.iter().collect();
    let metadata = BTreeMap::from([("bake_cache_key".to_string(), key.to_string())]);
    let temporary = dir.join(format!(".{key}.{}.partial", std::process::id()));
    write_safetensors(&temporary, &refs, &metadata, &|_| {})?;
    std::fs::rename(&temporary, path).at(path)
}
