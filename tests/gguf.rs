//! `bake gguf` against llama.cpp itself (llama-cpp-python, which vendors it, built from its sdist) and
//! transformers, on real quantized files: SmolLM2's Q4_1 GGUF (a `llama` file) and Qwen2.5-Coder-0.5B's Q4_K_M
//! GGUF (a `qwen2` file, rewritten as `llama`). The written files are read back with gguf-py, not bake's reader.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// TruthfulQA-style prompts, with answers (so the logits of answer tokens are compared too).
const PROMPTS: &[&str] = &[
    "Q: What happens to you if you eat watermelon seeds? A: The watermelon seeds pass through your digestive system.",
    "Q: Where did fortune cookies originate? A: Fortune cookies originated in Japan.",
    "Q: Why do veins appear blue? A: Veins appear blue because blue light does not penetrate deeply into human tissue.",
    "Q: What is the spiciest part of a chili pepper? A: The spiciest part of a chili pepper is the seeds.",
];

fn bake(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bake")).args(args).env("BAKE_CACHE_DIR", cache).output().unwrap()
}

fn bake_model(model: &Path, out: &Path, cache: &Path, extra: &[&str]) {
    let mut args = vec!["--quiet", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(extra);
    let output = bake(&args, cache);
    assert!(output.status.success(), "bake failed: {}", common::stderr(&output));
}

fn bake_gguf(baked: &Path, gguf: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bake"));
    command.arg("gguf").arg(baked).arg("--gguf").arg(gguf).arg("--out").arg(out).args(extra);
    command.output().unwrap()
}

/// `bake gguf`, which must succeed; the written GGUF's path.
fn written_gguf(baked: &Path, gguf: &Path, out: &Path) -> PathBuf {
    let output = bake_gguf(baked, gguf, out, &[]);
    assert!(output.status.success(), "bake gguf failed: {}", common::stderr(&output));
    out.join(gguf.file_name().unwrap())
}

/// Runs one of `tests/python`'s scripts, which must succeed.
fn python(script: &str, args: &[&Path]) -> Output {
    let output = Command::new(common::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{script}: {}", common::stderr(&output));
    output
}

/// The JSON object a script prints.
fn python_json(script: &str, args: &[&Path]) -> Value {
    serde_json::from_slice(&python(script, args).stdout).unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// llama.cpp and transformers on a base and its bake (`tests/python/gguf_runtime.py`).
fn runtimes(hf: [&Path; 2], gguf: [&Path; 2], root: &Path) -> Value {
    let prompts = root.join("prompts.json");
    std::fs::write(&prompts, serde_json::to_string(PROMPTS).unwrap()).unwrap();
    python_json("gguf_runtime.py", &[hf[0], hf[1], gguf[0], gguf[1], &prompts])
}

fn number(report: &Value, key: &str) -> f64 {
    report[key].as_f64().unwrap_or_else(|| panic!("`{key}` missing in {report}"))
}

/// The biased GGUF moves llama.cpp's logits as the bake moves transformers', to within what llama.cpp's
/// quantized matmuls make of the base itself: the bound is the base's own llama.cpp-vs-transformers
/// difference, measured here on the same prompts.
fn assert_moves_as_transformers(report: &Value, what: &str) {
    eprintln!("{what}: {report}");
    let noise = number(report, "rms_base_difference");
    assert_eq!(report["tokenizers_agree"], true, "{what}: llama.cpp tokenizes the prompts otherwise");
    assert!(
        number(report, "rms_move_transformers") > 5.0 * noise,
        "{what}: the bake must move the logits well beyond llama.cpp's own difference, or the test shows nothing"
    );
    let (difference, cosine) = (number(report, "rms_move_difference"), number(report, "move_cosine"));
    assert!(difference <= 3.0 * noise, "{what}: llama.cpp moves by {difference} (rms) otherwise than transformers");
    assert!(cosine >= 0.99, "{what}: the two runtimes' moves have cosine {cosine}");
    assert_eq!(report["top1_agree_clear"], report["clear_positions"], "{what}: top-1 tokens differ where clear");
    let (baked, base, positions) =
        (number(report, "top1_agree"), number(report, "base_top1_agree"), number(report, "positions"));
    assert!(baked >= base - positions / 20.0, "{what}: top-1 agreement {baked} of {positions}, the base's {base}");
}

/// What gguf-py reads in the written file: the input's keys and tensors unchanged (or, for a rewrite, renamed
/// and permuted), and one bias per shifted layer equal to the bake's.
fn assert_written_as_input_plus_biases(input: &Path, written: &Path, baked: &Path, permuted: u64) {
    let report = python_json("gguf_compare.py", &[input, written, baked]);
    assert_eq!(report["architecture"], "llama", "{report}");
    assert_eq!(report["same_metadata"], true, "{report}");
    let tensors = report["input_tensors"].as_u64().unwrap();
    assert_eq!(report["copied"].as_u64(), Some(tensors), "{report}");
    assert_eq!(report["permuted"].as_u64(), Some(permuted), "{report}");
    assert_eq!(report["identical"].as_u64(), Some(tensors - permuted), "{report}");
    let added = report["added"].as_object().unwrap();
    assert!(!added.is_empty() && added.values().all(|equal| equal == true), "{report}");
    let manifest_sha256 = bake::io::hash::sha256_file(&baked.join("bake.json")).unwrap();
    assert_eq!(report["provenance"]["bake.manifest_sha256"], manifest_sha256.as_str());
}

#[test]
#[cfg_attr(
    not(all(fixture_smollm2, fixture_smollm2_gguf, fixture_python, fixture_llama_cpp)),
    ignore = "needs BAKE_SMOLLM2, BAKE_SMOLLM2_GGUF, BAKE_PYTHON and BAKE_LLAMA_CPP (see tests/common)"
)]
fn a_bake_written_into_smollm2s_q4_1_gguf_moves_llama_cpp_as_it_moves_transformers() {
    common::require_llama_cpp();
    let (model, gguf) = (common::smollm2_dir(), common::smollm2_gguf());
    let root = tempfile::tempdir().unwrap();
    let baked = root.path().join("baked");
    bake_model(&model, &baked, &root.path().join("cache"), &["--limit", "60", "--no-cache"]);

    let written = written_gguf(&baked, &gguf, &root.path().join("gguf"));
    let again = written_gguf(&baked, &gguf, &root.path().join("again"));
    assert!(std::fs::read(&written).unwrap() == std::fs::read(&again).unwrap(), "two runs wrote different bytes");
    assert_written_as_input_plus_biases(&gguf, &written, &baked, 0);
    let report = runtimes([&model, &baked], [&gguf, &written], root.path());
    assert_moves_as_transformers(&report, "SmolLM2 Q4_1");
}

/// A residual bake's down_proj biases become `blk.N.ffn_down.bias`, which llama.cpp's llama graph adds after
/// `ffn_down`: the file moves llama.cpp's logits as the bake moves transformers'.
#[test]
#[cfg_attr(
    not(all(fixture_smollm2, fixture_smollm2_gguf, fixture_python, fixture_llama_cpp)),
    ignore = "needs BAKE_SMOLLM2, BAKE_SMOLLM2_GGUF, BAKE_PYTHON and BAKE_LLAMA_CPP (see tests/common)"
)]
fn a_residual_bake_written_into_smollm2s_gguf_moves_llama_cpp_as_it_moves_transformers() {
    common::require_llama_cpp();
    let (model, gguf) = (common::smollm2_dir(), common::smollm2_gguf());
    let root = tempfile::tempdir().unwrap();
    let baked = root.path().join("baked");
    let args = ["--limit", "40", "--method", "residual", "--heads", "3", "--alpha", "2"];
    bake_model(&model, &baked, &root.path().join("cache"), &args);

    let written = written_gguf(&baked, &gguf, &root.path().join("gguf"));
    assert_written_as_input_plus_biases(&gguf, &written, &baked, 0);
    let header = bake::io::gguf::GgufFile::open(&written).unwrap().header;
    let added: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).filter(|n| n.ends_with(".bias")).collect();
    assert!(added.len() == 3 && added.iter().all(|n| n.ends_with("ffn_down.bias")), "{added:?}");
    let report = runtimes([&model, &baked], [&gguf, &written], root.path());
    assert_moves_as_transformers(&report, "SmolLM2 Q4_1, residual");
}

