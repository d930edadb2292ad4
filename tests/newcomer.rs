//! What a newcomer gets without `../shared`, a network or Python: TruthfulQA built into the binary, a bake of
//! a model made on the spot end to end on it, a heatmap worth looking at, and a terminal summary that says
//! what to run next.

mod common;

use std::path::Path;
use std::process::Command;

use bake::data::{builtin, TruthfulQa};
use bake::model::synthetic::{write_byte_level_tokenizer, write_synthetic_model, SyntheticSpec, BYTE_LEVEL_VOCAB};
use bake::probes::Head;
use serde_json::Value;

#[test]
fn the_builtin_copy_is_the_whole_of_truthfulqa() {
    let data = TruthfulQa::load(builtin::SOURCE, builtin::SPLIT, None).unwrap();
    assert_eq!(data.questions.len(), 817);
    assert_eq!(data.questions.iter().map(|q| q.mc2.len()).sum::<usize>(), 5882);
    let answers: usize = data.questions.iter().map(|q| q.correct_answers.len() + q.incorrect_answers.len()).sum();
    assert_eq!(answers, 5918);
    // Recorded under the Hub's file names, so that a manifest does not tell the two apart.
    let names: Vec<String> = data.files.iter().map(|(p, _)| bake::export::manifest::dataset_key(p)).collect();
    assert_eq!(
        names,
        [
            "dataset/multiple_choice/validation-00000-of-00001.parquet",
            "dataset/generation/validation-00000-of-00001.parquet"
        ]
    );
    let error = TruthfulQa::load(builtin::SOURCE, "train", None).unwrap_err().to_string();
    assert!(error.contains("only `validation`"), "{error}");
}

#[test]
fn the_builtin_prompts_are_truthfulqas() {
    // Lengths in characters as the reference code's constants have them; the instruction's quotes are curly.
    assert_eq!(builtin::INSTRUCTION_DEFAULT.chars().count(), 227);
    assert!(builtin::INSTRUCTION_DEFAULT.contains("\u{201c}I have no comment\u{201d}"));
    assert_eq!(builtin::QA_PRIMER.chars().count(), 573);
    assert_eq!(builtin::QA_PRIMER.matches("\n\nQ: ").count(), 5, "six pairs joined by blank lines");
    assert!(!builtin::QA_PRIMER.ends_with('\n') && !builtin::INSTRUCTION_INFORMATIVE.ends_with('\n'));
}

#[test]
#[cfg_attr(not(fixture_shared), ignore = "needs the shared folder (BAKE_SHARED)")]
fn the_builtin_copy_equals_the_pinned_hub_files() {
    let shared = common::shared_dir();
    let folder = shared.join("data/truthfulqa");
    let builtin = TruthfulQa::load(builtin::SOURCE, builtin::SPLIT, None).unwrap();
    for (path, sha256) in &builtin.files {
        let config = path.parent().unwrap().file_name().unwrap();
        let hub_file = folder.join(config).join(path.file_name().unwrap());
        assert_eq!(&bake::io::hash::sha256_file(&hub_file).unwrap(), sha256, "{}", hub_file.display());
    }
    let jsonl = TruthfulQa::load(folder.to_str().unwrap(), "validation", None).unwrap();
    for (a, b) in common::zip_exact(&builtin.questions, &jsonl.questions) {
        assert_eq!(
            (&a.question, &a.mc1, &a.mc2, &a.best_answer, &a.correct_answers, &a.incorrect_answers),
            (&b.question, &b.mc1, &b.mc2, &b.best_answer, &b.correct_answers, &b.incorrect_answers)
        );
    }
}

/// A random 2-layer LLaMA with a byte-level tokenizer: bakeable on any text, made in milliseconds.
fn synthetic_model(dir: &Path) {
    let spec = SyntheticSpec { vocab: BYTE_LEVEL_VOCAB, ..Default::default() };
    write_synthetic_model(dir, &spec, u64::MAX).unwrap();
    write_byte_level_tokenizer(dir).unwrap();
}

#[test]
fn a_synthetic_model_bakes_end_to_end_on_the_builtin_data() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, out) = (tmp.path().join("model"), tmp.path().join("baked"));
    synthetic_model(&model);
    let bake = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("--model")
        .arg(&model)
        .args(["--limit", "20", "--heads", "3", "--out"])
        .arg(&out)
        .env("BAKE_CACHE_DIR", tmp.path().join("cache"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&bake.stdout), String::from_utf8_lossy(&bake.stderr));
    assert!(bake.status.success(), "{stderr}");

    // The summary: every stage with its time, the output, and the commands to run next, naming this bake.
    for stage in ["data", "activations", "probes", "write", "total"] {
        assert!(stdout.lines().any(|l| l.trim_start().starts_with(stage) && l.ends_with(" s")), "{stage}: {stdout}");
    }
    let out_text = out.display().to_string();
    for next in ["bake verify", "bake eval", "bake push"] {
        assert!(stdout.lines().any(|l| l.contains(next) && l.contains(&out_text)), "{next}: {stdout}");
    }
    assert!(stdout.contains("heads (K)    3 of 8"), "{stdout}");
    // Progress goes to stderr, each stage line with the time since the start.
    assert!(stderr.lines().any(|l| l.starts_with("bake: ") && l.contains(" s  activations")), "{stderr}");

    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("bake.json")).unwrap()).unwrap();
    assert_eq!(manifest["recipe"]["dataset"]["source"], "builtin");
    let data = TruthfulQa::load(builtin::SOURCE, builtin::SPLIT, Some(20)).unwrap();
    for (path, sha256) in &data.files {
        assert_eq!(manifest["inputs"][bake::export::manifest::dataset_key(path)], sha256.as_str());
    }
    let verify =
        Command::new(env!("CARGO_BIN_EXE_bake")).arg("verify").arg(&out).arg("--base").arg(&model).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));

    // The card shows the figure it ships.
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("![") && card.contains("(heatmap.png)"), "{card}");
    assert!(out.join("heatmap.svg").is_file());
}

