//! Two jobs, both about the machine the build runs on:
//!
//! * **Test fixtures.** A test whose fixture is missing must show in `cargo test`'s summary as ignored, with the
//!   reason, never as passed; libtest decides that at compile time, so this script looks for the fixtures with the
//!   rules `tests/common` uses and sets `fixture_shared`, `fixture_smollm2`, `fixture_python`, `fixture_smollm2_gguf`,
//!   `fixture_qwen25`, `fixture_llama_cpp` (and `fixture_root`) for those present (all of them under
//!   `BAKE_REQUIRE_FIXTURES=1`, so that in CI a missing fixture fails its test instead). A fixture that appears after
//!   a build is seen once its variable changes or the script reruns (`touch build.rs`).
//! * **CUDA rpath.** With the `cuda` feature, bake's binaries link the CUDA libraries dynamically (cudarc). An rpath to
//!   where the lent GPU machines keep them (their PyTorch's CUDA 13 wheels) lets the binary start there with no
//!   LD_LIBRARY_PATH; `BAKE_CUDA_RPATH` (colon-separated) replaces it for other machines. The CPU build is untouched.

use std::path::{Path, PathBuf};

const DEFAULT_CUDA_RPATH: &str = "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    announce_fixtures();
    link_cuda_rpath();
}

fn env_path(name: &str) -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed={name}");
    std::env::var_os(name).map(PathBuf::from)
}

/// Sets `fixture_<name>` when `path` exists (or fixtures are required), and watches it so that its removal reruns
/// this script. A missing path is not watched: cargo would rerun the script on every build.
fn announce(name: &str, path: Option<PathBuf>, required: bool) {
    println!("cargo:rustc-check-cfg=cfg(fixture_{name})");
    let present = path.filter(|p| p.exists());
    if let Some(path) = &present {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if present.is_some() || required {
        println!("cargo:rustc-cfg=fixture_{name}");
    }
}

fn announce_fixtures() {
    let required = env_path("BAKE_REQUIRE_FIXTURES").is_some_and(|v| v == Path::new("1"));
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let shared = env_path("BAKE_SHARED").unwrap_or_else(|| manifest_dir.join("../shared"));
    // Its data folder stands for it: watching the whole folder, cargo would check every fixture's mtime each build.
    announce("shared", Some(shared.join("data")), required);
    let smollm2 = env_path("BAKE_SMOLLM2")
        .or_else(|| env_path("HOME").map(|home| home.join(".cache/bake/fixtures/smollm2-135m-instruct")));
    announce("smollm2", smollm2.map(|dir| dir.join("model.safetensors")), required);
    announce("python", env_path("BAKE_PYTHON"), required);
    // The GGUF fixtures and llama.cpp (llama-cpp-python, built from its sdist by scripts/setup-test-env.sh).
    let cached = |name: &str| env_path("HOME").map(|home| home.join(".cache/bake/fixtures").join(name));
    let smollm2_gguf = env_path("BAKE_SMOLLM2_GGUF").or_else(|| cached("smollm2-135m-instruct.Q4_1.gguf"));
    announce("smollm2_gguf", smollm2_gguf, required);
    let qwen25 = env_path("BAKE_QWEN25").or_else(|| cached("qwen25-coder-0.5b-instruct"));
    announce("qwen25", qwen25.map(|dir| dir.join("model.safetensors")), required);
    announce("llama_cpp", env_path("BAKE_LLAMA_CPP"), required);
    // Full-disk tests mount a small tmpfs, which takes root.
    println!("cargo:rustc-check-cfg=cfg(fixture_root)");
    if required || runs_as_root() {
        println!("cargo:rustc-cfg=fixture_root");
    }
}

fn runs_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status.lines().find_map(|line| line.strip_prefix("Uid:"));
    uid.and_then(|ids| ids.split_whitespace().next()) == Some("0")
}

fn link_cuda_rpath() {
    println!("cargo:rerun-if-env-changed=BAKE_CUDA_RPATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let rpath = std::env::var("BAKE_CUDA_RPATH").unwrap_or_else(|_| DEFAULT_CUDA_RPATH.to_string());
    for dir in rpath.split(':').filter(|d| !d.is_empty()) {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
    }
}
