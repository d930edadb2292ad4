//! The file list of a folder `bake` wrote: the `outputs` table of its `bake.json`, each file's relative path,
//! size and sha256. It is what proves a folder is bake's own (so that `--force` may replace it) and what
//! `bake verify` checks a folder against.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::fs::{limits, read_text};
use crate::error::{BakeError, IoContext, Result};

/// The manifest of a baked folder.
pub const MANIFEST_FILE: &str = "bake.json";
/// Run-dependent facts (timings) beside the manifest; not listed, so the listed files are reproducible.
pub const LOG_FILE: &str = "bake.log";

/// One listed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// Relative path (always `/`-separated) → entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileListing(pub BTreeMap<String, FileEntry>);

impl FileListing {
    /// The `outputs` table of `dir/bake.json`; the manifest's other fields are not read.
    pub fn read(dir: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct OutputsOnly {
            outputs: FileListing,
        }
        let path = dir.join(MANIFEST_FILE);
        let text = read_text(&path, limits::JSON)?;
        let parsed: OutputsOnly = serde_json::from_str(&text).map_err(|e| BakeError::parse(&path, e))?;
        Ok(parsed.outputs)
    }

    pub fn get(&self, name: &str) -> Option<&FileEntry> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &FileEntry)> {
        self.0.iter()
    }

    /// Entries whose path is not a plain relative path inside the folder, with the reason.
    pub fn unsafe_entries(&self) -> Vec<(&str, &'static str)> {
        self.0.keys().filter_map(|name| check_relative(name).err().map(|why| (name.as_str(), why))).collect()
    }

    /// What lies below `dir` but is not listed (the manifest and the log excepted).
    pub fn unlisted(&self, dir: &Path) -> Result<Vec<String>> {
        Ok(entries_under(dir)?.into_iter().filter(|name| !self.0.contains_key(name) && !is_exempt(name)).collect())
    }
}

/// The two files a folder holds beside its listed ones.
pub fn is_exempt(name: &str) -> bool {
    name == MANIFEST_FILE || name == LOG_FILE
}

/// `Ok` when `name` is a plain relative path that stays inside the folder.
pub fn check_relative(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.starts_with('/') || name.contains('\\') || name.contains('\0') {
        return Err("is not a plain relative path");
    }
    if name.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err("leaves the folder or is not normalised");
    }
    Ok(())
}

/// Every file, symbolic link or other non-folder entry below `dir`, as sorted `/`-separated relative paths.
/// Symbolic links are listed as entries and never followed.
pub fn entries_under(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).at(&folder)? {
            let entry = entry.at(&folder)?;
            let path = entry.path();
            if entry.file_type().at(&path)?.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_safe() {
        for good in ["model.safetensors", "activation_diff/config.json", "a.b/c..d"] {
            assert_eq!(check_relative(good), Ok(()), "{good}");
        }
        for bad in ["", "/etc/hostname", "../../recipe.yaml", "a/../../b", "a//b", "./a", "a\\..\\b", "a/"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn symbolic_links_are_entries_not_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), "x").unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("root-link")).unwrap();
        assert_eq!(entries_under(dir.path()).unwrap(), vec!["root-link".to_string(), "sub/f".to_string()]);
    }
}
