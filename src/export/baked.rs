//! The baked output folder, written into a staging folder ([`crate::io::output`]) and published
//! at the end, so a failure or interrupt never leaves a partial output.
//!
//! ```text
//! OUT/
//!   config.json                 base config, every key kept, attention_bias: true (mlp_bias: true for the
//!                               residual method; Mistral and Qwen2 written as LlamaForCausalLM, which reads
//!                               an o_proj and a down_proj bias)
//!   model*.safetensors (+index) every base tensor byte for byte, plus q/k/v/o (or gate/up/down) biases: by
//!                               default the base's weight files copied whole and one file added for the new
//!                               biases
//!   tokenizer.json, ...         the base's companion files
//!   README.md                   model card
//!   report.json, heatmap.png/.svg  the probe stage (no timings: the folder is byte-reproducible)
//!   activation_diff/            pyvene IntervenableModel.load layout
//!   activation_diff.safetensors δ per layer in f32, heads/α/σ in the metadata
//!   bake.json                   manifest: recipe, splits, sha256 of every input and output file
//!   bake.log                    run-dependent facts (timings); not hashed
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::manifest::{self, ConfigChange, Manifest};
use super::{card, pyvene};
use crate::error::{IoContext, Result};
use crate::io::dtype::StoredDtype;
use crate::io::hash::sha256_file;
use crate::io::listing::{FileEntry, FileListing};
use crate::io::names;
use crate::io::output::{Published, Staging};
use crate::io::safetensors::{
    copy_file, safetensors_bytes, write_checkpoint, write_file, write_shards, CopiedShard, Shard, TensorBytes,
    WrittenFile,
};
use crate::model::weights::{Checkpoint, TensorEntry};
use crate::model::{ModelFiles, Site};
use crate::probes::report::ProbeReport;
use crate::probes::Deltas;
use crate::progress::{Laps, Progress};
use crate::surgery;

pub const DIFF_DIR: &str = "activation_diff";
pub const DIFF_SAFETENSORS: &str = "activation_diff.safetensors";
pub use crate::io::listing::{LOG_FILE as LOG, MANIFEST_FILE as MANIFEST};

pub struct BakeOptions {
    pub sharding: Sharding,
}

/// How the baked weights are laid out in files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// The base's weight files, renamed `model-0000i-of-0000N.safetensors`, each copied byte for byte unless
    /// it holds a tensor the bake replaces (an o_proj bias the base already has; that file is rewritten
    /// with the new value), and one more file for the tensors the bake adds. The fast default: the copies
    /// are the kernel's and keep the hashes taken when the base was read.
    KeepBase,
    /// Every tensor rewritten in name order into files of at most this many bytes.
    MaxBytes(u64),
}

/// What a bake writes beside the base model's own files: the probe stage's result, narrowed to what the
/// folder records.
pub struct BakeInput<'a> {
    pub model: &'a ModelFiles,
    /// `report.json` (recipe, splits, heads, σ, δ); its timings go to `bake.log`, not into the folder.
    pub report: &'a ProbeReport,
    /// δ per layer at the method's site (o_proj input or residual); `None` for layers without a shift.
    pub deltas: &'a Deltas,
    /// sha256 of the model's config and weight files.
    pub model_hashes: &'a [(PathBuf, String)],
    /// sha256 of the dataset files.
    pub dataset_hashes: &'a [(PathBuf, String)],
    /// What the shift costs, measured before writing (`None`: not measured).
    pub cost: Option<&'a manifest::Cost>,
}

/// What [`write_baked`] wrote and did.
pub struct BakeWritten {
    /// Every file of the folder (manifest included), at its published path.
    pub files: Vec<WrittenFile>,
    pub published: Published,
    /// Seconds of each part of the write step, in order: `biases` (W_o · δ), `weights` (the weight files
    /// written or copied, and flushed to disk), `other files` (config, tokenizer, card, figures, diff,
    /// manifest, flushed; and the publishing rename).
    pub timings: Vec<(String, f64)>,
}

