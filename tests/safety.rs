//! Safety: `--force` never destroys what bake did not write, a replacement is atomic at every step (failures
//! are injected with `BAKE_FAILPOINTS`, never timed), and bad input never hangs, corrupts or passes.
//! Everything happens inside temporary folders; paths like `/` are only ever given to the pure checks.
//!
//! These tests need no shared data: the model and the dataset are made on the spot (`common::synthetic_inputs`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bake::io::output::{self, Ownership, Request};
use serde_json::Value;

fn assert_ok(output: &Output) {
    assert!(output.status.success(), "bake failed: {}", common::stderr(output));
}

fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("bake.json")).unwrap()).unwrap()
}

/// The folder is a complete bake of this α: its files match its manifest and its biases are its δ's.
fn assert_complete_bake(dir: &Path, model: &Path, alpha: f64) {
    assert_eq!(manifest(dir)["recipe"]["alpha"].as_f64(), Some(alpha), "{}", dir.display());
    let out =
        Command::new(env!("CARGO_BIN_EXE_bake")).arg("verify").arg(dir).arg("--base").arg(model).output().unwrap();
    assert!(out.status.success(), "{} is not a complete bake: {}", dir.display(), String::from_utf8_lossy(&out.stdout));
}

fn siblings(out: &Path, role: &str) -> Vec<PathBuf> {
    let prefix = format!(".{}.bake-{role}-", out.file_name().unwrap().to_string_lossy());
    let mut found: Vec<PathBuf> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
        .collect();
    found.sort();
    found
}

struct Setup {
    root: tempfile::TempDir,
    inputs: (PathBuf, PathBuf),
}

impl Setup {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let inputs = common::synthetic_inputs(root.path());
        Setup { root, inputs }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn bake(&self, out: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut all = vec!["--out", out.to_str().unwrap()];
        all.extend_from_slice(args);
        common::bake_synthetic(self.root.path(), &self.inputs, &all, envs)
    }

    fn model(&self) -> &Path {
        &self.inputs.0
    }
}

// 1. `/`, the home folder, the working folder and its parents.

#[test]
fn the_root_folder_is_refused_by_the_pure_check() {
    // `check` writes nothing, so `/` can be given to it safely.
    let request = Request { out: Path::new("/"), force: true, protected: Vec::new(), ownership: Ownership::Manifest };
    let err = output::check(&request).unwrap_err().to_string();
    assert!(err.contains("is the root folder"), "{err}");
}

