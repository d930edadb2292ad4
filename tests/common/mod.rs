//! Where the tests find real data: the shared reference folder and the SmolLM2 fixture.
//!
//! * `BAKE_SHARED`: the shared folder (TruthfulQA data, tiny fixtures, reference outputs). Default: `../shared`
//!   beside the repository, when it exists.
//! * `BAKE_SMOLLM2`: the SmolLM2-135M-Instruct checkpoint built by `fixtures/make_smollm2.py`. Default:
//!   `~/.cache/bake/fixtures/smollm2-135m-instruct`, when it exists.
//! * `BAKE_REQUIRE_FIXTURES=1` (CI sets it): a missing fixture fails the test instead of skipping it.
#![allow(dead_code)]

use std::path::PathBuf;

fn required() -> bool {
    std::env::var("BAKE_REQUIRE_FIXTURES").is_ok_and(|v| v == "1")
}

/// Says why a test is skipped. Written straight to stderr: libtest captures `eprintln!`, not the handle.
pub fn say_skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

fn found_or_skip(what: &str, path: Option<PathBuf>, how: &str) -> Option<PathBuf> {
    match path.filter(|p| p.exists()) {
        Some(p) => Some(p),
        None if required() => panic!("{what} not found and BAKE_REQUIRE_FIXTURES=1: {how}"),
        None => {
            say_skipped(&format!("{what} not found ({how})"));
            None
        }
    }
}

/// The Python with the references (torch, transformers, scikit-learn, pyvene), from `BAKE_PYTHON`.
pub fn python() -> Option<PathBuf> {
    let path = std::env::var_os("BAKE_PYTHON").map(PathBuf::from);
    found_or_skip("BAKE_PYTHON", path, "set it to a Python with torch, transformers, scikit-learn and pyvene")
}

pub fn shared_dir() -> Option<PathBuf> {
    let path = std::env::var_os("BAKE_SHARED")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")));
    found_or_skip("the shared folder", path, "set BAKE_SHARED to the folder holding fixtures/ and data/")
}

pub fn shared(relative: &str) -> Option<PathBuf> {
    shared_dir().map(|d| d.join(relative))
}

pub fn smollm2_dir() -> Option<PathBuf> {
    let path = std::env::var_os("BAKE_SMOLLM2").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bake/fixtures/smollm2-135m-instruct"))
    });
    found_or_skip(
        "the SmolLM2 fixture",
        path.filter(|p| p.join("model.safetensors").exists()),
        "build it with fixtures/make_smollm2.py and set BAKE_SMOLLM2",
    )
}

/// The three reference models: SmolLM2 (when built) and the two tiny GQA checkpoints.
pub fn reference_models() -> Vec<(String, PathBuf, PathBuf)> {
    let mut out = Vec::new();
    let Some(shared) = shared_dir() else { return out };
    if let Some(dir) = smollm2_dir() {
        out.push(("smollm2".into(), dir, shared.join("fixtures/smollm2/reference_forward.json")));
    }
    for tiny in ["tiny-gqa", "tiny-llama3-rope"] {
        let dir = shared.join("fixtures").join(tiny);
        out.push((tiny.into(), dir.clone(), dir.join("reference_forward.json")));
    }
    out
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Bakes the tiny GQA fixture (shared folder required) into `out` with the built-in recipe, the local
/// TruthfulQA and `extra` flags; returns the base folder.
pub fn bake_tiny(out: &std::path::Path, extra: &[&str]) -> PathBuf {
    let shared = shared_dir().expect("callers check the shared folder first");
    let tiny = shared.join("fixtures/tiny-gqa");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("--model")
        .arg(&tiny)
        .arg("--dataset")
        .arg(shared.join("data/truthfulqa"))
        .args(extra)
        .arg("--out")
        .arg(out)
        .env("BAKE_CACHE_DIR", std::env::temp_dir().join("bake-test-cache"))
        .output()
        .unwrap();
    assert!(output.status.success(), "bake failed: {}", String::from_utf8_lossy(&output.stderr));
    tiny
}
