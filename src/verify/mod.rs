//! `bake verify`: proves that a baked folder is exactly its base plus the diff it declares.
//!
//! Checks, each reported by name:
//! 1. `files`: every file's sha256 against `bake.json`; no file missing, none unlisted.
//! 2. `tensors` (with a base): every base tensor is in the output byte for byte (name, dtype, shape, bytes),
//!    except the shift biases the bake replaces (o_proj's, or down_proj's for the residual method); nothing
//!    else is added but the biases a bake of that method adds.
//! 3. `biases`: each shift bias is exactly `W_o · δ_l` (or δ_l on the residual stream) plus the base's bias,
//!    accumulated in f64 and rounded to the dtype as the bake rounds it, with δ from the diff; every other
//!    added bias is zero.
//! 4. `diff`: the pyvene files and the safetensors twin hold the same δ for the same layers.
//! 5. `config`: `config.json` differs from the base's only in the keys a bake changes (`attention_bias`, the
//!    family rewrite), whatever the manifest declares.
//! 6. `derived` (with a base): every other file is re-derived from the base and `report.json` and must be
//!    equal byte for byte, the manifest included ([`derived`]); only `bake.log` is free.
//! 7. `run` (optional): a forward pass shows the logits finite, moved away from the base's and equal to the
//!    base with δ added at the method's site.

mod derived;
mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::{BakeError, Result};
use crate::export::baked::{DIFF_DIR, DIFF_SAFETENSORS, MANIFEST};
use crate::export::manifest::Manifest;
use crate::export::pyvene;
use crate::io::dtype::StoredDtype;
use crate::io::fs::{limits, read_text};
use crate::io::hub::{Repo, RepoKind};
use crate::io::listing::{check_relative, FileListing, BAKE_UNLISTED};
use crate::io::names;
use crate::io::safetensors::SINGLE_FILE;
use crate::model::weights::TensorEntry;
use crate::model::{Checkpoint, ModelFiles, Site};
use crate::progress::Progress;

/// One thing that does not hold.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mismatch {
    pub check: &'static str,
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    pub message: String,
}

/// What a verification could prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Without a base: the files match the manifest and the diff is consistent and finite; the weights could
    /// have been replaced wholesale (with the manifest's hashes updated) and this would not show it.
    SelfConsistency,
    /// With the base: the weights are exactly base + diff.
    AgainstBase,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub folder: String,
    pub scope: Scope,
    pub checks: Vec<&'static str>,
    pub mismatches: Vec<Mismatch>,
    /// With `run`: how the run check holds the base (resident or layer-streamed) and its memory estimates.
    pub run_plan: Option<crate::scoring::plan::ScoringPlan>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

#[derive(Default)]
pub struct VerifyOptions {
    /// The base model (folder, Hub id or short name); without it only checks 1 and 4 run.
    pub base: Option<String>,
    pub run: bool,
    /// The host memory the run check may use (default: what is available).
    pub max_memory: Option<u64>,
    /// The base's [`ModelFiles::input_hashes`], when the caller has them already (hashing a 7B takes most of a
    /// minute).
    pub base_hashes: Option<Vec<(std::path::PathBuf, String)>>,
}

struct Findings {
    list: Vec<Mismatch>,
}

impl Findings {
    fn add(&mut self, check: &'static str, file: impl Into<String>, tensor: Option<&str>, message: impl Into<String>) {
        self.list.push(Mismatch {
            check,
            file: file.into(),
            tensor: tensor.map(str::to_string),
            message: message.into(),
        });
    }
}