/// Writes the whole baked folder into `staging` and publishes it.
pub fn write_baked(
    input: &BakeInput,
    staging: Staging,
    options: &BakeOptions,
    progress: &dyn Progress,
) -> Result<BakeWritten> {
    let (model, dir) = (input.model, staging.path().to_path_buf());
    let dtype = model.dtype();
    let mut clock = Laps::start();

    progress.stage("write");
    // A bake some runtime would serve without its shift is a warning, which --quiet does not hide.
    if let Some(warning) = super::runtimes::warning(model.config.family) {
        progress.warn(&warning);
    }
    if let Some(note) = card::architecture_note(model, input.report.recipe.method.site()) {
        progress.note(&note);
    }
    let site = input.report.recipe.method.site();
    let biases = surgery::bias_tensors(&model.checkpoint, &model.config, (site, input.deltas), dtype)?;
    clock.lap("biases");
    let mut written = write_weights(input, biases, &dir, options.sharding, progress)?;
    clock.lap("weights");
    written.push(write_file(&dir.join("config.json"), config_text(model, site).as_bytes())?);
    let mut model_hashes = input.model_hashes.to_vec();
    for file in model.location.companion_files() {
        let name = file.file_name().expect("companion files have names");
        let copy = copy_file(&file, &dir.join(name))?;
        // A copy has its source's sha256.
        model_hashes.push((file, copy.sha256.clone()));
        written.push(copy);
    }
    let report = ProbeReport { timings: None, ..input.report.clone() };
    for path in report.write_files(&dir)? {
        written.push(hashed(&path)?);
    }
    written.extend(write_activation_diff(input, dtype, &dir)?);
    written.push(write_file(&dir.join("README.md"), card::model_card(model, &report, input.cost).as_bytes())?);
    let manifest = bake_manifest(input, &model_hashes, &written, &dir);
    written.push(write_file(&dir.join(MANIFEST), manifest.to_text().as_bytes())?);
    std::fs::write(dir.join(LOG), log_text(input.report)).at(dir.join(LOG))?;
    clock.lap("other files");
    flush_to_disk(&written)?;
    let published = staging.commit()?;
    clock.lap("flush to disk");
    let out = published.out.clone();
    let files = written
        .into_iter()
        .map(|f| WrittenFile { path: out.join(f.path.strip_prefix(&dir).unwrap_or(&f.path)), ..f })
        .collect();
    Ok(BakeWritten { files, published, timings: clock.done })
}

/// `bake.log` (and `probe.log`): what differs from run to run (seconds per stage), kept out of the hashed files.
pub fn log_text(report: &ProbeReport) -> String {
    report.timings.iter().flatten().map(|(stage, seconds)| format!("{stage}: {seconds:.2} s\n")).collect()
}

/// Makes files durable before the rename publishes the folder; flushed together so the disk can merge the
/// writes.
fn flush_to_disk(files: &[WrittenFile]) -> Result<()> {
    use rayon::prelude::*;
    files.par_iter().try_for_each(|f| std::fs::File::open(&f.path).and_then(|file| file.sync_all()).at(&f.path))
}

fn hashed(path: &Path) -> Result<WrittenFile> {
    let bytes = std::fs::metadata(path).at(path)?.len();
    Ok(WrittenFile { path: path.into(), bytes, sha256: sha256_file(path)? })
}

fn write_weights<'a>(
    input: &BakeInput<'a>,
    biases: Vec<TensorBytes<'a>>,
    dir: &Path,
    sharding: Sharding,
    progress: &dyn Progress,
) -> Result<Vec<WrittenFile>> {
    let ck = &input.model.checkpoint;
    let base_bytes: u64 = ck.tensors.values().map(|e| (e.end - e.start) as u64).sum();
    let biases_bytes: u64 = biases.iter().map(|t| t.bytes.len() as u64).sum();
    let replaced_bytes: u64 = biases.iter().filter_map(|t| ck.get(&t.name)).map(|e| (e.end - e.start) as u64).sum();
    progress.start(base_bytes - replaced_bytes + biases_bytes, "bytes");
    // Each base tensor's mapped pages are handed back once it is written: the write step's memory stays at
    // one tensor, whatever the model's size.
    let on_written = |name: &str, bytes: u64| {
        progress.advance(bytes);
        ck.release(&[name]);
    };
    let files = match sharding {
        Sharding::MaxBytes(max) => write_checkpoint(dir, with_replacements(ck, biases), max, &on_written)?,
        Sharding::KeepBase => write_shards(dir, base_layout(ck, biases, input.model_hashes), &on_written)?,
    };
    progress.finish();
    Ok(files)
}

/// Every base tensor, the ones `biases` replace swapped for them, and the added biases.
fn with_replacements<'a>(ck: &'a Checkpoint, biases: Vec<TensorBytes<'a>>) -> Vec<TensorBytes<'a>> {
    let mut biases: HashMap<String, TensorBytes> = biases.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut tensors: Vec<TensorBytes> =
        ck.tensors.iter().map(|(name, e)| biases.remove(name).unwrap_or_else(|| base_tensor(ck, name, e))).collect();
    tensors.extend(biases.into_values());
    tensors
}

