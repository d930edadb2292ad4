//! The ITI core in one call: data → prompts → activations (cached) → probes → heads → shifts → report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use crate::activations::plan::{Mode, Plan};
use crate::activations::{self, cache, Activations, PackedPrompts};
use crate::data::{build_prompt_sets, PromptSets, TruthfulQa};
use crate::error::Result;
use crate::io::output::{self, Ownership, Protected, Published, Request, Staging, Target};
use crate::model::{pick_device, ModelFiles};
use crate::probes::report::ProbeReport;
use crate::probes::{self, HeadLayout, HeadShift, ProbeResults, ShiftInputs, Split};
use crate::progress::Progress;
use crate::recipe::Recipe;

pub struct ProbeOptions {
    /// `None` disables the activation cache.
    pub cache_dir: Option<PathBuf>,
    /// Host memory budget; the activation pass streams layers when the resident model would not fit.
    pub max_memory: Option<u64>,
}

/// Everything the probe stage produced, for the report and for baking.
pub struct ProbeOutcome {
    pub report: ProbeReport,
    pub shifts: Vec<HeadShift>,
    /// δ per layer in o_proj-input layout; `None` for layers without a chosen head.
    pub deltas: Vec<Option<Vec<f32>>>,
    pub split: Split,
    pub dataset: TruthfulQa,
    /// sha256 of the model's config and weight files.
    pub model_hashes: Vec<(PathBuf, String)>,
    pub cache_hit: bool,
}

pub fn run_probe(model: &ModelFiles, recipe: &Recipe, options: &ProbeOptions, progress: &dyn Progress) -> Result<ProbeOutcome> {
    let mut timings = BTreeMap::new();
    let mut clock = Instant::now();
    let mut lap = |name: &str, timings: &mut BTreeMap<String, f64>| {
        timings.insert(name.to_string(), clock.elapsed().as_secs_f64());
        clock = Instant::now();
    };
    let c = &model.config;
    let layout = HeadLayout { layers: c.num_layers, heads: c.num_heads, head_dim: c.head_dim };
    probes::check_head_count(recipe.heads, layout.layers * layout.heads)?;
    // Before anything else: a cached run never touches the device, and must not record a bogus one.
    pick_device(&recipe.device)?;

    progress.stage("data");
    let dataset = TruthfulQa::load(&recipe.dataset.source, &recipe.dataset.split, recipe.limit)?;
    probes::check_question_count(dataset.questions.len(), recipe.validation_ratio, "a bake")?;
    let prompts = build_prompt_sets(&dataset, &recipe.prompts, recipe.seed);
    progress.stage("hashing model files");
    let model_hashes = model.input_hashes()?;
    lap("data", &mut timings);

    progress.stage("activations");
    let (probe_acts, tuning_acts, cache_hit) = activations_for(model, recipe, &dataset, &prompts, &model_hashes, options, progress)?;
    lap("activations", &mut timings);

    progress.stage("probes");
    let split = probes::split_questions(dataset.questions.len(), recipe.validation_ratio, recipe.seed);
    let fitted = fit_shifts(recipe, &Fit { probe_acts: &probe_acts, tuning_acts: &tuning_acts, prompts: &prompts, split: &split, layout, sigma_questions: None })?;
    let (trained, chosen, shifts, deltas) = (fitted.probes, fitted.chosen, fitted.shifts, fitted.deltas);
    lap("probes", &mut timings);

    let report = ProbeReport {
        tool_version: crate::VERSION.into(),
        model: model.location.hub_repo.clone().unwrap_or_else(|| model.location.spec.clone()),
        recipe: recipe.clone(),
        layers: layout.layers,
        heads_per_layer: layout.heads,
        head_dim: layout.head_dim,
        probe_prompts: prompts.probe.len(),
        tuning_prompts: prompts.tuning.len(),
        val_accuracy: trained.val_accuracy,
        heads: chosen.iter().map(|&(l, h)| [l, h]).collect(),
        train_questions: split.train.clone(),
        val_questions: split.val.clone(),
        tuning_question: prompts.tuning_question.clone(),
        sigma: shifts.iter().map(|s| (s.layer, s.head, s.sigma)).collect(),
        delta: deltas.iter().enumerate().filter_map(|(l, d)| d.clone().map(|d| (l.to_string(), d))).collect(),
        timings: Some(timings),
    };
    Ok(ProbeOutcome { report, shifts, deltas, split, dataset, model_hashes, cache_hit })
}

