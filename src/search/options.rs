//! What a search tries and under which budget: the grid of K and α, the objective, the folds and trials, each
//! checked against the model and the questions before any work.

use serde::Serialize;

use crate::error::{BakeError, Result};
use crate::recipe::Recipe;
use crate::scoring::ScoreOptions;

/// The default grid: the reference's K = 48, α = 15 inside the range its users swept by hand.
pub const DEFAULT_HEADS: [usize; 6] = [8, 16, 32, 48, 64, 96];
pub const DEFAULT_ALPHAS: [f64; 7] = [0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0];
/// The search's default budget is the one a bake warns over.
pub use crate::recipe::DEFAULT_KL_BUDGET;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
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

    pub fn of(self, mc1: f64, mc2: f64) -> f64 {
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
    pub eval: ScoreOptions,
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

/// Search options that passed [`SearchOptions::check`] for one model and recipe: what a search takes.
#[derive(Debug, Clone)]
pub struct Checked(SearchOptions);

impl std::ops::Deref for Checked {
    type Target = SearchOptions;

    fn deref(&self) -> &SearchOptions {
        &self.0
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "K = {}, α = {}", self.heads, self.alpha)
    }
}

impl SearchOptions {
    /// Checks everything that needs no model weights, before any is read; `model_heads` is layers × heads per
    /// layer. Only checked options can be searched with: the check runs once.
    pub fn check(self, model_heads: usize, recipe: &Recipe) -> Result<Checked> {
        let invalid = |m: String| Err(BakeError::Invalid(m));
        if self.heads.is_empty() {
            return invalid("search heads: expected at least one K, found an empty list".into());
        }
        if self.alphas.is_empty() {
            return invalid("search alphas: expected at least one α, found an empty list".into());
        }
        if let Some(k) = self.heads.iter().find(|&&k| k == 0 || k > model_heads) {
            return invalid(format!(
                "search heads: K = {k} is not between 1 and the model's {model_heads} attention heads"
            ));
        }
        if let Some(a) = self.alphas.iter().find(|a| !(a.is_finite() && **a >= 0.0)) {
            return invalid(format!("search alphas: expected finite numbers ≥ 0, found {a}"));
        }
        if !(self.kl_budget.is_finite() && self.kl_budget > 0.0) {
            return invalid(format!("KL budget: expected a number > 0 (nats per token), found {}", self.kl_budget));
        }
        if let Some(b) = self.ce_budget.filter(|b| !(b.is_finite() && *b > 0.0)) {
            return invalid(format!("CE budget: expected a number > 0 (nats per token), found {b}"));
        }
        if self.folds < 2 {
            return invalid(format!("{} folds: expected at least 2", self.folds));
        }
        if self.trials == 0 {
            return invalid("trials: expected at least 1".into());
        }
        if recipe.corpus.is_none() {
            return invalid("a search measures KL against a budget and needs the recipe's `corpus`".into());
        }
        Ok(Checked(self))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoring::mc::Protocol;

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
            eval: ScoreOptions {
                protocols: vec![Protocol::Reference],
                instruction: String::new(),
                answer_tokens: crate::scoring::mc::AnswerTokens::Offsets,
            },
        };
        let points: Vec<(usize, f64)> = options.points().iter().map(|p| (p.heads, p.alpha)).collect();
        assert_eq!(points, vec![(8, 0.0), (8, 2.5), (16, 2.5), (8, 5.0), (16, 5.0)]);
    }
}
