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
/// The file list of the other folders bake writes (`bake probe`, `bake search`): every other file of the
/// folder with its sha256, so that `--force` can tell them from the user's files.
pub const OUTPUTS_FILE: &str = "outputs.json";

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

    /// What lies below `dir` but is not listed, `unlisted_by_design` aside (the listing's own file, a log).
    pub fn unlisted(&self, dir: &Path, unlisted_by_design: &[&str]) -> Result<Vec<String>> {
        Ok(entries_under(dir)?
            .into_iter()
            .filter(|name| !self.0.contains_key(name) && !unlisted_by_design.contains(&name.as_str()))
            .collect())
    }

    /// Every way the folder `dir` differs from this listing, one (file, what) each: a listed path that leaves
    /// the folder, a listed file missing or not a regular file, a size or sha256 that differs, a file not
    /// listed. Sizes are compared before anything is hashed.
    pub fn differences(&self, dir: &Path, unlisted_by_design: &[&str]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let unsafe_entries = self.unsafe_entries();
        for (name, why) in &unsafe_entries {
            out.push((name.to_string(), format!("listed, but the path {why}: outside the folder")));
        }
        for (name, entry) in self.iter().filter(|(n, _)| !unsafe_entries.iter().any(|(u, _)| u == n)) {
            let path = dir.join(name);
            let size = std::fs::symlink_metadata(&path).ok().filter(|m| m.is_file()).map(|m| m.len());
            match size {
                None => out.push((name.clone(), "listed but missing (or not a regular file)".into())),
                Some(n) if n != entry.bytes => {
                    out.push((name.clone(), format!("{n} bytes, listed as {}", entry.bytes)))
                }
                Some(_) if super::hash::sha256_file(&path)? != entry.sha256 => {
                    out.push((name.clone(), format!("sha256 differs from the listed {}", entry.sha256)))
                }
                Some(_) => {}
            }
        }
        for name in self.unlisted(dir, unlisted_by_design)? {
            out.push((name, "not listed".into()));
        }
        Ok(out)
    }
}

/// Whether `text` is a log bake writes beside a listing (`bake.log`): small, and nothing but lines
/// `name: seconds s`. Such a file holds no work of the user's, so it may go with the folder it belongs to.
pub fn is_timings_log(text: &str) -> bool {
    text.len() <= 1 << 20
        && text.lines().all(|line| {
            line.rsplit_once(": ").is_some_and(|(name, value)| {
                !name.is_empty()
                    && value.strip_suffix(" s").is_some_and(|seconds| seconds.parse::<f64>().is_ok_and(f64::is_finite))
            })
        })
}

/// `bake search`'s and `bake probe`'s logs of seconds, beside their `outputs.json`.
pub const SEARCH_LOG_FILE: &str = "search.log";
pub const PROBE_LOG_FILE: &str = "probe.log";

/// The logs of seconds bake writes beside its outputs. They differ from run to run, so no listing holds them (the
/// same inputs must give the same listing, byte for byte), and a folder holding one is bake's only while it holds
/// nothing but timings ([`is_timings_log`]).
pub const TIMINGS_LOGS: &[&str] = &[LOG_FILE, SEARCH_LOG_FILE, PROBE_LOG_FILE];

/// The files a baked folder holds beside its listed ones.
pub const BAKE_UNLISTED: &[&str] = &[MANIFEST_FILE, LOG_FILE];

/// The files a probe or search folder holds beside its listed ones.
pub const OUTPUTS_UNLISTED: &[&str] = &[OUTPUTS_FILE, SEARCH_LOG_FILE, PROBE_LOG_FILE];

/// `outputs.json`: the file list of a probe or search folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsFile {
    /// Always `bake`.
    pub tool: String,
    pub outputs: FileListing,
}

impl OutputsFile {
    /// Lists (and hashes) every file below `dir` but the unlisted ones ([`OUTPUTS_UNLISTED`]).
    pub fn of_folder(dir: &Path) -> Result<Self> {
        let mut outputs = BTreeMap::new();
        for name in entries_under(dir)?.into_iter().filter(|n| !OUTPUTS_UNLISTED.contains(&n.as_str())) {
            let path = dir.join(&name);
            let bytes = std::fs::metadata(&path).at(&path)?.len();
            outputs.insert(name, FileEntry { sha256: super::hash::sha256_file(&path)?, bytes });
        }
        Ok(OutputsFile { tool: "bake".into(), outputs: FileListing(outputs) })
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(self).expect("a listing serializes") + "\n"
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(OUTPUTS_FILE);
        let text = read_text(&path, limits::JSON)?;
        serde_json::from_str(&text).map_err(|e| BakeError::parse(&path, e))
    }
}

/// Whether `text` is pretty JSON exactly as bake's serializer writes it (key order kept, two-space
/// indent, shortest numbers, a final newline): a file edited by hand, even in its spacing, is not.
pub fn is_as_serialized(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|value| serde_json::to_string_pretty(&value).expect("a parsed value serializes") + "\n" == text)
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
