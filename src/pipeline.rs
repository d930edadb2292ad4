//! The ITI core in one call: data → prompts → activations (cached) → probes → heads → shifts → report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use crate::activations::plan::{Mode, Plan};
use crate::activations::{self, cache, Activations, PackedPrompts};
use crate::data::{build_prompt_sets, PromptSets, TruthfulQa};
use crate::error::Result;
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

    progress.stage("data");
    let dataset = TruthfulQa::load(&recipe.dataset.source, &recipe.dataset.split, recipe.limit)?;
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
    );
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
        if let Some(mut sets) = cache::load(path, &["probe", "tuning"])? {
            progress.note(&format!("activations: reused {}", path.display()));
            let tuning = sets.pop().expect("two sets");
            return Ok((sets.pop().expect("two sets"), tuning, true));
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
    let (probe, tuning) = split_rows(acts, prompts.probe.len());
    if let Some(path) = &cache_path {
        cache::store(path, &[("probe", &probe), ("tuning", &tuning)], &key)?;
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

fn split_rows(acts: Activations, first: usize) -> (Activations, Activations) {
    let per_row = acts.layers * acts.width;
    let mut data = acts.data;
    let rest = data.split_off(first * per_row);
    (
        Activations { rows: first, layers: acts.layers, width: acts.width, data },
        Activations { rows: acts.rows - first, layers: acts.layers, width: acts.width, data: rest },
    )
}

/// Writes `report.json` and `heatmap.png` into `dir`.
pub fn write_probe_outputs(report: &ProbeReport, dir: &Path) -> Result<()> {
    report.write_json(&dir.join("report.json"))?;
    report.write_heatmap(&dir.join("heatmap.png"))
}