/// Verifies `dir`. `Err` means verification could not run (missing manifest, unreachable base); mismatches
/// are in the report.
pub fn verify(dir: &Path, options: &VerifyOptions, progress: &dyn Progress) -> Result<VerifyReport> {
    let scope = if options.base.is_some() { Scope::AgainstBase } else { Scope::SelfConsistency };
    let mut found = Findings { list: Vec::new() };
    let mut checks = vec!["files"];
    let report = |checks, found: Findings, run_plan| VerifyReport {
        folder: dir.display().to_string(),
        scope,
        checks,
        mismatches: found.list,
        run_plan,
    };
    progress.stage("verify: files");
    let manifest = match Manifest::read(dir) {
        Ok(m) => m,
        // A manifest that is there but not a bake's own is a mismatch, not a failure to run.
        Err(e @ (BakeError::Parse { .. } | BakeError::Field { .. })) => {
            found.add("files", MANIFEST, None, e.to_string());
            return Ok(report(checks, found, None));
        }
        Err(e) => return Err(e),
    };
    let differing = manifest.outputs.differences(dir, BAKE_UNLISTED)?;
    for (name, what) in &differing {
        found.add("files", name.as_str(), None, format!("{what} in bake.json"));
    }
    let differing: BTreeSet<String> = differing.into_iter().map(|(name, _)| name).collect();

    checks.push("diff");
    let site = manifest.recipe.method.site();
    let deltas = check_diff(dir, (site, manifest.dtype), &mut found);
    checks.push("finite");
    let baked = Checkpoint::weight_files(dir).and_then(Checkpoint::open);
    if let Ok(baked) = &baked {
        check_finite_biases(baked, &mut found);
    }

    let base = match &options.base {
        Some(spec) => {
            progress.stage("verify: tensors");
            let model = ModelFiles::open(spec)?;
            // Planned first: a run that cannot fit is refused before minutes of hashing.
            let planned = options.run.then(|| run::RunCheck::plan(&model, options.max_memory)).transpose()?;
            if let Some(p) = &planned {
                progress.note(&p.plan.describe());
            }
            let hashes = match &options.base_hashes {
                Some(hashes) => hashes.clone(),
                None => model.input_hashes()?,
            };
            Some((model, hashes, planned))
        }
        None => None,
    };
    if let Some((base, base_hashes, _)) = &base {
        for d in manifest.base_differences(base, base_hashes) {
            found.add("tensors", d.key, None, "the base given differs from the base this folder was baked from");
        }
        checks.extend(["tensors", "biases", "config"]);
        match &baked {
            Err(e) => found.add("tensors", SINGLE_FILE, None, format!("cannot read the baked weights: {e}")),
            Ok(baked) => {
                check_tensors(base, baked, site, &mut found);
                if let Some(deltas) = &deltas {
                    check_biases(base, baked, (site, deltas), &mut found)?;
                }
            }
        }
        check_config(dir, base, site, &mut found);
    }
    checks.push("derived");
    let derivation = derived::Derivation {
        dir,
        manifest: &manifest,
        deltas: deltas.as_ref(),
        differing: &differing,
        base: base.as_ref().map(|(model, hashes, _)| derived::Base { model, hashes, baked: baked.as_ref().ok() }),
    };
    derived::check_derived(&derivation, &mut found)?;
    if let (Some((base, _, Some(planned))), true) = (&base, found.list.is_empty()) {
        progress.stage("verify: run");
        checks.push("run");
        if let Some(deltas) = &deltas {
            planned.check(dir, base, (site, deltas), &mut found, progress)?;
        }
    }
    let run_plan = base.and_then(|(_, _, planned)| planned).map(|p| p.plan);
    Ok(report(checks, found, run_plan))
}

/// Refuses to `action` a folder that fails the self-consistency checks (files, diff, finite values): `push`
/// and `eval --card` must not publish or bless a folder that was edited after the bake.
pub fn require_intact(dir: &Path, action: &str) -> Result<()> {
    let check = verify(dir, &VerifyOptions::default(), &crate::progress::Silent)?;
    match check.mismatches.first() {
        None => Ok(()),
        Some(m) => Err(BakeError::content(
            dir,
            format!(
                "refusing to {action} a folder that fails `bake verify` ({} mismatches; first: {}: {})",
                check.mismatches.len(),
                m.file,
                m.message
            ),
        )),
    }
}

