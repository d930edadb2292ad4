//! The ITI core: probes against scikit-learn, batching, the activation cache, and bad inputs.

mod common;

use std::path::Path;
use std::process::Command;

use bake::activations::{capture, tokenize, PackedPrompts};
use bake::model::{ModelFiles, Site};
use bake::pipeline::{run_probe, Resolved, RunOptions};
use bake::probes::logistic;
use bake::progress::Silent;
use bake::recipe::Recipe;
use bake::rng::SeededRng;
use candle_core::Device;

/// Heads of activations, some easy, one nearly separable, for checking the probe fitter: (features
/// [n][heads × d] as f32, labels).
fn probe_heads(n: usize, heads: usize, d: usize) -> (Vec<f32>, Vec<bool>) {
    let mut rng = SeededRng::new(7);
    let labels: Vec<bool> = (0..n).map(|i| i % 3 != 0).collect();
    let mut features = vec![0f32; n * heads * d];
    for h in 0..heads {
        // Class means apart by `gap` noise units along a random direction; the last head nearly separable.
        let gap = if h + 1 == heads { 9.0 } else { 0.3 + h as f64 * 0.4 };
        let direction: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        let norm = direction.iter().map(|v| v * v).sum::<f64>().sqrt();
        for (i, &label) in labels.iter().enumerate() {
            let shift = if label { gap / 2.0 } else { -gap / 2.0 };
            for j in 0..d {
                let value = rng.normal() + shift * direction[j] / norm + 0.5;
                features[(i * heads + h) * d + j] = value as f32;
            }
        }
    }
    (features, labels)
}

const PROBE_ROWS: usize = 400;
const PROBE_HEADS: usize = 5;
const PROBE_WIDTH: usize = 24;
const TRAIN_ROWS: usize = 320;

/// Probes fitted by the batched trainer on `probe_heads`' data (the first 320 rows train), and each head's
/// training rows.
fn fitted_probe_heads() -> (bake::probes::ProbeResults, Vec<Vec<Vec<f64>>>, Vec<bool>) {
    use bake::activations::Activations;
    use bake::data::prompts::Prompt;
    use bake::probes::{train_probes, HeadLayout, Split};
    use bake::recipe::Method;
    let (n, heads, d) = (PROBE_ROWS, PROBE_HEADS, PROBE_WIDTH);
    let (features, labels) = probe_heads(n, heads, d);
    // One prompt per question, so the split is by row.
    let acts = Activations::from_vec(n, 1, heads * d, features.clone());
    let prompts: Vec<Prompt> =
        labels.iter().enumerate().map(|(i, &label)| Prompt { text: String::new(), question: i, label }).collect();
    let split = Split { train: (0..TRAIN_ROWS).collect(), val: (TRAIN_ROWS..n).collect() };
    let fitted = train_probes(&acts, &prompts, &split, HeadLayout { layers: 1, heads, head_dim: d }, (Method::Iti, 42));
    let head_rows = |h: usize| -> Vec<Vec<f64>> {
        (0..TRAIN_ROWS)
            .map(|i| features[(i * heads + h) * d..(i * heads + h + 1) * d].iter().map(|&v| v as f64).collect())
            .collect()
    };
    (fitted, (0..heads).map(head_rows).collect(), labels)
}

/// Every weight and the intercept of `ours` within `tolerance` of `theirs` (same length).
fn assert_probe_equals(head: usize, ours: &bake::probes::logistic::Probe, theirs: &[f64], tolerance: f64, who: &str) {
    let ours: Vec<f64> = ours.weights.iter().chain([&ours.intercept]).copied().collect();
    for (a, b) in common::zip_exact(&ours, theirs) {
        assert!((a - b).abs() <= tolerance, "head {head}: bake {a}, {who} {b}");
    }
}

#[test]
fn batched_probes_equal_the_scalar_reference() {
    let (fitted, train_rows, labels) = fitted_probe_heads();
    assert_eq!(fitted.probes.len(), PROBE_HEADS);
    for (h, rows) in train_rows.iter().enumerate() {
        let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
        let reference = logistic::reference::fit(&refs, &labels[..TRAIN_ROWS], 1.0, 1e-6);
        let theirs: Vec<f64> = reference.weights.iter().chain([&reference.intercept]).copied().collect();
        assert_probe_equals(h, &fitted.probes[h], &theirs, 1e-6, "the scalar reference");
    }
    let last: Vec<f32> = train_rows[PROBE_HEADS - 1].iter().flatten().map(|&v| v as f32).collect();
    let train_accuracy = fitted.probes[PROBE_HEADS - 1].accuracy(&last, &labels[..TRAIN_ROWS]);
    assert!(train_accuracy >= 0.995, "the last head should be nearly separable (training accuracy {train_accuracy})");
}

