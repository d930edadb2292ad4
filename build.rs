//! With the `cuda` feature, bake's binaries link the CUDA libraries dynamically (cudarc). An rpath to where the
//! lent GPU machines keep them (their PyTorch's CUDA 13 wheels) lets the binary start there with no
//! LD_LIBRARY_PATH; `BAKE_CUDA_RPATH` (colon-separated) replaces it for other machines. The CPU build is
//! untouched.

const DEFAULT_CUDA_RPATH: &str = "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=BAKE_CUDA_RPATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let rpath = std::env::var("BAKE_CUDA_RPATH").unwrap_or_else(|_| DEFAULT_CUDA_RPATH.to_string());
    for dir in rpath.split(':').filter(|d| !d.is_empty()) {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
    }
}
