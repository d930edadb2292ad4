//! The non-linear probe of NL-ITI: one hidden layer of [`HIDDEN`] ReLU units and a logistic output, fitted to
//! exactly scikit-learn's `MLPClassifier(hidden_layer_sizes=(16,), activation="relu", alpha=ALPHA)` objective
//!
//! ```text
//! f(W₁, b₁, w₂, b₂) = −(1/n) Σᵢ [yᵢ log pᵢ + (1 − yᵢ) log(1 − pᵢ)] + α/(2n) (‖W₁‖² + ‖w₂‖²)
//! pᵢ = σ(w₂ · relu(W₁ xᵢ + b₁) + b₂)
//! ```
//!
//! by full-batch L-BFGS from scikit-learn's initialisation (Glorot-uniform weights and intercepts, drawn from a
//! generator seeded by the recipe's seed, the layer and the head), stopping when the largest gradient component
//! is at most [`TOLERANCE`] (scikit-learn's `tol`, which it passes to L-BFGS as `gtol`) or after [`MAX_ITER`]
//! iterations (its `max_iter`). Full batches, no dropout and no shuffling make the fit a function of its inputs
//! alone: the same activations give the same probe, bit for bit, on any thread count.
//!
//! Why not NL-ITI's own training (batch norm, Adam on shuffled mini-batches for 10 epochs, the best epoch's
//! weights by validation accuracy): its result depends on the shuffling order and it picks its weights on the
//! very validation prompts that then rank the heads. Both probes have the same capacity (batch norm before a
//! ReLU is an affine map the first layer can absorb at inference).

use super::logistic::{sigmoid, softplus};
use super::product;
use crate::rng::SeededRng;

/// Hidden units (NL-ITI's `MLP_S`).
pub const HIDDEN: usize = 16;
/// L2 penalty (scikit-learn's default `alpha`).
pub const ALPHA: f64 = 1e-4;
/// Largest gradient component at which a fit stops (scikit-learn's default `tol`).
pub const TOLERANCE: f64 = 1e-4;
/// Most L-BFGS iterations (scikit-learn's default `max_iter`).
pub const MAX_ITER: usize = 200;
/// Correction pairs L-BFGS keeps (scipy's default).
const MEMORY: usize = 10;

/// A fitted MLP probe. Parameters are laid out as one vector: `W₁` (`HIDDEN × d`, row-major), `b₁`, `w₂`, `b₂`.
#[derive(Debug, Clone, PartialEq)]
pub struct MlpProbe {
    pub d: usize,
    pub params: Vec<f64>,
    /// L-BFGS iterations used.
    pub iterations: usize,
}

/// Where each part of the parameter vector starts.
struct Layout {
    d: usize,
}

impl Layout {
    fn w1(&self) -> std::ops::Range<usize> {
        0..HIDDEN * self.d
    }
    fn b1(&self) -> std::ops::Range<usize> {
        HIDDEN * self.d..HIDDEN * (self.d + 1)
    }
    fn w2(&self) -> std::ops::Range<usize> {
        HIDDEN * (self.d + 1)..HIDDEN * (self.d + 2)
    }
    fn b2(&self) -> usize {
        HIDDEN * (self.d + 2)
    }
    fn len(&self) -> usize {
        self.b2() + 1
    }
}

impl MlpProbe {
    /// The logit of one row of features.
    pub fn decision(&self, x: &[f32]) -> f64 {
        let l = Layout { d: self.d };
        let (w1, b1, w2) = (&self.params[l.w1()], &self.params[l.b1()], &self.params[l.w2()]);
        let mut z = self.params[l.b2()];
        for j in 0..HIDDEN {
            let a = b1[j] + dot(&w1[j * self.d..(j + 1) * self.d], x);
            z += w2[j] * a.max(0.0);
        }
        z
    }

    /// Fraction of the rows of `features` (n × d) whose predicted class (p > ½) equals the label.
    pub fn accuracy(&self, features: &[f32], labels: &[bool]) -> f64 {
        if labels.is_empty() {
            return 0.0;
        }
        let correct = features.chunks_exact(self.d).zip(labels).filter(|(x, &y)| (self.decision(x) > 0.0) == y).count();
        correct as f64 / labels.len() as f64
    }
}

fn dot(w: &[f64], x: &[f32]) -> f64 {
    w.iter().zip(x).map(|(w, &x)| w * x as f64).sum()
}

/// The starting point of `head`'s probe: [`initial_params`] from a generator seeded by the recipe's seed, the
/// layer and the head, so every head's fit is reproducible on its own.
pub fn initial_params_for(seed: u64, head: super::Head, d: usize) -> Vec<f64> {
    let purpose = format!("mlp-probe {} {}", head.layer, head.head);
    initial_params(d, &mut SeededRng::for_purpose(seed, &purpose))
}