/// What the probe stage fits on: activations, prompts and which questions play which part.
pub struct Fit<'a> {
    pub probe_acts: &'a Activations,
    pub tuning_acts: &'a Activations,
    pub prompts: &'a PromptSets,
    pub split: &'a Split,
    pub layout: HeadLayout,
    /// σ over these questions' tuning prompts (`None`: all).
    pub sigma_questions: Option<&'a [usize]>,
}

pub struct Fitted {
    pub probes: ProbeResults,
    pub chosen: Vec<(usize, usize)>,
    pub shifts: Vec<HeadShift>,
    pub deltas: Vec<Option<Vec<f32>>>,
}

/// Probes on the split, the top K heads, their directions, σ and δ.
pub fn fit_shifts(recipe: &Recipe, fit: &Fit) -> Result<Fitted> {
    let trained = probes::train_probes(fit.probe_acts, &fit.prompts.probe, fit.split, fit.layout);
    let chosen = probes::select_heads(&trained.val_accuracy, recipe.heads)?;
    let shifts = probes::compute_shifts(
        &ShiftInputs {
            probe_acts: fit.probe_acts,
            probe_prompts: &fit.prompts.probe,
            tuning_acts: fit.tuning_acts,
            tuning_prompts: &fit.prompts.tuning,
            sigma_questions: fit.sigma_questions,
            split: fit.split,
            probes: &trained,
            layout: fit.layout,
            direction: recipe.direction,
            alpha: recipe.alpha,
            seed: recipe.seed,
        },
        &chosen,
    )?;
    let deltas = probes::per_layer_deltas(&shifts, fit.layout);
    Ok(Fitted { probes: trained, chosen, shifts, deltas })
}

/// The probe and tuning activations of every prompt, from the cache when it holds them.
pub fn activations_for(
    model: &ModelFiles,
    recipe: &Recipe,
    dataset: &TruthfulQa,
    prompts: &PromptSets,
    model_hashes: &[(PathBuf, String)],
    options: &ProbeOptions,
    progress: &dyn Progress,
) -> Result<(Activations, Activations, bool)> {
    // One pass and one cache entry for both sets, split afterwards.
    let texts = prompts.texts();
    let hashes: Vec<String> = model_hashes.iter().map(|(_, h)| h.clone()).collect();
    let key = cache::CacheKey {
        tool_version: crate::VERSION,
        pass_version: activations::PASS_VERSION,
        batch_size: recipe.batch_size,
        model_hashes: &hashes,
        dataset_fingerprint: &dataset.fingerprint(),
        templates: &[&recipe.prompts.probe, &recipe.prompts.tuning],
        prompts: &texts,
    }
    .digest();
    let cache_path = options.cache_dir.as_deref().map(|d| cache::path_for(d, &key));
    if let Some(path) = &cache_path {
        // The cache only saves time: an unreadable entry is recomputed, never fatal.
        match cache::load(path, &["probe", "tuning"]) {
            Ok(Some(mut sets)) => {
                progress.note(&format!("activations: reused {}", path.display()));
                let tuning = sets.pop().expect("two sets");
                let probe = sets.pop().expect("two sets");
                check_finite(&probe, &texts, model.config.head_dim)?;
                check_finite(&tuning, &texts[prompts.probe.len()..], model.config.head_dim)?;
                return Ok((probe, tuning, true));
            }
            Ok(None) => {}
            Err(e) => progress.note(&format!("warning: activation cache not used: {e}")),
        }
    }
    let device = pick_device(&recipe.device)?;
    let tokens = activations::tokenize(&model.tokenizer()?, &texts)?;
    let packed = PackedPrompts::new(&tokens, recipe.batch_size, &device)?;
    let plan = plan_for(model, &packed, &device, options.max_memory)?;
    progress.note(&format!("activations: {}", plan.describe()));
    let acts = match plan.mode {
        Mode::Resident => activations::capture_last_token(&model.load(&device)?, &packed, progress)?,
        Mode::Streamed => activations::capture_last_token_streamed(model, &device, &packed, progress)?,
    };
    check_finite(&acts, &texts, model.config.head_dim)?;
    let (probe, tuning) = split_rows(acts, prompts.probe.len());
    if let Some(path) = &cache_path {
        if let Err(e) = cache::store(path, &[("probe", &probe), ("tuning", &tuning)], &key) {
            progress.note(&format!("warning: activations not cached: {e}"));
        }
    }
    Ok((probe, tuning, false))
}

