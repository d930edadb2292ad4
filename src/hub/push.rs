//! `bake push`: publish a baked folder to the Hub in one commit, uploading only what the remote lacks, then
//! prove the remote weight files are the ones the manifest lists.
//!
//! The commit goes through hf-hub 1.0's upload API (repository creation, preupload, LFS batch, commit). The
//! tree listing is read here: hf-hub 1.0 looks for `lfs.sha256`, while the Hub sends the LFS sha256 as
//! `lfs.oid`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hf_hub::repository::CommitOperation;
use hf_hub::HFError;
use serde::Serialize;
use serde_json::Value;
use sha1::Digest;

use crate::error::{BakeError, IoContext, Result};
use crate::export::baked::LOG;
use crate::export::manifest::Manifest;
use crate::io::hash::sha256_file;
use crate::progress::Progress;

pub struct PushOptions {
    /// `org/name`.
    pub repo: String,
    pub private: bool,
    /// Branch to commit to (default `main`); created from `main` when missing.
    pub revision: Option<String>,
    pub create_pr: bool,
    /// Compare with the remote and report, without changing anything.
    pub dry_run: bool,
}

/// A local file and how it compares with the remote.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    /// `false`: the remote already holds these bytes.
    pub upload: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub repo: String,
    pub revision: String,
    pub repo_created: bool,
    pub files: Vec<PlannedFile>,
    pub commit_message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr_url: Option<String>,
    /// Weight files whose remote LFS sha256 was checked against the manifest after the upload.
    pub verified: Vec<String>,
    pub dry_run: bool,
}

/// What the remote holds for one path.
#[derive(Debug, Clone, PartialEq)]
struct RemoteFile {
    size: u64,
    /// Git blob id (SHA-1 of `blob <size>\0<bytes>`).
    oid: String,
    /// sha256 of the content, for LFS files.
    lfs_sha256: Option<String>,
}

/// The token hf-hub will send, in its order (HF_TOKEN, HF_TOKEN_PATH, $HF_HOME/token), so that it can be
/// kept out of every message.
fn token() -> Option<String> {
    if std::env::var("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_ok_and(|v| !v.is_empty()) {
        return None;
    }
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.is_empty() {
            return Some(t);
        }
    }
    let from_file =
        |p: PathBuf| std::fs::read_to_string(p).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
    if let Some(t) = std::env::var_os("HF_TOKEN_PATH").and_then(|p| from_file(p.into())) {
        return Some(t);
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))?;
    from_file(home.join("token"))
}

/// A Hub error as a message that never contains the token, with advice for the usual causes.
fn hub_error(repo: &str, what: &str, error: impl HubCause) -> BakeError {
    let mut message = format!("{repo}: {what}: {}", error.describe());
    if let Some(t) = token() {
        message = message.replace(&t, "***");
    }
    let text = message.to_lowercase();
    if text.contains("401") || text.contains("unauthorized") || text.contains("authentication") || text.contains("403")
    {
        message.push_str(" (check the token in HF_TOKEN or the Hugging Face token file: it must have write access)");
    }
    BakeError::Hub(message)
}

/// A failure's text with every cause, once.
trait HubCause {
    fn describe(&self) -> String;
}

impl HubCause for String {
    fn describe(&self) -> String {
        self.clone()
    }
}

impl HubCause for reqwest::Error {
    fn describe(&self) -> String {
        crate::error::describe_chain(self)
    }
}

impl HubCause for HFError {
    fn describe(&self) -> String {
        crate::error::describe_chain(self)
    }
}

/// The git blob id of a file, as the Hub reports it for non-LFS files.
fn git_blob_id(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).at(path)?;
    let mut hasher = sha1::Sha1::new();
    hasher.update(format!("blob {}\0", bytes.len()).as_bytes());
    hasher.update(&bytes);
    Ok(crate::io::hash::hex(&hasher.finalize()))
}