/// [`Sharding::KeepBase`]: one shard per base file, copied unless it holds a replaced tensor, then the added
/// tensors in name order.
fn base_layout<'a>(ck: &'a Checkpoint, biases: Vec<TensorBytes<'a>>, hashes: &[(PathBuf, String)]) -> Vec<Shard<'a>> {
    let mut biases: HashMap<String, TensorBytes> = biases.into_iter().map(|t| (t.name.clone(), t)).collect();
    let mut shards: Vec<Shard> = ck
        .files
        .iter()
        .enumerate()
        .map(|(file, path)| {
            let tensors: Vec<(&String, &TensorEntry)> = ck.tensors.iter().filter(|(_, e)| e.file == file).collect();
            let known_hash = hashes.iter().find(|(p, _)| p == path).map(|(_, h)| h.clone());
            match known_hash {
                Some(sha256) if !tensors.iter().any(|(name, _)| biases.contains_key(*name)) => {
                    let tensors =
                        tensors.iter().map(|(name, e)| (name.to_string(), (e.end - e.start) as u64)).collect();
                    Shard::Copy(CopiedShard { from: path.clone(), sha256, tensors })
                }
                _ => Shard::Write(
                    tensors
                        .into_iter()
                        .map(|(name, e)| biases.remove(name).unwrap_or_else(|| base_tensor(ck, name, e)))
                        .collect(),
                ),
            }
        })
        .collect();
    let mut added: Vec<TensorBytes> = biases.into_values().collect();
    if !added.is_empty() {
        added.sort_by(|a, b| a.name.cmp(&b.name));
        shards.push(Shard::Write(added));
    }
    shards
}

/// A base tensor, its bytes borrowed from the map.
fn base_tensor<'a>(ck: &'a Checkpoint, name: &str, e: &TensorEntry) -> TensorBytes<'a> {
    TensorBytes { name: name.to_string(), dtype: e.dtype, shape: e.shape.clone(), bytes: ck.bytes(e).into() }
}

/// The keys of `config.json` a bake at `site` changes: the flag of each bias it writes (`attention_bias`,
/// `mlp_bias`; see [`surgery::sets_attention_bias`]), and for a family whose own class would drop the bias,
/// the class itself (see [`crate::model::config::Family::written_as_llama`]). The manifest records each key's
/// base value, so the original architecture stays on record.
pub fn config_changes(model: &ModelFiles, site: Site) -> BTreeMap<String, ConfigChange> {
    let raw = &model.config.raw;
    let change = |key: &str, baked: Value| (key.to_string(), ConfigChange { base: raw.get(key).cloned(), baked });
    let mut changes = BTreeMap::new();
    if surgery::sets_attention_bias(site, model.config.family) {
        changes.extend([change("attention_bias", Value::Bool(true))]);
    }
    if site == Site::Residual {
        changes.extend([change("mlp_bias", Value::Bool(true))]);
    }
    let (family, baked_as) = (model.config.family, model.config.family.baked_as());
    if baked_as != family {
        changes.extend([
            change("model_type", baked_as.model_type().into()),
            change("architectures", serde_json::json!([baked_as.architecture()])),
        ]);
    }
    changes
}

/// `config.json` of a bake of `model` at `site`: the base config with every key kept in order and the changed
/// keys set.
pub fn config_text(model: &ModelFiles, site: Site) -> String {
    let mut config = model.config.raw.clone();
    for (key, change) in config_changes(model, site) {
        config.insert(key, change.baked);
    }
    serde_json::to_string_pretty(&Value::Object(config)).expect("JSON") + "\n"
}

fn write_activation_diff(input: &BakeInput, dtype: StoredDtype, dir: &Path) -> Result<Vec<WrittenFile>> {
    std::fs::create_dir_all(dir.join(DIFF_DIR)).at(dir.join(DIFF_DIR))?;
    let width = input.model.config.width_at(input.report.recipe.method.site());
    activation_diff_files(input.report, input.deltas, width, dtype)
        .into_iter()
        .map(|(name, bytes)| write_file(&dir.join(name), &bytes))
        .collect()
}