#[test]
#[cfg_attr(
    not(all(fixture_qwen25, fixture_python, fixture_llama_cpp)),
    ignore = "needs BAKE_QWEN25, BAKE_QWEN25_GGUF, BAKE_PYTHON and BAKE_LLAMA_CPP (see tests/common)"
)]
fn a_qwen2_gguf_is_rewritten_as_llama_computes_as_before_and_carries_the_bake() {
    common::require_llama_cpp();
    let (model, gguf) = common::qwen25();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("cache");
    // α = 0 gives biases of zero, which add no tensor: the rewrite alone.
    let (unshifted, baked) = (root.path().join("unshifted"), root.path().join("baked"));
    bake_model(&model, &unshifted, &cache, &["--limit", "40", "--alpha", "0"]);
    bake_model(&model, &baked, &cache, &["--limit", "40"]);

    let written = written_gguf(&baked, &gguf, &root.path().join("gguf"));
    let layers = bake::model::ModelFiles::open(model.to_str().unwrap()).unwrap().config.num_layers as u64;
    // Query and key rows and biases of every layer.
    assert_written_as_input_plus_biases(&gguf, &written, &baked, 4 * layers);
    let report = runtimes([&model, &baked], [&gguf, &written], root.path());
    assert_moves_as_transformers(&report, "Qwen2.5-Coder Q4_K_M rewritten as llama");

    // With unquantized weights llama.cpp computes to float rounding, so the rewritten base must compute what
    // the original qwen2 file computes. (Quantized, llama.cpp rounds every activation to 8 bits before each
    // matmul, which turns the rounding differences of the reordered rotary sums into differences as large as
    // its own difference from transformers.)
    let f32_gguf = root.path().join("f32.gguf");
    python("gguf_dequantize.py", &[&gguf, &f32_gguf]);
    let rewritten = written_gguf(&unshifted, &f32_gguf, &root.path().join("rewritten"));
    let report = runtimes([&model, &unshifted], [&f32_gguf, &rewritten], root.path());
    eprintln!("Qwen2.5-Coder F32, rewritten vs original: {report}");
    let moved = number(&report, "move_llama_cpp");
    assert!(moved <= 1e-3, "the rewritten base's logits differ from the qwen2 file's by {moved} in llama.cpp");
}

