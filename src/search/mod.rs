//! Stage 8: `bake search`: K (heads) and α (strength) chosen by the reference's cross-validation under a
//! KL budget, spending the evaluation where it can change the answer.
//!
//! ```text
//! activations (cached) ─► per fold: probes once ─► per candidate (K, α): δ only
//!                                                      │
//!        KL screen on a few documents ◄────────────────┘   over budget: no MC scoring
//!        successive halving on held-out questions         halved on growing nested question subsets
//!        CE/KL on the whole corpus for the finalists      the budget is applied to these numbers
//!        selection: best mean objective within budget, ties to smaller α, then smaller K
//! ```
//!
//! Every number of a finalist is measured as `bake eval --cv` measures it (the shift at every position, the
//! reference MC protocol, the same folds, splits and documents), so the chosen point's numbers are the ones
//! `bake eval --cv` reports for the same K and α.

pub mod output;
pub mod tradeoff;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::error::{BakeError, Result};
use crate::eval::mc::{McScores, Protocol};
use crate::eval::score::{self, Hook, HookMode, LanguageScores, Variant};
use crate::eval::{self, EvalOptions, FoldSplit, Setup};
use crate::model::ModelFiles;
use crate::pipeline::{self, ProbeOptions};
use crate::probes::ProbeResults;
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::rng::SeededRng;

/// The default grid: the reference's K = 48, α = 15 inside the range its users swept by hand.
pub const DEFAULT_HEADS: [usize; 6] = [8, 16, 32, 48, 64, 96];
pub const DEFAULT_ALPHAS: [f64; 7] = [0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0];
/// KL(base ‖ edited) per token, in nats. The reference's own ITI runs sit between 0.06 and 1.08 (its
/// Llama-2-7B-chat at the defaults: 0.65, with CE 2.51 → 2.82, a visible loss of fluency); 0.1 keeps the
/// next-token distribution on ordinary text close to the base's while leaving room for a useful shift.
pub const DEFAULT_KL_BUDGET: f64 = 0.1;
/// Documents of the corpus sample the KL screen runs on.
pub const SCREEN_DOCUMENTS: usize = 10;
/// Fewest held-out questions per fold a rung scores: below that, a mean MC2 says little.
pub const MIN_RUNG_QUESTIONS: usize = 20;
/// Successive halving keeps 1 in `ETA` candidates per rung.
pub const ETA: usize = 2;
/// Finalists by default. Each costs every held-out question and the whole corpus, about two thirds of a
/// search at 4; the rung before them already ranks on half the questions.
pub const DEFAULT_TRIALS: usize = 2;

/// Which held-out number the search maximises (both from the reference MC protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    Mc1,
    Mc2,
}

impl Objective {
    pub fn name(self) -> &'static str {
        match self {
            Objective::Mc1 => "mc1",
            Objective::Mc2 => "mc2",
        }
    }

    fn of(self, mc1: f64, mc2: f64) -> f64 {
        match self {
            Objective::Mc1 => mc1,
            Objective::Mc2 => mc2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SearchOptions {
    pub heads: Vec<usize>,
    pub alphas: Vec<f64>,
    pub kl_budget: f64,
    /// Most CE increase over the base, in nats per token (`None`: no CE budget).
    pub ce_budget: Option<f64>,
    pub objective: Objective,
    pub folds: usize,
    /// Most candidates measured on every held-out question (the last rung of the halving).
    pub trials: usize,
    /// `false`: every candidate on every question and on the whole corpus (no screen, no halving): the
    /// reference the savings are measured against.
    pub early_discard: bool,
    /// Fewest held-out questions per fold a rung scores ([`MIN_RUNG_QUESTIONS`]).
    pub min_rung_questions: usize,
    /// Instruction, answer tokens and corpus of the MC and CE/KL measurements; the protocol is the reference's.
    pub eval: EvalOptions,
}

/// One point of the grid. α = 0 is the base model whatever K, so it is one candidate, at the smallest K.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub heads: usize,
    pub alpha: f64,
}

impl Point {
    /// α = 0: the base itself, whatever K (its shift adds zero everywhere).
    pub fn is_base(&self) -> bool {
        self.alpha == 0.0
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "K = {}, α = {}", self.heads, self.alpha)
    }
}

