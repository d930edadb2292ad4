//! Stage 5b: the baked output folder, written into a hidden staging folder beside `--out` and renamed into
//! place at the end, so a failure or interrupt never leaves a partial output.
//!
//! ```text
//! OUT/
//!   config.json                 base config, every key kept, attention_bias: true
//!   model*.safetensors (+index) every base tensor byte for byte, plus q/k/v/o biases
//!   tokenizer.json, ...         the base's companion files
//!   README.md                   model card
//!   report.json, heatmap.png    the probe stage (no timings: the folder is byte-reproducible)
//!   activation_diff/            pyvene IntervenableModel.load layout
//!   activation_diff.safetensors δ per layer in f32, heads/α/σ in the metadata
//!   bake.json                   manifest: recipe, splits, sha256 of every input and output file
//!   bake.log                    run-dependent facts (timings); not hashed
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::card;
use super::pyvene;
use super::shards::{copy_file, write_checkpoint, write_file, write_safetensors, TensorBytes, WrittenFile};
use crate::error::{IoContext, Result};
use crate::io::output::{Published, Staging};
use crate::model::{ModelFiles, StoredDtype};
use crate::pipeline::{write_probe_outputs, ProbeOutcome};
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::surgery;

pub const DIFF_DIR: &str = "activation_diff";
pub const DIFF_SAFETENSORS: &str = "activation_diff.safetensors";
pub use crate::io::listing::{LOG_FILE as LOG, MANIFEST_FILE as MANIFEST};

pub struct BakeOptions {
    pub max_shard_bytes: u64,
}

/// Writes the whole baked folder for `outcome` into `staging` and publishes it; returns the files it holds
/// (manifest included) and what the publication did.
pub fn write_baked(
    model: &ModelFiles,
    recipe: &Recipe,
    outcome: &ProbeOutcome,
    staging: Staging,
    options: &BakeOptions,
    log: &str,
    progress: &dyn Progress,
) -> Result<(Vec<WrittenFile>, Published)> {
    let dir = staging.path().to_path_buf();
    let dtype = model.dtype();

    progress.stage("write");
    let (mut written, added_tensors) = write_weights(model, outcome, dtype, &dir, options.max_shard_bytes, progress)?;
    written.push(write_config(model, &dir)?);
    let companions_from = written.len();
    for file in model.location.companion_files() {
        let name = file.file_name().expect("companion files have names");
        written.push(copy_file(&file, &dir.join(name))?);
    }
    // A copy has its source's sha256, so the copies' hashes are the inputs' hashes.
    let companions: Vec<WrittenFile> = written[companions_from..].to_vec();
    let mut report = outcome.report.clone();
    report.timings = None;
    write_probe_outputs(&report, &dir)?;
    written.extend(["report.json", "heatmap.png"].iter().map(|f| hashed(&dir.join(f))).collect::<Result<Vec<_>>>()?);
    written.extend(write_activation_diff(model, outcome, dtype, &dir)?);
    written.push(write_file(&dir.join("README.md"), card::model_card(model, recipe, &report).as_bytes())?);
    let manifest = manifest(model, recipe, outcome, &companions, &added_tensors, &written, &dir)?;
    written.push(write_file(&dir.join(MANIFEST), manifest.as_bytes())?);
    std::fs::write(dir.join(LOG), log).at(dir.join(LOG))?;
    flush_to_disk(&written)?;

    let published = staging.commit()?;
    let out = published.out.clone();
    let files = written.into_iter().map(|f| WrittenFile { path: out.join(f.path.strip_prefix(&dir).unwrap_or(&f.path)), ..f }).collect();
    Ok((files, published))
}

/// Makes every file durable before the rename publishes the folder; the files are flushed together so the
/// disk can merge the writes.
fn flush_to_disk(files: &[WrittenFile]) -> Result<()> {
    use rayon::prelude::*;
    files.par_iter().try_for_each(|f| std::fs::File::open(&f.path).and_then(|file| file.sync_all()).at(&f.path))
}

fn hashed(path: &Path) -> Result<WrittenFile> {
    let bytes = std::fs::metadata(path).at(path)?.len();
    Ok(WrittenFile { path: path.into(), bytes, sha256: super::shards::sha256_file(path)? })
}

fn write_weights(
    model: &ModelFiles,
    outcome: &ProbeOutcome,
    dtype: StoredDtype,
    dir: &Path,
    max_shard_bytes: u64,
    progress: &dyn Progress,
) -> Result<(Vec<WrittenFile>, Vec<String>)> {
    let ck = &model.checkpoint;
    let biases = surgery::bias_tensors(ck, &model.config, &outcome.deltas, dtype)?;
    let added: Vec<String> = biases.iter().filter(|t| ck.get(&t.name).is_none()).map(|t| t.name.clone()).collect();
    let replaced: std::collections::HashSet<&str> = biases.iter().map(|t| t.name.as_str()).collect();
    let mut tensors: Vec<TensorBytes> = ck
        .tensors
        .iter()
        .filter(|(name, _)| !replaced.contains(name.as_str()))
        .map(|(name, e)| TensorBytes { name: name.clone(), dtype: e.dtype, shape: e.shape.clone(), bytes: Cow::Borrowed(ck.bytes(e)) })
        .collect();
    tensors.extend(biases);
    progress.start(tensors.iter().map(|t| t.bytes.len() as u64).sum(), "bytes");
    let files = write_checkpoint(dir, tensors, max_shard_bytes, &|n| progress.advance(n))?;
    progress.finish();
    Ok((files, added))
}