/// A revision as one URL path segment: every byte but the unreserved ones percent-encoded (as the Hub's
/// own client does), so that `/`, `?` or `#` in a branch name cannot change the URL.
fn encode_revision(revision: &str) -> String {
    revision
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `Ok` when `revision` can be a branch name (git's `check-ref-format` rules), else why not.
fn check_revision(revision: &str) -> std::result::Result<(), &'static str> {
    if revision.is_empty() {
        return Err("is empty");
    }
    if revision.chars().any(|c| c.is_control() || " ~^:?*[\\".contains(c)) {
        return Err("holds a space, a control character or one of ~ ^ : ? * [ \\");
    }
    if revision.contains("..") || revision.contains("@{") || revision.contains("//") {
        return Err("holds `..`, `@{` or `//`");
    }
    if revision.starts_with(['/', '-', '.']) || revision.ends_with(['/', '.']) || revision.ends_with(".lock") {
        return Err("starts with / - or ., or ends with / . or .lock");
    }
    Ok(())
}

/// `GET /api/models/{repo}/tree/{revision}?recursive=true`, following `Link: <...>; rel="next"`. `None`
/// when the repository (or the revision) does not exist.
fn remote_tree(repo: &str, revision: &str) -> Result<Option<BTreeMap<String, RemoteFile>>> {
    let client = crate::io::hub::http_client()?;
    let mut url = Some(format!(
        "{}/api/models/{repo}/tree/{}?recursive=true",
        crate::io::hub::endpoint(),
        encode_revision(revision)
    ));
    let mut files = BTreeMap::new();
    while let Some(u) = url.take() {
        let mut request = client.get(&u);
        if let Some(t) = token() {
            request = request.bearer_auth(t);
        }
        let response = request.send().map_err(|e| hub_error(repo, "listing the repository", e))?;
        let status = response.status();
        if status.as_u16() == 404 {
            return Ok(None);
        }
        if !status.is_success() {
            let body = response.text().unwrap_or_default();
            return Err(hub_error(repo, "listing the repository", format!("HTTP {status}: {body}")));
        }
        url = next_link(response.headers());
        let entries: Vec<Value> = response.json().map_err(|e| hub_error(repo, "reading the tree listing", e))?;
        for e in entries.iter().filter(|e| e["type"] == "file") {
            let path = e["path"].as_str().unwrap_or_default().to_string();
            let lfs = e.get("lfs").filter(|l| l.is_object());
            files.insert(
                path,
                RemoteFile {
                    size: e["size"].as_u64().unwrap_or(0),
                    oid: e["oid"].as_str().unwrap_or_default().to_string(),
                    lfs_sha256: lfs
                        .and_then(|l| l.get("oid").or_else(|| l.get("sha256")))
                        .and_then(Value::as_str)
                        .map(str::to_string),
                },
            );
        }
    }
    Ok(Some(files))
}

fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find(|part| part.contains("rel=\"next\"")).and_then(|part| {
        let start = part.find('<')? + 1;
        let end = part.find('>')?;
        Some(part[start..end].to_string())
    })
}

/// Does the remote already hold exactly this file?
fn same_as_remote(remote: Option<&RemoteFile>, path: &Path, bytes: u64, sha256: &str) -> Result<bool> {
    let Some(r) = remote else { return Ok(false) };
    if r.size != bytes {
        return Ok(false);
    }
    match &r.lfs_sha256 {
        Some(h) => Ok(h == sha256),
        None => Ok(r.oid == git_blob_id(path)?),
    }
}

fn commit_message(manifest: &Manifest) -> (String, String) {
    let base = &manifest.base_model;
    // Printed as JSON numbers are (15.0), as the first pushes did.
    let alpha = Value::from(manifest.recipe.alpha);
    let summary = format!("bake: ITI on {base} ({} heads, alpha {alpha})", manifest.heads.len());
    let description = format!(
        "Inference-Time Intervention baked as o_proj biases by bake {} (recipe sha256 {}).\n\nCheck it with `bake verify <this repo> --base {base}`.",
        manifest.tool_version, manifest.recipe_sha256
    );
    (summary, description)
}

