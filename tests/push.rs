//! `bake push` against a Hub on 127.0.0.1 started by the test. It answers the requests hf-hub 1.0 and bake
//! make, as the Hub documents them: `POST /api/repos/create`, `GET /api/models/{repo}/tree/{rev}`,
//! `POST /api/models/{repo}/preupload/{rev}`, `POST /{repo}.git/info/lfs/objects/batch`,
//! `POST /api/models/{repo}/branch/{branch}` and `POST /api/models/{repo}/commit/{rev}` (NDJSON). Files named
//! `*.safetensors` are stored in LFS, as the Hub's default `.gitattributes` says.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;

/// Several shards, so the LFS checks see more than one weight file.
const BAKE_ARGS: &[&str] = &["--limit", "6", "--heads", "4"];
const TOKEN: &str = "hf_mockTOKEN1234567890";

#[derive(Default)]
struct Hub {
    /// repo → revision → path → bytes.
    repos: HashMap<String, HashMap<String, BTreeMap<String, Vec<u8>>>>,
    /// (method, path) of every request.
    log: Vec<(String, String)>,
    /// Answer this many commit requests with HTTP 500.
    failing_commits: usize,
    /// Store LFS files with their first byte changed (a broken upload).
    corrupt_lfs: bool,
    prs: u64,
}

fn is_lfs(path: &str) -> bool {
    path.ends_with(".safetensors")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tree_entry(path: &str, bytes: &[u8]) -> Value {
    let mut blob = sha1::Sha1::new();
    blob.update(format!("blob {}\0", bytes.len()).as_bytes());
    blob.update(bytes);
    let mut entry = json!({ "type": "file", "oid": hex(&blob.finalize()), "size": bytes.len(), "path": path });
    if is_lfs(path) {
        entry["lfs"] = json!({ "oid": hex(&sha2::Sha256::digest(bytes)), "size": bytes.len(), "pointerSize": 134 });
    }
    entry
}

struct Request {
    method: String,
    path: String,
    query: String,
    authorized: Option<bool>,
    body: Vec<u8>,
}

fn read_request(stream: &std::net::TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next()?.to_string(), parts.next()?.to_string());
    let (mut length, mut authorized) = (0usize, None);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header == "\r\n" {
            break;
        }
        let lower = header.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("authorization:") {
            authorized = Some(header.trim_end().ends_with(&format!("Bearer {TOKEN}")));
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let (path, query) =
        target.split_once('?').map(|(p, q)| (p.to_string(), q.to_string())).unwrap_or((target, String::new()));
    Some(Request { method, path: path.replace("%2F", "/"), query, authorized, body })
}

fn respond(stream: &mut std::net::TcpStream, status: u16, body: &Value) {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    };
    let head = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", text.len());
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(text.as_bytes());
}

/// `/api/models/{org}/{name}/{action}/{rest}` → (repo, action, rest).
fn api_parts(path: &str) -> Option<(String, String, String)> {
    let rest = path.strip_prefix("/api/models/")?;
    let mut it = rest.splitn(4, '/');
    let (org, name, action) = (it.next()?, it.next()?, it.next()?);
    Some((format!("{org}/{name}"), action.to_string(), it.next().unwrap_or("").to_string()))
}