impl SearchOptions {
    /// Checks everything that needs no model weights: called before any is read. `model_heads` is layers ×
    /// heads per layer.
    pub fn check(&self, model_heads: usize) -> Result<()> {
        let invalid = |m: String| Err(BakeError::Invalid(m));
        if self.heads.is_empty() {
            return invalid("--heads: expected at least one K, found an empty list".into());
        }
        if self.alphas.is_empty() {
            return invalid("--alpha: expected at least one α, found an empty list".into());
        }
        if let Some(k) = self.heads.iter().find(|&&k| k == 0 || k > model_heads) {
            return invalid(format!("--heads: K = {k} is not between 1 and the model's {model_heads} attention heads"));
        }
        if let Some(a) = self.alphas.iter().find(|a| !(a.is_finite() && **a >= 0.0)) {
            return invalid(format!("--alpha: expected finite numbers ≥ 0, found {a}"));
        }
        if !(self.kl_budget.is_finite() && self.kl_budget > 0.0) {
            return invalid(format!("--kl-budget: expected a number > 0 (nats per token), found {}", self.kl_budget));
        }
        if let Some(b) = self.ce_budget.filter(|b| !(b.is_finite() && *b > 0.0)) {
            return invalid(format!("--ce-budget: expected a number > 0 (nats per token), found {b}"));
        }
        if self.folds < 2 {
            return invalid(format!("--folds {}: expected at least 2", self.folds));
        }
        if self.trials == 0 {
            return invalid("--trials: expected at least 1".into());
        }
        if self.eval.corpus.is_none() {
            return invalid(
                "bake search measures KL against a budget and needs a corpus: give --corpus FILE (.jsonl with a \
                 `text` field, or plain text) or the recipe's `corpus:`"
                    .into(),
            );
        }
        Ok(())
    }

    /// The candidates in tie order (α, then K, ascending): every (K, α > 0), and α = 0 once, listed or not
    /// ("no shift" is always a possible answer).
    pub fn points(&self) -> Vec<Point> {
        let mut heads = self.heads.clone();
        heads.sort_unstable();
        heads.dedup();
        let mut alphas = self.alphas.clone();
        alphas.push(0.0);
        alphas.sort_by(f64::total_cmp);
        alphas.dedup();
        let mut points = Vec::new();
        for &alpha in &alphas {
            match alpha == 0.0 {
                true => points.push(Point { heads: heads[0], alpha }),
                false => points.extend(heads.iter().map(|&heads| Point { heads, alpha })),
            }
        }
        points
    }
}

/// The default K list for a model: the grid's values up to its number of heads (all of them when it has
/// fewer than the smallest).
pub fn default_heads(model_heads: usize) -> Vec<usize> {
    let fit: Vec<usize> = DEFAULT_HEADS.iter().copied().filter(|&k| k <= model_heads).collect();
    if fit.is_empty() {
        vec![model_heads]
    } else {
        fit
    }
}

/// One rung of successive halving: how much of each fold's held-out questions it scores, and how many
/// candidates go on to the next.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rung {
    /// Share of each fold's held-out questions (the last rung: 1).
    pub fraction: f64,
    /// Candidates kept after this rung (the last rung: all that reached it).
    pub keep: usize,
}

/// Halving from `candidates` down to at most `trials`, each rung on twice the questions of the one before;
/// the last rung scores every question. With `candidates ≤ trials`, one rung.
pub fn schedule(candidates: usize, trials: usize) -> Vec<Rung> {
    let mut sizes = vec![candidates];
    while *sizes.last().unwrap() > trials {
        let next = sizes.last().unwrap().div_ceil(ETA).max(trials);
        sizes.push(next);
    }
    let rungs = sizes.len();
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| Rung {
            fraction: 1.0 / (ETA.pow((rungs - 1 - i) as u32)) as f64,
            keep: sizes.get(i + 1).copied().unwrap_or(size),
        })
        .collect()
}

/// Successive halving over candidates `0..n` (in tie order). `evaluate(rung, alive)` gives the objective
/// of each alive candidate on that rung's questions; after every rung but the last, the best `keep` of the
/// unprotected ones stay (ties to the earlier candidate), and the `protected` ones always do. Returns, per
/// candidate, the rung it was dropped at (`None`: it reached the last rung).
pub fn successive_halving(
    n: usize,
    protected: &[usize],
    rungs: &[Rung],
    mut evaluate: impl FnMut(usize, &[usize]) -> Result<Vec<f64>>,
) -> Result<Vec<Option<usize>>> {
    let mut dropped = vec![None; n];
    let mut alive: Vec<usize> = (0..n).collect();
    for (r, rung) in rungs.iter().enumerate() {
        let scores = evaluate(r, &alive)?;
        if r + 1 == rungs.len() {
            break;
        }
        let mut ranked: Vec<(usize, f64)> =
            alive.iter().copied().zip(scores).filter(|(c, _)| !protected.contains(c)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let kept: Vec<usize> = ranked
            .iter()
            .take(rung.keep)
            .map(|(c, _)| *c)
            .chain(alive.iter().copied().filter(|c| protected.contains(c)))
            .collect();
        for &c in alive.iter().filter(|c| !kept.contains(c)) {
            dropped[c] = Some(r);
        }
        alive.retain(|c| kept.contains(c));
    }
    Ok(dropped)
}

/// A finalist's cross-validated numbers, as the selection rule sees them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finalist {
    pub point: Point,
    pub objective: f64,
    pub kl: f64,
    /// Mean CE minus the base's.
    pub ce_increase: f64,
}