/// δ per layer (f32) from the safetensors twin, after checking it names the manifest's `site` and the pyvene
/// files hold it rounded to `dtype`. `None` when the twin is unreadable.
fn check_diff(
    dir: &Path,
    (site, dtype): (Site, StoredDtype),
    found: &mut Findings,
) -> Option<BTreeMap<usize, Vec<f32>>> {
    let twin_path = dir.join(DIFF_SAFETENSORS);
    let twin = match Checkpoint::open(vec![twin_path.clone()]) {
        Ok(t) => t,
        Err(e) => {
            found.add("diff", DIFF_SAFETENSORS, None, e.to_string());
            return None;
        }
    };
    let mut deltas = BTreeMap::new();
    for (name, entry) in &twin.tensors {
        match names::delta_layer(name) {
            Some((_, other)) if other != site => found.add(
                "diff",
                DIFF_SAFETENSORS,
                Some(name),
                format!("a shift at {other:?}; the recipe's method shifts at {site:?}"),
            ),
            Some((l, _)) => {
                let values = entry.dtype.decode(twin.bytes(entry)).into_iter().map(|v| v as f32).collect::<Vec<f32>>();
                if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                    found.add("diff", DIFF_SAFETENSORS, Some(name), format!("δ holds {v}"));
                }
                deltas.insert(l, values);
            }
            None => found.add("diff", DIFF_SAFETENSORS, Some(name), "unexpected tensor name"),
        }
    }
    let config_path = dir.join(DIFF_DIR).join("config.json");
    let listed: BTreeSet<usize> = read_text(&config_path, limits::JSON)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|c| c.get("representations").and_then(Value::as_array).cloned())
        .map(|reps| {
            let components = reps.iter().filter_map(|r| r.get(1).and_then(Value::as_str));
            components.filter_map(names::component_layer).filter(|(_, s)| *s == site).map(|(l, _)| l).collect()
        })
        .unwrap_or_default();
    if listed != deltas.keys().copied().collect() {
        found.add(
            "diff",
            format!("{DIFF_DIR}/config.json"),
            None,
            format!("lists layers {listed:?}, the twin {:?}", deltas.keys().collect::<Vec<_>>()),
        );
    }
    for (layer, values) in &deltas {
        let bytes = &dtype.encode(values.iter().copied());
        let file = format!("{DIFF_DIR}/{}", pyvene::file_name(*layer, site));
        let stored = std::fs::read(dir.join(&file)).ok().and_then(|b| pyvene::read_stored_zip(&b));
        match stored.and_then(|records| records.into_iter().find(|(n, _)| n.ends_with("/data/0"))) {
            None => found.add("diff", file, None, "missing, or not a torch zip with a data/0 record"),
            Some((_, data)) if &data != bytes => {
                found.add("diff", file, None, "δ differs from activation_diff.safetensors rounded to the model dtype")
            }
            Some(_) => {}
        }
    }
    Some(deltas)
}

/// Every bias a bake may add is finite, and every shift bias (o_proj's, down_proj's) within what the dtype's
/// residual stream can carry ([`crate::surgery::largest_safe_bias`]): past it every logit is NaN.
fn check_finite_biases(baked: &Checkpoint, found: &mut Findings) {
    for (name, entry) in baked.tensors.iter().filter(|(n, _)| names::is_added_bias(n)) {
        let values = entry.dtype.decode(baked.bytes(entry));
        let largest = match (names::is_shift_bias(name), entry.shape.as_slice()) {
            (true, [hidden]) => crate::surgery::largest_safe_bias(entry.dtype, *hidden),
            _ => f64::INFINITY,
        };
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            found.add("finite", file_name(baked, entry), Some(name), format!("element {i} is {v}"));
        } else if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| v.abs() > largest) {
            found.add(
                "finite",
                file_name(baked, entry),
                Some(name),
                format!("element {i} is {v}, beyond the {largest:.3e} the residual stream can carry: every logit would be NaN"),
            );
        }
    }
}

/// Where a missing tensor should have been listed, for messages: the index of a sharded checkpoint, else its
/// one weight file.
pub(super) fn where_missing(ck: &Checkpoint) -> String {
    match ck.files.as_slice() {
        [one] => one.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        _ => crate::io::safetensors::INDEX_FILE.to_string(),
    }
}

/// The weight file a tensor is stored in, for messages.
pub(super) fn file_name(ck: &Checkpoint, entry: &TensorEntry) -> String {
    ck.file_of(entry).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
}

fn check_tensors(base: &ModelFiles, baked: &Checkpoint, site: Site, found: &mut Findings) {
    let base_ck = &base.checkpoint;
    let is_replaced = |name: &str| names::layer_of(name).is_some_and(|l| name == names::Layer(l).shift_bias(site));
    for (name, entry) in &base_ck.tensors {
        let replaced = is_replaced(name);
        match baked.get(name) {
            None => found.add("tensors", where_missing(baked), Some(name), "missing from the baked checkpoint"),
            Some(b) if b.dtype != entry.dtype || b.shape != entry.shape => found.add(
                "tensors",
                file_name(baked, b),
                Some(name),
                format!("{:?} {:?} in the base, {:?} {:?} here", entry.dtype, entry.shape, b.dtype, b.shape),
            ),
            Some(b) if !replaced && baked.bytes(b) != base_ck.bytes(entry) => {
                found.add("tensors", file_name(baked, b), Some(name), "bytes differ from the base")
            }
            Some(_) => {}
        }
        // Read once: their pages need not stay in this process's memory (a 7B's are 13 GB per checkpoint).
        base_ck.release(&[name]);
        baked.release(&[name]);
    }
    let added: BTreeSet<String> = crate::surgery::added_tensors(base_ck, &base.config, site).into_iter().collect();
    for (name, entry) in &baked.tensors {
        if base_ck.get(name).is_none() && !added.contains(name) {
            found.add("tensors", file_name(baked, entry), Some(name), "not in the base and not a bias this bake adds");
        }
    }
}

