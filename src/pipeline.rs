//! The run a command works out once ([`Resolved`]: device, dtype, batch size, memory budget, cache), the ITI core
//! in one call on it (data → prompts → activations (cached) → probes → heads → shifts → report), and the checks
//! of an output folder before any of it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::activations::plan::{budget_for, Budget, Compute, Mode, Plan};
use crate::activations::{self, cache, Activations, PackedPrompts};
use crate::data::{build_prompt_sets, DatasetSource, PromptSets, TruthfulQa};
use crate::error::{IoContext, Result};
use crate::export::baked::BakeInput;
use crate::export::manifest::Cost;
use crate::io::output::{self, Ownership, Protected, Published, Request, Staging, Target};
use crate::model::config::Family;
use crate::model::Site;
use crate::model::{pick_device, pick_dtype, ModelFiles};
use crate::probes::report::ProbeReport;
use crate::probes::{self, Deltas, Head, HeadLayout, HeadShift, ProbeResults, ShiftInputs, Split};
use crate::progress::{Laps, Progress};
use crate::recipe::{BatchTokens, Method, Recipe};

/// How a run may use the machine, beyond the recipe.
pub struct RunOptions {
    /// `None` disables the activation cache.
    pub cache_dir: Option<PathBuf>,
    /// Memory budget (host on the CPU, GPU memory on CUDA); `None`: what the device has. The activation pass
    /// streams layers when the resident model would not fit.
    pub max_memory: Option<u64>,
}

/// What a command works out once from the model, the recipe and its options, and hands to every stage it runs.
/// The device is created here and nowhere else: candle gives each CUDA device it creates an id of its own, and
/// tensors of two never meet.
pub struct Resolved {
    /// The device and the matmuls' dtype.
    pub compute: Compute,
    /// The user's memory budget (`None`: what the device has, see [`Resolved::budget`]).
    pub max_memory: Option<u64>,
    /// Most tokens in one batch of the activation pass, `auto` resolved from the model's shape, the device and
    /// the user's budget (never from the memory that happens to be free: the same flags give the same batches).
    pub batch_tokens: usize,
    /// `None` disables the activation cache.
    pub cache_dir: Option<PathBuf>,
}

impl Resolved {
    pub fn new(model: &ModelFiles, recipe: &Recipe, options: &RunOptions) -> Result<Self> {
        let device = pick_device(recipe.device)?;
        let dtype = pick_dtype(recipe.dtype, &device, model.dtype());
        let compute = Compute { device, dtype };
        let batch_tokens = match recipe.batch_tokens {
            BatchTokens::Fixed(n) => n,
            BatchTokens::Auto => activations::plan::auto_batch_tokens(&model.config, &compute, options.max_memory),
        };
        Ok(Resolved { compute, max_memory: options.max_memory, batch_tokens, cache_dir: options.cache_dir.clone() })
    }

    /// The memory this run may use: the user's budget, or what the device has.
    pub fn budget(&self) -> Option<Budget> {
        budget_for(&self.compute.device, self.max_memory)
    }
}

/// Everything the probe stage produced, for the report and for baking.
pub struct ProbeOutcome {
    pub report: ProbeReport,
    /// δ per layer in o_proj-input layout; `None` for layers without a chosen head.
    pub deltas: Deltas,
    /// Questions the stage ran on.
    pub questions: usize,
    /// sha256 of the model's config and weight files, and of the dataset files.
    pub model_hashes: Vec<(PathBuf, String)>,
    pub dataset_hashes: Vec<(PathBuf, String)>,
    pub cache_hit: bool,
}

impl ProbeOutcome {
    /// What a bake of `model` with this outcome, and what it costs, writes.
    pub fn bake_input<'a>(&'a self, model: &'a ModelFiles, cost: Option<&'a Cost>) -> BakeInput<'a> {
        BakeInput {
            model,
            cost,
            report: &self.report,
            deltas: &self.deltas,
            model_hashes: &self.model_hashes,
            dataset_hashes: &self.dataset_hashes,
        }
    }
}

/// What every use of the probe stage starts from: the data, its prompts and their activations (from the
/// cache when it holds them). `bake`, `bake probe` and `bake eval --cv` share it.
pub struct Prepared {
    pub dataset: TruthfulQa,
    pub prompts: PromptSets,
    pub layout: HeadLayout,
    pub model_hashes: Vec<(PathBuf, String)>,
    pub probe_acts: Activations,
    pub tuning_acts: Activations,
    pub cache_hit: bool,
    /// Seconds per stage so far.
    pub timings: BTreeMap<String, f64>,
}