/// scikit-learn's initialisation for a ReLU network: every weight and intercept of a layer uniform in
/// ±√(6 / (fan_in + fan_out)).
pub fn initial_params(d: usize, rng: &mut SeededRng) -> Vec<f64> {
    let l = Layout { d };
    let mut params = vec![0.0; l.len()];
    let hidden_bound = (6.0 / (d + HIDDEN) as f64).sqrt();
    let output_bound = (6.0 / (HIDDEN + 1) as f64).sqrt();
    let mut uniform = |bound: f64| (2.0 * rng.uniform() - 1.0) * bound;
    for v in &mut params[l.w1()] {
        *v = uniform(hidden_bound);
    }
    for v in &mut params[l.b1()] {
        *v = uniform(hidden_bound);
    }
    for v in &mut params[l.w2()] {
        *v = uniform(output_bound);
    }
    params[l.b2()] = uniform(output_bound);
    params
}

/// Buffers one fit reuses across its objective evaluations.
#[derive(Default)]
pub struct Scratch {
    w1: Vec<f32>,
    /// `n × HIDDEN`: pre-activations, then the gradient at them.
    hidden: Vec<f32>,
    g_w1: Vec<f32>,
}

/// The objective and its gradient at `params` over `features` (n × d) and `labels`. The two products with the
/// features (`X W₁ᵀ` forward, `Δᵀ X` back) are f32 matrix products, nearly all of the work; everything between
/// them is f64.
fn objective(params: &[f64], features: &[f32], labels: &[bool], d: usize, grad: &mut [f64], s: &mut Scratch) -> f64 {
    let l = Layout { d };
    let n = labels.len();
    let (w1, b1, w2, b2) = (&params[l.w1()], &params[l.b1()], &params[l.w2()], params[l.b2()]);
    s.w1.clear();
    s.w1.extend(w1.iter().map(|&v| v as f32));
    s.hidden.resize(n * HIDDEN, 0.0);
    s.g_w1.resize(HIDDEN * d, 0.0);
    // hidden = X · W₁ᵀ: (n × d)(d × HIDDEN); W₁ᵀ is W₁ read with its strides swapped.
    product((&mut s.hidden, HIDDEN), (n, HIDDEN, d), (features, 1, d), (&s.w1, d, 1));
    let (mut g_b1, mut g_w2, mut g_b2, mut loss) = ([0.0f64; HIDDEN], [0.0f64; HIDDEN], 0.0, 0.0);
    for (row, &y) in s.hidden.chunks_exact_mut(HIDDEN).zip(labels) {
        let mut a = [0.0f64; HIDDEN];
        let mut z = b2;
        for j in 0..HIDDEN {
            a[j] = (row[j] as f64 + b1[j]).max(0.0);
            z += w2[j] * a[j];
        }
        // −log p = softplus(−z), −log(1 − p) = softplus(z); the residual p − y is the gradient in z.
        let y = if y { 1.0 } else { 0.0 };
        loss += softplus(z) - y * z;
        let residual = sigmoid(z) - y;
        g_b2 += residual;
        for j in 0..HIDDEN {
            g_w2[j] += residual * a[j];
            let back = if a[j] > 0.0 { residual * w2[j] } else { 0.0 };
            g_b1[j] += back;
            row[j] = back as f32;
        }
    }
    // ∇W₁ = Δᵀ · X: (HIDDEN × n)(n × d), Δ read with its strides swapped.
    product((&mut s.g_w1, d), (HIDDEN, d, n), (&s.hidden, HIDDEN, 1), (features, 1, d));
    let scale = 1.0 / n.max(1) as f64;
    let penalty = ALPHA * scale;
    let mut squares = 0.0;
    for (g, (&w, &gw)) in grad[l.w1()].iter_mut().zip(w1.iter().zip(&s.g_w1)) {
        *g = gw as f64 * scale + penalty * w;
        squares += w * w;
    }
    for (g, &gb) in grad[l.b1()].iter_mut().zip(&g_b1) {
        *g = gb * scale;
    }
    for (g, (&w, &gw)) in grad[l.w2()].iter_mut().zip(w2.iter().zip(&g_w2)) {
        *g = gw * scale + penalty * w;
        squares += w * w;
    }
    grad[l.b2()] = g_b2 * scale;
    loss * scale + 0.5 * penalty * squares
}

