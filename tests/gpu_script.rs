//! `scripts/gpu-check.sh` runs once, on a lent GPU, with no second chance: its measurement script is run here
//! in its smoke mode (tiny shapes, the CPU, this build's binary) so that every section is known to work
//! before device time is spent on it.

mod common;

use std::process::Command;

use bake::activations::pass_inputs;
use bake::model::TextTokenizer;
use bake::recipe::Recipe;
use serde_json::Value;

#[test]
#[cfg_attr(not(all(fixture_smollm2, fixture_python)), ignore = "needs BAKE_SMOLLM2 and BAKE_PYTHON (see tests/common)")]
fn the_gpu_check_script_runs_every_section_in_smoke_mode() {
    let (smollm2, python) = (common::smollm2_dir(), common::python());
    let tmp = tempfile::tempdir().unwrap();
    let carry = tmp.path().join("carry");
    std::fs::create_dir(&carry).unwrap();
    std::fs::copy(smollm2.join("tokenizer.json"), carry.join("tokenizer.json")).unwrap();
    let mut recipe = Recipe::shipped();
    recipe.limit = Some(30);
    let inputs = pass_inputs(&recipe, &TextTokenizer::load(&carry.join("tokenizer.json")).unwrap()).unwrap();
    std::fs::write(carry.join("prompts.json"), serde_json::to_string(&inputs).unwrap()).unwrap();

    let (work, out) = (tmp.path().join("work"), tmp.path().join("out"));
    std::fs::create_dir(&work).unwrap();
    let run = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu/check.py"))
        .arg("--smoke")
        .args(["--bake", env!("CARGO_BIN_EXE_bake")])
        .arg("--carry")
        .arg(&carry)
        .arg("--work")
        .arg(&work)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let result: Value = serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap()).unwrap();
    for section in ["parity", "speed", "end_to_end", "evaluation", "streaming"] {
        assert!(result[section].get("error").is_none(), "{section}: {}", result[section]);
    }
    // The bf16 pass (on the CPU here) against transformers' own bf16 error, as on the GPU.
    for ratio in result["parity"]["ratio_to_transformers_per_layer"].as_array().unwrap() {
        assert!(ratio.as_f64().unwrap() <= 1.5, "{}", result["parity"]);
    }
    assert!(result["streaming"]["plan"].as_str().unwrap().contains("layer-streamed"), "{}", result["streaming"]);
    assert!(result["streaming"]["max_abs_vs_resident"].as_f64().unwrap() <= 1e-5, "{}", result["streaming"]);
    assert!(result["speed"]["speedup_vs_reference"].as_f64().unwrap() > 0.0, "{}", result["speed"]);
    assert!(result["end_to_end"]["stage_seconds"]["write"].is_number(), "{}", result["end_to_end"]);
    let rows = result["evaluation"]["rows"].as_array().unwrap();
    assert!(rows.len() == 2 && rows[1]["kl"].as_f64().unwrap() >= 0.0, "{}", result["evaluation"]);
}