/// The base config with every key kept in order and `attention_bias` set.
fn write_config(model: &ModelFiles, dir: &Path) -> Result<WrittenFile> {
    let mut config = model.config.raw.clone();
    config.insert("attention_bias".into(), Value::Bool(true));
    let text = serde_json::to_string_pretty(&Value::Object(config)).expect("JSON") + "\n";
    write_file(&dir.join("config.json"), text.as_bytes())
}

fn write_activation_diff(model: &ModelFiles, outcome: &ProbeOutcome, dtype: StoredDtype, dir: &Path) -> Result<Vec<WrittenFile>> {
    let width = model.config.attn_width();
    let diff_dir = dir.join(DIFF_DIR);
    std::fs::create_dir_all(&diff_dir).at(&diff_dir)?;
    let shifted: Vec<(usize, &Vec<f32>)> = outcome.deltas.iter().enumerate().filter_map(|(l, d)| d.as_ref().map(|d| (l, d))).collect();
    let layers: Vec<usize> = shifted.iter().map(|(l, _)| *l).collect();
    let mut written = vec![write_file(&diff_dir.join("config.json"), pyvene::config_json(&layers, width).as_bytes())?];
    for (layer, delta) in &shifted {
        let bytes = pyvene::intervention_file(dtype.encode(delta.iter().copied()), width, dtype);
        written.push(write_file(&diff_dir.join(pyvene::file_name(*layer)), &bytes)?);
    }
    // The safetensors twin, readable without torch: δ exactly as the biases were computed from (f32); the
    // pyvene files hold it rounded to the model dtype.
    let twin: Vec<TensorBytes> = shifted
        .iter()
        .map(|(l, d)| TensorBytes {
            name: format!("layers.{l}.self_attn.o_proj.input.delta"),
            dtype: StoredDtype::F32,
            shape: vec![width],
            bytes: Cow::Owned(StoredDtype::F32.encode(d.iter().copied())),
        })
        .collect();
    let metadata = BTreeMap::from([
        ("alpha".to_string(), outcome.report.recipe.alpha.to_string()),
        ("heads".to_string(), serde_json::to_string(&outcome.report.heads).expect("JSON")),
        ("sigma".to_string(), serde_json::to_string(&outcome.report.sigma).expect("JSON")),
        ("hook".to_string(), "model.layers[l].self_attn.o_proj.input".to_string()),
        ("model_dtype".to_string(), dtype.torch_name().to_string()),
    ]);
    let twin_refs: Vec<&TensorBytes> = twin.iter().collect();
    written.push(write_safetensors(&dir.join(DIFF_SAFETENSORS), &twin_refs, &metadata, &|_| {})?);
    Ok(written)
}

fn relative(path: &Path, dir: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).to_string_lossy().replace('\\', "/")
}

/// `bake.json`: what went in, how, and what came out, each file with its sha256.
fn manifest(
    model: &ModelFiles,
    recipe: &Recipe,
    outcome: &ProbeOutcome,
    companions: &[WrittenFile],
    added_tensors: &[String],
    written: &[WrittenFile],
    dir: &Path,
) -> Result<String> {
    let model_dir = &model.location.dir;
    let mut inputs: BTreeMap<String, String> =
        outcome.model_hashes.iter().map(|(p, h)| (format!("model/{}", relative(p, model_dir)), h.clone())).collect();
    for copy in companions {
        inputs.insert(format!("model/{}", relative(&copy.path, dir)), copy.sha256.clone());
    }
    for (p, h) in &outcome.dataset.files {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let config = p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        inputs.insert(format!("dataset/{config}/{name}"), h.clone());
    }
    let outputs: BTreeMap<String, Value> =
        written.iter().map(|f| (relative(&f.path, dir), json!({ "sha256": f.sha256, "bytes": f.bytes }))).collect();
    let manifest = json!({
        "tool": "bake",
        "tool_version": crate::VERSION,
        "method": "inference-time intervention (Li et al. 2023), baked as o_proj biases b = W_o · δ",
        "base_model": outcome.report.model,
        "base_revision": model.location.revision,
        "recipe": recipe,
        "recipe_sha256": recipe.sha256(),
        "seed": recipe.seed,
        "dtype": model.dtype(),
        "heads": outcome.report.heads,
        "train_questions": outcome.split.train,
        "val_questions": outcome.split.val,
        "tuning_question": outcome.report.tuning_question,
        "config_changes": { "attention_bias": { "base": model.config.raw.get("attention_bias"), "baked": true } },
        "added_tensors": added_tensors,
        "inputs": inputs,
        "outputs": outputs,
    });
    Ok(serde_json::to_string_pretty(&manifest).expect("JSON") + "\n")
}
