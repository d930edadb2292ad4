//! `bake search`: the method, K (heads, or layers) and α (strength) chosen by the reference's cross-validation
//! under a KL budget, spending the evaluation where it can change the answer. Every method's candidates share
//! the folds, the question order, the screen, the halving and the budget.
//!
//! ```text
//! per method: activations (cached) ─► per fold: probes once ─► per candidate (K, α): δ only
//!                                                      │
//!        KL screen on a few documents ◄────────────────┘   over budget: no MC scoring
//!        successive halving on held-out questions         halved on growing nested question subsets
//!        CE/KL on the whole corpus for the finalists      the budget is applied to these numbers
//!        selection: best mean objective within budget, ties to smaller α, then smaller K, then the earlier method
//! ```
//!
//! Every number of a finalist is measured as `bake eval --cv` measures it (the shift at every position, the
//! reference MC protocol, the same folds, splits and documents), so the chosen point's numbers are the ones
//! `bake eval --cv` reports for the same K and α.

pub mod halving;
pub mod options;
pub mod output;
pub mod report;
pub mod tradeoff;

pub use halving::{choose, rung_questions, schedule, successive_halving, Finalist, Rung};
pub use options::{
    default_heads, Checked, Grid, Objective, Point, SearchOptions, DEFAULT_ALPHAS, DEFAULT_HEADS, DEFAULT_KL_BUDGET,
    DEFAULT_RESIDUAL_ALPHAS, DEFAULT_RESIDUAL_LAYERS, DEFAULT_TRIALS, ETA, MIN_RUNG_QUESTIONS, SCREEN_DOCUMENTS,
};
pub use report::{CandidateBase, CandidateReport, Cost, FoldNumbers, Reached, SearchOutcome, SearchReport};

use std::collections::BTreeMap;
use std::time::Instant;

use crate::error::{BakeError, Result};
use crate::model::ModelFiles;
use crate::pipeline::{self, Resolved};
use crate::probes::{Head, ProbeResults};
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::rng::SeededRng;
use crate::scoring::corpus::Corpus;
use crate::scoring::folds::{fold_splits, FoldSplit};
use crate::scoring::logprobs::{Hook, HookMode, LanguageScores, Variant};
use crate::scoring::mc::{McScores, Protocol};
use crate::scoring::plan::ScoringPlan;
use crate::scoring::{read_inputs, set_up, McWork, Scorer, Workload};

/// What the search measured on: the corpus sample, the KL screen's share of it, the documents it ran in all, and
/// the questions.
struct Measured {
    documents: usize,
    screen_documents: usize,
    documents_run: usize,
    questions: usize,
}

/// A candidate while the search runs.
struct Candidate {
    point: Point,
    folds: Vec<CandidateFold>,
    reached: Option<Reached>,
    seconds: f64,
}

struct CandidateFold {
    heads: Vec<Head>,
    hook: Hook,
    /// MC1 and MC2 per held-out question scored so far.
    scored: BTreeMap<usize, (f64, f64)>,
    screen_kl: Option<f64>,
    language: Option<LanguageScores>,
}

