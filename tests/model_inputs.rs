//! Bad model folders give clear, non-zero-exit errors naming the file and field; sharded equals one file.

mod common;

use std::path::Path;
use std::process::Command;

use bake::io::safetensors::{write_checkpoint, TensorBytes};
use bake::model::synthetic::{write_synthetic_model, SyntheticSpec};
use bake::model::{Batch, Checkpoint, ModelFiles, Request};
use candle_core::Device;

fn synthetic(dir: &Path) {
    write_synthetic_model(dir, &SyntheticSpec::default(), u64::MAX).unwrap();
}

/// Runs `bake inspect` on `dir` and returns (exit code, stderr).
fn inspect(dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--model"]).arg(dir).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_fails(dir: &Path, needles: &[&str]) {
    let (code, stderr) = inspect(dir);
    assert_eq!(code, 2, "expected exit 2, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
}

fn inspect_json(dir: &Path) -> serde_json::Value {
    let out =
        Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--json", "--model"]).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_good_synthetic_model_inspects_as_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    let spec = SyntheticSpec::default();
    let report = inspect_json(dir.path());
    let (h, a, kv, i, v) =
        (spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.intermediate, spec.vocab);
    let per_layer = 2 * h + h * a + 2 * h * kv + a * h + 3 * h * i;
    let parameters = v * h + spec.layers * per_layer + h + v * h;
    for (field, expected) in [
        ("layers", spec.layers),
        ("heads", spec.heads),
        ("kv_heads", spec.kv_heads),
        ("head_dim", spec.head_dim),
        ("hidden_size", h),
        ("intermediate_size", i),
        ("vocab_size", v),
        ("o_proj_in_features", a),
        ("parameters", parameters),
    ] {
        assert_eq!(report[field].as_u64(), Some(expected as u64), "{field}: {report}");
    }
    assert_eq!(report["dtype"], "f32");
    assert_eq!(report["has_attention_biases"], false);
    assert_eq!(report["tied_embeddings"], false);
    // The human-readable form says the same.
    let out = Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--model"]).arg(dir.path()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("layers       2") && text.contains("4 (2 KV heads, head_dim 8)"), "{text}");
}

/// Adds bias tensors (zeros) to a synthetic model's checkpoint.
fn add_biases(dir: &Path, names: &[(&str, usize)]) {
    let checkpoint = Checkpoint::open(Checkpoint::weight_files(dir).unwrap()).unwrap();
    let mut tensors: Vec<TensorBytes> = checkpoint
        .tensors
        .iter()
        .map(|(name, e)| TensorBytes {
            name: name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            bytes: checkpoint.bytes(e).to_vec().into(),
        })
        .collect();
    for (name, width) in names {
        tensors.push(TensorBytes {
            name: name.to_string(),
            dtype: bake::io::dtype::StoredDtype::F32,
            shape: vec![*width],
            bytes: vec![0; width * 4].into(),
        });
    }
    drop(checkpoint);
    write_checkpoint(dir, tensors, u64::MAX, &|_, _| {}).unwrap();
}

#[test]
fn mlp_biases_are_not_attention_biases() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    let spec = SyntheticSpec::default();
    add_biases(dir.path(), &[("model.layers.0.mlp.up_proj.bias", spec.intermediate)]);
    assert_eq!(inspect_json(dir.path())["has_attention_biases"], false);
    add_biases(dir.path(), &[("model.layers.0.self_attn.q_proj.bias", spec.heads * spec.head_dim)]);
    assert_eq!(inspect_json(dir.path())["has_attention_biases"], true);
}

#[test]
fn missing_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    common::edit_config(dir.path(), |c| {
        c.remove("intermediate_size");
    });
    assert_fails(dir.path(), &["config.json", "intermediate_size", "missing"]);
}

#[test]
fn shape_contradicting_the_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    common::edit_config(dir.path(), |c| {
        c.insert("intermediate_size".into(), 65.into());
    });
    assert_fails(dir.path(), &["model.safetensors", "mlp.gate_proj.weight", "shape [64, 32]", "[65, 32]"]);
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(dir.path(), &["model.safetensors", "not a valid safetensors file", "truncated"]);
}

#[test]
fn header_length_past_the_end_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_fails(dir.path(), &["model.safetensors", "header length"]);
}

#[test]
fn unsupported_dtype_is_reported_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    let header = br#"{"model.embed_tokens.weight":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[1, 2]);
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert_fails(dir.path(), &["model.safetensors", "I8", "bf16, f16 and f32"]);
}

#[test]
fn pickle_only_folder_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path());
    std::fs::rename(dir.path().join("model.safetensors"), dir.path().join("pytorch_model.bin")).unwrap();
    assert_fails(dir.path(), &["pickle", "safe_serialization=True"]);
}

#[test]
fn unknown_short_name_is_reported() {
    let out = Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--model", "llama9_chat_1T"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("unknown model `llama9_chat_1T`") && stderr.contains("bake models"), "{stderr}");
}

fn sharded(dir: &Path) {
    let spec = SyntheticSpec::default();
    write_synthetic_model(dir, &spec, 20_000).unwrap();
    assert!(dir.join("model.safetensors.index.json").exists());
}

#[test]
fn missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let shard = Checkpoint::weight_files(dir.path()).unwrap()[1].clone();
    std::fs::remove_file(&shard).unwrap();
    let name = shard.file_name().unwrap().to_string_lossy().into_owned();
    assert_fails(dir.path(), &["model.safetensors.index.json", &name, "missing"]);
}

#[test]
fn index_entry_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    sharded(dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap().replacen("\"model-00001", "\"../model-00001", 1);
    std::fs::write(&index, text).unwrap();
    assert_fails(dir.path(), &["model.safetensors.index.json", "weight_map", "outside the model folder"]);
}

fn last_token_outputs(dir: &Path, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let model = ModelFiles::open(dir.to_str().unwrap()).unwrap().load(&Device::Cpu).unwrap();
    let batch = Batch::right_padded(&[prompt.to_vec()], 0, &Device::Cpu).unwrap();
    let at = [prompt.len() - 1];
    let out = model.forward(&batch, &Request { capture_at: Some(&at), logits: true, ..Default::default() }).unwrap();
    let captured = out.captured.iter().map(|t| t.flatten_all().unwrap().to_vec1().unwrap()).collect();
    (captured, out.logits.unwrap().flatten_all().unwrap().to_vec1().unwrap())
}

#[test]
fn sharded_and_single_file_give_identical_results() {
    let single = tempfile::tempdir().unwrap();
    synthetic(single.path());
    let out = tempfile::tempdir().unwrap();
    common::reshard(single.path(), out.path(), 20_000);
    let shards = Checkpoint::weight_files(out.path()).unwrap();
    assert!(shards.len() > 1, "the model was not sharded");
    let prompt = [1u32, 5, 9, 17, 33, 65];
    assert_eq!(last_token_outputs(single.path(), &prompt), last_token_outputs(out.path(), &prompt));
}
