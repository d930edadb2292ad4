//! The schema of `search.json`: every candidate's numbers per fold, how far it got, what the search cost.

use serde::{Deserialize, Serialize};

use super::halving::Rung;
use super::options::{Objective, Point};
use crate::probes::Head;
use crate::recipe::{Method, Recipe};
use crate::scoring::mc::Protocol;

/// A candidate's numbers on one fold.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub heads: Vec<Head>,
}

/// Where a candidate's evaluation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CandidateReport {
    /// (Absent from the files of searches made before methods: read as the report's method.)
    #[serde(default)]
    pub method: Method,
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
        Point { method: self.method, heads: self.heads, alpha: self.alpha }
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
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchReport {
    pub tool_version: String,
    pub model: String,
    /// The searched recipe; its `method` is the first of `methods`.
    pub recipe: Recipe,
    /// The methods whose candidates competed (absent from searches made before methods: the recipe's).
    #[serde(default)]
    pub methods: Vec<Method>,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