/// One fold: its split and the order its held-out questions are scored in (the same for every method).
struct FoldState {
    plan: FoldSplit,
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

/// What a search's largest passes score: one candidate on a fold's held-out questions, and on the corpus every
/// candidate beside the base. (How many passes run depends on what the halving drops.)
fn workload(options: &Checked) -> Workload {
    let held_out = McWork { from_prompt_end: false, share: options.folds };
    Workload { mc: vec![held_out], edited: options.points().len() }
}

/// The memory plan of [`search`]: its inputs are read and nothing is run.
pub fn plan(model: &ModelFiles, recipe: &Recipe, options: &Checked, run: &Resolved) -> Result<ScoringPlan> {
    Ok(read_inputs(model, recipe, &options.eval, &workload(options), run, &crate::progress::Silent)?.plan)
}

/// Runs the search with options checked for this model and recipe ([`SearchOptions::check`]).
pub fn search(
    model: &ModelFiles,
    recipe: &Recipe,
    options: &Checked,
    run: &Resolved,
    progress: &dyn Progress,
) -> Result<SearchOutcome> {
    let mut timings = crate::progress::Laps::start();
    // Everything checkable is checked before the activation pass: the dataset, the corpus, the folds.
    let inputs = read_inputs(model, recipe, &options.eval, &workload(options), run, progress)?;
    let n = inputs.data.questions.len();
    let plans = fold_splits(n, options.folds, recipe)?;
    // The recipe the search reports (and `recipe.yaml` bakes) names the documents it measured.
    let recipe = &Recipe { method: options.grids[0].method, ..with_documents_used(recipe, inputs.corpus.as_ref()) };
    let prepared = pipeline::prepare(model, recipe, run, progress)?;
    timings.lap("data and activations");
    let setup = set_up(model, run, inputs)?;

    let folds: Vec<FoldState> = plans
        .into_iter()
        .map(|plan| {
            let permutation = SeededRng::for_purpose(recipe.seed, "search-questions").permutation(plan.test.len());
            let order = permutation.iter().map(|&i| plan.test[i]).collect();
            FoldState { plan, order }
        })
        .collect();
    let points = options.points();
    let mut candidates = Vec::new();
    let several = options.grids.len() > 1;
    for (i, grid) in options.grids.iter().enumerate() {
        let method = grid.method;
        // The first method's activations were prepared above; each other method's pass replaces them, so one
        // method's activations are in memory at a time.
        let recipe = &Recipe { method, ..recipe.clone() };
        let owned;
        let prepared = match i {
            0 => &prepared,
            _ => {
                progress.stage(&format!("search: activations of method {method}"));
                owned = pipeline::prepare(model, recipe, run, progress)?;
                timings.lap(&format!("data and activations ({method})"));
                &owned
            }
        };
        progress
            .stage(&format!("search: probes{}", if several { format!(" of method {method}") } else { String::new() }));
        let probes: Vec<ProbeResults> =
            folds.iter().map(|f| pipeline::fit_probes(recipe, &f.plan.fit(prepared))).collect();
        for &point in points.iter().filter(|p| p.method == method) {
            let r = Recipe { heads: point.heads, alpha: point.alpha, ..recipe.clone() };
            let candidate_folds = folds
                .iter()
                .zip(&probes)
                .map(|(f, probes)| {
                    let shifted = pipeline::shift_top_heads(&r, &f.plan.fit(prepared), probes)?;
                    Ok(CandidateFold {
                        heads: shifted.chosen.clone(),
                        hook: Hook::new(
                            &shifted.deltas,
                            (method.site(), HookMode::EveryPosition),
                            setup.runner.device(),
                        )?,
                        scored: BTreeMap::new(),
                        screen_kl: None,
                        language: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            candidates.push(Candidate { point, folds: candidate_folds, reached: None, seconds: 0.0 });
        }
        timings.lap(&match several {
            true => format!("probes ({method})"),
            false => "probes".to_string(),
        });
    }
    drop(prepared);

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
    let measured = Measured { documents, screen_documents, documents_run, questions: n };
    let report = run.report(model, candidates, base_ce, &rungs, measured)?;
    Ok(SearchOutcome { report, timings: timings.done, candidate_seconds })
}

/// What every step of a search reads.
struct Run<'a> {
    setup: &'a Scorer<'a>,
    recipe: &'a Recipe,
    options: &'a SearchOptions,
    folds: &'a [FoldState],
    progress: &'a dyn Progress,
}

impl Run<'_> {
    fn variant<'v>(&'v self, fold: &'v CandidateFold) -> Variant<'v> {
        Variant::hooked(&fold.hook)
    }

    /// Drops the candidates whose mean KL over the folds on the first documents is over the budget, α by α
    /// upwards: at a fixed K the shift is α times one vector, so the KL grows with α, and once a K is over
    /// the budget its larger α are dropped unmeasured. Returns the documents run.
    fn screen(&self, candidates: &mut [Candidate], documents: usize) -> Result<usize> {
        let docs = &self.setup.corpus.as_ref().expect("checked: a corpus").documents[..documents];
        let mut alphas: Vec<f64> = candidates.iter().filter(|c| !c.point.is_base()).map(|c| c.point.alpha).collect();
        alphas.sort_by(f64::total_cmp);
        alphas.dedup();
        let mut run = 0;
        for alpha in alphas {
            let level: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].point.alpha == alpha).collect();
            let (measured, implied): (Vec<usize>, Vec<usize>) = level.into_iter().partition(|&i| {
                let Point { method, heads, .. } = candidates[i].point;
                !candidates.iter().any(|c| {
                    (c.point.method, c.point.heads) == (method, heads) && c.point.alpha < alpha && c.reached.is_some()
                })
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
                let (_, scores) = self.setup.language_on(docs, &variants, self.recipe, &crate::progress::Silent)?;
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
            let (base, scores) = self.setup.language_on(docs, &variants, self.recipe, self.progress)?;
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

    fn report(
        &self,
        model: &ModelFiles,
        candidates: Vec<Candidate>,
        base_ce: f64,
        rungs: &[Rung],
        measured: Measured,
    ) -> Result<SearchReport> {
        let Measured { documents, screen_documents, documents_run, questions } = measured;
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
                method: c.point.method,
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
            methods: self.options.methods.clone(),
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
                probe_fits: folds * self.options.methods.len(),
                probe_fits_full_grid: folds * candidates.len(),
            },
            candidates: reports,
            chosen,
        })
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / count.max(1) as f64
}

/// `recipe` with its corpus's `documents` set to the number of documents the sample holds, when the corpus
/// had fewer usable ones than asked for.
fn with_documents_used(recipe: &Recipe, corpus: Option<&Corpus>) -> Recipe {
    let mut recipe = recipe.clone();
    if let (Some(spec), Some(c)) = (recipe.corpus.as_mut(), corpus) {
        spec.documents = spec.documents.min(c.documents.len());
    }
    recipe
}
