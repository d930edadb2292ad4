//! Fuzzing, on stable Rust, of every reader that takes untrusted bytes: the safetensors header and index
//! reader, the recipe parser and the manifest reader. Inputs are random bytes and mutations of valid files
//! (the mutations reach deep into the parsers, random bytes test the first checks). Each must return `Ok`
//! or a clean `Err` naming the file: never panic, hang or allocate without bound.
//!
//! `FUZZ_CASES` sets the number of cases per target (default 5000; CI runs the default).

use std::path::Path;

use bake::io::listing::FileListing;
use bake::model::Checkpoint;
use bake::recipe::Recipe;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn runner() -> TestRunner {
    let cases = std::env::var("FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(5000);
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
}

/// An edit of a valid input: overwrite, insert or delete bytes at a position, or cut the input short.
#[derive(Debug, Clone)]
enum Edit {
    Overwrite(usize, Vec<u8>),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let bytes = || proptest::collection::vec(any::<u8>(), 1..16);
    let edit = prop_oneof![
        (any::<usize>(), bytes()).prop_map(|(at, b)| Edit::Overwrite(at, b)),
        (any::<usize>(), bytes()).prop_map(|(at, b)| Edit::Insert(at, b)),
        (any::<usize>(), 1..64usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ];
    proptest::collection::vec(edit, 1..4)
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit], focus: usize) -> Vec<u8> {
    // Positions fall in the first `focus` bytes (the header) most of the time, where the parsers look.
    for edit in edits {
        let span = focus.min(bytes.len()).max(1);
        match edit {
            Edit::Overwrite(at, new) => {
                let at = at % span;
                for (i, b) in new.iter().enumerate() {
                    if let Some(x) = bytes.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            Edit::Insert(at, new) => {
                let at = (at % span).min(bytes.len());
                bytes.splice(at..at, new.iter().copied());
            }
            Edit::Delete(at, n) => {
                let at = (at % span).min(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            Edit::Truncate(at) => bytes.truncate(at % (bytes.len() + 1)),
        }
    }
    bytes
}

/// A small valid safetensors file as bake writes it.
fn valid_safetensors(dir: &Path) -> Vec<u8> {
    let spec = bake::model::synthetic::SyntheticSpec {
        layers: 1,
        hidden: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        intermediate: 8,
        vocab: 8,
        ..Default::default()
    };
    bake::model::synthetic::write_synthetic_model(dir, &spec, u64::MAX).unwrap();
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn the_safetensors_header_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let valid = valid_safetensors(dir.path());
    let header_len = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize + 8;
    let path = dir.path().join("fuzzed.safetensors");
    let mutated = (edits(), any::<bool>())
        .prop_map(move |(e, whole)| apply(valid.clone(), &e, if whole { usize::MAX } else { header_len }));
    let random = proptest::collection::vec(any::<u8>(), 0..256);
    runner()
        .run(&prop_oneof![4 => mutated, 1 => random], |bytes| {
            std::fs::write(&path, &bytes).unwrap();
            if let Err(e) = Checkpoint::open(vec![path.clone()]) {
                prop_assert!(e.to_string().contains("fuzzed.safetensors"), "{e}");
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_shard_index_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let spec = bake::model::synthetic::SyntheticSpec::default();
    bake::model::synthetic::write_synthetic_model(dir.path(), &spec, 20_000).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    let valid = std::fs::read(&index).unwrap();
    runner()
        .run(&edits().prop_map(move |e| apply(valid.clone(), &e, usize::MAX)), |bytes| {
            std::fs::write(&index, &bytes).unwrap();
            if let Err(e) = Checkpoint::weight_files(dir.path()).and_then(Checkpoint::open) {
                let text = e.to_string();
                prop_assert!(text.contains("model.safetensors") || text.contains("model-0"), "{text}");
            }
            Ok(())
        })
        .unwrap();
}

/// YAML-looking fragments, so that mutations make structure (nesting, flow collections, anchors, tags)
/// and not only bad characters.
fn yaml_fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(&b"["[..]),
        Just(&b"]"[..]),
        Just(&b"{"[..]),
        Just(&b"}"[..]),
        Just(&b"\n  - "[..]),
        Just(&b": "[..]),
        Just(&b"&a "[..]),
        Just(&b"*a"[..]),
        Just(&b"!!binary "[..]),
        Just(&b"\"{question}\""[..]),
        Just(&b"{other_question}"[..]),
        Just(&b"\nheads: 48\n"[..]),
        Just(&b"1e999"[..]),
        Just(&b"-1"[..]),
        Just(&b"null"[..]),
        Just(&b"\t"[..]),
    ]
    .prop_map(<[u8]>::to_vec)
}

#[test]
fn the_recipe_parser_never_panics() {
    let shipped = bake::recipe::SHIPPED.as_bytes().to_vec();
    let structural = proptest::collection::vec((any::<usize>(), yaml_fragment()), 1..8).prop_map({
        let shipped = shipped.clone();
        move |inserts| {
            let mut text = shipped.clone();
            for (at, fragment) in inserts {
                let at = at % (text.len() + 1);
                text.splice(at..at, fragment);
            }
            text
        }
    });
    let mutated = edits().prop_map(move |e| apply(shipped.clone(), &e, usize::MAX));
    let random = proptest::collection::vec(any::<u8>(), 0..512);
    runner()
        .run(&prop_oneof![2 => structural, 2 => mutated, 1 => random], |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = Recipe::parse(Path::new("fuzzed.yaml"), &text) {
                prop_assert!(e.to_string().starts_with("fuzzed.yaml"), "{e}");
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_manifest_reader_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("baked");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("README.md"), "card").unwrap();
    let valid = serde_json::to_vec_pretty(&serde_json::json!({
        "tool": "bake", "tool_version": "0.1.0", "dtype": "bf16", "heads": [[0, 1]],
        "outputs": { "README.md": { "sha256": bake::io::hash::sha256_file(&folder.join("README.md")).unwrap(), "bytes": 4 },
                     "activation_diff/config.json": { "sha256": "00", "bytes": 2 } }
    }))
    .unwrap();
    let manifest = folder.join("bake.json");
    runner()
        .run(&edits().prop_map(move |e| apply(valid.clone(), &e, usize::MAX)), |bytes| {
            std::fs::write(&manifest, &bytes).unwrap();
            let _ = FileListing::read(&folder);
            // The whole self-consistency check reads the manifest as `bake verify DIR` does.
            let options = bake::verify::VerifyOptions::default();
            if let Err(e) = bake::verify::verify(&folder, &options, &bake::progress::Silent) {
                prop_assert!(e.to_string().contains("bake.json"), "{e}");
            }
            Ok(())
        })
        .unwrap();
}
