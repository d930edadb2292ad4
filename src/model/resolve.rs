//! `--model` resolution: a local folder, a Hub repo id `org/name[@revision]`, or a short name of the
//! reference code (`llama2_chat_7B`, ...).

use std::path::{Path, PathBuf};

use crate::error::{BakeError, Result};
use crate::io::hub::{Repo, RepoKind};
use crate::io::safetensors::{INDEX_FILE, SINGLE_FILE};

/// The short names `likenneth/honest_llama` uses, and the Hub repositories behind them.
pub const ALIASES: &[(&str, &str)] = &[
    ("llama_7B", "huggyllama/llama-7b"),
    ("alpaca_7B", "circulus/alpaca-7b"),
    ("vicuna_7B", "AlekseyKorshuk/vicuna-7b"),
    ("llama2_chat_7B", "meta-llama/Llama-2-7b-chat-hf"),
    ("llama2_chat_13B", "meta-llama/Llama-2-13b-chat-hf"),
    ("llama2_chat_70B", "meta-llama/Llama-2-70b-chat-hf"),
    ("llama3_8B", "meta-llama/Meta-Llama-3-8B"),
    ("llama3_8B_instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),
    ("llama3_70B", "meta-llama/Meta-Llama-3-70B"),
    ("llama3_70B_instruct", "meta-llama/Meta-Llama-3-70B-Instruct"),
];

/// Files of a model folder besides the weights that a baked copy must carry along.
pub const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "LICENSE",
    "LICENSE.txt",
    "USE_POLICY.md",
    "NOTICE",
];

/// A model folder on disk and where it came from.
#[derive(Debug, Clone)]
pub struct ModelLocation {
    /// What the user typed.
    pub spec: String,
    /// The Hub repository, when the model came from (or is named after) one.
    pub hub_repo: Option<String>,
    pub revision: Option<String>,
    pub dir: PathBuf,
}

impl ModelLocation {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// Companion files present in the folder.
    pub fn companion_files(&self) -> Vec<PathBuf> {
        COMPANION_FILES.iter().map(|f| self.dir.join(f)).filter(|p| p.is_file()).collect()
    }
}

pub fn alias_target(name: &str) -> Option<&'static str> {
    ALIASES.iter().find(|(alias, _)| *alias == name).map(|(_, repo)| *repo)
}

/// Splits `org/name[@revision]`; `None` when `spec` is not of that form.
pub fn parse_repo_id(spec: &str) -> Option<(String, Option<String>)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_string())),
        Some(_) => return None,
        None => (spec, None),
    };
    let mut parts = repo.split('/');
    let (org, name) = (parts.next()?, parts.next()?);
    // The Hub's own rule: at most 96 characters of letters, digits, `-`, `_` and `.`, not starting with `.`.
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && !s.starts_with('.')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (parts.next().is_none() && valid(org) && valid(name)).then(|| (repo.to_string(), revision))
}

/// Finds the model folder for `spec`, downloading from the Hub when needed.
pub fn resolve(spec: &str) -> Result<ModelLocation> {
    let local = Path::new(spec);
    if local.is_dir() {
        return Ok(ModelLocation { spec: spec.into(), hub_repo: None, revision: None, dir: local.into() });
    }
    let (repo, revision) = if let Some(repo) = alias_target(spec) {
        (repo.to_string(), None)
    } else if let Some(parsed) = parse_repo_id(spec) {
        parsed
    } else {
        return Err(BakeError::ModelNotFound(format!(
            "unknown model `{}`: not a folder, not a short name (`bake models` lists them) and not a Hub repo \
             id of the form org/name[@revision]",
            crate::error::shorten(spec, 100)
        )));
    };
    let dir = download_model(&Repo { kind: RepoKind::Model, id: &repo, revision: revision.as_deref() })?;
    Ok(ModelLocation { spec: spec.into(), hub_repo: Some(repo.clone()), revision, dir })
}

/// Fetches config, tokenizer and companion files and the safetensors weights (nothing else) of a model
/// repository into the Hub cache; returns the snapshot folder.
fn download_model(repo: &Repo) -> Result<PathBuf> {
    let config = repo.fetch("config.json")?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    for file in COMPANION_FILES {
        repo.fetch_optional(file)?;
    }
    match repo.fetch_optional(INDEX_FILE)? {
        Some(index) => {
            for shard in super::weights::shard_names(&index)? {
                repo.fetch(&shard)?;
            }
        }
        None => {
            repo.fetch(SINGLE_FILE)?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_parse_with_and_without_revision() {
        assert_eq!(
            parse_repo_id("meta-llama/Llama-2-7b-chat-hf"),
            Some(("meta-llama/Llama-2-7b-chat-hf".into(), None))
        );
        assert_eq!(parse_repo_id("a/b@v1.0"), Some(("a/b".into(), Some("v1.0".into()))));
        assert_eq!(parse_repo_id("llama2_chat_7B"), None);
        assert_eq!(parse_repo_id("a/b/c"), None);
        assert_eq!(parse_repo_id("../x"), None);
        assert_eq!(parse_repo_id("a/b@"), None);
    }

    #[test]
    fn every_alias_points_at_a_repo_id() {
        for (alias, repo) in ALIASES {
            assert!(parse_repo_id(repo).is_some(), "{alias} -> {repo}");
        }
        assert_eq!(alias_target("llama2_chat_7B"), Some("meta-llama/Llama-2-7b-chat-hf"));
    }

    #[test]
    fn unknown_names_get_a_clear_error() {
        let err = resolve("llama9_chat_1T").unwrap_err().to_string();
        assert!(err.contains("llama9_chat_1T") && err.contains("bake models"), "{err}");
    }
}
