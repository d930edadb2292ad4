//! Talking to the Hugging Face Hub (or whatever `HF_ENDPOINT` points at) through `hf-hub`.
//!
//! `hf-hub` reads `HF_ENDPOINT`, `HF_TOKEN` (and the token file) and `HF_HOME`; `HF_HUB_OFFLINE` is handled
//! here: when set, only files already in the cache are used.
//!
//! Every request gives up when the server stops answering: `bake`'s own HTTP client has connect and read
//! timeouts, and each download runs under a watchdog that fails it after `BAKE_HUB_TIMEOUT` seconds
//! (default 60) without any progress, because hf-hub's metadata requests carry no timeout of their own.
//! hf-hub retries transient failures (connection errors, 5xx, 429) itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_hub::progress::{ProgressEvent, ProgressHandler};
use hf_hub::repository::RepoType;
use hf_hub::{HFClientBuilder, HFClientSync, HFError, HFRepositorySync};

use crate::error::{describe_chain, BakeError, Result};
use crate::model::resolve::COMPANION_FILES;
use crate::model::weights::{INDEX_FILE, SINGLE_FILE};

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0" && v.to_lowercase() != "false")
}

/// How long a request may go without any answer: `BAKE_HUB_TIMEOUT` seconds, default 60.
pub fn stall_timeout() -> Duration {
    let seconds = std::env::var("BAKE_HUB_TIMEOUT").ok().and_then(|s| s.parse::<f64>().ok()).filter(|s| *s > 0.0);
    Duration::from_secs_f64(seconds.unwrap_or(60.0))
}

/// The endpoint requests go to.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| "https://huggingface.co".into()).trim_end_matches('/').to_string()
}

/// A blocking HTTP client for the requests `bake` makes itself, with the same timeouts.
pub fn http_client() -> Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder()
        .user_agent(format!("bake/{}", crate::VERSION))
        .connect_timeout(stall_timeout().min(Duration::from_secs(10)))
        .timeout(stall_timeout())
        .build()
        .map_err(|e| BakeError::Hub(format!("starting the HTTP client: {}", describe_chain(&e))))
}

pub(crate) fn client() -> Result<HFClientSync> {
    let http = reqwest::Client::builder()
        .user_agent(format!("bake/{}", crate::VERSION))
        .connect_timeout(stall_timeout().min(Duration::from_secs(10)))
        .read_timeout(stall_timeout())
        .build()
        .map_err(|e| BakeError::Hub(format!("starting the HTTP client: {}", describe_chain(&e))))?;
    HFClientBuilder::new().client(http).build_sync().map_err(|e| {
        BakeError::Hub(format!("starting the Hub client (endpoint `{}`, from HF_ENDPOINT): {}", endpoint(), describe_chain(&e)))
    })
}

/// Records when hf-hub last reported anything (the watchdog's clock).
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl ProgressHandler for Activity {
    fn on_progress(&self, _event: &ProgressEvent) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One file of a repository at `revision` (default branch when `None`), through the Hub cache, failed after
/// the stall timeout without progress. `Err(None)`: the file does not exist.
fn fetch<T: RepoType + Send + Sync + 'static>(
    repo: &HFRepositorySync<T>,
    file: &str,
    revision: Option<&str>,
) -> std::result::Result<PathBuf, FetchError> {
    let activity = Arc::new(Activity { started: Instant::now(), last_ms: AtomicU64::new(0) });
    let (sender, receiver) = std::sync::mpsc::channel();
    let (repo, file_name, revision) = (repo.clone(), file.to_string(), revision.map(str::to_string));
    let handler = Arc::clone(&activity);
    // A thread of its own, so that a request hf-hub never times out can be abandoned.
    std::thread::spawn(move || {
        let result = repo
            .download_file()
            .filename(file_name)
            .maybe_revision(revision)
            .local_files_only(offline())
            .progress(handler)
            .send();
        let _ = sender.send(result);
    });
    let limit = stall_timeout();
    loop {
        match receiver.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(path)) => return Ok(path),
            Ok(Err(HFError::EntryNotFound { .. } | HFError::LocalEntryNotFound { .. })) => return Err(FetchError::NotFound),
            Ok(Err(e)) => return Err(FetchError::Failed(describe_chain(&e))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(FetchError::Failed("the download thread stopped".into())),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let idle = activity.started.elapsed().saturating_sub(Duration::from_millis(activity.last_ms.load(Ordering::Relaxed)));
                if idle >= limit {
                    return Err(FetchError::Failed(format!(
                        "no answer from {} for {:.0} s (timed out; BAKE_HUB_TIMEOUT sets the limit)",
                        endpoint(),
                        idle.as_secs_f64()
                    )));
                }
            }
        }
    }
}

enum FetchError {
    NotFound,
    Failed(String),
}

impl FetchError {
    fn describe(self, repo: &str, file: &str) -> BakeError {
        let hint = if offline() { " (HF_HUB_OFFLINE is set: only cached files are used)" } else { "" };
        match self {
            FetchError::NotFound => BakeError::Hub(format!("{repo}: {file}: not found{hint}")),
            FetchError::Failed(why) => BakeError::Hub(format!("{repo}: {file}: {why}{hint}")),
        }
    }
}

fn split_repo(repo: &str) -> Result<(&str, &str)> {
    repo.split_once('/').ok_or_else(|| BakeError::Hub(format!("`{}` is not org/name", crate::error::shorten(repo, 100))))
}

/// Downloads config, tokenizer files and safetensors weights (nothing else) of a model repository into the
/// Hub cache and returns the snapshot folder.
pub fn download_model(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let (owner, name) = split_repo(repo)?;
    let handle = client()?.model(owner, name);
    let fetch = |file: &str| fetch(&handle, file, revision);
    let config = fetch("config.json").map_err(|e| e.describe(repo, "config.json"))?;
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    for file in COMPANION_FILES {
        match fetch(file) {
            Ok(_) | Err(FetchError::NotFound) => {}
            Err(e) => return Err(e.describe(repo, file)),
        }
    }
    match fetch(INDEX_FILE) {
        Ok(index) => {
            for shard in shard_names(&index)? {
                fetch(&shard).map_err(|e| e.describe(repo, &shard))?;
            }
        }
        Err(FetchError::NotFound) => {
            fetch(SINGLE_FILE).map_err(|e| e.describe(repo, SINGLE_FILE))?;
        }
        Err(e) => return Err(e.describe(repo, INDEX_FILE)),
    }
    Ok(dir)
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = crate::io::fs::read_text(index, crate::io::fs::limits::JSON)?;
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
    fetch(&client()?.dataset(owner, name), file, None).map_err(|e| e.describe(&format!("dataset {repo}"), file))
}

/// A baked model repository: `bake.json` first, then every file it lists. Returns the snapshot folder.
pub fn download_baked(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    let (owner, name) = split_repo(repo)?;
    let handle = client()?.model(owner, name);
    let fetch = |file: &str| fetch(&handle, file, revision).map_err(|e| e.describe(repo, file));
    let manifest_path = fetch(crate::io::listing::MANIFEST_FILE)?;
    let dir = manifest_path.parent().map(Path::to_path_buf).unwrap_or_default();
    let listing = crate::io::listing::FileListing::read(&dir)?;
    // A listed path that leaves the folder is not fetched; `bake verify` reports it.
    for (file, _) in listing.iter().filter(|(f, _)| crate::io::listing::check_relative(f).is_ok()) {
        fetch(file)?;
    }
    Ok(dir)
}

pub mod push;
