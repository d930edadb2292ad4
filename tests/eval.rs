//! `bake eval`: MC1/MC2 and CE agree with an independent transformers computation; a baked model scores
//! as the base with the shift hooked at every position; the shared-prefix forward equals the full one; bad
//! inputs get clear errors.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use bake::data::TruthfulQa;
use bake::model::{Batch, Mode, ModelFiles, Request, Runner, Site};
use bake::progress::Silent;
use bake::scoring::logprobs::{self, Hook, HookMode, Variant};
use bake::scoring::mc::{self, AnswerTokens, Protocol};
use candle_core::{DType, Device};
use serde_json::Value;

/// A strong shift on a few heads, so the bake visibly moves the scores.
const TINY_BAKE: &[&str] = &["--limit", "12", "--heads", "6", "--alpha", "40"];

fn bake_eval(model: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("eval")
        .arg("--model")
        .arg(model)
        .args(extra)
        .env("BAKE_CACHE_DIR", std::env::temp_dir().join("bake-test-cache"))
        .output()
        .unwrap()
}

fn eval_json(model: &Path, extra: &[&str]) -> Value {
    let out = bake_eval(model, &[extra, &["--json"]].concat());
    assert!(out.status.success(), "bake eval failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[cfg_attr(
    not(all(fixture_shared, fixture_smollm2, fixture_python)),
    ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 and BAKE_PYTHON (see tests/common)"
)]
fn smollm2_scores_agree_with_transformers() {
    let (shared, model, python) = (common::shared_dir(), common::smollm2_dir(), common::python());
    let corpus = shared.join("data/wikitext2/test.jsonl");
    let limit = "8";
    let ours = eval_json(&model, &["--limit", limit, "--corpus", corpus.to_str().unwrap(), "--documents", "6"]);
    let picked = ours["documents_picked"].to_string();
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/eval_reference.py"))
        .arg(&model)
        .arg(shared.join("data/truthfulqa"))
        .args([limit, corpus.to_str().unwrap(), &picked, "128"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference: Value = serde_json::from_slice(&out.stdout).unwrap();
    let base = &ours["rows"][0];
    for protocol in ["reference", "leaderboard"] {
        for metric in ["mc1", "mc2"] {
            let (a, b) =
                (base["mc"][protocol][metric].as_f64().unwrap(), reference[protocol][metric].as_f64().unwrap());
            eprintln!("{protocol} {metric}: bake {a:.6}, transformers {b:.6}");
            assert!((a - b).abs() <= 0.005, "{protocol} {metric}: bake {a}, transformers {b}");
        }
        assert_eq!(base["mc"][protocol]["questions"], 8);
    }
    let (a, b) = (base["ce"].as_f64().unwrap(), reference["ce"].as_f64().unwrap());
    eprintln!("ce: bake {a:.6}, transformers {b:.6}");
    assert!((a - b).abs() <= 0.01, "CE: bake {a}, transformers {b}");
    assert_eq!(base["kl"], 0.0);
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn the_shared_prefix_forward_and_its_prefix_tree_equal_the_full_forward() {
    for (name, dir, _) in common::reference_models() {
        let model = ModelFiles::open(dir.to_str().unwrap()).unwrap().load(&Device::Cpu).unwrap();
        let vocab = model.config.vocab_size as u32;
        let prefix_ids: Vec<u32> = (0..9).map(|i| (i * 37 + 5) % vocab).collect();
        // The tails share their first token, so as a prefix tree they hold 4 tokens, not 5.
        let tails: Vec<Vec<u32>> = vec![vec![11 % vocab, 12 % vocab, 13 % vocab], vec![11 % vocab, 7 % vocab]];
        let prefix_batch = Batch::right_padded(std::slice::from_ref(&prefix_ids), 0, &Device::Cpu).unwrap();
        let prefix =
            model.forward(&prefix_batch, &Request { keep_kv: true, ..Default::default() }).unwrap().prefix.unwrap();
        let tail_batch = Batch::right_padded(&tails, 0, &Device::Cpu).unwrap();
        let with_prefix =
            model.forward(&tail_batch, &Request { prefix: Some(&prefix), logits: true, ..Default::default() }).unwrap();
        let (tree, last) = Batch::prefix_tree(&tails, &Device::Cpu).unwrap();
        assert_eq!(tree.len(), 4);
        let as_tree =
            model.forward(&tree, &Request { prefix: Some(&prefix), logits: true, ..Default::default() }).unwrap();
        for (row, tail) in tails.iter().enumerate() {
            let full: Vec<u32> = prefix_ids.iter().chain(tail).copied().collect();
            let batch = Batch::right_padded(std::slice::from_ref(&full), 0, &Device::Cpu).unwrap();
            let whole = model.forward(&batch, &Request { logits: true, ..Default::default() }).unwrap().logits.unwrap();
            let path = tree.tree_path(last[row]);
            for (i, _) in tail.iter().enumerate() {
                let b: Vec<f32> = whole.get(0).unwrap().get(prefix_ids.len() + i).unwrap().to_vec1().unwrap();
                let a: Vec<f32> =
                    with_prefix.logits.as_ref().unwrap().get(row).unwrap().get(i).unwrap().to_vec1().unwrap();
                let diff = common::max_abs_diff(&a, &b);
                assert!(diff < 1e-4, "{name}: tail {row} position {i}: prefix forward differs by {diff}");
                let t: Vec<f32> =
                    as_tree.logits.as_ref().unwrap().get(0).unwrap().get(path[i]).unwrap().to_vec1().unwrap();
                let diff = common::max_abs_diff(&t, &b);
                assert!(diff < 1e-4, "{name}: tail {row} position {i}: prefix-tree forward differs by {diff}");
            }
        }
    }
}

/// δ per layer from the baked folder's safetensors twin.
fn baked_deltas(dir: &Path, layers: usize) -> bake::probes::Deltas {
    let twin = bake::model::Checkpoint::open(vec![dir.join("activation_diff.safetensors")]).unwrap();
    let deltas = (0..layers)
        .map(|l| {
            let name = format!("layers.{l}.self_attn.o_proj.input.delta");
            twin.get(&name).map(|_| {
                twin.load_f32(&name, &[twin.get(&name).unwrap().shape[0]], &Device::Cpu).unwrap().to_vec1().unwrap()
            })
        })
        .collect();
    bake::probes::Deltas(deltas)
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn a_baked_model_scores_as_the_base_with_the_hook_at_every_position() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("baked");
    let base_dir = common::bake_tiny(&out, TINY_BAKE);
    let base_files = ModelFiles::open(base_dir.to_str().unwrap()).unwrap();
    let baked_files = ModelFiles::open(out.to_str().unwrap()).unwrap();
    let tokenizer = base_files.tokenizer().unwrap();
    let base = Runner::load(&base_files, &Device::Cpu, DType::F32, Mode::Resident).unwrap();
    let streamed = Runner::load(&base_files, &Device::Cpu, DType::F32, Mode::Streamed).unwrap();
    let baked = Runner::load(&baked_files, &Device::Cpu, DType::F32, Mode::Resident).unwrap();
    let biases = baked_files.site_biases(Site::AttentionHeads, &Device::Cpu, DType::F32).unwrap();
    let documents: Vec<Vec<u32>> = ["The capital of France is Paris.", "Bees make honey from the nectar of flowers."]
        .iter()
        .map(|t| tokenizer.encode(t).unwrap())
        .collect();
    let language = |runner: &Runner, edited: &[Variant]| {
        logprobs::language_scores(runner, edited, &documents, 2, 0, &Silent).unwrap()
    };
    let one_model = language(&base, &[Variant::baked(Site::AttentionHeads, &biases)]);
    assert_eq!(one_model.1[0].ce, language(&baked, &[]).0.ce, "CE of the bake, run as base + biases and loaded whole");
    assert!(one_model.1[0].kl > 0.0);
    assert_eq!(
        language(&streamed, &[Variant::baked(Site::AttentionHeads, &biases)]),
        one_model,
        "CE and KL, layer-streamed and resident"
    );
    let deltas = baked_deltas(&out, base_files.config.num_layers);
    assert!(deltas.iter().any(Option::is_some));
    let every = Hook::new(&deltas, (Site::AttentionHeads, HookMode::EveryPosition), &Device::Cpu).unwrap();
    let from_end = Hook::new(&deltas, (Site::AttentionHeads, HookMode::FromPromptEnd), &Device::Cpu).unwrap();
    let data = TruthfulQa::load("builtin", "validation", Some(12)).unwrap();
    let questions: Vec<usize> = (0..12).collect();
    for protocol in [Protocol::Reference, Protocol::Leaderboard] {
        let set =
            mc::build(protocol, &data, &questions, &tokenizer, mc::INSTRUCTION_DEFAULT, AnswerTokens::Offsets).unwrap();
        let score = |runner: &Runner, v: Variant| logprobs::score_items(runner, v, &set.items, 8, 0, &Silent).unwrap();
        let plain = score(&base, Variant::plain());
        let hooked = score(&base, Variant::hooked(&every));
        let from_prompt_end = score(&base, Variant::hooked(&from_end));
        let direct = score(&baked, Variant::plain());
        // One model in memory: the base's weights with the bake's o_proj biases are the bake, bit for bit.
        assert_eq!(
            score(&base, Variant::baked(Site::AttentionHeads, &biases)),
            direct,
            "{protocol:?}: one model differs from two"
        );
        // Layer by layer, each batch goes through the same steps: the same scores to the last bit.
        for (name, variant, resident) in [
            ("base", Variant::plain(), &plain),
            ("hook at every position", Variant::hooked(&every), &hooked),
            ("hook from the prompt's end", Variant::hooked(&from_end), &from_prompt_end),
            ("bake", Variant::baked(Site::AttentionHeads, &biases), &direct),
        ] {
            assert_eq!(&score(&streamed, variant), resident, "{protocol:?}, {name}: streamed differs from resident");
        }
        let worst = common::zip_exact(&hooked, &direct).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let moved = common::zip_exact(&plain, &direct).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        let hook_moved = common::zip_exact(&from_prompt_end, &hooked).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        eprintln!(
            "{protocol:?}: baked vs hooked {worst:.2e}; baked vs base {moved:.3}; hook modes differ by {hook_moved:.3}"
        );
        assert!(worst < 1e-3, "{protocol:?}: baked and hooked scores differ by {worst}");
        assert!(moved > 100.0 * worst.max(1e-6), "{protocol:?}: the bake did not move the scores ({moved})");
        assert!(hook_moved > 100.0 * worst.max(1e-6), "{protocol:?}: the two hook modes should differ ({hook_moved})");
        let (a, b) = (set.combine(&hooked), set.combine(&direct));
        assert_eq!(a.mc1, b.mc1);
        assert!(common::zip_exact(&a.mc2, &b.mc2).all(|(x, y)| (x - y).abs() < 1e-4));
    }
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn bad_inputs_get_clear_errors() {
    let shared = common::shared_dir();
    let tiny = shared.join("fixtures/tiny-gqa");
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.jsonl");
    common::assert_exit_2(
        &bake_eval(&tiny, &["--limit", "2", "--corpus", missing.to_str().unwrap()]),
        &["missing.jsonl"],
    );
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    common::assert_exit_2(
        &bake_eval(&tiny, &["--limit", "2", "--corpus", empty.to_str().unwrap()]),
        &["empty.txt", "no documents"],
    );

    let no_tokenizer = tmp.path().join("no-tokenizer");
    std::fs::create_dir(&no_tokenizer).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny.join(f), no_tokenizer.join(f)).unwrap();
    }
    common::assert_exit_2(&bake_eval(&no_tokenizer, &["--limit", "2"]), &["tokenizer.json", "missing"]);

    // A folder baked from tiny-gqa, evaluated against another base.
    let baked = tmp.path().join("baked");
    common::bake_tiny(&baked, TINY_BAKE);
    let other = shared.join("fixtures/tiny-llama3-rope");
    let out = bake_eval(&other, &["--limit", "2", "--baked", baked.to_str().unwrap()]);
    common::assert_exit_2(&out, &["bake.json", "different base", "sha256", "tiny-llama3-rope"]);
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn the_table_goes_into_the_model_card_and_the_folder_still_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let baked = tmp.path().join("baked");
    let base = common::bake_tiny(&baked, TINY_BAKE);
    let dir = baked.to_str().unwrap();
    for _ in 0..2 {
        let out = bake_eval(&base, &["--limit", "3", "--baked", dir, "--card", dir]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let card = std::fs::read_to_string(baked.join("README.md")).unwrap();
    assert_eq!(card.matches("## Evaluation (`bake eval`)").count(), 1, "{card}");
    assert!(card.contains("| baked |") && card.contains("MC1 (reference)"), "{card}");
    let verify =
        Command::new(env!("CARGO_BIN_EXE_bake")).arg("verify").arg(&baked).arg("--base").arg(&base).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn eval_runs_in_the_dtype_asked_for_and_refuses_what_does_not_fit() {
    let shared = common::shared_dir();
    let tiny = shared.join("fixtures/tiny-gqa");
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, "The capital of France is Paris.\n\nBees make honey from nectar.\n").unwrap();
    let args = ["--limit", "6", "--protocol", "leaderboard", "--corpus", corpus.to_str().unwrap()];
    let numbers = |json: &Value| {
        let row = &json["rows"][0];
        [row["mc"]["leaderboard"]["mc2"].as_f64().unwrap(), row["ce"].as_f64().unwrap()]
    };
    let f32 = numbers(&eval_json(&tiny, &[&args[..], &["--dtype", "f32"]].concat()));
    let bf16 = numbers(&eval_json(&tiny, &[&args[..], &["--dtype", "bf16"]].concat()));
    // bf16 matmuls: not the f32 numbers, but within bf16's precision of them.
    assert_ne!(f32, bf16, "--dtype bf16 changed nothing");
    for (a, b) in common::zip_exact(&f32, &bf16) {
        assert!((a - b).abs() <= 0.02 * a.abs().max(1.0), "f32 {f32:?} vs bf16 {bf16:?}");
    }
    // Too little memory for one model: refused before loading, naming the estimate and what to try.
    let out = bake_eval(&tiny, &[&args[..], &["--max-memory", "1MB"]].concat());
    common::assert_exit_2(
        &out,
        &[
            "scoring needs more than the memory budget of 0.00 GB",
            "resident about",
            "layer-streamed about",
            "dtype bf16",
        ],
    );
}

/// The plan `bake eval --dry-run` prints for these arguments, as JSON.
fn eval_plan(model: &Path, args: &[&str]) -> Value {
    let out = bake_eval(model, &[args, &["--dry-run"]].concat());
    assert!(out.status.success(), "bake eval --dry-run failed: {}", common::stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(&stdout[stdout.find('{').expect("a JSON plan")..]).unwrap()
}

#[test]
#[cfg_attr(not(all(fixture_shared, fixture_smollm2)), ignore = "needs BAKE_SHARED and BAKE_SMOLLM2 (see tests/common)")]
fn a_streamed_evaluation_equals_the_resident_one() {
    let (shared, model) = (common::shared_dir(), common::smollm2_dir());
    let corpus = shared.join("data/wikitext2/test.jsonl");
    let args = ["--cv", "2", "--limit", "6", "--heads", "8", "--corpus", corpus.to_str().unwrap(), "--documents", "3"];
    let plan = eval_plan(&model, &args)["scoring"].clone();
    assert_eq!(plan["mode"], "resident", "{plan}");
    let (resident, streamed) = (plan["resident_bytes"].as_u64().unwrap(), plan["streamed_bytes"].as_u64().unwrap());
    assert!(streamed < resident, "streaming must need less memory: {plan}");
    let between = ((resident + streamed) / 2).to_string();
    let tight = [&args[..], &["--max-memory", &between]].concat();
    assert_eq!(eval_plan(&model, &tight)["scoring"]["mode"], "streamed");
    // Every pass (the base, the folds' bias and hook, CE and KL) runs layer by layer through the same steps as
    // resident: the same numbers to the last digit.
    let (a, b) = (eval_json(&model, &args), eval_json(&model, &tight));
    assert_eq!(a["rows"], b["rows"], "streamed and resident evaluations differ");
    assert_eq!(a["folds"], b["folds"]);
    // A budget below the streamed estimate: refused before any work, naming both estimates.
    let below = (streamed / 2).to_string();
    let out = bake_eval(&model, &[&args[..], &["--max-memory", &below]].concat());
    common::assert_exit_2(&out, &["resident about", "layer-streamed about"]);
}