impl Finalist {
    pub fn within(&self, kl_budget: f64, ce_budget: Option<f64>) -> bool {
        self.kl <= kl_budget && ce_budget.is_none_or(|b| self.ce_increase <= b)
    }
}

/// The best mean objective within the budgets, ties to smaller α then smaller K; `None` when nothing is
/// within them (α = 0 always is: its KL and CE increase are 0).
pub fn choose(finalists: &[Finalist], kl_budget: f64, ce_budget: Option<f64>) -> Option<usize> {
    (0..finalists.len()).filter(|&i| finalists[i].within(kl_budget, ce_budget)).min_by(|&a, &b| {
        let (x, y) = (&finalists[a], &finalists[b]);
        y.objective
            .total_cmp(&x.objective)
            .then(x.point.alpha.total_cmp(&y.point.alpha))
            .then(x.point.heads.cmp(&y.point.heads))
    })
}

/// A candidate's numbers on one fold.
#[derive(Debug, Clone, Serialize)]
pub struct FoldNumbers {
    pub fold: usize,
    /// Held-out questions its MC numbers are the mean over (0: dropped at the KL screen, no MC numbers).
    pub questions: usize,
    pub mc1: Option<f64>,
    pub mc2: Option<f64>,
    /// On the KL screen's documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub screen_kl: Option<f64>,
    /// On the whole corpus sample (finalists only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// The chosen heads `[layer, head]`, best first.
    pub heads: Vec<[usize; 2]>,
}

/// Where a candidate's evaluation ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "stage")]
pub enum Reached {
    /// Its mean KL on the screen's documents is over the budget: no MC scoring.
    KlScreen,
    /// Not screened: the same K at a smaller α already was over the budget.
    KlImplied,
    /// Dropped after rung `rung` (0-based) of the halving, on that share of the questions.
    Rung { rung: usize, fraction: f64 },
    /// Measured on every held-out question and the whole corpus.
    Final,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateReport {
    pub heads: usize,
    pub alpha: f64,
    pub reached: Reached,
    pub folds: Vec<FoldNumbers>,
    /// Means over the folds (on the questions each fold reached).
    pub mc1: Option<f64>,
    pub mc2: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
    /// For finalists: within the KL (and CE) budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within_budget: Option<bool>,
}

impl CandidateReport {
    pub fn point(&self) -> Point {
        Point { heads: self.heads, alpha: self.alpha }
    }

    /// Its mean MC1 or MC2, whichever the search maximised (`None`: no MC numbers).
    pub fn objective(&self, objective: Objective) -> Option<f64> {
        match objective {
            Objective::Mc1 => self.mc1,
            Objective::Mc2 => self.mc2,
        }
    }

    /// Its mean KL over the folds on the screen's documents (`None`: not screened).
    pub fn screen_kl(&self) -> Option<f64> {
        self.folds.iter().map(|f| f.screen_kl).sum::<Option<f64>>().map(|kl| kl / self.folds.len() as f64)
    }
}

/// What the reuse saved, in units of work: MC questions scored and documents run, against evaluating every
/// candidate on every question and document.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cost {
    pub questions_scored: usize,
    pub questions_full_grid: usize,
    pub documents_run: usize,
    pub documents_full_grid: usize,
    /// Probe fits: once per fold, instead of once per candidate and fold.
    pub probe_fits: usize,
    pub probe_fits_full_grid: usize,
}

