//! What a search tries and under which budget: the grid of K and α, the objective, the folds and trials, each
//! checked against the model and the questions before any work.

use serde::Serialize;

use crate::error::{BakeError, Result};
use crate::model::ModelConfig;
use crate::probes::HeadLayout;
use crate::recipe::{Method, Recipe};
use crate::scoring::ScoreOptions;

/// The default grid of the head methods: the reference's K = 48, α = 15 inside the range its users swept by hand.
pub const DEFAULT_HEADS: [usize; 6] = [8, 16, 32, 48, 64, 96];
pub const DEFAULT_ALPHAS: [f64; 7] = [0.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0];
/// The default grid of `residual`: K counts layers, and one σ of a whole layer's residual stream moves the
/// next-token distribution about as much as ten of one head's output (on SmolLM2, K = 3 at α = 2 already costs
/// 0.7 nats of KL), so its α are ten times smaller.
pub const DEFAULT_RESIDUAL_LAYERS: [usize; 5] = [1, 2, 3, 4, 8];
pub const DEFAULT_RESIDUAL_ALPHAS: [f64; 6] = [0.0, 0.25, 0.5, 1.0, 2.0, 3.0];
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
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
    /// The methods whose candidates compete, in the same folds and under the same budget.
    pub methods: Vec<Method>,
    /// The K to try (empty: each method's default grid).
    pub heads: Vec<usize>,
    /// The α to try (empty: each method's default grid).
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

/// One point of the grid: a method, K and α. α = 0 is the base model whatever the method and K, so it is one
/// candidate, at the first method's smallest K.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub method: Method,
    pub heads: usize,
    pub alpha: f64,
}

impl Point {
    /// α = 0: the base itself, whatever K (its shift adds zero everywhere).
    pub fn is_base(&self) -> bool {
        self.alpha == 0.0
    }
}

/// One method's K and α.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub method: Method,
    pub heads: Vec<usize>,
    pub alphas: Vec<f64>,
}

/// Search options that passed [`SearchOptions::check`] for one model and recipe, with each method's grid
/// resolved: what a search takes.
#[derive(Debug, Clone)]
pub struct Checked {
    options: SearchOptions,
    pub grids: Vec<Grid>,
}

impl std::ops::Deref for Checked {
    type Target = SearchOptions;

    fn deref(&self) -> &SearchOptions {
        &self.options
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} K = {}, α = {}", self.method, self.heads, self.alpha)
    }
}

impl SearchOptions {
    /// Checks everything that needs no model weights, before any is read, and resolves each method's grid for
    /// a model of `config`. Only checked options can be searched with: the check runs once.
    pub fn check(self, config: &ModelConfig, recipe: &Recipe) -> Result<Checked> {
        let invalid = |m: String| Err(BakeError::Invalid(m));
        if self.methods.is_empty() {
            return invalid("search methods: expected at least one method, found an empty list".into());
        }
        let mut grids = Vec::new();
        for &method in &self.methods {
            let layout = HeadLayout::at(method.site(), config);
            let units = layout.layers * layout.heads;
            let heads = match self.heads.is_empty() {
                true => default_heads(method, units),
                false => self.heads.clone(),
            };
            if let Some(k) = heads.iter().find(|&&k| k == 0 || k > units) {
                return invalid(format!(
                    "search heads: K = {k} is not between 1 and the model's {units} {} (method {method})",
                    method.units()
                ));
            }
            let alphas = match (self.alphas.is_empty(), method) {
                (false, _) => self.alphas.clone(),
                (true, Method::Residual) => DEFAULT_RESIDUAL_ALPHAS.to_vec(),
                (true, Method::Iti | Method::NlIti) => DEFAULT_ALPHAS.to_vec(),
            };
            grids.push(Grid { method, heads, alphas });
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
        Ok(Checked { options: self, grids })
    }
}

impl Checked {
    /// The candidates, method by method, each in tie order (α, then K, ascending): every (K, α > 0), and α = 0
    /// once for all methods, listed or not ("no shift" is always a possible answer).
    pub fn points(&self) -> Vec<Point> {
        let mut points = Vec::new();
        for (i, grid) in self.grids.iter().enumerate() {
            let mut heads = grid.heads.clone();
            heads.sort_unstable();
            heads.dedup();
            let mut alphas = grid.alphas.clone();
            alphas.push(0.0);
            alphas.sort_by(f64::total_cmp);
            alphas.dedup();
            let method = grid.method;
            for &alpha in &alphas {
                match alpha == 0.0 {
                    true if i == 0 => points.push(Point { method, heads: heads[0], alpha }),
                    true => {}
                    false => points.extend(heads.iter().map(|&heads| Point { method, heads, alpha })),
                }
            }
        }
        points
    }
}

/// The default K list of `method` for a model with `units` of what it shifts (heads, or layers): the grid's
/// values up to that number (all of them when there are fewer than the smallest).
pub fn default_heads(method: Method, units: usize) -> Vec<usize> {
    let grid: &[usize] = match method {
        Method::Residual => &DEFAULT_RESIDUAL_LAYERS,
        Method::Iti | Method::NlIti => &DEFAULT_HEADS,
    };
    let fit: Vec<usize> = grid.iter().copied().filter(|&k| k <= units).collect();
    if fit.is_empty() {
        vec![units]
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
            methods: vec![Method::Iti, Method::Residual],
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
        let json = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_hidden_layers": 20, "vocab_size": 100});
        let serde_json::Value::Object(map) = json else { unreachable!() };
        let config = ModelConfig::from_map(std::path::Path::new("config.json"), map).unwrap();
        let recipe = Recipe {
            corpus: Some(crate::recipe::CorpusSpec { documents: 1, tokens: 8, path: "c".into() }),
            ..Recipe::shipped()
        };
        let options = options.check(&config, &recipe).unwrap();
        let points: Vec<(Method, usize, f64)> = options.points().iter().map(|p| (p.method, p.heads, p.alpha)).collect();
        let (iti, residual) = (Method::Iti, Method::Residual);
        assert_eq!(
            points,
            vec![
                (iti, 8, 0.0),
                (iti, 8, 2.5),
                (iti, 16, 2.5),
                (iti, 8, 5.0),
                (iti, 16, 5.0),
                (residual, 8, 2.5),
                (residual, 16, 2.5),
                (residual, 8, 5.0),
                (residual, 16, 5.0)
            ]
        );
    }
}