/// The recipe's K against the units its method shifts (heads, or layers for `residual`), and the method
/// against what the model's family can carry.
pub fn check_recipe_heads(model: &ModelFiles, recipe: &Recipe) -> Result<()> {
    check_method(model, recipe.method)?;
    let layout = HeadLayout::at(recipe.method.site(), &model.config);
    let what = match recipe.method.site() {
        Site::AttentionHeads => "attention heads (layers × heads)",
        Site::Residual => "layers (method residual)",
    };
    probes::check_head_count(recipe.heads, (layout.layers * layout.heads, what))
}

/// Refuses a method whose bias the model's transformers class would not read.
pub fn check_method(model: &ModelFiles, method: Method) -> Result<()> {
    let family = model.config.family.baked_as();
    if method.site() == Site::Residual && family == Family::Qwen3 {
        return Err(crate::BakeError::Invalid(format!(
            "{}: method `residual` writes down_proj biases, and transformers' {} MLP has none (it would drop them);              use method `iti` or `nl-iti` with this model",
            model.config.path.display(),
            family.architecture()
        )));
    }
    Ok(())
}

/// Checks the number of questions, then loads the data, builds the prompts and runs (or reuses) the activation
/// pass. The recipe's K is the caller's to check: `bake search` tries its own. The device was checked when `run`
/// was resolved, before anything else: a cached run never touches it, and must not record a bogus one.
pub fn prepare(model: &ModelFiles, recipe: &Recipe, run: &Resolved, progress: &dyn Progress) -> Result<Prepared> {
    let mut timings = Laps::start();
    let c = &model.config;
    let layout = HeadLayout::at(recipe.method.site(), c);

    progress.stage("data");
    let dataset = TruthfulQa::load(&recipe.dataset.source, &recipe.dataset.split, recipe.limit)?;
    probes::check_question_count(dataset.questions.len(), recipe.validation_ratio, "the probe stage")?;
    let prompts = build_prompt_sets(&dataset, &recipe.prompts, recipe.seed);
    progress.stage("hashing model files");
    let model_hashes = model.input_hashes()?;
    timings.lap("data");

    progress.stage("activations");
    let (probe_acts, tuning_acts, cache_hit) =
        activations_for(model, recipe, &dataset, &prompts, &model_hashes, run, progress)?;
    timings.lap("activations");
    Ok(Prepared {
        dataset,
        prompts,
        layout,
        model_hashes,
        probe_acts,
        tuning_acts,
        cache_hit,
        timings: timings.done.into_iter().collect(),
    })
}

/// The ITI core: probes on the reference's split, the top K heads, their shifts, and the report.
pub fn run_probe(model: &ModelFiles, recipe: &Recipe, run: &Resolved, progress: &dyn Progress) -> Result<ProbeOutcome> {
    check_recipe_heads(model, recipe)?;
    let prepared = prepare(model, recipe, run, progress)?;
    let mut timings = Laps::start();
    progress.stage("probes");
    let layout = prepared.layout;
    let split = probes::split_questions(prepared.dataset.questions.len(), recipe.validation_ratio, recipe.seed);
    let fit = Fit { prepared: &prepared, split: &split, sigma_questions: None };
    let fitted = fit_shifts(recipe, &fit)?;
    timings.lap("probes");

    let report = ProbeReport {
        tool_version: crate::VERSION.into(),
        model: model.location.hub_repo.clone().unwrap_or_else(|| model.location.spec.clone()),
        recipe: recipe.clone(),
        layers: layout.layers,
        heads_per_layer: layout.heads,
        head_dim: layout.head_dim,
        probe_prompts: prepared.prompts.probe.len(),
        tuning_prompts: prepared.prompts.tuning.len(),
        val_accuracy: fitted.probes.val_accuracy,
        heads: fitted.chosen.clone(),
        train_questions: split.train,
        val_questions: split.val,
        tuning_question: prepared.prompts.tuning_question.clone(),
        sigma: fitted.shifts.iter().map(|s| (s.layer, s.head, s.sigma)).collect(),
        delta: fitted.deltas.by_layer_number(),
        timings: Some(prepared.timings.clone().into_iter().chain(timings.done).collect()),
    };
    Ok(ProbeOutcome {
        report,
        deltas: fitted.deltas,
        questions: prepared.dataset.questions.len(),
        model_hashes: prepared.model_hashes,
        dataset_hashes: prepared.dataset.files,
        cache_hit: prepared.cache_hit,
    })
}