/// `search.json`: everything the search measured. Seconds are kept out (in `search.log`): the same inputs
/// give the same file, so its sha256 identifies the search.
#[derive(Debug, Clone, Serialize)]
pub struct SearchReport {
    pub tool_version: String,
    pub model: String,
    pub recipe: Recipe,
    pub questions: usize,
    pub folds: usize,
    pub objective: Objective,
    pub protocol: Protocol,
    pub kl_budget: f64,
    pub ce_budget: Option<f64>,
    /// Documents of the corpus sample, and of the screen.
    pub documents: usize,
    pub screen_documents: usize,
    pub early_discard: bool,
    pub rungs: Vec<Rung>,
    /// The base model's numbers: per fold MC on every held-out question, CE on the corpus.
    pub base: CandidateBase,
    pub candidates: Vec<CandidateReport>,
    /// Index into `candidates`.
    pub chosen: usize,
    pub cost: Cost,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateBase {
    pub mc1: f64,
    pub mc2: f64,
    pub ce: f64,
}

impl SearchReport {
    pub fn chosen(&self) -> &CandidateReport {
        &self.candidates[self.chosen]
    }
}

/// The search and the seconds it spent, by stage and by candidate.
pub struct SearchOutcome {
    pub report: SearchReport,
    pub timings: Vec<(String, f64)>,
    /// Seconds spent on each candidate (its MC scoring and its share of the CE/KL passes), in
    /// `report.candidates` order.
    pub candidate_seconds: Vec<f64>,
}

/// A candidate while the search runs.
struct Candidate {
    point: Point,
    folds: Vec<CandidateFold>,
    reached: Option<Reached>,
    seconds: f64,
}

struct CandidateFold {
    heads: Vec<[usize; 2]>,
    hook: Hook,
    /// MC1 and MC2 per held-out question scored so far.
    scored: BTreeMap<usize, (f64, f64)>,
    screen_kl: Option<f64>,
    language: Option<LanguageScores>,
}

/// One fold: its split, its probes, the order its held-out questions are scored in.
struct FoldState {
    plan: FoldSplit,
    probes: ProbeResults,
    /// The held-out questions in a seeded order: rung r scores a prefix of it, so the subsets are nested.
    order: Vec<usize>,
}

impl FoldState {
    /// A candidate's mean MC1 and MC2 on the first `count` questions of this fold's order.
    fn means(&self, fold: &CandidateFold, count: usize) -> (f64, f64) {
        let picked = &self.order[..count];
        (mean(picked.iter().map(|q| fold.scored[q].0)), mean(picked.iter().map(|q| fold.scored[q].1)))
    }
}

/// Runs the search. The options must have passed [`SearchOptions::check`].
pub fn search(
    model: &ModelFiles,
    recipe: &Recipe,
    options: &SearchOptions,
    probe_options: &ProbeOptions,
    progress: &dyn Progress,
) -> Result<SearchOutcome> {
    let c = &model.config;
    options.check(c.num_layers * c.num_heads)?;
    let mut timings = crate::progress::Laps::start();
    // Everything checkable is checked before the activation pass: the dataset, the corpus, the folds.
    let inputs = eval::read_inputs(model, recipe, &options.eval, progress)?;
    let n = inputs.data.questions.len();
    let plans = eval::fold_splits(n, options.folds, recipe, "--folds")?;
    // The recipe the search reports (and `recipe.yaml` bakes) names the documents it measured.
    let recipe = &with_documents_used(recipe, inputs.corpus.as_ref());
    let prepared = pipeline::prepare(model, recipe, probe_options, progress)?;
    timings.lap("data and activations");
    let setup = eval::set_up(model, recipe, &options.eval, inputs)?;

    progress.stage("search: probes");
    let folds: Vec<FoldState> = plans
        .into_iter()
        .map(|plan| {
            let probes = pipeline::fit_probes(&plan.fit(&prepared));
            let mut order = plan.test.clone();
            let permutation = SeededRng::for_purpose(recipe.seed, "search-questions").permutation(order.len());
            order = permutation.iter().map(|&i| order[i]).collect();
            FoldState { plan, probes, order }
        })
        .collect();
    let points = options.points();
    let mut candidates = points
        .iter()
        .map(|&point| {
            let r = Recipe { heads: point.heads, alpha: point.alpha, ..recipe.clone() };
            let folds = folds
                .iter()
                .map(|f| {
                    let shifted = pipeline::shift_top_heads(&r, &f.plan.fit(&prepared), &f.probes)?;
                    Ok(CandidateFold {
                        heads: shifted.chosen.iter().map(|&(l, h)| [l, h]).collect(),
                        hook: Hook::new(&shifted.deltas, HookMode::EveryPosition, setup.base.device())?,
                        scored: BTreeMap::new(),
                        screen_kl: None,
                        language: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Candidate { point, folds, reached: None, seconds: 0.0 })
        })
        .collect::<Result<Vec<_>>>()?;
    timings.lap("probes");

    let run = Run { setup: &setup, recipe, options, folds: &folds, progress };
    let documents = setup.corpus.as_ref().map_or(0, |c| c.documents.len());
    let screen_documents = SCREEN_DOCUMENTS.min(documents);
    let mut documents_run = 0;
    if options.early_discard {
        progress.stage(&format!("search: KL screen on {screen_documents} documents"));
        documents_run += run.screen(&mut candidates, screen_documents)?;
        timings.lap("kl screen");
    }
    let alive: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].reached.is_none()).collect();
    // α = 0 rides along every rung (the honest fallback when no shift is within budget), outside the count
    // of trials.
    let protected: Vec<usize> = (0..alive.len()).filter(|&i| candidates[alive[i]].point.is_base()).collect();
    let trials = if options.early_discard { options.trials } else { alive.len() };
    let rungs = schedule(alive.len() - protected.len(), trials);
    let dropped = successive_halving(alive.len(), &protected, &rungs, |r, live| {
        let ids: Vec<usize> = live.iter().map(|&i| alive[i]).collect();
        run.rung(&mut candidates, &ids, r, &rungs)
    })?;
    for (i, d) in dropped.iter().enumerate() {
        if let Some(r) = *d {
            candidates[alive[i]].reached = Some(Reached::Rung { rung: r, fraction: rungs[r].fraction });
        }
    }
    timings.lap("halving");

    let finalists: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].reached.is_none()).collect();
    progress.stage(&format!("search: CE and KL of {} finalists on {documents} documents", finalists.len()));
    let (base_ce, run_here) = run.language(&mut candidates, &finalists)?;
    documents_run += run_here;
    timings.lap("ce and kl");