fn check_biases(
    base: &ModelFiles,
    baked: &Checkpoint,
    (site, deltas): (Site, &BTreeMap<usize, Vec<f32>>),
    found: &mut Findings,
) -> Result<()> {
    let c = &base.config;
    for layer in 0..c.num_layers {
        let shift_name = names::Layer(layer).shift_bias(site);
        for (name, _) in crate::surgery::layer_biases(c, site, layer) {
            if name == shift_name || base.checkpoint.get(&name).is_some() {
                continue; // the shift's is checked below; a base's own is compared byte for byte with the base
            }
            match baked.get(&name) {
                None => found.add("biases", where_missing(baked), Some(&name), "missing (its config flag needs it)"),
                Some(e) if e.dtype.decode(baked.bytes(e)).iter().any(|v| *v != 0.0 || v.is_nan()) => {
                    found.add("biases", file_name(baked, e), Some(&name), "should be zero")
                }
                Some(_) => {}
            }
        }
        let Some(entry) = baked.get(&shift_name) else {
            found.add("biases", where_missing(baked), Some(&shift_name), "missing");
            continue;
        };
        let delta = deltas.get(&layer).map(Vec::as_slice);
        let expected = crate::surgery::shift_bias(&base.checkpoint, c, site, layer, delta)?;
        // The same f64 sum bake computed, rounded the same way: the stored bytes must be exactly these.
        let expected_bytes = entry.dtype.encode(expected.iter().map(|&v| v as f32));
        if baked.bytes(entry) != expected_bytes.as_slice() {
            let stored = entry.dtype.decode(baked.bytes(entry));
            let (i, (s, e)) = stored
                .iter()
                .zip(&expected)
                .enumerate()
                .find(|(_, (s, e))| s.to_bits() != (**e as f32 as f64).to_bits())
                .unwrap_or((0, (&f64::NAN, &f64::NAN)));
            let rule = match site {
                Site::AttentionHeads => "W_o·δ",
                Site::Residual => "δ",
            };
            let message = format!("element {i} is {s}, {rule} gives {e}");
            found.add("biases", file_name(baked, entry), Some(&shift_name), message);
        }
    }
    Ok(())
}

pub(super) fn scale(values: &[f64]) -> f64 {
    values.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-3)
}

fn check_config(dir: &Path, base: &ModelFiles, site: Site, found: &mut Findings) {
    let changes = crate::export::baked::config_changes(base, site);
    let path = dir.join("config.json");
    let baked: Option<serde_json::Map<String, Value>> =
        read_text(&path, limits::JSON).ok().and_then(|t| serde_json::from_str(&t).ok());
    let Some(baked) = baked else {
        found.add("config", "config.json", None, "missing or not a JSON object");
        return;
    };

    let keys: BTreeSet<&String> = baked.keys().chain(base.config.raw.keys()).collect();
    for key in keys {
        let (before, after) = (base.config.raw.get(key), baked.get(key));
        if before == after {
            continue;
        }
        let made = changes.get(key).map(|c| &c.baked);
        if made != after {
            let what = match made {
                Some(v) => format!("a bake sets it to {v}"),
                None => "a bake never changes it".to_string(),
            };
            found.add("config", "config.json", None, format!("`{key}` is {after:?}, the base has {before:?}; {what}"));
        }
    }
}

/// The local folder to verify: `target` itself, or a Hub repository downloaded (manifest first, then every file
/// it lists).
pub fn locate(target: &str) -> Result<PathBuf> {
    let path = Path::new(target);
    if path.is_dir() {
        return Ok(path.into());
    }
    match crate::model::resolve::parse_repo_id(target) {
        Some((repo, revision)) => {
            download_baked(&Repo { kind: RepoKind::Model, id: &repo, revision: revision.as_deref() })
        }
        None => Err(BakeError::Invalid(format!(
            "`{}`: not a folder and not a Hub repo id org/name[@revision]",
            crate::error::shorten(target, 100)
        ))),
    }
}

/// A baked model repository: `bake.json` first, then every file it lists. Returns the snapshot folder.
fn download_baked(repo: &Repo) -> Result<PathBuf> {
    let manifest_path = repo.fetch(MANIFEST)?;
    let dir = manifest_path.parent().map(Path::to_path_buf).unwrap_or_default();
    // A listed path that leaves the folder is not fetched; the files check reports it.
    for (file, _) in FileListing::read(&dir)?.iter().filter(|(f, _)| check_relative(f).is_ok()) {
        repo.fetch(file)?;
    }
    Ok(dir)
}