/// What the probe stage fits on: the prepared activations and prompts, and which questions play which part.
pub struct Fit<'a> {
    pub prepared: &'a Prepared,
    pub split: &'a Split,
    /// σ over these questions' tuning prompts (`None`: all).
    pub sigma_questions: Option<&'a [usize]>,
}

pub struct Fitted {
    pub probes: ProbeResults,
    pub chosen: Vec<Head>,
    pub shifts: Vec<HeadShift>,
    pub deltas: Deltas,
}

/// Probes on the split, the top K heads, their directions, σ and δ.
pub fn fit_shifts(recipe: &Recipe, fit: &Fit) -> Result<Fitted> {
    let probes = fit_probes(recipe, fit);
    let Shifted { chosen, shifts, deltas } = shift_top_heads(recipe, fit, &probes)?;
    Ok(Fitted { probes, chosen, shifts, deltas })
}

/// One probe per head, of the recipe's method, trained on the split's training questions and scored on its
/// validation questions.
pub fn fit_probes(recipe: &Recipe, fit: &Fit) -> ProbeResults {
    let p = fit.prepared;
    probes::train_probes(&p.probe_acts, &p.prompts.probe, fit.split, p.layout, (recipe.method, recipe.seed))
}

/// The recipe's K heads and α applied to fitted probes.
pub struct Shifted {
    pub chosen: Vec<Head>,
    pub shifts: Vec<HeadShift>,
    pub deltas: Deltas,
}

/// The top `recipe.heads` heads of `probes`, their directions, σ and δ at `recipe.alpha`. Cheap next to
/// the probes: `bake search` calls it once per candidate (K, α) on probes fitted once.
pub fn shift_top_heads(recipe: &Recipe, fit: &Fit, probes: &ProbeResults) -> Result<Shifted> {
    let p = fit.prepared;
    let chosen = probes::select_heads(&probes.val_accuracy, recipe.heads)?;
    let shifts = probes::compute_shifts(
        &ShiftInputs {
            probe_acts: &p.probe_acts,
            probe_prompts: &p.prompts.probe,
            tuning_acts: &p.tuning_acts,
            tuning_prompts: &p.prompts.tuning,
            sigma_questions: fit.sigma_questions,
            split: fit.split,
            probes,
            layout: p.layout,
            direction: recipe.direction,
            alpha: recipe.alpha,
            seed: recipe.seed,
        },
        &chosen,
    )?;
    let deltas = probes::per_layer_deltas(&shifts, p.layout);
    Ok(Shifted { chosen, shifts, deltas })
}

/// The probe and tuning activations of every prompt, from the cache when it holds them.
fn activations_for(
    model: &ModelFiles,
    recipe: &Recipe,
    dataset: &TruthfulQa,
    prompts: &PromptSets,
    model_hashes: &[(PathBuf, String)],
    run: &Resolved,
    progress: &dyn Progress,
) -> Result<(Activations, Activations, bool)> {
    // One pass and one cache entry for both sets, split afterwards.
    let texts = prompts.texts();
    let unit_width = match recipe.method.site() {
        Site::AttentionHeads => model.config.head_dim,
        Site::Residual => 0,
    };
    let hashes: Vec<String> = model_hashes.iter().map(|(_, h)| h.clone()).collect();
    let (compute, batch_tokens) = (&run.compute, run.batch_tokens);
    let key = cache::CacheKey {
        tool_version: crate::VERSION,
        pass_version: activations::PASS_VERSION,
        device_kind: compute.device_kind(),
        dtype: compute.dtype_name(),
        batch_tokens,
        answer_tokens: recipe.answer_tokens(),
        site: recipe.method.site(),
        model_hashes: &hashes,
        dataset_fingerprint: &dataset.fingerprint(),
        templates: &[&recipe.prompts.probe, &recipe.prompts.tuning],
        prompts: &texts,
    }
    .digest();
    let cache_path = run.cache_dir.as_deref().map(|d| cache::path_for(d, &key));
    if let Some(path) = &cache_path {
        // The cache only saves time: an unreadable entry is recomputed, never fatal.
        match cache::load(path, &["probe", "tuning"]) {
            Ok(Some(mut sets)) => {
                progress.note(&format!("activations: reused {}", path.display()));
                let tuning = sets.pop().expect("two sets");
                let probe = sets.pop().expect("two sets");
                check_finite(&probe, &texts, unit_width)?;
                check_finite(&tuning, &texts[prompts.probe.len()..], unit_width)?;
                return Ok((probe, tuning, true));
            }
            Ok(None) => {}
            Err(e) => progress.warn(&format!("activation cache not used: {e}")),
        }
    }
    let tokens = activations::tokenize(&model.tokenizer()?, &texts)?;
    let packed = PackedPrompts::new(&tokens, batch_tokens, recipe.answer_tokens(), &compute.device)?;
    let plan = plan_for(model, &packed, prompts.probe.len(), run)?;
    progress.note(&format!("activations: {}", plan.describe()));
    let Compute { device, dtype } = compute;
    let site = recipe.method.site();
    let acts = match plan.estimate.mode {
        Mode::Resident => activations::capture(&model.load_as(device, *dtype)?, &packed, site, progress)?,
        Mode::Streamed => activations::capture_streamed(model, (device, *dtype), site, &packed, progress)?,
    };
    check_finite(&acts, &texts, unit_width)?;
    let (probe, tuning) = acts.split_rows(prompts.probe.len());
    if let Some(path) = &cache_path {
        if let Err(e) = cache::store(path, &[("probe", &probe), ("tuning", &tuning)], &key) {
            progress.warn(&format!("activations not cached: {e}"));
        }
    }
    Ok((probe, tuning, false))
}