    let candidate_seconds = candidates.iter().map(|c| c.seconds).collect();
    let report = run.report(model, candidates, base_ce, &rungs, documents, screen_documents, documents_run, n)?;
    Ok(SearchOutcome { report, timings: timings.done, candidate_seconds })
}

/// What every step of a search reads.
struct Run<'a> {
    setup: &'a Setup,
    recipe: &'a Recipe,
    options: &'a SearchOptions,
    folds: &'a [FoldState],
    progress: &'a dyn Progress,
}

impl Run<'_> {
    fn variant<'v>(&'v self, fold: &'v CandidateFold) -> Variant<'v> {
        Variant::hooked(&self.setup.base, &fold.hook)
    }

    /// Drops the candidates whose mean KL over the folds on the first documents is over the budget, α by α
    /// upwards: at a fixed K the shift is α times one vector, so the KL grows with α, and once a K is over
    /// the budget its larger α are dropped unmeasured. Returns the documents run.
    fn screen(&self, candidates: &mut [Candidate], documents: usize) -> Result<usize> {
        let docs = &self.setup.corpus.as_ref().expect("checked: a corpus").documents[..documents];
        let mut alphas: Vec<f64> = candidates.iter().filter(|c| !c.point.is_base()).map(|c| c.point.alpha).collect();
        alphas.dedup();
        let mut run = 0;
        for alpha in alphas {
            let level: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].point.alpha == alpha).collect();
            let (measured, implied): (Vec<usize>, Vec<usize>) = level.into_iter().partition(|&i| {
                let k = candidates[i].point.heads;
                !candidates.iter().any(|c| c.point.heads == k && c.point.alpha < alpha && c.reached.is_some())
            });
            for &i in &implied {
                candidates[i].reached = Some(Reached::KlImplied);
            }
            if measured.is_empty() {
                continue;
            }
            self.progress.note(&format!("KL screen: α = {alpha}, {} candidates", measured.len()));
            for f in 0..self.folds.len() {
                let started = Instant::now();
                let variants: Vec<Variant> = measured.iter().map(|&i| self.variant(&candidates[i].folds[f])).collect();
                let (_, scores) = score::language_scores(
                    &self.setup.base,
                    &variants,
                    docs,
                    self.recipe.batch_size,
                    self.setup.pad_id,
                    &crate::progress::Silent,
                )?;
                let share = started.elapsed().as_secs_f64() / measured.len() as f64;
                for (&i, s) in measured.iter().zip(scores) {
                    candidates[i].folds[f].screen_kl = Some(s.kl);
                    candidates[i].seconds += share;
                }
            }
            run += documents * (1 + measured.len()) * self.folds.len();
            for &i in &measured {
                let c = &mut candidates[i];
                let kl = mean(c.folds.iter().map(|f| f.screen_kl.unwrap_or(0.0)));
                if kl > self.options.kl_budget {
                    c.reached = Some(Reached::KlScreen);
                    self.progress
                        .note(&format!("{:<22} KL {kl:.4} on the screen: over the budget", c.point.to_string()));
                }
            }
        }
        Ok(run)
    }

    /// Scores `ids` on rung `r`'s questions (only the ones each has not been scored on) and returns their
    /// mean objective over the folds.
    fn rung(&self, candidates: &mut [Candidate], ids: &[usize], r: usize, rungs: &[Rung]) -> Result<Vec<f64>> {
        let fraction = rungs[r].fraction;
        let counts: Vec<usize> = self
            .folds
            .iter()
            .map(|f| rung_questions(f.order.len(), fraction, self.options.min_rung_questions))
            .collect();
        self.progress.stage(&format!(
            "search: rung {} of {}: {} candidates on {} held-out questions per fold",
            r + 1,
            rungs.len(),
            ids.len(),
            counts.iter().map(usize::to_string).collect::<Vec<_>>().join(" + ")
        ));
        let mut objectives = Vec::new();
        for &i in ids {
            let started = Instant::now();
            for (f, fold) in self.folds.iter().enumerate() {
                let wanted = &fold.order[..counts[f]];
                let missing: Vec<usize> =
                    wanted.iter().copied().filter(|q| !candidates[i].folds[f].scored.contains_key(q)).collect();
                if !missing.is_empty() {
                    let mut sorted = missing.clone();
                    sorted.sort_unstable();
                    let scores = self.score_mc(&candidates[i].folds[f], &sorted)?;
                    let cf = &mut candidates[i].folds[f];
                    for (k, &q) in scores.questions.iter().enumerate() {
                        cf.scored.insert(q, (scores.mc1[k], scores.mc2[k]));
                    }
                }
            }
            let c = &mut candidates[i];
            c.seconds += started.elapsed().as_secs_f64();
            let (mc1, mc2) = self.means_on(c, &counts);
            let objective = self.options.objective.of(mc1, mc2);
            self.progress.note(&format!(
                "{:<22} MC1 {mc1:.4}  MC2 {mc2:.4}  on {} questions",
                c.point.to_string(),
                counts.iter().sum::<usize>()
            ));
            objectives.push(objective);
        }
        Ok(objectives)
    }

    fn score_mc(&self, fold: &CandidateFold, questions: &[usize]) -> Result<McScores> {
        self.setup.score(
            self.variant(fold),
            Protocol::Reference,
            questions,
            &self.options.eval,
            self.recipe,
            &crate::progress::Silent,
        )
    }

    /// Mean MC1 and MC2 over the folds of the first `counts[f]` questions of each fold's order.
    fn means_on(&self, c: &Candidate, counts: &[usize]) -> (f64, f64) {
        let per_fold: Vec<(f64, f64)> =
            self.folds.iter().zip(&c.folds).zip(counts).map(|((fold, cf), &count)| fold.means(cf, count)).collect();
        (mean(per_fold.iter().map(|p| p.0)), mean(per_fold.iter().map(|p| p.1)))
    }

    /// CE and KL on the whole corpus sample of each finalist, fold by fold; returns the base's CE. α = 0
    /// adds zero at every position, so its logits are the base's bit for bit: it takes the base's numbers
    /// without a pass of its own. Also returns the documents run.
    fn language(&self, candidates: &mut [Candidate], finalists: &[usize]) -> Result<(f64, usize)> {
        let docs = &self.setup.corpus.as_ref().expect("checked: a corpus").documents;
        let (unshifted, finalists): (Vec<usize>, Vec<usize>) =
            finalists.iter().partition(|&&i| candidates[i].point.is_base());
        let mut base_ce = 0.0;
        for f in 0..self.folds.len() {
            let started = Instant::now();
            let variants: Vec<Variant> = finalists.iter().map(|&i| self.variant(&candidates[i].folds[f])).collect();
            let (base, scores) = score::language_scores(
                &self.setup.base,
                &variants,
                docs,
                self.recipe.batch_size,
                self.setup.pad_id,
                self.progress,
            )?;
            base_ce = base.ce;
            for &i in &unshifted {
                candidates[i].folds[f].language = Some(base);
            }
            let share = started.elapsed().as_secs_f64() / finalists.len().max(1) as f64;
            for (&i, s) in finalists.iter().zip(scores) {
                candidates[i].folds[f].language = Some(s);
                candidates[i].seconds += share;
            }
        }
        Ok((base_ce, docs.len() * (1 + finalists.len()) * self.folds.len()))
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        model: &ModelFiles,
        candidates: Vec<Candidate>,
        base_ce: f64,
        rungs: &[Rung],
        documents: usize,
        screen_documents: usize,
        documents_run: usize,
        questions: usize,
    ) -> Result<SearchReport> {
        let full: Vec<usize> = self.folds.iter().map(|f| f.order.len()).collect();
        let base = candidates.iter().find(|c| c.point.is_base() && c.reached.is_none());
        let (base_mc1, base_mc2) = base.map_or((f64::NAN, f64::NAN), |c| self.means_on(c, &full));
        let mut reports = Vec::new();
        let mut finalists = Vec::new();
        for c in &candidates {
            let counts: Vec<usize> = match &c.reached {
                Some(Reached::KlScreen | Reached::KlImplied) => vec![0; full.len()],
                Some(Reached::Rung { fraction, .. }) => {
                    full.iter().map(|&n| rung_questions(n, *fraction, self.options.min_rung_questions)).collect()
                }
                _ => full.clone(),
            };
            let (mc1, mc2) = match counts.iter().all(|&n| n > 0) {
                true => self.means_on(c, &counts),
                false => (f64::NAN, f64::NAN),
            };
            let language: Option<Vec<LanguageScores>> = c.folds.iter().map(|f| f.language).collect();
            let ce = language.as_ref().map(|l| mean(l.iter().map(|s| s.ce)));
            let kl = language.as_ref().map(|l| mean(l.iter().map(|s| s.kl)));
            let within_budget = match (ce, kl) {
                (Some(ce), Some(kl)) => {
                    let finalist = Finalist {
                        point: c.point,
                        objective: self.options.objective.of(mc1, mc2),
                        kl,
                        ce_increase: ce - base_ce,
                    };
                    finalists.push((reports.len(), finalist));
                    Some(finalist.within(self.options.kl_budget, self.options.ce_budget))
                }
                _ => None,
            };
            let folds = c
                .folds
                .iter()
                .zip(self.folds)
                .zip(&counts)
                .enumerate()
                .map(|(f, ((cf, fold), &count))| {
                    let means = (count > 0).then(|| fold.means(cf, count));
                    FoldNumbers {
                        fold: f,
                        questions: count,
                        mc1: means.map(|m| m.0),
                        mc2: means.map(|m| m.1),
                        screen_kl: cf.screen_kl,
                        ce: cf.language.map(|l| l.ce),
                        kl: cf.language.map(|l| l.kl),
                        heads: cf.heads.clone(),
                    }
                })
                .collect();
            reports.push(CandidateReport {
                heads: c.point.heads,
                alpha: c.point.alpha,
                reached: c.reached.clone().unwrap_or(Reached::Final),
                folds,
                mc1: mc1.is_finite().then_some(mc1),
                mc2: mc2.is_finite().then_some(mc2),
                ce,
                kl,
                within_budget,
            });
        }
        let list: Vec<Finalist> = finalists.iter().map(|(_, f)| *f).collect();
        let chosen = choose(&list, self.options.kl_budget, self.options.ce_budget)
            .map(|i| finalists[i].0)
            .ok_or_else(|| BakeError::Invalid("no candidate is within the budget (α = 0 always is)".into()))?;
        let scored: usize = candidates.iter().flat_map(|c| c.folds.iter().map(|f| f.scored.len())).sum();
        let folds = self.folds.len();
        Ok(SearchReport {
            tool_version: crate::VERSION.into(),
            model: model.location.hub_repo.clone().unwrap_or_else(|| model.location.spec.clone()),
            recipe: self.recipe.clone(),
            questions,
            folds,
            objective: self.options.objective,
            protocol: Protocol::Reference,
            kl_budget: self.options.kl_budget,
            ce_budget: self.options.ce_budget,
            documents,
            screen_documents: if self.options.early_discard { screen_documents } else { 0 },
            early_discard: self.options.early_discard,
            rungs: rungs.to_vec(),
            base: CandidateBase { mc1: base_mc1, mc2: base_mc2, ce: base_ce },
            cost: Cost {
                questions_scored: scored,
                questions_full_grid: candidates.len() * questions,
                documents_run,
                documents_full_grid: documents * (1 + candidates.len()) * folds,
                probe_fits: folds,
                probe_fits_full_grid: folds * candidates.len(),
            },
            candidates: reports,
            chosen,
        })
    }
}

