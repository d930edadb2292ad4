//! The on-disk activation cache: one safetensors file per key, written to a temporary file and renamed, so
//! an interrupt never leaves a file that looks complete.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::Activations;
use crate::error::{BakeError, IoContext, Result};
use crate::io::dtype::StoredDtype;
use crate::io::hash::hex;
use crate::io::safetensors::{write_safetensors, TensorBytes};
use crate::model::Checkpoint;

/// What an activation pass depends on; any change gives another key.
pub struct CacheKey<'a> {
    pub tool_version: &'a str,
    /// How the pass computes ([`super::PASS_VERSION`]), on which kind of device (`cpu`, `cuda`), in which
    /// dtype and with how many tokens a batch: each changes the last bits of the values, and a cache must
    /// give exactly what a fresh run would.
    pub pass_version: u32,
    pub device_kind: &'a str,
    pub dtype: &'a str,
    pub batch_tokens: usize,
    /// How many of each prompt's last tokens are averaged (1: the last token alone, the key it always had).
    pub answer_tokens: usize,
    /// Where the activations are read (the o_proj input: the key it always had).
    pub site: crate::model::Site,
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
        let mut pass =
            format!("{} {} {} tokens {}", self.pass_version, self.device_kind, self.dtype, self.batch_tokens);
        if self.answer_tokens != 1 {
            pass.push_str(&format!(" mean of last {}", self.answer_tokens));
        }
        if self.site == crate::model::Site::Residual {
            pass.push_str(" residual stream");
        }
        part("pass", &pass);
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

/// Named activation sets stored under one key. Each set is read straight into its buffer (not through a
/// memory map, whose pages would count twice while they are copied).
pub fn load(path: &Path, names: &[&str]) -> Result<Option<Vec<Activations>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let layout = Checkpoint::open(vec![path.to_path_buf()])?;
    let mut file = crate::io::fs::open_regular(path)?;
    let mut out = Vec::new();
    for name in names {
        let Some(entry) = layout.get(name) else { return Ok(None) };
        let [rows, layers, width] = entry.shape[..] else {
            return Err(BakeError::tensor(path, *name, "expected 3 dimensions [prompts, layers, width]"));
        };
        if entry.dtype != StoredDtype::F32 {
            return Err(BakeError::tensor(
                path,
                *name,
                format!("stored as {:?}; the cache holds f32 only", entry.dtype),
            ));
        }
        let mut data = super::zeroed_buffer(rows * layers * width);
        file.seek(SeekFrom::Start(entry.start as u64)).at(path)?;
        read_f32s(&mut file, &mut data).at(path)?;
        out.push(Activations::from_vec(rows, layers, width, data));
    }
    Ok(Some(out))
}

/// Fills `values` with little-endian f32s from `reader`.
fn read_f32s(reader: &mut impl Read, values: &mut [f32]) -> std::io::Result<()> {
    let mut bytes = [0u8; 1 << 16];
    for chunk in values.chunks_mut(bytes.len() / 4) {
        let part = &mut bytes[..chunk.len() * 4];
        reader.read_exact(part)?;
        for (v, b) in chunk.iter_mut().zip(part.chunks_exact(4)) {
            *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
    }
    Ok(())
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
            bytes: crate::io::dtype::f32_le_bytes(a.data()).into(),
        })
        .collect();
    let refs: Vec<&TensorBytes> = tensors.iter().collect();
    let metadata = BTreeMap::from([("bake_cache_key".to_string(), key.to_string())]);
    let temporary = dir.join(format!(".{key}.{}.partial", std::process::id()));
    write_safetensors(&temporary, &refs, &metadata, &|_| {})?;
    std::fs::rename(&temporary, path).at(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_entry_round_trips_and_only_f32_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry.safetensors");
        let acts = Activations::from_vec(2, 1, 3, vec![1.0, -2.0, 3.5, 0.25, f32::MIN_POSITIVE, 7.0]);
        let (first, rest) = acts.clone().split_rows(1);
        store(&path, &[("probe", &first), ("tuning", &rest)], "key").unwrap();
        let loaded = load(&path, &["probe", "tuning"]).unwrap().unwrap();
        assert_eq!((&loaded[0], &loaded[1]), (&first, &rest));

        let bf16 = TensorBytes {
            name: "probe".into(),
            dtype: StoredDtype::Bf16,
            shape: vec![1, 1, 2],
            bytes: vec![0; 4].into(),
        };
        write_safetensors(&path, &[&bf16], &BTreeMap::new(), &|_| {}).unwrap();
        let e = load(&path, &["probe"]).unwrap_err().to_string();
        assert!(e.contains("f32 only"), "{e}");
    }
}
