//! Successive halving over the candidates and the selection rule: candidates are scored on growing nested subsets
//! of each fold's held-out questions, half dropped per rung, and the best mean objective within the budgets wins.

use serde::Serialize;

use super::options::{Point, ETA};
use crate::error::Result;

/// One rung of successive halving: how much of each fold's held-out questions it scores, and how many
/// candidates go on to the next.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
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

/// The best mean objective within the budgets, ties to smaller α, then smaller K, then the earlier method;
/// `None` when nothing is within them (α = 0 always is: its KL and CE increase are 0).
pub fn choose(finalists: &[Finalist], kl_budget: f64, ce_budget: Option<f64>) -> Option<usize> {
    (0..finalists.len()).filter(|&i| finalists[i].within(kl_budget, ce_budget)).min_by(|&a, &b| {
        let (x, y) = (&finalists[a], &finalists[b]);
        y.objective
            .total_cmp(&x.objective)
            .then(x.point.alpha.total_cmp(&y.point.alpha))
            .then(x.point.heads.cmp(&y.point.heads))
            .then(x.point.method.cmp(&y.point.method))
    })
}

/// Held-out questions a rung scores out of a fold's `n`.
pub fn rung_questions(n: usize, fraction: f64, fewest: usize) -> usize {
    ((n as f64 * fraction).ceil() as usize).max(fewest).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;
    use crate::search::options::MIN_RUNG_QUESTIONS;

    #[test]
    fn the_schedule_halves_down_to_the_trials_and_ends_on_every_question() {
        let rungs = schedule(36, 4);
        let keeps: Vec<usize> = rungs.iter().map(|r| r.keep).collect();
        assert_eq!(keeps, vec![18, 9, 5, 4, 4]);
        let fractions: Vec<f64> = rungs.iter().map(|r| r.fraction).collect();
        assert_eq!(fractions, vec![1.0 / 16.0, 1.0 / 8.0, 0.25, 0.5, 1.0]);
        assert_eq!(schedule(3, 4), vec![Rung { fraction: 1.0, keep: 3 }]);
    }

    fn finalist(heads: usize, alpha: f64, objective: f64, kl: f64, ce_increase: f64) -> Finalist {
        Finalist { point: Point { method: crate::recipe::Method::Iti, heads, alpha }, objective, kl, ce_increase }
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