/// Held-out questions a rung scores out of a fold's `n`.
fn rung_questions(n: usize, fraction: f64, fewest: usize) -> usize {
    ((n as f64 * fraction).ceil() as usize).max(fewest).min(n)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / count.max(1) as f64
}

/// `recipe` with its corpus's `documents` set to the number of documents the sample holds, when the corpus
/// had fewer usable ones than asked for.
fn with_documents_used(recipe: &Recipe, corpus: Option<&eval::corpus::Corpus>) -> Recipe {
    let mut recipe = recipe.clone();
    if let (Some(spec), Some(c)) = (recipe.corpus.as_mut(), corpus) {
        spec.documents = spec.documents.min(c.documents.len());
    }
    recipe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_halves_down_to_the_trials_and_ends_on_every_question() {
        let rungs = schedule(36, 4);
        let keeps: Vec<usize> = rungs.iter().map(|r| r.keep).collect();
        assert_eq!(keeps, vec![18, 9, 5, 4, 4]);
        let fractions: Vec<f64> = rungs.iter().map(|r| r.fraction).collect();
        assert_eq!(fractions, vec![1.0 / 16.0, 1.0 / 8.0, 0.25, 0.5, 1.0]);
        assert_eq!(schedule(3, 4), vec![Rung { fraction: 1.0, keep: 3 }]);
    }

    #[test]
    fn one_alpha_zero_candidate_and_tie_order() {
        let options = SearchOptions {
            heads: vec![16, 8, 16],
            alphas: vec![5.0, 0.0, 2.5],
            kl_budget: 0.1,
            ce_budget: None,
            objective: Objective::Mc2,
            folds: 2,
            trials: 4,
            early_discard: true,
            min_rung_questions: MIN_RUNG_QUESTIONS,
            eval: EvalOptions {
                protocols: vec![Protocol::Reference],
                instruction: String::new(),
                answer_tokens: crate::eval::mc::AnswerTokens::Offsets,
                corpus: None,
                max_memory: None,
            },
        };
        let points: Vec<(usize, f64)> = options.points().iter().map(|p| (p.heads, p.alpha)).collect();
        assert_eq!(points, vec![(8, 0.0), (8, 2.5), (16, 2.5), (8, 5.0), (16, 5.0)]);
    }

    fn finalist(heads: usize, alpha: f64, objective: f64, kl: f64, ce_increase: f64) -> Finalist {
        Finalist { point: Point { heads, alpha }, objective, kl, ce_increase }
    }

    #[test]
    fn the_best_within_the_budget_wins_ties_to_smaller_alpha_then_k() {
        let f = [
            finalist(8, 0.0, 0.40, 0.0, 0.0),
            finalist(48, 15.0, 0.60, 0.30, 0.2), // best, but over the KL budget
            finalist(32, 10.0, 0.50, 0.08, 0.05),
            finalist(16, 10.0, 0.50, 0.05, 0.04), // ties the one above on the objective: smaller K
            finalist(64, 5.0, 0.50, 0.09, 0.30),  // ties too, smaller α, but over a CE budget of 0.1
        ];
        assert_eq!(choose(&f, 0.1, None), Some(4));
        assert_eq!(choose(&f, 0.1, Some(0.1)), Some(3));
        assert_eq!(choose(&f, 1.0, None), Some(1));
        // Nothing helps: no shift is the answer.
        let f =
            [finalist(8, 0.0, 0.45, 0.0, 0.0), finalist(8, 5.0, 0.44, 0.01, 0.0), finalist(8, 10.0, 0.40, 0.02, 0.0)];
        assert_eq!(choose(&f, 0.1, None), Some(0));
    }

    /// Candidates whose per-question scores are seeded noise around known means: halving on nested prefixes
    /// must keep the one with the best mean over every question, which the full grid picks.
    #[test]
    fn halving_keeps_the_full_grid_winner() {
        let (candidates, questions) = (36, 400);
        let mut rng = SeededRng::for_purpose(7, "halving-test");
        // A clear winner (candidate 23, 0.1 above the next) among means spread over 0.40 .. 0.50, and
        // per-question noise like MC2's (σ 0.25): a rung of 25 questions sees each mean to about ± 0.05.
        let means: Vec<f64> = (0..candidates)
            .map(|c| if c == 23 { 0.60 } else { 0.40 + 0.1 * ((c * 17) % candidates) as f64 / 36.0 })
            .collect();
        let scores: Vec<Vec<f64>> =
            means.iter().map(|m| (0..questions).map(|_| (m + 0.25 * rng.normal()).clamp(0.0, 1.0)).collect()).collect();
        let full_mean = |c: usize, n: usize| scores[c][..n].iter().sum::<f64>() / n as f64;
        let full_winner = (0..candidates).max_by(|&a, &b| full_mean(a, questions).total_cmp(&full_mean(b, questions)));
        assert_eq!(full_winner, Some(23));
        let rungs = schedule(candidates, 4);
        // Questions each candidate was scored on: the nested subsets are scored incrementally.
        let mut reached = vec![0; candidates];
        let dropped = successive_halving(candidates, &[0], &rungs, |r, alive| {
            let n = rung_questions(questions, rungs[r].fraction, MIN_RUNG_QUESTIONS);
            alive.iter().for_each(|&c| reached[c] = n);
            Ok(alive.iter().map(|&c| full_mean(c, n)).collect())
        })
        .unwrap();
        let evaluated: usize = reached.iter().sum();
        let finalists: Vec<usize> = (0..candidates).filter(|&c| dropped[c].is_none()).collect();
        assert!(finalists.contains(&0), "the protected candidate stays");
        assert!(finalists.contains(&full_winner.unwrap()), "{finalists:?} lost {full_winner:?}");
        let halving_winner =
            finalists.iter().copied().max_by(|&a, &b| full_mean(a, questions).total_cmp(&full_mean(b, questions)));
        assert_eq!(halving_winner, full_winner);
        assert!(evaluated * 3 < candidates * questions, "halving scored {evaluated} of {}", candidates * questions);
    }
}