fn largest_component(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// Fits a probe from `initial` on `features` (n × d) and `labels` by L-BFGS with a backtracking (Armijo) line
/// search.
pub fn fit_from(initial: Vec<f64>, features: &[f32], labels: &[bool], d: usize, scratch: &mut Scratch) -> MlpProbe {
    let m = initial.len();
    let mut x = initial;
    let mut g = vec![0.0; m];
    let mut f = objective(&x, features, labels, d, &mut g, scratch);
    let mut history: std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)> = std::collections::VecDeque::new();
    let (mut trial, mut trial_g) = (vec![0.0; m], vec![0.0; m]);
    let mut iterations = 0;
    while iterations < MAX_ITER && largest_component(&g) > TOLERANCE {
        iterations += 1;
        let direction = two_loop(&g, &history);
        let slope = dot64(&direction, &g);
        let (direction, slope) = if slope < 0.0 {
            (direction, slope)
        } else {
            // Not a descent direction (curvature information gone stale): restart from steepest descent.
            history.clear();
            let d: Vec<f64> = g.iter().map(|v| -v).collect();
            let s = dot64(&d, &g);
            (d, s)
        };
        // The first step of a fresh history has no scale: one of length 1 at most.
        let mut step = if history.is_empty() { (1.0 / largest_component(&direction)).min(1.0) } else { 1.0 };
        let mut accepted = false;
        for _ in 0..40 {
            for ((t, &xi), &di) in trial.iter_mut().zip(&x).zip(&direction) {
                *t = xi + step * di;
            }
            let ft = objective(&trial, features, labels, d, &mut trial_g, scratch);
            if ft <= f + 1e-4 * step * slope {
                let s: Vec<f64> = trial.iter().zip(&x).map(|(a, b)| a - b).collect();
                let y: Vec<f64> = trial_g.iter().zip(&g).map(|(a, b)| a - b).collect();
                let sy = dot64(&s, &y);
                if sy > 1e-10 * dot64(&y, &y).sqrt() * dot64(&s, &s).sqrt() {
                    if history.len() == MEMORY {
                        history.pop_front();
                    }
                    history.push_back((s, y, 1.0 / sy));
                }
                std::mem::swap(&mut x, &mut trial);
                std::mem::swap(&mut g, &mut trial_g);
                f = ft;
                accepted = true;
                break;
            }
            step *= 0.5;
        }
        if !accepted {
            // No decrease along the direction at any tried step: f is as low as f64 resolves here.
            break;
        }
    }
    MlpProbe { d, params: x, iterations }
}

/// The L-BFGS direction −H·g from the stored correction pairs (Nocedal & Wright, algorithm 7.4).
fn two_loop(g: &[f64], history: &std::collections::VecDeque<(Vec<f64>, Vec<f64>, f64)>) -> Vec<f64> {
    let mut q: Vec<f64> = g.to_vec();
    let mut alphas = Vec::with_capacity(history.len());
    for (s, y, rho) in history.iter().rev() {
        let a = rho * dot64(s, &q);
        q.iter_mut().zip(y).for_each(|(q, y)| *q -= a * y);
        alphas.push(a);
    }
    if let Some((s, y, _)) = history.back() {
        let gamma = dot64(s, y) / dot64(y, y);
        q.iter_mut().for_each(|v| *v *= gamma);
    }
    for ((s, y, rho), a) in history.iter().zip(alphas.into_iter().rev()) {
        let b = rho * dot64(y, &q);
        q.iter_mut().zip(s).for_each(|(q, s)| *q += (a - b) * s);
    }
    q.iter_mut().for_each(|v| *v = -*v);
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gradient_matches_finite_differences() {
        let d = 5;
        let mut rng = SeededRng::for_purpose(7, "test");
        let features: Vec<f32> = (0..40 * d).map(|_| rng.normal() as f32).collect();
        let labels: Vec<bool> = (0..40).map(|i| features[i * d] + 0.3 * features[i * d + 1] > 0.0).collect();
        let params = initial_params(d, &mut rng);
        let mut g = vec![0.0; params.len()];
        let s = &mut Scratch::default();
        objective(&params, &features, &labels, d, &mut g, s);
        let mut scratch = vec![0.0; params.len()];
        for i in [0, 3, 17, HIDDEN * d + 2, HIDDEN * (d + 1) + 5, params.len() - 1] {
            // Large enough that W₁, rounded to f32 in the product, moves by many of its ulps.
            let h = 1e-3;
            let (mut up, mut down) = (params.clone(), params.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (objective(&up, &features, &labels, d, &mut scratch, s)
                - objective(&down, &features, &labels, d, &mut scratch, s))
                / (2.0 * h);
            assert!((numeric - g[i]).abs() < 1e-4, "parameter {i}: {numeric} vs {}", g[i]);
        }
    }

    #[test]
    fn a_fit_separates_a_nonlinear_pattern() {
        // XOR of two signs: no linear probe beats chance, one hidden layer does.
        let d = 4;
        let mut rng = SeededRng::for_purpose(3, "test");
        let features: Vec<f32> = (0..400 * d).map(|_| rng.normal() as f32).collect();
        let labels: Vec<bool> = (0..400).map(|i| (features[i * d] > 0.0) != (features[i * d + 1] > 0.0)).collect();
        let probe = fit_from(initial_params(d, &mut rng), &features, &labels, d, &mut Scratch::default());
        assert!(probe.accuracy(&features, &labels) > 0.9, "{}", probe.accuracy(&features, &labels));
    }
}