#[test]
fn home_and_working_folders_are_refused_with_force() {
    let s = Setup::new();
    let home = s.path("home");
    let work = home.join("projects/work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("notes.txt"), "mine").unwrap();
    let before = common::files_of(&home);
    let run = |out: &str| {
        Command::new(env!("CARGO_BIN_EXE_bake"))
            .current_dir(&work)
            .env("HOME", &home)
            .env("BAKE_CACHE_DIR", s.path("cache"))
            .arg("--model")
            .arg(s.model())
            .arg("--dataset")
            .arg(&s.inputs.1)
            .args(["--out", out, "--force"])
            .output()
            .unwrap()
    };
    common::assert_refused(&run(home.to_str().unwrap()), &["is your home folder"], None);
    common::assert_refused(&run("."), &["is the working folder or one of its parents"], None);
    common::assert_refused(&run(".."), &["is the working folder or one of its parents"], None);
    assert_eq!(common::files_of(&home), before, "a refused run changed the home folder");
}

// 2. The model, its parent, the dataset's parent, and folders bake did not write.

#[test]
fn the_model_and_the_folders_holding_it_or_the_dataset_are_refused() {
    let s = Setup::new();
    std::fs::write(s.path("beside-the-model.txt"), "keep").unwrap();
    let before = common::files_of(s.root.path());
    let model = s.model().to_path_buf();
    common::assert_refused(&s.bake(&model, &["--force"], &[]), &["is the model folder itself"], None);
    common::assert_refused(&s.bake(s.root.path(), &["--force"], &[]), &["contains the model folder"], None);
    common::assert_refused(
        &s.bake(&model.join("baked"), &["--force"], &[]),
        &["lies inside the model folder"],
        Some(&model.join("baked")),
    );
    let dataset_parent = s.inputs.1.join("multiple_choice").parent().unwrap().to_path_buf();
    common::assert_refused(&s.bake(&dataset_parent, &["--force"], &[]), &["the dataset folder"], None);
    assert_eq!(common::files_of(s.root.path()), before, "a refused run changed the inputs");
}

#[test]
fn a_folder_bake_did_not_write_is_never_replaced() {
    let s = Setup::new();
    let mine = s.path("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("thesis.tex"), "years of work").unwrap();
    let out = s.bake(&mine, &["--force"], &[]);
    common::assert_refused(&out, &["was not written by bake", "`thesis.tex`", "even with --force"], Some(&mine));
    assert_eq!(std::fs::read_to_string(mine.join("thesis.tex")).unwrap(), "years of work");
    // Without --force the same folder is refused for the same reason.
    common::assert_refused(&s.bake(&mine, &[], &[]), &["was not written by bake"], Some(&mine));

    // A bake with a file of the user's added is not bake's alone any more.
    let baked = s.path("baked");
    assert_ok(&s.bake(&baked, &["--limit", "4"], &[]));
    common::assert_refused(&s.bake(&baked, &["--limit", "4"], &[]), &["already exists; pass --force"], Some(&baked));
    std::fs::write(baked.join("my-notes.md"), "mine").unwrap();
    common::assert_refused(
        &s.bake(&baked, &["--limit", "4", "--force"], &[]),
        &["`my-notes.md`", "not listed in its bake.json"],
        Some(&baked),
    );
    assert!(baked.join("my-notes.md").exists() && baked.join("bake.json").exists());

    // A file, and a symbolic link, are not folders bake wrote.
    let file = s.path("a-file");
    std::fs::write(&file, "x").unwrap();
    common::assert_refused(&s.bake(&file, &["--force"], &[]), &["exists and is not a folder"], Some(&file));
    let link = s.path("link");
    std::os::unix::fs::symlink(&baked, &link).unwrap();
    common::assert_refused(&s.bake(&link, &["--force"], &[]), &["is a symbolic link"], Some(&link));
    assert!(std::fs::read_to_string(&file).unwrap() == "x" && baked.join("bake.json").exists());

    // An empty folder (made by the user beforehand) is simply used.
    let empty = s.path("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_ok(&s.bake(&empty, &["--limit", "4"], &[]));
    assert!(empty.join("bake.json").exists());
}

// 3. An interruption at each step of a replacement leaves a complete old or a complete new output.

fn two_bakes(s: &Setup, out: &Path, envs: &[(&str, &str)]) -> Output {
    assert_ok(&s.bake(out, &["--limit", "4", "--alpha", "5"], &[]));
    s.bake(out, &["--limit", "4", "--alpha", "25", "--force"], envs)
}

#[test]
fn a_first_bake_killed_before_publishing_leaves_no_output_and_is_cleaned_up() {
    let s = Setup::new();
    let out = s.path("baked");
    let killed = s.bake(&out, &["--limit", "4"], &[("BAKE_FAILPOINTS", "commit=abort")]);
    assert!(!killed.status.success());
    assert!(!out.exists(), "an interrupted bake left {}", out.display());
    // The kill really came at the end: the staging folder holds the whole bake.
    let staged = siblings(&out, "partial");
    assert_eq!(staged.len(), 1);
    assert!(staged[0].join("bake.json").exists() && staged[0].join("model.safetensors.index.json").exists());
    assert_ok(&s.bake(&out, &["--limit", "4"], &[]));
    assert_complete_bake(&out, s.model(), 15.0);
    assert!(siblings(&out, "partial").is_empty(), "the dead run's staging folder was not cleaned up");
}

#[test]
fn killed_before_the_swap_the_old_bake_is_intact_and_the_next_run_cleans_up() {
    let s = Setup::new();
    let out = s.path("baked");
    let killed = two_bakes(&s, &out, &[("BAKE_FAILPOINTS", "commit=abort")]);
    assert!(!killed.status.success());
    assert_complete_bake(&out, s.model(), 5.0);
    let staged = siblings(&out, "partial");
    assert_eq!(staged.len(), 1, "the killed run's staging folder");
    assert!(staged[0].join("model.safetensors.index.json").exists(), "the kill came after the new bake was complete");
    assert_ok(&s.bake(&out, &["--limit", "4", "--alpha", "25", "--force"], &[]));
    assert_complete_bake(&out, s.model(), 25.0);
    assert!(siblings(&out, "partial").is_empty(), "the dead run's staging folder was not cleaned up");
}

#[test]
fn killed_after_the_swap_the_new_bake_is_in_place_and_the_old_one_is_cleaned_up_later() {
    let s = Setup::new();
    let out = s.path("baked");
    let killed = two_bakes(&s, &out, &[("BAKE_FAILPOINTS", "exchanged=abort")]);
    assert!(!killed.status.success());
    assert_complete_bake(&out, s.model(), 25.0);
    let old = siblings(&out, "partial");
    assert_eq!(old.len(), 1);
    assert_complete_bake(&old[0], s.model(), 5.0);
    assert_ok(&s.bake(&out, &["--limit", "4", "--alpha", "15", "--force"], &[]));
    assert_complete_bake(&out, s.model(), 15.0);
    assert!(siblings(&out, "partial").is_empty());
}

#[test]
fn a_removal_that_fails_half_way_keeps_the_new_bake_and_says_where_the_old_one_is() {
    let s = Setup::new();
    let out = s.path("baked");
    let run = two_bakes(&s, &out, &[("BAKE_FAILPOINTS", "remove-old=error")]);
    assert_ok(&run);
    assert!(common::stderr(&run).contains("the replaced folder is left at"), "{}", common::stderr(&run));
    assert_complete_bake(&out, s.model(), 25.0);
    assert_eq!(siblings(&out, "partial").len(), 1);
    assert_ok(&s.bake(&out, &["--limit", "4", "--alpha", "25", "--force"], &[]));
    assert!(siblings(&out, "partial").is_empty());
}

#[test]
fn without_an_atomic_swap_a_kill_between_the_renames_is_repaired_by_the_next_run() {
    let s = Setup::new();
    let out = s.path("baked");
    // The fallback path works on its own.
    let run = two_bakes(&s, &out, &[("BAKE_FAILPOINTS", "exchange=unsupported")]);
    assert_ok(&run);
    assert_complete_bake(&out, s.model(), 25.0);
    assert!(siblings(&out, "old").is_empty() && siblings(&out, "partial").is_empty());

    // Killed with the old bake set aside and the new one not yet in place: OUT is missing for a moment,
    // the old bake is complete beside it, and the next run into OUT puts it back before anything else.
    let killed = s.bake(
        &out,
        &["--limit", "4", "--alpha", "5", "--force"],
        &[("BAKE_FAILPOINTS", "exchange=unsupported,moved-aside=abort")],
    );
    assert!(!killed.status.success());
    assert!(!out.exists());
    let aside = siblings(&out, "old");
    assert_eq!(aside.len(), 1);
    assert_complete_bake(&aside[0], s.model(), 25.0);
    let restored = s.bake(&out, &["--limit", "4", "--alpha", "5", "--force"], &[("BAKE_FAILPOINTS", "commit=abort")]);
    assert!(!restored.status.success());
    assert_complete_bake(&out, s.model(), 25.0);
    assert!(siblings(&out, "old").is_empty());

    // A failed second rename puts the old bake back at once.
    let failed = s.bake(
        &out,
        &["--limit", "4", "--alpha", "5", "--force"],
        &[("BAKE_FAILPOINTS", "exchange=unsupported,moved-aside=error")],
    );
    common::assert_refused(&failed, &["failure injected at `moved-aside`"], None);
    assert_complete_bake(&out, s.model(), 25.0);
}

// 4. Two bakes into the same output at once.

#[test]
fn two_bakes_into_one_output_at_once_never_mix() {
    let s = Setup::new();
    let out = s.path("baked");
    let go = s.path("go");
    // Bake A stops with its staging folder complete, just before publishing...
    let mut first = Command::new(env!("CARGO_BIN_EXE_bake"));
    first
        .arg("--model")
        .arg(s.model())
        .arg("--dataset")
        .arg(&s.inputs.1)
        .args(["--heads", "2", "--limit", "4", "--alpha", "5", "--force", "--out", out.to_str().unwrap()])
        .env("BAKE_CACHE_DIR", s.path("cache"))
        .env("BAKE_FAILPOINTS", format!("commit=wait:{}", go.display()));
    let first = first.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let reached = PathBuf::from(format!("{}.reached", go.display()));
    let started = std::time::Instant::now();
    while !reached.exists() {
        assert!(started.elapsed().as_secs() < 120, "the first bake never reached its commit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // ... while bake B runs from start to end into the same output, in a staging folder of its own.
    assert_eq!(siblings(&out, "partial").len(), 1);
    assert_ok(&s.bake(&out, &["--limit", "4", "--alpha", "25", "--force"], &[]));
    assert_complete_bake(&out, s.model(), 25.0);
    // Then A publishes: it replaces B's complete bake with its own complete one.
    std::fs::write(&go, "").unwrap();
    let first = first.wait_with_output().unwrap();
    assert_ok(&first);
    assert_complete_bake(&out, s.model(), 5.0);
    assert!(siblings(&out, "partial").is_empty());
}

#[test]
fn a_bake_without_force_does_not_replace_one_that_appeared_while_it_ran() {
    let s = Setup::new();
    let out = s.path("baked");
    let go = s.path("go");
    let first = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("--model")
        .arg(s.model())
        .arg("--dataset")
        .arg(&s.inputs.1)
        .args(["--heads", "2", "--limit", "4", "--alpha", "5", "--out", out.to_str().unwrap()])
        .env("BAKE_CACHE_DIR", s.path("cache"))
        .env("BAKE_FAILPOINTS", format!("commit=wait:{}", go.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let reached = PathBuf::from(format!("{}.reached", go.display()));
    while !reached.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_ok(&s.bake(&out, &["--limit", "4", "--alpha", "25"], &[]));
    std::fs::write(&go, "").unwrap();
    let first = first.wait_with_output().unwrap();
    common::assert_refused(&first, &["appeared while bake ran; pass --force"], None);
    assert_complete_bake(&out, s.model(), 25.0);
    assert!(siblings(&out, "partial").is_empty());
}

// The same rules for `bake probe --out` and `bake eval --card`.

#[test]
fn probe_out_follows_the_same_rules() {
    let s = Setup::new();
    let probe = |out: &Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bake"))
            .arg("probe")
            .arg("--model")
            .arg(s.model())
            .arg("--dataset")
            .arg(&s.inputs.1)
            .args(["--heads", "2", "--limit", "4", "--out", out.to_str().unwrap()])
            .args(extra)
            .env("BAKE_CACHE_DIR", s.path("cache"))
            .output()
            .unwrap()
    };
    let out = s.path("report");
    assert_ok(&probe(&out, &[]));
    assert!(out.join("report.json").exists() && out.join("heatmap.png").exists());
    common::assert_refused(&probe(&out, &[]), &["already exists; pass --force"], Some(&out));
    assert_ok(&probe(&out, &["--force"]));
    std::fs::write(out.join("analysis.ipynb"), "mine").unwrap();
    common::assert_refused(&probe(&out, &["--force"]), &["`analysis.ipynb`", "not written by bake"], Some(&out));
    common::assert_refused(&probe(s.model(), &["--force"]), &["is the model folder itself"], None);
}

#[test]
fn eval_card_refuses_a_tampered_folder_before_evaluating() {
    let s = Setup::new();
    let out = s.path("baked");
    assert_ok(&s.bake(&out, &["--limit", "4"], &[]));
    let card = out.join("README.md");
    std::fs::write(&card, std::fs::read_to_string(&card).unwrap() + "\nThis model never lies.\n").unwrap();
    let before = common::files_of(&out);
    let eval = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("eval")
        .arg("--model")
        .arg(s.model())
        .arg("--dataset")
        .arg(&s.inputs.1)
        .args(["--limit", "4", "--protocol", "leaderboard", "--baked"])
        .arg(&out)
        .arg("--card")
        .arg(&out)
        .output()
        .unwrap();
    common::assert_refused(
        &eval,
        &["refusing to put an evaluation into a folder that fails `bake verify`", "README.md"],
        None,
    );
    assert!(
        !common::stderr(&eval).contains("eval: leaderboard"),
        "it evaluated before refusing: {}",
        common::stderr(&eval)
    );
    assert_eq!(common::files_of(&out), before);
}

// 5. Non-finite values never become a bake, and never verify.

/// Overwrites the first `count` f32 values of a tensor of the model with `value`.
fn poke_tensor(model: &Path, name: &str, count: usize, value: f32) {
    let path = model.join("model.safetensors");
    let (start, dtype) = {
        let ck = bake::model::Checkpoint::open(vec![path.clone()]).unwrap();
        let e = ck.get(name).unwrap();
        (e.start, e.dtype)
    };
    assert_eq!(dtype, bake::io::dtype::StoredDtype::F32);
    let mut bytes = std::fs::read(&path).unwrap();
    for i in 0..count {
        bytes[start + 4 * i..start + 4 * i + 4].copy_from_slice(&value.to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn non_finite_values_stop_the_bake_naming_where() {
    let s = Setup::new();
    let out = s.path("baked");
    let alpha = s.bake(&out, &["--limit", "4", "--alpha", "1e300"], &[]);
    common::assert_refused(&alpha, &["head", "not a finite f32", "lower alpha"], Some(&out));

    common::edit_config(s.model(), |c| {
        c.insert("rope_theta".into(), 0.into());
    });
    common::assert_refused(
        &s.bake(&out, &["--limit", "4"], &[]),
        &["config.json", "rope_theta", "finite number > 0, found 0"],
        Some(&out),
    );
    common::edit_config(s.model(), |c| {
        c.insert("rope_theta".into(), 10000.0.into());
    });

    poke_tensor(s.model(), "model.layers.1.self_attn.v_proj.weight", 64, f32::NAN);
    let nan = s.bake(&out, &["--limit", "4", "--no-cache"], &[]);
    common::assert_refused(&nan, &["the activation pass produced NaN at layer 1, head", "non-finite"], Some(&out));
    assert!(!out.exists());
}

/// Replaces one element of a bias tensor of a baked folder and updates the manifest's hashes, as a careful
/// forger would.
fn forge_bias(dir: &Path, name: &str, value: f32) {
    let (path, start, dtype) = {
        let ck = bake::model::Checkpoint::open(bake::model::Checkpoint::weight_files(dir).unwrap()).unwrap();
        let e = ck.get(name).unwrap();
        (ck.file_of(e).to_path_buf(), e.start, e.dtype)
    };
    let mut bytes = std::fs::read(&path).unwrap();
    let encoded = dtype.encode([value]);
    bytes[start..start + encoded.len()].copy_from_slice(&encoded);
    std::fs::write(&path, &bytes).unwrap();
    let mut m = manifest(dir);
    let listed = path.file_name().unwrap().to_str().unwrap();
    m["outputs"][listed]["sha256"] = bake::io::hash::sha256_file(&path).unwrap().into();
    std::fs::write(dir.join("bake.json"), serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

/// Bakes into `out`, forges layer 0's o_proj bias to `value`, and requires `verify`, with and without the
/// base, to fail with a mismatch `is_the_one` accepts.
fn assert_forged_bias_never_verifies(s: &Setup, out: &Path, value: f32, is_the_one: impl Fn(&Value) -> bool) {
    assert_ok(&s.bake(out, &["--limit", "4"], &[]));
    forge_bias(out, "model.layers.0.self_attn.o_proj.bias", value);
    for base in [None, Some(s.model())] {
        let (code, report, err) = common::verify_json(out, base, &[]);
        assert_eq!(code, 1, "{report} {err}");
        assert!(report["mismatches"].as_array().unwrap().iter().any(&is_the_one), "{report}");
    }
}

#[test]
fn verify_treats_a_forged_nan_bias_as_a_mismatch_with_or_without_the_base() {
    let s = Setup::new();
    let out = s.path("baked");
    assert_forged_bias_never_verifies(&s, &out, f32::NAN, |m| m["tensor"] == "model.layers.0.self_attn.o_proj.bias");
}

// 6. Too few questions for a split.

#[test]
fn too_few_questions_for_a_split_is_an_error() {
    let s = Setup::new();
    let out = s.path("baked");
    let one = s.bake(&out, &["--limit", "1"], &[]);
    common::assert_refused(&one, &["needs at least 2 questions", "has 1", "the recipe's `limit`"], Some(&out));
    assert!(!out.exists());
    assert_ok(&s.bake(&out, &["--limit", "2"], &[]));
}

// 7. The device is validated before anything else, the activation cache included.

#[test]
fn a_bad_device_is_refused_even_with_a_warm_cache() {
    let s = Setup::new();
    let warm = s.path("warm");
    assert_ok(&s.bake(&warm, &["--limit", "4"], &[]));
    let out = s.path("baked");
    for (device, needle) in [
        ("cuda", "built without CUDA"),
        ("cuda:99", "built without CUDA"),
        ("metal", "invalid value 'metal' for '--device <DEVICE>': expected cpu, cuda, cuda:N or auto"),
    ] {
        let run = s.bake(&out, &["--limit", "4", "--device", device], &[]);
        common::assert_refused(&run, &[needle], Some(&out));
        assert!(!out.exists());
    }
}

// 9. `verify` without a base says what it did not check; manifest paths never leave the folder.

#[test]
fn verify_without_a_base_says_it_checked_self_consistency_only() {
    let s = Setup::new();
    let out = s.path("baked");
    assert_ok(&s.bake(&out, &["--limit", "4"], &[]));
    let plain = Command::new(env!("CARGO_BIN_EXE_bake")).arg("verify").arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.status.success() && text.contains("self-consistency only") && text.contains("--base MODEL"),
        "{text}"
    );
    let (_, report, _) = common::verify_json(&out, None, &[]);
    assert_eq!(report["scope"], "self_consistency");
    let (_, report, _) = common::verify_json(&out, Some(s.model()), &[]);
    assert_eq!(report["scope"], "against_base");

    // Entries that point outside the folder are mismatches, and are not read.
    std::fs::write(s.path("recipe.yaml"), "outside").unwrap();
    let mut m = manifest(&out);
    m["outputs"]["../../recipe.yaml"] = serde_json::json!({ "sha256": "x", "bytes": 7 });
    m["outputs"]["/etc/hostname"] = serde_json::json!({ "sha256": "x", "bytes": 7 });
    std::fs::write(out.join("bake.json"), serde_json::to_string_pretty(&m).unwrap()).unwrap();
    let (code, report, _) = common::verify_json(&out, None, &[]);
    assert_eq!(code, 1);
    for name in ["../../recipe.yaml", "/etc/hostname"] {
        let hit = report["mismatches"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["file"] == name && x["message"].as_str().unwrap().contains("outside the folder"));
        assert!(hit, "{name}: {report}");
    }
}

// 10. A corpus with nothing to score.

#[test]
fn a_corpus_with_no_scorable_token_is_an_error() {
    let s = Setup::new();
    let corpus = s.path("corpus.txt");
    std::fs::write(&corpus, "sky\n").unwrap();
    let eval = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("eval")
        .arg("--model")
        .arg(s.model())
        .arg("--dataset")
        .arg(&s.inputs.1)
        .args(["--limit", "4", "--corpus"])
        .arg(&corpus)
        .output()
        .unwrap();
    common::assert_refused(&eval, &["corpus.txt", "no document has the 2 tokens"], None);
}

// 11. Config sizes are bounded before anything is sized from them.

#[test]
fn absurd_config_sizes_are_refused_at_once() {
    let s = Setup::new();
    for (field, value, needle) in [
        ("num_hidden_layers", 1_000_000_000_000u64, "at most 4096, found 1000000000000"),
        ("num_hidden_layers", 3, "3 layers, but the checkpoint holds 2"),
        ("vocab_size", 1 << 40, "vocab_size"),
    ] {
        common::edit_config(s.model(), |c| {
            c.insert(field.into(), value.into());
        });
        let started = std::time::Instant::now();
        let out =
            Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--model"]).arg(s.model()).output().unwrap();
        common::assert_refused(&out, &["config.json", field, needle], None);
        assert!(started.elapsed().as_secs() < 20, "{field}: took {:?}", started.elapsed());
        common::synthetic_inputs(s.root.path());
    }
}

// 12. A Hub that accepts connections and never answers.

#[test]
fn a_silent_hub_times_out_with_the_url_named() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    // Accept every connection and never answer.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let home = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{address}");
    let run = |args: &[&str]| {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_bake"))
            .args(args)
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", home.path())
            .env("BAKE_HUB_TIMEOUT", "2")
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        (out, started.elapsed())
    };
    let s = Setup::new();
    let probe_out = s.path("p");
    let dataset_run = [
        "probe",
        "--model",
        s.model().to_str().unwrap(),
        "--heads",
        "2",
        "--dataset",
        "org/data",
        "--out",
        probe_out.to_str().unwrap(),
    ];
    for args in [&["inspect", "--model", "org/model"][..], &["verify", "org/baked"][..], &dataset_run[..]] {
        let (out, took) = run(args);
        common::assert_refused(&out, &["no answer from", &endpoint, "timed out"], None);
        assert!(took.as_secs() < 60, "{args:?} took {took:?}");
    }
}

// 13. Size and depth limits.

#[test]
fn oversized_or_deeply_nested_inputs_are_refused_quickly() {
    let s = Setup::new();
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/truthfulqa.yaml")).unwrap();
    let nested = s.path("nested.yaml");
    std::fs::write(&nested, format!("{shipped}\nextra: {}{}\n", "[".repeat(100_000), "]".repeat(100_000))).unwrap();
    let huge = s.path("huge.yaml");
    let template = format!("Q: {{question}} A: {{answer}} {}", "x".repeat(100 << 20));
    std::fs::write(&huge, shipped.replace("\"Q: {question} A: {answer}\"", &format!("\"{template}\""))).unwrap();
    let out = s.path("baked");
    for (recipe, needle) in [(&nested, "nested"), (&huge, "refused above")] {
        let started = std::time::Instant::now();
        let run = s.bake(&out, &["--recipe", recipe.to_str().unwrap()], &[]);
        common::assert_refused(&run, &[recipe.file_name().unwrap().to_str().unwrap(), needle], Some(&out));
        assert!(started.elapsed().as_secs() < 20, "{needle}: took {:?}", started.elapsed());
    }
    let eval = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("eval")
        .arg("--model")
        .arg(s.model())
        .arg("--dataset")
        .arg(&s.inputs.1)
        .args(["--limit", "4", "--corpus", "/dev/zero"])
        .output()
        .unwrap();
    common::assert_refused(&eval, &["/dev/zero", "is a device; expected a regular file"], None);
}

// 14. Only regular files are opened.

#[test]
fn weights_that_are_a_fifo_or_a_folder_are_refused_without_blocking() {
    let s = Setup::new();
    let weights = s.model().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let c = std::ffi::CString::new(weights.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path inside the test's temporary folder.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let inspect =
        || Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--model"]).arg(s.model()).output().unwrap();
    common::assert_refused(&inspect(), &["model.safetensors", "is a FIFO (named pipe); expected a regular file"], None);
    std::fs::remove_file(&weights).unwrap();
    std::fs::create_dir(&weights).unwrap();
    common::assert_refused(&inspect(), &["model.safetensors", "is a folder; expected a regular file"], None);
}

// 15, 16, 17, 18: messages.

#[test]
fn os_errors_print_once_and_bad_flags_are_blamed_on_the_flag() {
    let s = Setup::new();
    let out = s.path("baked");
    let missing = s.bake(&out, &["--recipe", "/nonexistent/recipe.yaml"], &[]);
    let text = common::stderr(&missing);
    assert_eq!(text.matches("No such file or directory").count(), 1, "{text}");
    for (flag, value, needle) in [
        ("--alpha", "-1", "'-1' for '--alpha <ALPHA>': expected a finite number ≥ 0"),
        ("--limit", "0", "'0' for '--limit <LIMIT>': expected at least 1"),
        ("--batch-tokens", "0", "'0' for '--batch-tokens <BATCH_TOKENS>': expected at least 1 token"),
        ("--heads", "0", "'0' for '--heads <HEADS>': expected at least 1"),
        // A flag belongs to the commands it means something to: a bake scores no answers.
        ("--batch-size", "64", "unexpected argument '--batch-size'"),
    ] {
        let run = s.bake(&out, &[flag, value], &[]);
        common::assert_refused(&run, &[needle], Some(&out));
        assert!(
            !common::stderr(&run).contains("truthfulqa.yaml"),
            "{flag} was blamed on the recipe: {}",
            common::stderr(&run)
        );
    }
}

#[test]
fn hub_errors_name_the_cause_once_and_never_echo_huge_input() {
    // A port with nothing listening: the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bake"))
        .args(["inspect", "--model", "org/model"])
        .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("HF_HOME", home.path())
        .env("BAKE_HUB_TIMEOUT", "5")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let text = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("org/model: config.json") && text.to_lowercase().contains("connect"), "{text}");
    let url = format!("http://127.0.0.1:{port}/org/model/resolve/main/config.json");
    assert!(text.matches(&url).count() <= 1, "the URL is repeated: {text}");
    assert!(!text.contains("builder error"), "{text}");

    let huge = format!("org/{}", "n".repeat(100_000));
    let out = Command::new(env!("CARGO_BIN_EXE_bake")).args(["inspect", "--model", &huge]).output().unwrap();
    common::assert_refused(&out, &["unknown model", "100004 characters"], None);
    assert!(common::stderr(&out).len() < 1000, "{} bytes of error", common::stderr(&out).len());
}

#[test]
fn a_token_id_outside_the_vocabulary_names_the_tokenizer() {
    let s = Setup::new();
    let path = s.model().join("tokenizer.json");
    let mut tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    tokenizer["model"]["vocab"]["sky"] = 999_999.into();
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let out = s.path("baked");
    let run = s.bake(&out, &["--limit", "4"], &[]);
    common::assert_refused(&run, &["tokenizer.json", "token id 999999", "vocab_size 256"], Some(&out));
    assert!(common::stderr(&run).lines().count() < 10, "{}", common::stderr(&run));
}

// 19. An unwritable output is found before the work; an unusable cache is only a warning.

#[test]
fn an_unwritable_output_fails_first_and_an_unusable_cache_is_skipped() {
    let s = Setup::new();
    let blocker = s.path("a-file");
    std::fs::write(&blocker, "").unwrap();
    let out = blocker.join("baked");
    let run = s.bake(&out, &["--limit", "4"], &[]);
    common::assert_refused(&run, &["a-file", "cannot be written"], None);
    assert!(!common::stderr(&run).contains("activations"), "the check came after the work: {}", common::stderr(&run));

    let out = s.path("baked");
    let run = common::bake_synthetic(
        s.root.path(),
        &s.inputs,
        &["--out", out.to_str().unwrap(), "--limit", "4"],
        &[("BAKE_CACHE_DIR", blocker.join("cache").to_str().unwrap())],
    );
    assert_ok(&run);
    assert!(common::stderr(&run).contains("warning: activations not cached"), "{}", common::stderr(&run));
    assert_complete_bake(&out, s.model(), 15.0);
}

// 20. Sizes, paths, recipe keys and placeholders.

#[test]
fn bad_sizes_paths_keys_and_placeholders_get_clear_errors() {
    let s = Setup::new();
    let out = s.path("baked");
    for size in ["0", "-1", "999999999999TB", "5XB"] {
        let run = s.bake(&out, &["--max-shard-size", size], &[]);
        assert_eq!(run.status.code(), Some(2), "{size}: {}", common::stderr(&run));
        assert!(common::stderr(&run).contains("--max-shard-size"), "{size}: {}", common::stderr(&run));
    }
    for size in ["0", "-8GB"] {
        let run = s.bake(&out, &["--max-memory", size], &[]);
        assert_eq!(run.status.code(), Some(2), "{size}: {}", common::stderr(&run));
    }

    use std::os::unix::ffi::OsStrExt;
    let non_utf8 = s.root.path().join(std::ffi::OsStr::from_bytes(b"baked-\xff"));
    let run = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("--model")
        .arg(s.model())
        .arg("--dataset")
        .arg(&s.inputs.1)
        .arg("--out")
        .arg(&non_utf8)
        .output()
        .unwrap();
    common::assert_refused(&run, &["not valid UTF-8"], None);
    assert!(!non_utf8.exists());

    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/truthfulqa.yaml")).unwrap();
    let duplicate_line = shipped.lines().position(|l| l.starts_with("alpha:")).unwrap() + 2;
    let recipe = s.path("dup.yaml");
    std::fs::write(&recipe, shipped.replace("alpha: 15\n", "alpha: 15\nalpha: 20\n")).unwrap();
    let run = s.bake(&out, &["--recipe", recipe.to_str().unwrap()], &[]);
    common::assert_refused(&run, &["dup.yaml", &format!("line {duplicate_line}:"), "duplicate"], None);

    let recipe = s.path("placeholder.yaml");
    std::fs::write(&recipe, shipped.replace("\"Q: {question} A: {answer}\"", "\"Q: {question} A: {answer} {answr}\""))
        .unwrap();
    let run = s.bake(&out, &["--recipe", recipe.to_str().unwrap()], &[]);
    common::assert_refused(&run, &["placeholder.yaml", "prompts.probe", "`{answr}` is unknown"], None);
}

// Defects found in review (the code-health issue), each failing before its fix.

#[test]
fn an_alpha_zero_bake_verifies_with_a_forward_run() {
    let s = Setup::new();
    let out = s.path("baked");
    assert_ok(&s.bake(&out, &["--limit", "4", "--alpha", "0"], &[]));
    let run = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("verify")
        .arg(&out)
        .arg("--base")
        .arg(s.model())
        .arg("--run")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "α = 0 is a valid bake that changes nothing: {text}");
    assert!(text.contains("run"), "{text}");
}

#[test]
#[cfg_attr(not(fixture_root), ignore = "needs root to mount a small tmpfs")]
fn a_heatmap_that_cannot_be_written_is_an_io_error() {
    let mount = tempfile::tempdir().unwrap();
    common::mount_small_tmpfs(mount.path(), "64k");
    // Fill the filesystem, then ask for a heatmap on it.
    let filler = mount.path().join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 1 << 20]);
    let report = bake::probes::report::ProbeReport {
        tool_version: "test".into(),
        model: "m".into(),
        recipe: bake::recipe::Recipe::shipped(),
        layers: 30,
        heads_per_layer: 9,
        head_dim: 64,
        probe_prompts: 0,
        tuning_prompts: 0,
        val_accuracy: vec![vec![0.5; 9]; 30],
        heads: vec![bake::probes::Head { layer: 0, head: 0 }],
        train_questions: vec![],
        val_questions: vec![],
        tuning_question: vec![],
        sigma: vec![],
        delta: Default::default(),
        timings: None,
    };
    let result = bake::figure::write_png(&report.heatmap(), &mount.path().join("heatmap.png"));
    let _ = Command::new("umount").arg(mount.path()).status();
    match result {
        Err(bake::BakeError::Io { error, .. }) => assert!(error.to_string().contains("No space left"), "{error}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

// Issue #28: ownership by content, a card's provenance, what a dtype can carry, and checks before the work.

fn bake_command(s: &Setup, command: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg(command)
        .arg("--model")
        .arg(s.model())
        .arg("--dataset")
        .arg(&s.inputs.1)
        .args(args)
        .env("BAKE_CACHE_DIR", s.path("cache"))
        .output()
        .unwrap()
}

#[test]
fn force_replaces_a_bake_only_when_every_file_is_as_bake_recorded_it() {
    let s = Setup::new();
    let good = s.path("good");
    assert_ok(&s.bake(&good, &["--limit", "4"], &[]));
    let copy = |name: &str| {
        let dir = s.path(name);
        for file in bake::io::listing::entries_under(&good).unwrap() {
            std::fs::create_dir_all(dir.join(&file).parent().unwrap()).unwrap();
            std::fs::copy(good.join(&file), dir.join(&file)).unwrap();
        }
        dir
    };
    let refused = |dir: &Path, needles: &[&str]| {
        let before = common::files_of(dir);
        common::assert_refused(&s.bake(dir, &["--limit", "4", "--force"], &[]), needles, Some(dir));
        assert_eq!(common::files_of(dir), before, "{} was changed", dir.display());
    };
    // The user edited the model card: the sha256 bake recorded no longer holds.
    let dir = copy("edited-card");
    std::fs::write(dir.join("README.md"), "# my notes on this model\n").unwrap();
    refused(&dir, &["was not written by bake", "`README.md`", "bytes, listed as"]);
    // A real bake.json whose listed files all hold other content (same sizes).
    let dir = copy("other-content");
    for file in bake::io::listing::FileListing::read(&dir).unwrap().iter().map(|(f, _)| f.clone()) {
        let path = dir.join(&file);
        let zeros = vec![b'x'; std::fs::metadata(&path).unwrap().len() as usize];
        std::fs::write(&path, zeros).unwrap();
    }
    refused(&dir, &["was not written by bake", "sha256 differs"]);
    // bake.json edited by hand, even only its spacing.
    let dir = copy("hand-edited-manifest");
    let text = std::fs::read_to_string(dir.join("bake.json")).unwrap();
    std::fs::write(dir.join("bake.json"), text.replacen("  ", "   ", 1)).unwrap();
    refused(&dir, &["its bake.json is not as bake wrote it"]);
    // bake.log holding the user's words.
    let dir = copy("user-log");
    std::fs::write(dir.join("bake.log"), "my lab notebook: do not delete\n").unwrap();
    refused(&dir, &["its bake.log holds more than bake's timings"]);
    // The untouched copy is bake's, and is replaced.
    let dir = copy("untouched");
    assert_ok(&s.bake(&dir, &["--limit", "4", "--force"], &[]));
}

#[test]
fn force_replaces_a_probe_or_search_folder_only_when_its_outputs_json_vouches_for_every_file() {
    let s = Setup::new();
    let probe = |out: &Path, extra: &[&str]| {
        let mut args = vec!["--heads", "2", "--limit", "4", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        bake_command(&s, "probe", &args)
    };
    let search = |out: &Path| {
        let corpus = s.path("corpus.txt");
        std::fs::write(&corpus, "Bees make honey.\n\nThe sky is blue.\n").unwrap();
        let args = ["--limit", "4", "--corpus", corpus.to_str().unwrap(), "--force", "--out", out.to_str().unwrap()];
        bake_command(&s, "search", &args)
    };
    // A folder holding only the user's own report.json (or search.json and recipe.yaml).
    let mine = s.path("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("report.json"), "{\"my\": \"results\"}\n").unwrap();
    common::assert_refused(
        &probe(&mine, &["--force"]),
        &["was not written by bake", "no readable outputs.json"],
        Some(&mine),
    );
    let searched = s.path("searched");
    std::fs::create_dir(&searched).unwrap();
    std::fs::write(searched.join("search.json"), "{}\n").unwrap();
    std::fs::write(searched.join("recipe.yaml"), "alpha: 3\n").unwrap();
    common::assert_refused(&search(&searched), &["was not written by bake"], Some(&searched));
    assert!(mine.join("report.json").exists() && searched.join("recipe.yaml").exists());

    // bake's own folder, one file edited by the user: refused by both commands.
    let out = s.path("report");
    assert_ok(&probe(&out, &[]));
    assert!(out.join("outputs.json").exists());
    assert_ok(&probe(&out, &["--force"]));
    let text = std::fs::read_to_string(out.join("report.json")).unwrap();
    std::fs::write(out.join("report.json"), text.replacen("\"heads\"", "\"heads\" ", 1)).unwrap();
    let before = common::files_of(&out);
    common::assert_refused(&probe(&out, &["--force"]), &["`report.json`", "in its outputs.json"], Some(&out));
    common::assert_refused(&search(&out), &["`report.json`", "in its outputs.json"], Some(&out));
    assert_eq!(common::files_of(&out), before);

    // Two probe runs write the same bytes: their seconds go to probe.log, which outputs.json leaves out.
    let (p1, p2) = (s.path("probe-1"), s.path("probe-2"));
    assert_ok(&probe(&p1, &[]));
    assert_ok(&probe(&p2, &[]));
    let without_log = |dir: &Path| {
        let mut files = common::files_of(dir);
        assert!(files
            .remove("probe.log")
            .is_some_and(|log| bake::io::listing::is_timings_log(&String::from_utf8_lossy(&log))));
        files
    };
    assert_eq!(without_log(&p1), without_log(&p2), "two runs of one probe differ");

    // A search folder: its outputs.json leaves out search.log (seconds), so two searches list the same bytes;
    // bake's own folder is replaced, one whose search.log holds the user's text is not.
    let (first, second) = (s.path("search-1"), s.path("search-2"));
    assert_ok(&search(&first));
    assert_ok(&search(&second));
    let listed = |dir: &Path| std::fs::read(dir.join("outputs.json")).unwrap();
    assert_eq!(listed(&first), listed(&second), "outputs.json differs between two runs of one search");
    assert!(!String::from_utf8(listed(&first)).unwrap().contains("search.log"));
    assert_ok(&search(&first));
    std::fs::write(first.join("search.log"), "my notes on this search\n").unwrap();
    let before = common::files_of(&first);
    common::assert_refused(&search(&first), &["its search.log holds more than bake's timings"], Some(&first));
    assert_eq!(common::files_of(&first), before);
}

#[test]
fn eval_card_takes_only_its_own_bakes_numbers() {
    let s = Setup::new();
    let (a, b) = (s.path("a"), s.path("b"));
    assert_ok(&s.bake(&a, &["--limit", "4", "--alpha", "5"], &[]));
    assert_ok(&s.bake(&b, &["--limit", "4"], &[]));
    let other = s.path("other-model");
    let spec = bake::model::synthetic::SyntheticSpec { vocab: 256, seed: 7, ..Default::default() };
    bake::model::synthetic::write_synthetic_model(&other, &spec, u64::MAX).unwrap();
    std::fs::copy(s.model().join("tokenizer.json"), other.join("tokenizer.json")).unwrap();
    let before = (common::files_of(&a), common::files_of(&b));
    let eval = |model: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_bake"))
            .arg("eval")
            .arg("--model")
            .arg(model)
            .arg("--dataset")
            .arg(&s.inputs.1)
            .args(["--limit", "4", "--protocol", "leaderboard"])
            .args(args)
            .env("BAKE_CACHE_DIR", s.path("eval-cache"))
            .output()
            .unwrap()
    };
    // Another model's numbers into b's card.
    let run = eval(&other, &["--card", b.to_str().unwrap()]);
    common::assert_refused(&run, &["baked from a different base", "bake.json"], None);
    assert!(
        !common::stderr(&run).contains("eval: leaderboard"),
        "it evaluated before refusing: {}",
        common::stderr(&run)
    );
    // a's numbers into b's card.
    let run = eval(s.model(), &["--baked", a.to_str().unwrap(), "--card", b.to_str().unwrap()]);
    common::assert_refused(&run, &["its card can only hold its own evaluation", "a"], None);
    // A cross-validation of another α into b's card.
    let run = eval(s.model(), &["--cv", "2", "--heads", "2", "--alpha", "5", "--card", b.to_str().unwrap()]);
    common::assert_refused(&run, &["recipe.alpha", "another shift"], None);
    assert!(!s.path("eval-cache").exists(), "the activation pass ran before refusing");
    assert_eq!((common::files_of(&a), common::files_of(&b)), before);

    // Its own numbers: accepted, and the card's evaluation verifies against the base.
    assert_ok(&eval(s.model(), &["--baked", b.to_str().unwrap(), "--card", b.to_str().unwrap()]));
    assert!(std::fs::read_to_string(b.join("README.md")).unwrap().contains("## Evaluation (`bake eval`)"));
    let (code, report, err) = common::verify_json(&b, Some(s.model()), &[]);
    assert_eq!(code, 0, "{report} {err}");
}

#[test]
fn an_alpha_the_dtype_cannot_carry_is_refused_and_a_forged_one_never_verifies() {
    let s = Setup::new();
    let out = s.path("baked");
    let huge = s.bake(&out, &["--limit", "4", "--alpha", "3e38"], &[]);
    common::assert_refused(&huge, &["o_proj.bias", "residual stream", "lower alpha"], Some(&out));
    assert!(!out.exists());

    // A finite bias far beyond what the residual stream carries: every logit would be NaN.
    assert_forged_bias_never_verifies(&s, &out, 3e37, |m| {
        m["check"] == "finite" && m["message"].as_str().unwrap().contains("every logit would be NaN")
    });
}

#[test]
fn argument_and_corpus_errors_come_before_any_activation_work() {
    let s = Setup::new();
    let dir = s.path("corpora");
    std::fs::create_dir(&dir).unwrap();
    let corpus = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let fifo = dir.join("fifo.txt");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let looped = dir.join("loop.txt");
    std::os::unix::fs::symlink(&looped, &looped).unwrap();
    let oversized = dir.join("huge.txt");
    std::fs::File::create(&oversized).unwrap().set_len((1 << 30) + 1).unwrap();
    let bad_corpora: Vec<(PathBuf, &str)> = vec![
        (dir.join("missing.txt"), "missing.txt"),
        (fifo, "fifo.txt"),
        (dir.clone(), "corpora"),
        (looped, "loop.txt"),
        (oversized, "huge.txt"),
        (corpus("empty.txt", b""), "empty.txt"),
        (corpus("blank.txt", b"  \n\t\n \n"), "blank.txt"),
        (corpus("latin1.txt", b"caf\xe9 au lait\n"), "not UTF-8"),
        (corpus("binary.txt", &[0u8, 159, 146, 150, 0, 1]), "binary.txt"),
        (corpus("no-text.jsonl", b"{\"body\": \"hello there\"}\n"), "`text`"),
        (corpus("numeric.jsonl", b"{\"text\": 42}\n"), "`text`"),
        (corpus("broken.jsonl", b"{\"text\": \"unclosed\n"), "broken.jsonl"),
    ];
    for (path, needle) in &bad_corpora {
        for command in ["eval --cv 2 --heads 2", "search"] {
            let mut args: Vec<&str> = command.split(' ').skip(1).collect();
            args.extend(["--limit", "4", "--corpus", path.to_str().unwrap()]);
            let search_out = s.path("search-out");
            if command == "search" {
                args.extend(["--out", search_out.to_str().unwrap()]);
            }
            let run = bake_command(&s, command.split(' ').next().unwrap(), &args);
            common::assert_refused(&run, &[needle], None);
            assert!(!s.path("cache").exists(), "{command} {needle}: the activation pass ran before refusing");
            assert!(!search_out.exists(), "{command} {needle}: wrote an output");
        }
    }
    let good = corpus("good.txt", b"Bees make honey.\n\nThe sky is blue.\n");
    let good = good.to_str().unwrap();
    for (command, args, needle) in [
        ("eval", vec!["--cv", "0", "--heads", "2"], "'0' for '--cv <N>': expected a number of folds, at least 2"),
        ("eval", vec!["--cv", "1", "--heads", "2"], "'1' for '--cv <N>'"),
        ("eval", vec!["--cv", "5", "--heads", "2"], "5 folds: expected between 2 and the number of questions (4)"),
        ("search", vec!["--documents", "0", "--corpus", good], "documents must be ≥ 1"),
        ("search", vec!["--folds", "9", "--corpus", good], "9 folds: expected between 2 and the number of questions"),
        // A model that cannot be scored in the memory given: refused before the activation pass, not after it.
        ("eval", vec!["--cv", "2", "--heads", "2", "--max-memory", "1MB"], "layer-streamed about"),
        ("search", vec!["--max-memory", "1MB", "--corpus", good], "layer-streamed about"),
    ] {
        let mut args = args.clone();
        args.extend(["--limit", "4"]);
        let out = s.path("search-out");
        if command == "search" {
            args.extend(["--out", out.to_str().unwrap()]);
        }
        let run = bake_command(&s, command, &args);
        common::assert_refused(&run, &[needle], None);
        assert!(!s.path("cache").exists(), "{command} {args:?}: the activation pass ran before refusing");
    }
}
