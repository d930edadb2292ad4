//! Model resolution through the Hub protocol, against a file server on 127.0.0.1 that answers the requests
//! `hf-hub` makes (`HEAD`/`GET /{org}/{name}/resolve/{revision}/{file}`), and `HF_HUB_OFFLINE` from the cache.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `folder` as the repository `org/name`; returns the endpoint and a request counter.
fn serve(folder: PathBuf, repo: &'static str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200) {
            let Ok(mut stream) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            let mut parts = request_line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let prefix = format!("/{repo}/resolve/main/");
            let file = path.strip_prefix(&prefix).map(|f| folder.join(f)).filter(|p| p.is_file());
            let response = match file {
                Some(p) => {
                    let body = std::fs::read(&p).unwrap();
                    let etag = bake::io::hash::sha256_file(&p).unwrap();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let mut r = head.into_bytes();
                    if method == "GET" {
                        r.extend(body);
                    }
                    r
                }
                None => format!("HTTP/1.1 404 Not Found\r\nX-Repo-Commit: {COMMIT}\r\nX-Error-Code: EntryNotFound\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(),
            };
            let _ = stream.write_all(&response);
        }
    });
    (endpoint, count)
}

fn inspect(model: &str, endpoint: &str, home: &Path, offline: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bake"));
    cmd.args(["inspect", "--json", "--model", model])
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", home)
        .env_remove("HF_TOKEN");
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    cmd.output().unwrap()
}

#[test]
fn a_hub_repo_id_is_downloaded_then_works_offline() {
    let root = tempfile::tempdir().unwrap();
    let (model, _) = common::synthetic_inputs(root.path());
    let (endpoint, requests) = serve(model, "test-org/tiny-gqa");
    let home = tempfile::tempdir().unwrap();

    let out = inspect("test-org/tiny-gqa", &endpoint, home.path(), false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["hub_repo"], "test-org/tiny-gqa");
    assert_eq!((report["layers"].as_u64(), report["kv_heads"].as_u64()), (Some(2), Some(2)));
    assert!(report["folder"].as_str().unwrap().starts_with(home.path().to_str().unwrap()));
    let online_requests = requests.load(Ordering::SeqCst);
    assert!(online_requests > 0);

    // Offline: the same answer from the cache, and no request reaches the server.
    let out = inspect("test-org/tiny-gqa", "http://127.0.0.1:9", home.path(), true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(requests.load(Ordering::SeqCst), online_requests);

    // A repository the server does not have: a clear error naming the repo and the file.
    let out = inspect("test-org/missing", &endpoint, home.path(), false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("test-org/missing") && stderr.contains("config.json"), "{stderr}");
}
