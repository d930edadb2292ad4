//! The layer-streamed activation pass captures what the resident pass captures, and a memory budget picks it.

mod common;

use std::process::Command;

use bake::activations::{capture, capture_streamed, tokenize, PackedPrompts};
use bake::data::{build_prompt_sets, TruthfulQa};
use bake::model::{ModelFiles, Site, TextTokenizer};
use bake::progress::Silent;
use candle_core::{DType, Device};

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn streamed_and_resident_passes_capture_the_same_activations() {
    let shared = common::shared_dir();
    let data = TruthfulQa::load("builtin", "validation", Some(6)).unwrap();
    let prompts = build_prompt_sets(&data, &bake::recipe::Recipe::shipped().prompts, 42);
    let texts = prompts.texts();
    // The tiny checkpoints share SmolLM2's vocabulary; tiny-llama3-rope ships no tokenizer of its own.
    let tokenizer = TextTokenizer::load(&shared.join("fixtures/tiny-gqa/tokenizer.json")).unwrap();
    let tokens = tokenize(&tokenizer, &texts).unwrap();
    for (name, dir, _) in common::reference_models() {
        let files = ModelFiles::open(dir.to_str().unwrap()).unwrap();
        let packed = PackedPrompts::new(&tokens, 100, 1, &Device::Cpu).unwrap();
        let resident = capture(&files.load(&Device::Cpu).unwrap(), &packed, Site::AttentionHeads, &Silent).unwrap();
        let streamed =
            capture_streamed(&files, (&Device::Cpu, DType::F32), Site::AttentionHeads, &packed, &Silent).unwrap();
        assert_eq!((streamed.rows, streamed.layers, streamed.width), (resident.rows, resident.layers, resident.width));
        let diff = common::max_abs_diff(streamed.data(), resident.data());
        eprintln!("{name}: {} prompts, streamed vs resident max |Δ| = {diff:e}", texts.len());
        assert!(diff <= 1e-6, "{name}: streamed activations differ by {diff}");
    }
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn a_memory_budget_picks_the_mode_or_refuses() {
    let shared = common::shared_dir();
    let tmp = tempfile::tempdir().unwrap();
    let plan = |budget: &str| {
        Command::new(env!("CARGO_BIN_EXE_bake"))
            .arg("--model")
            .arg(shared.join("fixtures/tiny-gqa"))
            .args(["--limit", "5", "--dry-run", "--max-memory", budget, "--out"])
            .arg(tmp.path().join("never"))
            .output()
            .unwrap()
    };
    let roomy = plan("8GB");
    let stdout = String::from_utf8_lossy(&roomy.stdout);
    assert!(roomy.status.success() && stdout.contains("\"mode\": \"resident\""), "{stdout}");
    // A budget between the two estimates the plan gives picks the streamed mode.
    let json: serde_json::Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    let (resident, streamed) = (json["resident_bytes"].as_u64().unwrap(), json["streamed_bytes"].as_u64().unwrap());
    // `device: auto` in the shipped recipe: the CPU here, in f32, and the plan says so.
    assert_eq!(
        (json["device"].as_str(), json["dtype"].as_str(), json["memory"].as_str()),
        (Some("cpu"), Some("f32"), Some("host"))
    );
    let batch_tokens = json["batch_tokens"].as_u64().unwrap();
    assert!(batch_tokens >= 64 && batch_tokens.is_multiple_of(64), "{json}");
    assert!(stdout.contains(&format!("batches of ≤ {batch_tokens} tokens; on cpu in f32")), "{stdout}");
    assert!(streamed < resident, "streaming should need less memory: {json}");
    let tight_budget = format!("{}", streamed);
    let tight = plan(&tight_budget);
    assert!(tight.status.success(), "{}", String::from_utf8_lossy(&tight.stderr));
    assert!(
        String::from_utf8_lossy(&tight.stdout).contains("\"mode\": \"streamed\""),
        "{}",
        String::from_utf8_lossy(&tight.stdout)
    );
    let too_small = plan("50MB");
    let stderr = String::from_utf8_lossy(&too_small.stderr);
    assert_eq!(too_small.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("memory budget of 0.05 GB") && stderr.contains("streamed about"), "{stderr}");
    assert!(!tmp.path().join("never").exists());

    // A real bake under the tight budget streams and verifies.
    let out = tmp.path().join("baked");
    let base = common::bake_tiny(&out, &["--limit", "5", "--heads", "4", "--max-memory", &tight_budget, "--no-cache"]);
    let verify = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("verify")
        .arg(&out)
        .arg("--base")
        .arg(&base)
        .arg("--run")
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

/// Every file of a folder but `bake.log` (timings), with its bytes.
fn bake_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = common::files_of(dir);
    files.remove("bake.log");
    files
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn without_a_budget_the_machines_memory_picks_the_mode_and_no_byte_changes() {
    let shared = common::shared_dir();
    let tmp = tempfile::tempdir().unwrap();
    let tiny = shared.join("fixtures/tiny-gqa");
    // BAKE_AVAILABLE_MEMORY stands in for what /proc/meminfo or the cgroup say.
    let bake = |available: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bake"))
            .arg("--model")
            .arg(&tiny)
            .args(["--limit", "5", "--heads", "4", "--no-cache"])
            .args(extra)
            .env("BAKE_AVAILABLE_MEMORY", available)
            .env("BAKE_CACHE_DIR", tmp.path().join("cache"))
            .output()
            .unwrap()
    };
    // --dry-run needs no --out, and says what this machine would do.
    let dry = bake("8GB", &["--dry-run"]);
    let stdout = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success() && stdout.contains("≤ 8.00 GB available"), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).unwrap();
    assert_eq!(json["budget_source"], "available", "{json}");
    let streamed = json["streamed_bytes"].as_u64().unwrap();

    // Too little memory: refused before the activation pass, naming both estimates and what is available.
    let out = tmp.path().join("refused");
    let run = bake("50MB", &["--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    for needle in ["0.05 GB of host memory available", "resident about", "layer-streamed about", "try "] {
        assert!(stderr.contains(needle), "`{needle}` not in {stderr}");
    }
    assert!(!out.exists() && !stderr.contains("probes"), "{stderr}");

    // Between the estimates, the machine's memory picks streaming; the bytes are the forced run's and the
    // resident run's.
    let between = streamed.to_string();
    let folders: Vec<_> = [
        ("available-streamed", between.as_str(), vec![], "layer-streamed"),
        ("forced-streamed", "8GB", vec!["--max-memory", between.as_str()], "layer-streamed"),
        ("resident", "8GB", vec![], "resident (all layers loaded)"),
    ]
    .into_iter()
    .map(|(name, available, extra, mode)| {
        let out = tmp.path().join(name);
        let run = bake(available, &[&extra[..], &["--out", out.to_str().unwrap()]].concat());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success() && stderr.contains(mode), "{name}: {stderr}");
        // The cost is measured only where its scoring pass fits: not within the streamed estimate of this
        // tiny model with a 49,152-token vocabulary (its logits outweigh the weights), so the card and bake.json,
        // which carry it, are compared apart from the rest.
        let mut files = bake_files(&out);
        files.remove("README.md");
        files.remove("bake.json");
        files
    })
    .collect();
    assert!(folders[0].len() > 10);
    assert!(folders[0] == folders[1] && folders[1] == folders[2], "the mode changed an output byte");
}