/// Publishes `dir` to `options.repo`. The folder must pass `bake verify`'s file check first.
pub fn push(dir: &Path, options: &PushOptions, progress: &dyn Progress) -> Result<PushReport> {
    let (owner, name) = options
        .repo
        .split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
        .filter(|_| crate::model::resolve::parse_repo_id(&options.repo).is_some_and(|(_, rev)| rev.is_none()))
        .ok_or_else(|| {
            BakeError::Invalid(format!("repository `{}`: expected org/name", crate::error::shorten(&options.repo, 100)))
        })?;
    let revision = options.revision.clone().unwrap_or_else(|| "main".into());
    check_revision(&revision).map_err(|why| {
        BakeError::Invalid(format!(
            "revision `{}` {why}: expected a branch name",
            crate::error::shorten(&revision, 100)
        ))
    })?;
    progress.stage("push: checking the folder against its manifest");
    crate::verify::require_intact(dir, "push")?;
    let manifest = Manifest::read(dir)?;

    let repo = &options.repo;
    progress.stage("push: comparing with the remote");
    let main_tree = remote_tree(repo, "main")?;
    let repo_exists = main_tree.is_some();
    let remote = match (repo_exists, revision == "main") {
        (true, false) => remote_tree(repo, &revision)?,
        _ => main_tree,
    };
    let branch_missing = repo_exists && remote.is_none();
    let remote = remote.unwrap_or_default();

    let mut files = Vec::new();
    // `bake.log` (timings) stays local.
    for path_in_repo in crate::io::listing::entries_under(dir)?.into_iter().filter(|p| p != LOG) {
        let path = dir.join(&path_in_repo);
        let bytes = std::fs::metadata(&path).at(&path)?.len();
        // The check above just proved every listed file has its manifest sha256; only bake.json is unlisted.
        let sha256 = match manifest.outputs.get(&path_in_repo) {
            Some(entry) => entry.sha256.clone(),
            None => sha256_file(&path)?,
        };
        let upload = !same_as_remote(remote.get(&path_in_repo), &path, bytes, &sha256)?;
        files.push(PlannedFile { path: path_in_repo, bytes, sha256, upload });
    }
    let (summary, description) = commit_message(&manifest);
    let mut report = PushReport {
        repo: repo.clone(),
        revision: revision.clone(),
        repo_created: !repo_exists,
        files,
        commit_message: summary.clone(),
        commit_url: None,
        pr_url: None,
        verified: Vec::new(),
        dry_run: options.dry_run,
    };
    if options.dry_run {
        return Ok(report);
    }

    let client = crate::io::hub::client()?;
    if !repo_exists {
        progress.stage("push: creating the repository");
        client
            .create_repository()
            .repo_id(repo)
            .repo_type(hf_hub::repository::RepoTypeModel)
            .private(options.private)
            .exist_ok(true)
            .send()
            .map_err(|e| hub_error(repo, "creating the repository", e))?;
    }
    let handle = client.model(owner, name);
    if branch_missing || (!repo_exists && revision != "main") {
        handle
            .create_branch()
            .branch(&revision)
            .send()
            .map_err(|e| hub_error(repo, &format!("creating branch {revision}"), e))?;
    }
    let operations: Vec<CommitOperation> = report
        .files
        .iter()
        .filter(|f| f.upload)
        .map(|f| CommitOperation::add_file(f.path.clone(), dir.join(&f.path)))
        .collect();
    let mut checked_revision = revision.clone();
    if operations.is_empty() {
        progress.note(&format!("{repo}@{revision} already holds every file; nothing to upload"));
    } else {
        progress.stage(&format!("push: uploading {} files in one commit", operations.len()));
        let info = handle
            .create_commit()
            .operations(operations)
            .commit_message(summary)
            .commit_description(description)
            .revision(revision.clone())
            .create_pr(options.create_pr)
            .send()
            .map_err(|e: HFError| hub_error(repo, "committing", e))?;
        if let Some(n) = info.pr_num {
            checked_revision = format!("refs/pr/{n}");
        }
        report.commit_url = info.commit_url;
        report.pr_url = info.pr_url;
    }

    progress.stage("push: checking the remote weights against the manifest");
    let after = remote_tree(repo, &checked_revision)?.unwrap_or_default();
    for f in report.files.iter().filter(|f| f.path.ends_with(".safetensors")) {
        let found = after.get(&f.path);
        match found.and_then(|r| r.lfs_sha256.as_deref()) {
            Some(h) if h == f.sha256 => report.verified.push(f.path.clone()),
            other => {
                return Err(BakeError::Hub(format!(
                    "{repo}@{checked_revision}: `{}` on the Hub has LFS sha256 {}, the manifest says {}: the upload is not the baked file",
                    f.path,
                    other.unwrap_or(if found.is_some() { "(not stored in LFS)" } else { "(missing)" }),
                    f.sha256
                )))
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::{check_revision, encode_revision};

    #[test]
    fn a_revision_is_one_encoded_path_segment() {
        assert_eq!(encode_revision("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_revision("v1.0_rc-2~x"), "v1.0_rc-2~x");
        assert_eq!(encode_revision("main?x=1#f"), "main%3Fx%3D1%23f");
        assert_eq!(encode_revision("é"), "%C3%A9");
    }

    #[test]
    fn branch_names_follow_gits_rules() {
        for good in ["main", "iti-v2", "refs/pr/1", "feature/x.y"] {
            assert_eq!(check_revision(good), Ok(()), "{good}");
        }
        for bad in ["", "main?x=1", "a..b", "a b", "-x", "x/", "x.lock", "a//b", "x@{1}", "a\\b"] {
            assert!(check_revision(bad).is_err(), "{bad}");
        }
    }
}