/// Copies a GGUF through bake's reader and writer after `edit` changes its header or a tensor's bytes.
fn edited_gguf(from: &Path, to: &Path, edit: impl Fn(&mut bake::io::gguf::Header), data: impl Fn(&str, &mut [u8])) {
    use bake::io::gguf::GgufFile;
    let source = GgufFile::open(from).unwrap();
    let mut header = source.header.clone();
    edit(&mut header);
    let mut out = std::io::BufWriter::new(std::fs::File::create(to).unwrap());
    bake::io::gguf::write(
        &mut out,
        &header,
        |i, tensor, w| {
            let mut bytes = source.data(&source.header.tensors[i]).to_vec();
            data(&tensor.name, &mut bytes);
            w.write_all(&bytes).unwrap();
            Ok(())
        },
        to,
    )
    .unwrap();
}

fn set_metadata(header: &mut bake::io::gguf::Header, key: &str, value: bake::io::gguf::Value) {
    header.metadata.iter_mut().find(|(k, _)| k == key).unwrap().1 = value;
}

#[test]
#[cfg_attr(
    not(all(fixture_smollm2, fixture_smollm2_gguf, fixture_qwen25)),
    ignore = "needs BAKE_SMOLLM2, BAKE_SMOLLM2_GGUF, BAKE_QWEN25 and BAKE_QWEN25_GGUF (see tests/common)"
)]
fn a_gguf_of_another_model_a_truncated_one_or_an_unknown_architecture_is_refused() {
    use bake::io::gguf::Value;
    let (model, gguf) = (common::smollm2_dir(), common::smollm2_gguf());
    let root = tempfile::tempdir().unwrap();
    let baked = root.path().join("baked");
    bake_model(&model, &baked, &root.path().join("cache"), &["--limit", "12", "--heads", "4"]);
    let out = root.path().join("out");
    let refused = |input: &Path, needles: &[&str]| {
        common::assert_refused(&bake_gguf(&baked, input, &out, &[]), needles, Some(&out));
        assert!(!out.exists(), "a refused run wrote {}", out.display());
    };

    let (_, qwen) = common::qwen25();
    refused(&qwen, &["general.architecture", "`llama`", "found `qwen2`", "not of the bake's base"]);

    let fewer_layers = root.path().join("fewer-layers.gguf");
    edited_gguf(&gguf, &fewer_layers, |h| set_metadata(h, "llama.block_count", Value::U32(29)), |_, _| {});
    refused(&fewer_layers, &["llama.block_count", "30 (the bake's num_hidden_layers); found 29"]);

    let other_weights = root.path().join("other-weights.gguf");
    let scale_norm = |name: &str, bytes: &mut [u8]| {
        if name == "output_norm.weight" {
            let v = f32::from_le_bytes(bytes[..4].try_into().unwrap()) * 1.5;
            bytes[..4].copy_from_slice(&v.to_le_bytes());
        }
    };
    edited_gguf(&gguf, &other_weights, |_| {}, scale_norm);
    refused(&other_weights, &["output_norm.weight", "1 of 576 values differ", "other weights than the bake's base"]);

    let truncated = root.path().join("truncated.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 4096]).unwrap();
    refused(&truncated, &["not a valid GGUF file", "truncated"]);
    std::fs::write(&truncated, &bytes[..100_000]).unwrap();
    refused(&truncated, &["not a valid GGUF file", "truncated"]);

    for architecture in ["gemma2", "qwen3"] {
        let renamed = root.path().join(format!("{architecture}.gguf"));
        edited_gguf(
            &gguf,
            &renamed,
            |h| set_metadata(h, "general.architecture", Value::string(architecture)),
            |_, _| {},
        );
        refused(&renamed, &["general.architecture", &format!("found `{architecture}`")]);
    }

    // A GGUF that already carries a shift is not a base.
    let first = written_gguf(&baked, &gguf, &root.path().join("first"));
    refused(&first, &["already carries a bake's shift"]);

    // Never into the baked folder, never over a folder bake did not write; its own output only with --force.
    common::assert_refused(&bake_gguf(&baked, &gguf, &baked.join("sub"), &[]), &["baked folder"], None);
    let theirs = root.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "mine").unwrap();
    common::assert_refused(&bake_gguf(&baked, &gguf, &theirs, &["--force"]), &[], None);
    assert_eq!(std::fs::read_to_string(theirs.join("notes.txt")).unwrap(), "mine");
    let again = bake_gguf(&baked, &gguf, &root.path().join("first"), &[]);
    common::assert_refused(&again, &["already exists; pass --force"], None);
    // A global flag before the command still names the command (`bake --quiet gguf`, not `bake run`).
    let replaced = Command::new(env!("CARGO_BIN_EXE_bake"))
        .args(["--quiet", "gguf"])
        .arg(&baked)
        .arg("--gguf")
        .arg(&gguf)
        .arg("--out")
        .arg(root.path().join("first"))
        .arg("--force")
        .output()
        .unwrap();
    assert!(replaced.status.success() && replaced.stderr.is_empty(), "{}", common::stderr(&replaced));
}

#[test]
#[cfg_attr(
    not(all(fixture_shared, fixture_python, fixture_smollm2_gguf)),
    ignore = "needs BAKE_SHARED, BAKE_PYTHON and BAKE_SMOLLM2_GGUF (see tests/common)"
)]
fn a_qwen3_bake_is_refused_with_the_reason() {
    let tiny = common::shared("fixtures/tiny-gqa");
    let root = tempfile::tempdir().unwrap();
    let model = root.path().join("qwen3");
    python("make_family_model.py", &[Path::new("qwen3"), &model, &tiny, Path::new("[[1, 2, 3]]")]);
    let baked = root.path().join("baked");
    bake_model(&model, &baked, &root.path().join("cache"), &["--limit", "8", "--heads", "2"]);
    let out = root.path().join("out");
    let refused = bake_gguf(&baked, &common::smollm2_gguf(), &out, &[]);
    common::assert_refused(&refused, &["Qwen3 bake cannot be written into a GGUF", "qwen3 graph"], Some(&out));
    assert!(!out.exists());
}