/// The pyvene diff (`activation_diff/`) and its safetensors twin: each file's path in the folder and its
/// bytes. What a bake writes and what `bake verify` re-derives them from.
pub fn activation_diff_files(
    report: &ProbeReport,
    deltas: &Deltas,
    width: usize,
    dtype: StoredDtype,
) -> Vec<(String, Vec<u8>)> {
    let site = report.recipe.method.site();
    let shifted: Vec<(usize, &Vec<f32>)> =
        deltas.iter().enumerate().filter_map(|(l, d)| d.as_ref().map(|d| (l, d))).collect();
    let layers: Vec<usize> = shifted.iter().map(|(l, _)| *l).collect();
    let mut files = vec![(format!("{DIFF_DIR}/config.json"), pyvene::config_json(&layers, (site, width)).into_bytes())];
    for (layer, delta) in &shifted {
        let bytes = pyvene::intervention_file(dtype.encode(delta.iter().copied()), width, dtype);
        files.push((format!("{DIFF_DIR}/{}", pyvene::file_name(*layer, site)), bytes));
    }
    // The safetensors twin, readable without torch: δ exactly as the biases were computed from (f32); the
    // pyvene files hold it rounded to the model dtype.
    let twin: Vec<TensorBytes> = shifted
        .iter()
        .map(|(l, d)| TensorBytes {
            name: names::Layer(*l).delta(site),
            dtype: StoredDtype::F32,
            shape: vec![width],
            bytes: StoredDtype::F32.encode(d.iter().copied()).into(),
        })
        .collect();
    // Every number of report.json that no other file holds exactly (every head's accuracy, the prompt counts)
    // is here too, so that `bake verify` sees an edit of either file.
    let metadata = BTreeMap::from([
        ("alpha".to_string(), report.recipe.alpha.to_string()),
        ("heads".to_string(), json_text(&report.heads)),
        ("sigma".to_string(), json_text(&report.sigma)),
        ("val_accuracy".to_string(), json_text(&report.val_accuracy)),
        ("prompts".to_string(), json_text(&[report.probe_prompts, report.tuning_prompts])),
        ("hook".to_string(), names::Layer(0).component(site).replacen("[0]", "[l]", 1)),
        ("model_dtype".to_string(), dtype.torch_name().to_string()),
    ]);
    let twin_refs: Vec<&TensorBytes> = twin.iter().collect();
    files.push((DIFF_SAFETENSORS.to_string(), safetensors_bytes(&twin_refs, &metadata)));
    files
}

fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain JSON")
}

/// `bake.json` for this bake.
fn bake_manifest(
    input: &BakeInput,
    model_hashes: &[(PathBuf, String)],
    written: &[WrittenFile],
    dir: &Path,
) -> Manifest {
    let outputs = written
        .iter()
        .map(|f| (manifest::relative(&f.path, dir), FileEntry { sha256: f.sha256.clone(), bytes: f.bytes }))
        .collect();
    expected_manifest(
        input.model,
        input.report,
        Recorded {
            base_revision: input.model.location.revision.clone(),
            inputs: manifest::inputs(&input.model.location.dir, model_hashes, input.dataset_hashes),
            outputs: FileListing(outputs),
            evaluation: None,
            cost: input.cost.cloned(),
        },
    )
}

/// What a manifest records that cannot be derived from the base and the probe report.
pub struct Recorded {
    pub base_revision: Option<String>,
    pub inputs: BTreeMap<String, String>,
    pub outputs: FileListing,
    pub evaluation: Option<String>,
    pub cost: Option<manifest::Cost>,
}

/// The manifest of a bake of `model` with `report`: every field derived from the two, the rest as
/// recorded. What a bake writes and what `bake verify --base` requires `bake.json` to be.
pub fn expected_manifest(model: &ModelFiles, report: &ProbeReport, recorded: Recorded) -> Manifest {
    Manifest {
        tool: "bake".into(),
        tool_version: report.tool_version.clone(),
        method: manifest::method_description(report.recipe.method).into(),
        base_model: report.model.clone(),
        base_revision: recorded.base_revision,
        recipe: report.recipe.clone(),
        recipe_sha256: report.recipe.sha256(),
        seed: report.recipe.seed,
        dtype: model.dtype(),
        heads: report.heads.clone(),
        train_questions: report.train_questions.clone(),
        val_questions: report.val_questions.clone(),
        tuning_question: report.tuning_question.clone(),
        config_changes: config_changes(model, report.recipe.method.site()),
        added_tensors: surgery::added_tensors(&model.checkpoint, &model.config, report.recipe.method.site()),
        inputs: recorded.inputs,
        outputs: recorded.outputs,
        cost: recorded.cost,
        evaluation: recorded.evaluation,
    }
}