fn handle(hub: &mut Hub, r: &Request, endpoint: &str) -> (u16, Value) {
    if r.authorized == Some(false) || (r.method == "POST" && r.authorized.is_none()) {
        return (401, json!({ "error": "Invalid credentials in Authorization header" }));
    }
    if r.path == "/api/repos/create" {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let repo = format!("{}/{}", body["organization"].as_str().unwrap(), body["name"].as_str().unwrap());
        if hub.repos.contains_key(&repo) {
            return (409, json!({ "error": "You already created this model repo" }));
        }
        hub.repos.insert(repo.clone(), HashMap::from([("main".to_string(), BTreeMap::new())]));
        return (200, json!({ "url": format!("{endpoint}/{repo}") }));
    }
    if let Some(repo) =
        r.path.strip_suffix(".git/info/lfs/objects/batch").map(|p| p.trim_start_matches('/').to_string())
    {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let objects: Vec<Value> = body["objects"].as_array().unwrap().iter().map(|o| {
            json!({ "oid": o["oid"], "size": o["size"], "actions": { "upload": { "href": format!("{endpoint}/lfs/{repo}/{}", o["oid"].as_str().unwrap()) } } })
        }).collect();
        return (200, json!({ "transfer": "basic", "objects": objects }));
    }
    let Some((repo, action, rest)) = api_parts(&r.path) else { return (404, json!({ "error": "no such endpoint" })) };
    let corrupt = hub.corrupt_lfs;
    let Some(revisions) = hub.repos.get_mut(&repo) else { return (404, json!({ "error": "Repository not found" })) };
    match (r.method.as_str(), action.as_str()) {
        ("GET", "tree") => match revisions.get(&rest) {
            None => (404, json!({ "error": "Revision not found" })),
            Some(files) => {
                let mut entries: Vec<Value> = files.iter().map(|(p, b)| tree_entry(p, b)).collect();
                if r.query.contains("recursive=true") {
                    entries.push(json!({ "type": "directory", "oid": "0".repeat(40), "path": "activation_diff" }));
                }
                (200, Value::Array(entries))
            }
        },
        ("POST", "preupload") => {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            let files: Vec<Value> = body["files"].as_array().unwrap().iter().map(|f| {
                let path = f["path"].as_str().unwrap();
                json!({ "path": path, "uploadMode": if is_lfs(path) { "lfs" } else { "regular" }, "shouldIgnore": false })
            }).collect();
            (200, json!({ "files": files }))
        }
        ("POST", "branch") => {
            let main = revisions.get("main").cloned().unwrap_or_default();
            revisions.insert(rest, main);
            (200, json!({}))
        }
        ("POST", "commit") => {
            if hub.failing_commits > 0 {
                hub.failing_commits -= 1;
                return (
                    500,
                    json!({ "error": "Internal Error - We're working hard to fix this as soon as possible!" }),
                );
            }
            let Some(base) = revisions.get(&rest).cloned() else {
                return (404, json!({ "error": "Revision not found" }));
            };
            let mut files = base;
            for line in String::from_utf8_lossy(&r.body).lines().filter(|l| !l.is_empty()) {
                let entry: Value = serde_json::from_str(line).unwrap();
                let value = &entry["value"];
                match entry["key"].as_str().unwrap() {
                    "header" => {}
                    "file" => {
                        let path = value["path"].as_str().unwrap().to_string();
                        let mut bytes = base64::engine::general_purpose::STANDARD
                            .decode(value["content"].as_str().unwrap())
                            .unwrap();
                        if corrupt && is_lfs(&path) {
                            bytes[0] ^= 1;
                        }
                        files.insert(path, bytes);
                    }
                    "deletedFile" => {
                        files.remove(value["path"].as_str().unwrap());
                    }
                    other => {
                        return (
                            400,
                            json!({ "error": format!("unsupported commit entry {other}: no LFS object was uploaded") }),
                        )
                    }
                }
            }
            if r.query.contains("create_pr=1") {
                hub.prs += 1;
                let n = hub.prs;
                hub.repos.get_mut(&repo).unwrap().insert(format!("refs/pr/{n}"), files);
                return (
                    200,
                    json!({ "commitUrl": format!("{endpoint}/{repo}/commit/pr{n}"), "commitOid": "1".repeat(40), "prUrl": format!("{endpoint}/{repo}/discussions/{n}"), "prNum": n }),
                );
            }
            revisions.insert(rest, files);
            (200, json!({ "commitUrl": format!("{endpoint}/{repo}/commit/abc"), "commitOid": "2".repeat(40) }))
        }
        _ => (404, json!({ "error": "no such endpoint" })),
    }
}

fn serve() -> (String, Arc<Mutex<Hub>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let hub = Arc::new(Mutex::new(Hub::default()));
    let (shared, url) = (hub.clone(), endpoint.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let Some(request) = read_request(&stream) else { continue };
            let (status, body) = {
                let mut hub = shared.lock().unwrap();
                hub.log.push((request.method.clone(), request.path.clone()));
                handle(&mut hub, &request, &url)
            };
            respond(&mut stream, status, &body);
        }
    });
    (endpoint, hub)
}

fn push(dir: &Path, endpoint: &str, token: &str, extra: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("push")
        .arg(dir)
        .args(extra)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", token)
        .env("HF_HOME", home.path())
        .env_remove("HF_TOKEN_PATH")
        .output()
        .unwrap()
}

fn push_json(dir: &Path, endpoint: &str, extra: &[&str]) -> Value {
    let out = push(dir, endpoint, TOKEN, &[extra, &["--json"]].concat());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "push failed: {stderr}");
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN), "the token was printed");
    serde_json::from_str(&stdout).unwrap()
}

fn uploaded(report: &Value) -> Vec<String> {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["upload"] == true)
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect()
}

fn count(hub: &Arc<Mutex<Hub>>, method: &str, needle: &str) -> usize {
    hub.lock().unwrap().log.iter().filter(|(m, p)| m == method && p.contains(needle)).count()
}

/// The files a push sends: every file of the folder but its log.
fn local_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = common::files_of(dir);
    files.remove("bake.log");
    files
}

/// A legitimate edit of one published file: the model card changes and the manifest records its new hash.
fn edit_card(dir: &Path) {
    let card = dir.join("README.md");
    let text = std::fs::read_to_string(&card).unwrap() + "\nEdited after the bake.\n";
    std::fs::write(&card, &text).unwrap();
    let manifest_path = dir.join("bake.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["outputs"]["README.md"] =
        json!({ "sha256": hex(&sha2::Sha256::digest(text.as_bytes())), "bytes": text.len() });
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap() + "\n").unwrap();
}

