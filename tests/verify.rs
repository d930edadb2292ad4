//! `bake verify` catches a one-byte change in every kind of file, and in a tensor that must be untouched.

mod common;

use std::path::Path;
use std::process::Command;

use bake::model::Checkpoint;
use serde_json::Value;

fn verify(dir: &Path, base: &Path, extra: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("verify")
        .arg(dir)
        .arg("--base")
        .arg(base)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    let code = out.status.code().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (code, json)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &target)
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

fn flip(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// (check, file substring, tensor substring) triples that must all appear among the mismatches.
fn assert_caught(report: &Value, expected: &[(&str, &str, Option<&str>)]) {
    let mismatches = report["mismatches"].as_array().unwrap();
    for (check, file, tensor) in expected {
        let hit = mismatches.iter().any(|m| {
            m["check"] == *check
                && m["file"].as_str().unwrap().contains(file)
                && tensor.is_none_or(|t| m["tensor"].as_str().is_some_and(|x| x.contains(t)))
        });
        assert!(hit, "no `{check}` mismatch for {file} {tensor:?} in {report}");
    }
}

#[test]
fn verify_passes_a_fresh_bake_and_catches_every_one_byte_change() {
    if common::shared_dir().is_none() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let good = root.path().join("good");
    let base = common::bake_tiny(&good, &["--limit", "20", "--heads", "4", "--max-shard-size", "4MB"]);
    let (code, report) = verify(&good, &base, &["--run"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["checks"].as_array().unwrap().len(), 7);

    let case = |name: &str| {
        let dir = root.path().join(name);
        copy_tree(&good, &dir);
        dir
    };

    // A tensor that must be untouched: one byte of layer 1's q_proj weight.
    let dir = case("tensor");
    let ck = Checkpoint::open(Checkpoint::weight_files(&dir).unwrap()).unwrap();
    let entry = ck.get("model.layers.1.self_attn.q_proj.weight").unwrap().clone();
    let shard = ck.file_of(&entry).to_path_buf();
    drop(ck);
    flip(&shard, entry.start + 10);
    let (code, report) = verify(&dir, &base, &[]);
    assert_eq!(code, 1);
    let shard_name = shard.file_name().unwrap().to_string_lossy().into_owned();
    assert_caught(
        &report,
        &[("files", &shard_name, None), ("tensors", &shard_name, Some("layers.1.self_attn.q_proj.weight"))],
    );

    // An o_proj bias (the part the bake wrote) of a shifted layer: the W_o·δ check names it.
    let dir = case("bias");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let layer = report["heads"][0][0].as_u64().unwrap();
    let bias_name = format!("model.layers.{layer}.self_attn.o_proj.bias");
    let ck = Checkpoint::open(Checkpoint::weight_files(&dir).unwrap()).unwrap();
    let entry = ck.get(&bias_name).unwrap().clone();
    let shard = ck.file_of(&entry).to_path_buf();
    drop(ck);
    flip(&shard, entry.start + 3); // the lowest exponent bit of element 0: the value doubles or halves
    let (code, report) = verify(&dir, &base, &[]);
    assert_eq!(code, 1);
    assert_caught(&report, &[("biases", "model", Some(&bias_name))]);

    // The index, the config, a diff file: each named by the sha256 check and by its own check.
    let dir = case("index");
    flip(&dir.join("model.safetensors.index.json"), 40);
    let (code, report) = verify(&dir, &base, &[]);
    assert_eq!(code, 1);
    assert_caught(&report, &[("files", "model.safetensors.index.json", None)]);

    let dir = case("config");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let at = text.find("\"rms_norm_eps\"").unwrap() + 17;
    flip(&dir.join("config.json"), at);
    let (code, report) = verify(&dir, &base, &[]);
    assert_eq!(code, 1);
    assert_caught(&report, &[("files", "config.json", None), ("config", "config.json", None)]);

    let dir = case("diff");
    let bin = std::fs::read_dir(dir.join("activation_diff"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bin"))
        .unwrap();
    let len = std::fs::metadata(&bin).unwrap().len() as usize;
    let data_offset = bake::export::pyvene::read_stored_zip(&std::fs::read(&bin).unwrap()).unwrap();
    assert!(data_offset.iter().any(|(n, _)| n.ends_with("data/0")));
    // The data/0 record sits after data.pkl and byteorder; flip inside it (64-byte aligned at 384 for small files).
    flip(&bin, 384 + 1);
    assert!(len > 390);
    let (code, report) = verify(&dir, &base, &[]);
    assert_eq!(code, 1);
    let bin_name = bin.file_name().unwrap().to_string_lossy().into_owned();
    assert_caught(&report, &[("files", &bin_name, None), ("diff", &bin_name, None)]);

    // The manifest: one hex digit of a recorded sha256.
    let dir = case("manifest");
    let text = std::fs::read_to_string(dir.join("bake.json")).unwrap();
    let at = text.find("\"config.json\": {").unwrap();
    let at = text[at..].find("\"sha256\": \"").unwrap() + at + 11;
    flip(&dir.join("bake.json"), at);
    let (code, report) = verify(&dir, &base, &[]);
    assert_eq!(code, 1);
    assert_caught(&report, &[("files", "config.json", None)]);

    // A missing manifest: verification cannot run (exit 2).
    let dir = case("no-manifest");
    std::fs::remove_file(dir.join("bake.json")).unwrap();
    assert_eq!(verify(&dir, &base, &[]).0, 2);

    // A base that is not the one baked from.
    let other = common::shared("fixtures/tiny-llama3-rope").unwrap();
    let (code, report) = verify(&good, &other, &[]);
    assert_eq!(code, 1);
    assert_caught(&report, &[("tensors", "model/", None)]);
}
