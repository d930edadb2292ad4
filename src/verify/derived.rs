//! `bake verify`, check `derived`: every file of a bake that is not a weight is re-derived from the base and
//! the folder's own probe report, and must equal it byte for byte. Without a base, what the report
//! determines on its own is (the figures, the pyvene diff and its twin, the manifest's recipe, heads and
//! splits).
//!
//! A bake is a function of three things: the base model, what its probe stage found (`report.json`: the
//! recipe, splits, accuracies, σ; δ is in `activation_diff.safetensors`), and a few recorded facts (the
//! base's revision, the dataset's hashes, an evaluation `bake eval --card` added). So `config.json`, the
//! model card, the figures, the pyvene diff, its twin and `bake.json` itself are each rebuilt here with the
//! bake's own writers, the files copied from the base are compared with the base's, and any file a bake does
//! not write is reported. The weight files are the other checks' (`tensors`, `biases`); here their headers
//! and index must be exactly what bake's writer gives their tensors. Only `bake.log` (timings) is free.
//!
//! A value that appears in one file only and cannot be re-derived would be editable without notice; none is:
//! every field of `report.json` is also in the manifest (recipe, heads, splits, model, version), the twin's
//! tensors (δ) or its metadata (α, heads, σ, every head's accuracy, the prompt counts), or follows from the
//! base (the shape).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::Findings;
use crate::data::DatasetSource;
use crate::error::{IoContext, Result};
use crate::export::baked::{self, Recorded, DIFF_SAFETENSORS, LOG, MANIFEST};
use crate::export::card;
use crate::export::manifest::{self, Manifest};
use crate::io::hash::sha256_file;
use crate::io::listing::entries_under;
use crate::io::safetensors::{index_text, written_header, TensorBytes, INDEX_FILE};
use crate::model::{Checkpoint, ModelFiles};
use crate::probes::report::{ProbeReport, FILES as REPORT_FILES};
use crate::probes::Deltas;

const CHECK: &str = "derived";
const REPORT: &str = "report.json";
const CARD: &str = "README.md";

/// What the `derived` check needs from the other checks.
pub(super) struct Derivation<'a> {
    pub dir: &'a Path,
    pub manifest: &'a Manifest,
    /// δ per layer as the twin holds it (f32, exact), when the twin could be read.
    pub deltas: Option<&'a BTreeMap<usize, Vec<f32>>>,
    /// The files the `files` check found not as `bake.json` records them (or not listed there).
    pub differing: &'a BTreeSet<String>,
    /// Without it, only what `report.json` determines on its own is re-derived (its figures, the diff, the
    /// manifest's recipe, heads and splits).
    pub base: Option<Base<'a>>,
}

/// The base model a bake is verified against.
pub(super) struct Base<'a> {
    pub model: &'a ModelFiles,
    /// sha256 of the base's config and weight files.
    pub hashes: &'a [(std::path::PathBuf, String)],
    /// The bake's weights, when they could be read.
    pub baked: Option<&'a Checkpoint>,
}

pub(super) fn check_derived(d: &Derivation, found: &mut Findings) -> Result<()> {
    let mut expected: BTreeSet<String> = [MANIFEST, LOG].map(String::from).into();
    if let Some(base) = &d.base {
        expected.extend(check_weight_layout(d, base, found)?);
        expected.extend(check_copied_files(d, base, found)?);
        expected.insert("config.json".into());
        let _ = compare(
            "config.json",
            baked::config_text(base.model, d.manifest.recipe.method.site()).as_bytes(),
            d,
            found,
        );
    }

    let Some(report) = read_report(d, found) else {
        // Without a report nothing else can be derived; the files that would be are at least not unknown.
        expected.extend(REPORT_FILES.iter().map(|f| f.to_string()));
        expected.insert(CARD.into());
        return report_unknown_files(d, &expected, |name| name.starts_with(baked::DIFF_DIR), found);
    };
    // Every file report.json determines. When one disagrees, either it or report.json was edited: both are
    // named.
    let mut from_report: Vec<(String, Vec<u8>)> =
        report.files(d.dir)?.into_iter().map(|(name, bytes)| (name.to_string(), bytes)).collect();
    let width = report.heads_per_layer * report.head_dim;
    let deltas = Deltas::from_layer_numbers(&report.delta, report.layers);
    from_report.extend(baked::activation_diff_files(&report, &deltas, width, d.manifest.dtype));
    if let Some(base) = &d.base {
        let card_text = card::model_card(base.model, &report, d.manifest.cost.as_ref());
        let card_text = match &d.manifest.evaluation {
            Some(section) => card::with_evaluation(&card_text, section),
            None => card_text,
        };
        from_report.push((CARD.into(), card_text.into_bytes()));
    }
    let mut disagreeing = Vec::new();
    for (name, bytes) in from_report {
        if !compare(&name, &bytes, d, found) && name != REPORT {
            disagreeing.push(name.clone());
        }
        expected.insert(name);
    }
    let m = d.manifest;
    let claims_match = m.recipe == report.recipe
        && m.recipe_sha256 == report.recipe.sha256()
        && m.seed == report.recipe.seed
        && m.heads == report.heads
        && (&m.train_questions, &m.val_questions, &m.tuning_question)
            == (&report.train_questions, &report.val_questions, &report.tuning_question);
    if !claims_match {
        disagreeing.push(MANIFEST.into());
    }
    if !disagreeing.is_empty() {
        let message = format!("disagrees with {}, which it determines: one of them was edited", disagreeing.join(", "));
        found.add(CHECK, REPORT, None, message);
    }

    let Some(base) = &d.base else { return Ok(()) };
    let manifest = baked::expected_manifest(
        base.model,
        &report,
        Recorded {
            base_revision: d.manifest.base_revision.clone(),
            inputs: expected_inputs(d, base)?,
            outputs: actual_outputs(d)?,
            evaluation: d.manifest.evaluation.clone(),
            cost: d.manifest.cost.clone(),
        },
    );
    let _ = compare(MANIFEST, manifest.to_text().as_bytes(), d, found);
    report_unknown_files(d, &expected, |_| false, found)
}

