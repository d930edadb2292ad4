//! Talking to the Hugging Face Hub (or whatever `HF_ENDPOINT` points at) through `hf-hub`.
//!
//! `hf-hub` reads `HF_ENDPOINT`, `HF_TOKEN` (and the token file) and `HF_HOME`; `HF_HUB_OFFLINE` is handled
//! here: when set, only files already in the cache are used.

use std::path::{Path, PathBuf};

use hf_hub::repository::RepoType;
use hf_hub::{HFClientSync, HFError, HFRepositorySync};

use crate::error::{BakeError, Result};
use crate::model::resolve::COMPANION_FILES;
use crate::model::weights::{INDEX_FILE, SINGLE_FILE};

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
}

fn client() -> Result<HFClientSync> {
    HFClientSync::new().map_err(|e| BakeError::Hub(e.to_string()))
}

/// One file of a repository at `revision` (default branch when `None`), through the Hub cache.
fn fetch<T: RepoType>(repo: &HFRepositorySync<T>, file: &str, revision: Option<&str>) -> std::result::Result<PathBuf, HFError> {
    repo.download_file()
        .filename(file)
        .maybe_revision(revision.map(str::to_string))
        .local_files_only(offline())
        .send()
}

fn split_repo(repo: &str) -> Result<(&str, &str)> {
    repo.split_once('/').ok_or_else(|| BakeError::Hub(format!("`{repo}` is not org/name")))
}

/// Downloads config, tokenizer files and safetensors weights (nothing else) of a model repository into the
/// Hub cache and returns the snapshot folder.
pub fn download_model(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let (owner, name) = split_repo(repo)?;
    let handle = client()?.model(owner, name);
    let fetch = |file: &str| fetch(&handle, file, revision);
    let describe = |file: &str, e: HFError| {
        let hint = if offline() { " (HF_HUB_OFFLINE is set: only cached files are used)" } else { "" };
        BakeError::Hub(format!("{repo}: {file}: {e}{hint}"))
    };
    let config = fetch("config.json").map_err(|e| describe("config.json", e))?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    for file in COMPANION_FILES {
        match fetch(file) {
            Ok(_) => {}
            Err(HFError::EntryNotFound { .. } | HFError::LocalEntryNotFound { .. }) => {}
            Err(e) => return Err(describe(file, e)),
        }
    }
    match fetch(INDEX_FILE) {
        Ok(index) => {
            for shard in shard_names(&index)? {
                fetch(&shard).map_err(|e| describe(&shard, e))?;
            }
        }
        Err(HFError::EntryNotFound { .. } | HFError::LocalEntryNotFound { .. }) => {
            fetch(SINGLE_FILE).map_err(|e| describe(SINGLE_FILE, e))?;
        }
        Err(e) => return Err(describe(INDEX_FILE, e)),
    }
    Ok(dir)
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| BakeError::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| BakeError::parse(index, e))?;
    let mut names: Vec<String> = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| BakeError::field(index, "weight_map", "missing"))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// One file of a Hub dataset repository, from the cache when possible.
pub fn download_dataset_file(repo: &str, file: &str) -> Result<PathBuf> {
    let (owner, name) = split_repo(repo)?;
    fetch(&client()?.dataset(owner, name), file, None).map_err(|e| BakeError::Hub(format!("dataset {repo}: {file}: {e}")))
}

/// A baked model repository: `bake.json` first, then every file it lists. Returns the snapshot folder.
pub fn download_baked(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let (owner, name) = split_repo(repo)?;
    let handle = client()?.model(owner, name);
    let fetch = |file: &str| fetch(&handle, file, revision).map_err(|e| BakeError::Hub(format!("{repo}: {file}: {e}")));
    let manifest_path = fetch("bake.json")?;
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| BakeError::io(&manifest_path, e))?;
    let manifest: serde_json::Value = serde_json::from_str(&text).map_err(|e| BakeError::parse(&manifest_path, e))?;
    for file in manifest.get("outputs").and_then(|o| o.as_object()).into_iter().flat_map(|o| o.keys()) {
        fetch(file)?;
    }
    Ok(manifest_path.parent().map(Path::to_path_buf).unwrap_or_default())
}
pub mod push;
