//! Fetching files from the Hugging Face Hub (or whatever `HF_ENDPOINT` points at) into its cache, through
//! `hf-hub`, and the HTTP clients `bake` uses for its own Hub requests.
//!
//! `hf-hub` reads `HF_ENDPOINT`, `HF_TOKEN` (and the token file) and `HF_HOME`; `HF_HUB_OFFLINE` is handled
//! here: when set, only files already in the cache are used.
//!
//! Every request gives up when the server stops answering: `bake`'s own HTTP clients have connect and read
//! timeouts, and each download runs under a watchdog that fails it after `BAKE_HUB_TIMEOUT` seconds
//! (default 60) without any progress, because hf-hub's metadata requests carry no timeout of their own.
//! hf-hub retries transient failures (connection errors, 5xx, 429) itself.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hf_hub::progress::{ProgressEvent, ProgressHandler};
use hf_hub::repository::RepoType;
use hf_hub::{HFClientBuilder, HFClientSync, HFError, HFRepositorySync};

use crate::error::{describe_chain, BakeError, Result};

/// `HF_HUB_OFFLINE` is set: only cached files are used.
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
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
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

/// The hf-hub client, on an HTTP client with `bake`'s timeouts.
pub fn client() -> Result<HFClientSync> {
    let http = reqwest::Client::builder()
        .user_agent(format!("bake/{}", crate::VERSION))
        .connect_timeout(stall_timeout().min(Duration::from_secs(10)))
        .read_timeout(stall_timeout())
        .build()
        .map_err(|e| BakeError::Hub(format!("starting the HTTP client: {}", describe_chain(&e))))?;
    HFClientBuilder::new().client(http).build_sync().map_err(|e| {
        BakeError::Hub(format!(
            "starting the Hub client (endpoint `{}`, from HF_ENDPOINT): {}",
            endpoint(),
            describe_chain(&e)
        ))
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
/// the stall timeout without progress.
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
            Ok(Err(HFError::EntryNotFound { .. } | HFError::LocalEntryNotFound { .. })) => {
                return Err(FetchError::NotFound)
            }
            Ok(Err(e)) => return Err(FetchError::Failed(describe_chain(&e))),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(FetchError::Failed("the download thread stopped".into()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let idle = activity
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(activity.last_ms.load(Ordering::Relaxed)));
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

/// Which kind of Hub repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

/// A Hub repository at a revision (the default branch when `None`).
#[derive(Debug, Clone)]
pub struct Repo<'a> {
    pub kind: RepoKind,
    /// `org/name`.
    pub id: &'a str,
    pub revision: Option<&'a str>,
}

impl Repo<'_> {
    /// One file into the Hub cache; `Ok(None)` when the repository has no such file.
    pub fn fetch_optional(&self, file: &str) -> Result<Option<PathBuf>> {
        let (owner, name) = self
            .id
            .split_once('/')
            .ok_or_else(|| BakeError::Hub(format!("`{}` is not org/name", crate::error::shorten(self.id, 100))))?;
        let client = client()?;
        let result = match self.kind {
            RepoKind::Model => fetch(&client.model(owner, name), file, self.revision),
            RepoKind::Dataset => fetch(&client.dataset(owner, name), file, self.revision),
        };
        match result {
            Ok(path) => Ok(Some(path)),
            Err(FetchError::NotFound) => Ok(None),
            Err(FetchError::Failed(why)) => Err(self.error(file, &why)),
        }
    }

    /// One file into the Hub cache; its absence is an error.
    pub fn fetch(&self, file: &str) -> Result<PathBuf> {
        self.fetch_optional(file)?.ok_or_else(|| self.error(file, "not found"))
    }

    fn error(&self, file: &str, why: &str) -> BakeError {
        let hint = if offline() { " (HF_HUB_OFFLINE is set: only cached files are used)" } else { "" };
        let kind = if self.kind == RepoKind::Dataset { "dataset " } else { "" };
        BakeError::Hub(format!("{kind}{}: {file}: {why}{hint}", self.id))
    }
}