/// `report.json`, with δ taken from the twin (exact f32; the report's decimal copy must print the same), after
/// checking that its shape is consistent, and the base's when there is one (so that nothing below indexes
/// out of range).
fn read_report(d: &Derivation, found: &mut Findings) -> Option<ProbeReport> {
    let mut report = match ProbeReport::read(&d.dir.join(REPORT)) {
        Ok(r) => r,
        Err(e) => {
            found.add(CHECK, REPORT, None, e.to_string());
            return None;
        }
    };
    let (layers, heads) = (report.layers, report.heads_per_layer);
    let consistent = report.val_accuracy.len() == layers
        && report.val_accuracy.iter().all(|row| row.len() == heads)
        && report.heads.iter().all(|h| h.layer < layers && h.head < heads)
        && report.heads.len() == report.sigma.len();
    let fits_base = d.base.as_ref().is_none_or(|b| {
        let probed = crate::probes::HeadLayout::at(report.recipe.method.site(), &b.model.config);
        (layers, heads, report.head_dim) == (probed.layers, probed.heads, probed.head_dim)
    });
    if !(consistent && fits_base) {
        found.add(CHECK, REPORT, None, "its layers, heads or chosen heads do not fit each other or the base model");
        return None;
    }
    if let Some(deltas) = d.deltas {
        report.delta = deltas.iter().map(|(l, v)| (l.to_string(), v.clone())).collect();
    }
    Some(report)
}

/// The manifest's `inputs`: the base's config, weights and copied files as hashed now, and the dataset's
/// hashes as recorded (the dataset is not at hand here).
fn expected_inputs(d: &Derivation, base: &Base) -> Result<BTreeMap<String, String>> {
    let mut model_files = base.hashes.to_vec();
    for file in base.model.location.companion_files() {
        let hash = sha256_file(&file)?;
        model_files.push((file, hash));
    }
    let mut inputs = manifest::inputs(&base.model.location.dir, &model_files, &[]);
    match local_dataset_hashes(&d.manifest.recipe)? {
        Some(files) => inputs.extend(manifest::inputs(&base.model.location.dir, &[], &files)),
        None => inputs.extend(
            d.manifest.inputs.iter().filter(|(k, _)| k.starts_with("dataset/")).map(|(k, v)| (k.clone(), v.clone())),
        ),
    }
    Ok(inputs)
}

/// The dataset's files and their sha256, when the recipe's dataset is at hand without a download (the
/// built-in copy, or a local folder).
fn local_dataset_hashes(recipe: &crate::recipe::Recipe) -> Result<Option<Vec<(std::path::PathBuf, String)>>> {
    let source = &recipe.dataset.source;
    match DatasetSource::of(source) {
        DatasetSource::Builtin | DatasetSource::Folder(_) => {
            Ok(Some(crate::data::TruthfulQa::load(source, &recipe.dataset.split, recipe.limit)?.files))
        }
        DatasetSource::Hub(_) | DatasetSource::Unknown => Ok(None),
    }
}

/// The manifest's `outputs` as the folder really is: the recorded entries the `files` check confirmed, the
/// others as found (hashed here; a forged folder is the only one with any).
fn actual_outputs(d: &Derivation) -> Result<crate::io::listing::FileListing> {
    let mut outputs = d.manifest.outputs.clone();
    for name in d.differing {
        outputs.0.remove(name);
        let path = d.dir.join(name);
        let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        if crate::io::listing::check_relative(name).is_ok() && is_file {
            let bytes = std::fs::metadata(&path).at(&path)?.len();
            outputs.0.insert(name.clone(), crate::io::listing::FileEntry { sha256: sha256_file(&path)?, bytes });
        }
    }
    Ok(outputs)
}