#[test]
fn push_creates_uploads_once_and_checks_the_remote() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("baked");
    common::bake_sharded_synthetic(tmp.path(), &dir, BAKE_ARGS);
    let (endpoint, hub) = serve();
    let repo = ["--repo", "test-org/honest-tiny"];

    // A dry run against a repository that does not exist: nothing is changed.
    let plan = push_json(&dir, &endpoint, &[&repo[..], &["--dry-run"]].concat());
    assert_eq!(plan["repo_created"], true);
    assert_eq!(uploaded(&plan).len(), local_files(&dir).len());
    assert_eq!(count(&hub, "POST", "/"), 0, "a dry run must not POST");

    // A new repository: created, every file in one commit, byte for byte.
    let first = push_json(&dir, &endpoint, &repo);
    assert_eq!(count(&hub, "POST", "/api/repos/create"), 1);
    assert_eq!(count(&hub, "POST", "/commit/"), 1);
    let remote = hub.lock().unwrap().repos["test-org/honest-tiny"]["main"].clone();
    assert_eq!(remote, local_files(&dir));
    let weights: Vec<&String> = remote.keys().filter(|p| p.ends_with(".safetensors")).collect();
    assert!(weights.len() >= 3, "expected shards and the diff twin: {weights:?}");
    assert_eq!(first["verified"].as_array().unwrap().len(), weights.len());
    assert!(first["commit_message"].as_str().unwrap().contains("4 heads"));

    // Nothing changed: no upload, no commit.
    let again = push_json(&dir, &endpoint, &repo);
    assert!(uploaded(&again).is_empty());
    assert_eq!(count(&hub, "POST", "/commit/"), 1);

    // One file edited (with its manifest entry): exactly those two go up.
    edit_card(&dir);
    let third = push_json(&dir, &endpoint, &repo);
    assert_eq!(uploaded(&third), vec!["README.md".to_string(), "bake.json".to_string()]);
    assert_eq!(hub.lock().unwrap().repos["test-org/honest-tiny"]["main"], local_files(&dir));

    // A pull request and a new branch.
    edit_card(&dir);
    let pr = push_json(&dir, &endpoint, &[&repo[..], &["--create-pr"]].concat());
    assert!(pr["pr_url"].as_str().unwrap().contains("discussions/1"));
    assert_eq!(hub.lock().unwrap().repos["test-org/honest-tiny"]["refs/pr/1"], local_files(&dir));
    push_json(&dir, &endpoint, &[&repo[..], &["--revision", "iti-v2"]].concat());
    assert_eq!(hub.lock().unwrap().repos["test-org/honest-tiny"]["iti-v2"], local_files(&dir));
}

#[test]
fn push_failures_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("baked");
    common::bake_sharded_synthetic(tmp.path(), &dir, BAKE_ARGS);
    let (endpoint, hub) = serve();

    // Transient server errors are retried.
    hub.lock().unwrap().failing_commits = 2;
    push_json(&dir, &endpoint, &["--repo", "test-org/retried"]);
    assert_eq!(count(&hub, "POST", "/api/models/test-org/retried/commit/"), 3);

    // A server that keeps failing: a clear failure naming the step, nothing committed.
    hub.lock().unwrap().failing_commits = 1000;
    let out = push(&dir, &endpoint, TOKEN, &["--repo", "test-org/broken"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("test-org/broken") && stderr.contains("committing") && stderr.contains("500"), "{stderr}");
    assert!(hub.lock().unwrap().repos["test-org/broken"]["main"].is_empty());
    hub.lock().unwrap().failing_commits = 0;

    // A bad token: a clear error, and the token is not shown.
    let bad = "hf_badTOKENabcdef123456";
    let out = push(&dir, &endpoint, bad, &["--repo", "test-org/retried"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("401") && stderr.contains("HF_TOKEN"), "{stderr}");
    assert!(!stderr.contains(bad) && !stdout.contains(bad), "the token was printed: {stderr}");

    // The Hub stores something else than the baked weights: the check after the upload fails loudly.
    hub.lock().unwrap().corrupt_lfs = true;
    let out = push(&dir, &endpoint, TOKEN, &["--repo", "test-org/corrupted"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(".safetensors") && stderr.contains("LFS sha256") && stderr.contains("manifest"),
        "{stderr}"
    );
    hub.lock().unwrap().corrupt_lfs = false;

    // A revision that cannot be a branch name is refused before any request (`?` would end the URL's path).
    let requests = hub.lock().unwrap().log.len();
    for revision in ["", "main?x=1", "a..b", "feature branch"] {
        let out = push(&dir, &endpoint, TOKEN, &["--repo", "test-org/revisions", "--revision", revision]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{revision}: {stderr}");
        assert!(stderr.contains("expected a branch name"), "{revision}: {stderr}");
    }
    assert_eq!(hub.lock().unwrap().log.len(), requests);

    // A folder that no longer matches its manifest is refused before any request.
    let requests = hub.lock().unwrap().log.len();
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("model") && name.ends_with(".safetensors")
        })
        .unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let out = push(&dir, &endpoint, TOKEN, &["--repo", "test-org/tampered"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("bake verify") && stderr.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{stderr}"
    );
    assert_eq!(hub.lock().unwrap().log.len(), requests);
}