/// The execution plan of a run's activation pass on this machine, without running it.
pub fn plan_run(model: &ModelFiles, recipe: &Recipe, run: &Resolved) -> Result<Plan> {
    let inputs = activations::pass_inputs(recipe, &model.tokenizer()?)?;
    let packed = PackedPrompts::new(&inputs.tokens, run.batch_tokens, recipe.answer_tokens(), &run.compute.device)?;
    plan_for(model, &packed, inputs.probe_prompts, run)
}

/// The execution plan of the activation pass over these packed prompts, timed at the device's measured
/// matmul rate.
fn plan_for(model: &ModelFiles, packed: &PackedPrompts, probe_prompts: usize, run: &Resolved) -> Result<Plan> {
    let rate = activations::plan::measure_matmul_rate(&model.config, &run.compute)?;
    let shape = packed.shape(probe_prompts);
    activations::plan::plan(model, &shape, &run.compute, run.batch_tokens, Some(rate), run.budget())
}

/// A NaN or infinity in the activations would silently become NaN biases: name where it first appears (the
/// head, for `head_dim` > 0; else the element of the residual stream).
fn check_finite(acts: &Activations, texts: &[&str], head_dim: usize) -> Result<()> {
    let Some((row, layer, index, value)) = acts.first_non_finite() else { return Ok(()) };
    let text: String = texts.get(row).map(|t| t.chars().take(80).collect()).unwrap_or_default();
    let at = match head_dim {
        0 => format!("residual stream element {index}"),
        d => format!("head {}", index / d),
    };
    Err(crate::BakeError::NotFinite(format!(
        "the activation pass produced {value} at layer {layer}, {at} for prompt {row} (`{text}`): the model's weights \
         or config.json hold a non-finite or extreme value"
    )))
}

/// Which existing folders an output of this kind may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A baked checkpoint (`bake run`).
    Bake,
    /// A report folder (`bake probe`, `bake search`), its files listed in `outputs.json`.
    Report,
}

/// Checks an output folder before any work: never the model's or the dataset's folder, nor anything that
/// holds them, and an existing folder only when bake wrote it (see [`crate::io::output`]).
pub fn check_output(out: &Path, force: bool, model: &ModelFiles, recipe: &Recipe, kind: OutputKind) -> Result<Target> {
    let mut protected = vec![Protected { path: &model.location.dir, what: "the model folder", refuse_inside: true }];
    if let Some(dataset) = DatasetSource::of(&recipe.dataset.source).folder() {
        protected.push(Protected { path: dataset, what: "the dataset folder", refuse_inside: false });
    }
    let ownership = match kind {
        OutputKind::Bake => Ownership::Manifest,
        OutputKind::Report => Ownership::Listing,
    };
    output::check(&Request { out, force, protected, ownership })
}

/// Writes a probe report into `staging` and publishes it.
/// Writes `bake probe`'s folder: `report.json` and the heatmap, byte-reproducible, and the seconds per stage in
/// `probe.log`, which no listing holds.
pub fn publish_probe_outputs(report: &ProbeReport, staging: Staging) -> Result<Published> {
    ProbeReport { timings: None, ..report.clone() }.write_files(staging.path())?;
    let log = staging.path().join(crate::io::listing::PROBE_LOG_FILE);
    std::fs::write(&log, crate::export::baked::log_text(report)).at(&log)?;
    staging.commit()
}