/// The base's tokenizer, generation config, chat template and licence: each must be in the bake as it is in
/// the base. Returns their names.
fn check_copied_files(d: &Derivation, base: &Base, found: &mut Findings) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for file in base.model.location.companion_files() {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let copy = d.dir.join(&name);
        if !copy.is_file() {
            found.add(CHECK, &name, None, "the base has this file; the bake must carry it unchanged");
        } else if sha256_file(&copy)? != sha256_file(&file)? {
            found.add(CHECK, &name, None, format!("differs from the base's {}", file.display()));
        }
        names.push(name);
    }
    Ok(names)
}

/// Each weight file is either a byte-for-byte copy of a base weight file or exactly what bake's writer gives
/// its tensors (header and layout; the tensors' bytes are the `tensors` and `biases` checks'), and the index
/// is exactly the one bake writes for them. Returns the names of the weight files and the index.
fn check_weight_layout(d: &Derivation, base: &Base, found: &mut Findings) -> Result<Vec<String>> {
    let Some(baked) = base.baked else { return Ok(Vec::new()) };
    let base_weight_hashes: BTreeSet<&str> = base.hashes.iter().map(|(_, h)| h.as_str()).collect();
    let file_name = |i: usize| baked.files[i].file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut names = Vec::new();
    let mut index_entries = Vec::new();
    for (i, path) in baked.files.iter().enumerate() {
        let name = file_name(i);
        let mut tensors: Vec<(&String, &crate::model::weights::TensorEntry)> =
            baked.tensors.iter().filter(|(_, e)| e.file == i).collect();
        tensors.sort_by_key(|(_, e)| e.start);
        index_entries.extend(tensors.iter().map(|(n, e)| (n.to_string(), (e.end - e.start) as u64, i)));
        names.push(name.clone());
        // The files check has compared every file with its recorded sha256.
        let recorded = d.manifest.outputs.get(&name).map(|e| e.sha256.as_str());
        if recorded.is_some_and(|h| base_weight_hashes.contains(h)) {
            continue; // a copy of a base file, header and all
        }
        let as_written: Vec<TensorBytes> = tensors
            .iter()
            .map(|(n, e)| TensorBytes {
                name: n.to_string(),
                dtype: e.dtype,
                shape: e.shape.clone(),
                bytes: baked.bytes(e).into(),
            })
            .collect();
        let refs: Vec<&TensorBytes> = as_written.iter().collect();
        let header = written_header(&refs);
        let data: u64 = as_written.iter().map(|t| t.bytes.len() as u64).sum();
        match read_prefix(path, header.len()) {
            Ok((len, prefix)) if prefix == header && len == header.len() as u64 + data => {}
            _ => found.add(
                CHECK,
                &name,
                None,
                "neither a copy of a base weight file nor laid out as bake writes its tensors (header, order, padding)",
            ),
        }
    }
    if d.dir.join(INDEX_FILE).exists() {
        let names_ref = &names;
        let text = index_text(index_entries.iter().map(|(n, bytes, i)| (n.as_str(), *bytes, names_ref[*i].as_str())));
        let _ = compare(INDEX_FILE, text.as_bytes(), d, found);
        names.push(INDEX_FILE.into());
    }
    Ok(names)
}

/// The file's length and its first `n` bytes (fewer when it is shorter).
fn read_prefix(path: &Path, n: usize) -> std::io::Result<(u64, Vec<u8>)> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut prefix = Vec::with_capacity(n);
    file.take(n as u64).read_to_end(&mut prefix)?;
    Ok((len, prefix))
}

/// Compares the file `name` of the bake with the bytes it should hold; `true` when they are equal.
fn compare(name: &str, expected: &[u8], d: &Derivation, found: &mut Findings) -> bool {
    match std::fs::read(d.dir.join(name)) {
        Err(_) => found.add(CHECK, name, None, "missing: a bake writes it"),
        Ok(bytes) if bytes != expected => {
            let version = match d.manifest.tool_version.as_str() {
                v if v == crate::VERSION => String::new(),
                v => format!(" (bake.json says bake {v} wrote it; this is bake {})", crate::VERSION),
            };
            found.add(CHECK, name, None, format!("differs from what the base and report.json give{version}"))
        }
        Ok(_) => return true,
    }
    false
}

/// Files a bake does not write (known only with the base, which decides which files are copied).
fn report_unknown_files(
    d: &Derivation,
    expected: &BTreeSet<String>,
    also_allowed: impl Fn(&str) -> bool,
    found: &mut Findings,
) -> Result<()> {
    if d.base.is_none() {
        return Ok(());
    }
    for name in entries_under(d.dir)? {
        if !expected.contains(&name) && !also_allowed(&name) && name != DIFF_SAFETENSORS {
            found.add(CHECK, &name, None, "not a file a bake writes");
        }
    }
    Ok(())
}