#[test]
#[cfg_attr(not(fixture_python), ignore = "needs BAKE_PYTHON (torch, transformers, scikit-learn, pyvene)")]
fn batched_probes_reach_sklearns_optimum() {
    let (fitted, train_rows, labels) = fitted_probe_heads();
    let python = common::python();
    let data = serde_json::json!({ "heads": train_rows, "y": &labels[..TRAIN_ROWS] });
    let script = r#"
import json, sys
import numpy as np
from sklearn.linear_model import LogisticRegression
d = json.load(sys.stdin)
y = np.array(d["y"]).astype(int)
out = []
for x in d["heads"]:
    m = LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(np.array(x), y)
    out.append(m.coef_[0].tolist() + [float(m.intercept_[0])])
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let optimum: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(optimum.len(), fitted.probes.len());
    for (h, theirs) in optimum.iter().enumerate() {
        assert_probe_equals(h, &fitted.probes[h], theirs, 1e-6, "scikit-learn's optimum");
    }
}

/// The shipped recipe (the built-in TruthfulQA) on the first `limit` questions.
fn recipe_for(limit: usize) -> Recipe {
    let mut r = Recipe::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/truthfulqa.yaml"))).unwrap();
    r.limit = Some(limit);
    r.heads = 4;
    r.batch_tokens = bake::recipe::BatchTokens::Fixed(128);
    r
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn batched_activations_equal_one_prompt_at_a_time() {
    let shared = common::shared_dir();
    let files = ModelFiles::open(shared.join("fixtures/tiny-gqa").to_str().unwrap()).unwrap();
    let model = files.load(&Device::Cpu).unwrap();
    let tokenizer = files.tokenizer().unwrap();
    let prompts: Vec<String> = [
        "Q: What is the capital of France? A: Paris.",
        "Q: Why? A: Because.",
        // Shares "Q: What is the capital of France? A:" with the first prompt: packed, that part runs once.
        "Q: What is the capital of France? A: Lyon, since 1999. Q: Why?",
        "Q: What happens if you eat watermelon seeds? A: Nothing happens to you at all.",
        "Q: Is the earth flat? A: No.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let tokens = tokenize(&tokenizer, &prompts).unwrap();
    // 40 tokens a batch splits these prompts into several trees; a budget of 1 runs each prompt alone.
    let batched =
        capture(&model, &PackedPrompts::new(&tokens, 40, 1, &Device::Cpu).unwrap(), Site::AttentionHeads, &Silent)
            .unwrap();
    let single =
        capture(&model, &PackedPrompts::new(&tokens, 1, 1, &Device::Cpu).unwrap(), Site::AttentionHeads, &Silent)
            .unwrap();
    let diff = common::max_abs_diff(batched.data(), single.data());
    assert!(diff <= 1e-5, "batched differs from batch size 1 by {diff}");
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn activation_cache_is_reused_and_invalidated() {
    let shared = common::shared_dir();
    let cache = tempfile::tempdir().unwrap();
    let options = RunOptions { cache_dir: Some(cache.path().to_path_buf()), max_memory: None };
    let gqa = ModelFiles::open(shared.join("fixtures/tiny-gqa").to_str().unwrap()).unwrap();
    let recipe = recipe_for(6);
    let run_probe = |model: &ModelFiles, recipe: &Recipe, options: &RunOptions, progress: &Silent| {
        run_probe(model, recipe, &Resolved::new(model, recipe, options).unwrap(), progress)
    };
    let first = run_probe(&gqa, &recipe, &options, &Silent).unwrap();
    let second = run_probe(&gqa, &recipe, &options, &Silent).unwrap();
    assert!(!first.cache_hit && second.cache_hit);
    assert_eq!(first.report.val_accuracy, second.report.val_accuracy);
    assert_eq!(first.report.delta, second.report.delta);

    let mut other_template = recipe.clone();
    other_template.prompts.probe = "Question: {question} Answer: {answer}".into();
    assert!(!run_probe(&gqa, &other_template, &options, &Silent).unwrap().cache_hit);

    let rope = ModelFiles::open(shared.join("fixtures/tiny-llama3-rope").to_str().unwrap()).unwrap();
    assert!(!run_probe(&rope, &recipe, &options, &Silent).unwrap().cache_hit);
    assert!(run_probe(&gqa, &recipe, &options, &Silent).unwrap().cache_hit);
}

fn write_dataset(dir: &Path, mc_rows: &[serde_json::Value], gen_rows: &[serde_json::Value]) {
    for (config, rows) in [("multiple_choice", mc_rows), ("generation", gen_rows)] {
        std::fs::create_dir_all(dir.join(config)).unwrap();
        let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
        std::fs::write(dir.join(config).join("validation.jsonl"), text.join("\n")).unwrap();
    }
}

fn mc_row(question: &str, labels: &[u8]) -> serde_json::Value {
    let choices: Vec<String> = (0..labels.len()).map(|i| format!("answer {i}")).collect();
    serde_json::json!({"question": question, "mc1_targets": {"choices": choices, "labels": labels},
                       "mc2_targets": {"choices": choices, "labels": labels}})
}

fn gen_row(question: &str) -> serde_json::Value {
    serde_json::json!({"question": question, "best_answer": "a", "correct_answers": ["a"], "incorrect_answers": ["b"],
                       "type": "t", "category": "c", "source": "s"})
}

fn probe_error(dataset: &Path, model: &Path, extra: &[&str]) -> String {
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/truthfulqa.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_bake"))
        .args(["probe", "--recipe", recipe, "--no-cache", "--out"])
        .arg(tempfile::tempdir().unwrap().path())
        .arg("--model")
        .arg(model)
        .arg("--dataset")
        .arg(dataset)
        .args(extra)
        .args(if extra.contains(&"--heads") { &[][..] } else { &["--heads", "2"][..] })
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn bad_datasets_and_recipes_get_clear_errors() {
    let shared = common::shared_dir();
    let model = shared.join("fixtures/tiny-gqa");
    let dir = tempfile::tempdir().unwrap();

    write_dataset(dir.path(), &[], &[]);
    assert!(probe_error(dir.path(), &model, &[]).contains("no questions"));

    write_dataset(dir.path(), &[mc_row("Q1?", &[1, 1])], &[gen_row("Q1?")]);
    let e = probe_error(dir.path(), &model, &[]);
    assert!(e.contains("Q1?") && e.contains("one true and one false"), "{e}");

    write_dataset(dir.path(), &[serde_json::json!({"question": "Q1?", "mc2_targets": [1, 0]})], &[gen_row("Q1?")]);
    let e = probe_error(dir.path(), &model, &[]);
    assert!(e.contains("validation.jsonl") && e.contains("mc2_targets") && e.contains("line 1"), "{e}");

    write_dataset(dir.path(), &[mc_row("Q1?", &[1, 0])], &[gen_row("Q2?")]);
    assert!(probe_error(dir.path(), &model, &[]).contains("no row for the question `Q1?`"));

    write_dataset(dir.path(), &[mc_row("Q1?", &[1, 0]), mc_row("Q2?", &[0, 1])], &[gen_row("Q1?"), gen_row("Q2?")]);
    let e = probe_error(dir.path(), &model, &["--heads", "13"]);
    assert!(e.contains("K = 13") && e.contains("12 attention heads"), "{e}");
    let e = probe_error(dir.path(), &model, &["--alpha=-1"]);
    assert!(e.contains("alpha") && e.contains("≥ 0"), "{e}");
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn parquet_and_jsonl_give_the_same_dataset() {
    let shared = common::shared_dir();
    let jsonl = shared.join("data/truthfulqa");
    let parquet = tempfile::tempdir().unwrap();
    for config in ["multiple_choice", "generation"] {
        std::fs::create_dir(parquet.path().join(config)).unwrap();
        let name = "validation-00000-of-00001.parquet";
        std::fs::copy(jsonl.join(config).join(name), parquet.path().join(config).join(name)).unwrap();
    }
    let a = bake::data::TruthfulQa::load(jsonl.to_str().unwrap(), "validation", None).unwrap();
    let b = bake::data::TruthfulQa::load(parquet.path().to_str().unwrap(), "validation", None).unwrap();
    assert_eq!(a.questions.len(), 817);
    assert_eq!(a.questions.iter().map(|q| q.mc2.len()).sum::<usize>(), 5882);
    let generation: usize = a.questions.iter().map(|q| q.correct_answers.len() + q.incorrect_answers.len()).sum();
    assert_eq!(generation, 5918);
    let empty = a
        .questions
        .iter()
        .flat_map(|q| q.correct_answers.iter().chain(&q.incorrect_answers))
        .filter(|s| s.is_empty())
        .count();
    assert_eq!(empty, 31, "the Hub's empty answers are kept");
    for (x, y) in common::zip_exact(&a.questions, &b.questions) {
        assert_eq!(
            (&x.question, &x.mc2, &x.correct_answers, &x.incorrect_answers),
            (&y.question, &y.mc2, &y.correct_answers, &y.incorrect_answers)
        );
    }
}