/// The execution plan of a run's activation pass, without running it.
pub fn plan_run(model: &ModelFiles, recipe: &Recipe, budget: Option<u64>) -> Result<Plan> {
    let dataset = TruthfulQa::load(&recipe.dataset.source, &recipe.dataset.split, recipe.limit)?;
    let prompts = build_prompt_sets(&dataset, &recipe.prompts, recipe.seed);
    let tokens = activations::tokenize(&model.tokenizer()?, &prompts.texts())?;
    let device = pick_device(&recipe.device)?;
    plan_for(model, &PackedPrompts::new(&tokens, recipe.batch_size, &device)?, &device, budget)
}

/// The execution plan of the activation pass over these packed prompts, timed at the device's measured
/// matmul rate.
fn plan_for(model: &ModelFiles, packed: &PackedPrompts, device: &Device, budget: Option<u64>) -> Result<Plan> {
    let rate = activations::plan::measure_matmul_rate(&model.config, device)?;
    activations::plan::plan(model, &packed.shape(), Some(rate), budget)
}

/// A NaN or infinity in the activations would silently become NaN biases: name where it first appears.
fn check_finite(acts: &Activations, texts: &[&str], head_dim: usize) -> Result<()> {
    let Some((row, layer, index, value)) = acts.first_non_finite() else { return Ok(()) };
    let text: String = texts.get(row).map(|t| t.chars().take(80).collect()).unwrap_or_default();
    Err(crate::BakeError::NotFinite(format!(
        "the activation pass produced {value} at layer {layer}, head {} for prompt {row} (`{text}`): the model's \
         weights or config.json hold a non-finite or extreme value",
        index / head_dim
    )))
}

fn split_rows(acts: Activations, first: usize) -> (Activations, Activations) {
    let per_row = acts.layers * acts.width;
    let mut data = acts.data;
    let rest = data.split_off(first * per_row);
    (
        Activations { rows: first, layers: acts.layers, width: acts.width, data },
        Activations { rows: acts.rows - first, layers: acts.layers, width: acts.width, data: rest },
    )
}

/// The files `bake probe` writes; a folder holding nothing else is one `--force` may replace.
pub const PROBE_FILES: &[&str] = &["report.json", "heatmap.png"];

/// Writes `report.json` and `heatmap.png` into `dir`.
pub fn write_probe_outputs(report: &ProbeReport, dir: &Path) -> Result<()> {
    report.write_json(&dir.join(PROBE_FILES[0]))?;
    report.write_heatmap(&dir.join(PROBE_FILES[1]))
}

/// Which existing folders an output of this kind may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A baked checkpoint (`bake run`).
    Bake,
    /// A probe report (`bake probe`).
    Probe,
}

/// Checks an output folder before any work: never the model's or the dataset's folder, nor anything that
/// holds them, and an existing folder only when bake wrote it (see [`crate::io::output`]).
pub fn check_output(out: &Path, force: bool, model: &ModelFiles, recipe: &Recipe, kind: OutputKind) -> Result<Target> {
    let mut protected = vec![Protected { path: &model.location.dir, what: "the model folder", refuse_inside: true }];
    let dataset = Path::new(&recipe.dataset.source);
    if dataset.is_dir() {
        protected.push(Protected { path: dataset, what: "the dataset folder", refuse_inside: false });
    }
    let ownership = match kind {
        OutputKind::Bake => Ownership::Manifest,
        OutputKind::Probe => Ownership::OnlyFiles(PROBE_FILES),
    };
    output::check(&Request { out, force, protected, ownership })
}

/// Writes a probe report into `staging` and publishes it.
pub fn publish_probe_outputs(report: &ProbeReport, staging: Staging) -> Result<Published> {
    write_probe_outputs(report, staging.path())?;
    staging.commit()
}