#[test]
fn quiet_bakes_print_no_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    synthetic_model(&model);
    let bake = Command::new(env!("CARGO_BIN_EXE_bake"))
        .arg("--quiet")
        .arg("--model")
        .arg(&model)
        .args(["--limit", "4", "--heads", "2", "--out"])
        .arg(tmp.path().join("baked"))
        .env("BAKE_CACHE_DIR", tmp.path().join("cache"))
        .output()
        .unwrap();
    assert!(bake.status.success(), "{}", String::from_utf8_lossy(&bake.stderr));
    assert_eq!(String::from_utf8_lossy(&bake.stderr), "", "--quiet printed progress");
    assert!(String::from_utf8_lossy(&bake.stdout).contains("next:"));
}

/// RGB pixels of a PNG, with its size.
fn decode_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    pixels.truncate(info.buffer_size());
    (info.width, info.height, pixels)
}

#[test]
fn the_heatmap_is_a_figure_at_every_model_size() {
    use bake::figure::Figure;
    use bake::probes::heatmap::Heatmap;
    let tmp = tempfile::tempdir().unwrap();
    for (layers, heads) in [(30, 9), (32, 32), (80, 64)] {
        let accuracy: Vec<Vec<f64>> = (0..layers)
            .map(|l| (0..heads).map(|h| 0.5 + 0.4 * ((l * 7 + h * 3) % 11) as f64 / 10.0).collect())
            .collect();
        let chosen = [Head { layer: layers / 2, head: heads / 2 }, Head { layer: 0, head: 0 }];
        let figure = Heatmap {
            accuracy: &accuracy,
            chosen: &chosen,
            title: "Title".into(),
            subtitle: "sub".into(),
            columns: "attention head",
        };
        let path = tmp.path().join(format!("{layers}x{heads}.png"));
        bake::figure::write_png(&figure, &path).unwrap();
        let (width, height, pixels) = decode_png(&path);
        assert_eq!((width, height), figure.size(), "{layers} x {heads}");
        assert!(width >= 600 && (300..=800).contains(&height), "{layers} x {heads}: {width} x {height}");
        let colours: std::collections::BTreeSet<&[u8]> = pixels.chunks(3).collect();
        assert!(colours.len() >= 20, "{layers} x {heads}: only {} colours: a blank figure?", colours.len());
        let white = pixels.chunks(3).filter(|p| p == &[255, 255, 255]).count();
        let share = white as f64 / (width * height) as f64;
        assert!((0.2..0.9).contains(&share), "{layers} x {heads}: {:.0}% white", share * 100.0);
        // Text was drawn: dark, grey-ish pixels outside the grid (the title, ticks and labels).
        let ink = pixels.chunks(3).filter(|p| p.iter().all(|&c| c < 90) && p[0].abs_diff(p[2]) < 20).count();
        assert!(ink > 500, "{layers} x {heads}: {ink} dark pixels: no text?");
        // The chosen heads are outlined in red.
        let red = pixels.chunks(3).filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60).count();
        assert!(red >= 8 * chosen.len(), "{layers} x {heads}: {red} red pixels");

        let svg_path = path.with_extension("svg");
        bake::figure::write_svg(&figure, &svg_path).unwrap();
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        // Text stays text in SVG: the title, the labels and every tick.
        assert!(svg.starts_with("<svg") && svg.contains("\nTitle\n") && svg.contains("probe validation accuracy"));
        assert!(svg.matches("<text").count() > 10, "{layers} x {heads}: too few labels in the SVG");
        // Deterministic: the same figure twice is the same bytes.
        let again = tmp.path().join("again.png");
        bake::figure::write_png(&figure, &again).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&again).unwrap());
    }
}

#[test]
fn progress_reaches_a_log_when_stderr_is_no_terminal() {
    let root = tempfile::tempdir().unwrap();
    let inputs = common::synthetic_inputs(root.path());
    let out = root.path().join("baked");
    // stderr is a pipe here, as in `nohup`, `tee` or CI; a line per step instead of one per 30 seconds.
    let args = ["--limit", "6", "--batch-tokens", "64", "--no-cache", "--out", out.to_str().unwrap()];
    let run = common::bake_synthetic(root.path(), &inputs, &args, &[("BAKE_PROGRESS_SECONDS", "0")]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let counted: Vec<&str> = stderr.lines().filter(|l| l.contains("%), ") && l.contains(" of ")).collect();
    assert!(counted.len() >= 3, "no progress lines for a multi-batch pass: {stderr}");
    assert!(counted.iter().any(|l| l.contains("(100%)")), "the count does not end at its total: {stderr}");
    assert!(stderr.contains("s  activations"), "no stage line: {stderr}");
}
