//! L2-regularised logistic regression with an unpenalised intercept, minimising exactly scikit-learn's
//! objective `½‖w‖² + C Σᵢ log(1 + exp(−yᵢ (w·xᵢ + b)))` to its optimum by Newton's method with a
//! backtracking line search (the problem is small and strictly convex, so a handful of steps suffice).

/// A fitted probe.
#[derive(Debug, Clone)]
pub struct Probe {
    pub weights: Vec<f64>,
    pub intercept: f64,
}

impl Probe {
    pub fn decision(&self, x: &[f64]) -> f64 {
        self.intercept + dot(&self.weights, x)
    }

    /// Fraction of rows whose predicted class (decision > 0 means true) equals the label.
    pub fn accuracy(&self, rows: &[&[f64]], labels: &[bool]) -> f64 {
        if rows.is_empty() {
            return 0.0;
        }
        let correct = rows.iter().zip(labels).filter(|(x, &y)| (self.decision(x) > 0.0) == y).count();
        correct as f64 / rows.len() as f64
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// log(1 + eˣ) without overflow.
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

struct Problem<'a> {
    rows: &'a [&'a [f64]],
    labels: &'a [bool],
    c: f64,
    d: usize,
}

impl Problem<'_> {
    /// Parameters are `[w₀ … w_{d−1}, b]`.
    fn objective(&self, beta: &[f64]) -> f64 {
        let (w, b) = beta.split_at(self.d);
        let loss: f64 = self
            .rows
            .iter()
            .zip(self.labels)
            .map(|(x, &y)| {
                let z = dot(w, x) + b[0];
                softplus(z) - if y { z } else { 0.0 }
            })
            .sum();
        0.5 * dot(w, w) + self.c * loss
    }

    /// Gradient and Hessian (dense, (d+1)²).
    fn derivatives(&self, beta: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let d = self.d;
        let n = d + 1;
        let (w, b) = beta.split_at(d);
        let mut grad = vec![0.0; n];
        let mut hess = vec![0.0; n * n];
        for (x, &y) in self.rows.iter().zip(self.labels) {
            let p = sigmoid(dot(w, x) + b[0]);
            let r = self.c * (p - if y { 1.0 } else { 0.0 });
            let s = self.c * p * (1.0 - p);
            for i in 0..d {
                grad[i] += r * x[i];
                let sx = s * x[i];
                let row = &mut hess[i * n..i * n + n];
                for j in 0..=i {
                    row[j] += sx * x[j];
                }
                hess[d * n + i] += sx;
            }
            grad[d] += r;
            hess[d * n + d] += s;
        }
        // Only the lower triangle was accumulated; mirror it.
        for i in 0..n {
            for j in 0..i {
                hess[j * n + i] = hess[i * n + j];
            }
            if i < d {
                grad[i] += w[i];
                hess[i * n + i] += 1.0;
            }
        }
        (grad, hess)
    }
}

/// Solves `A x = b` for symmetric positive definite `A` (n×n, row-major) by Cholesky.
fn solve_spd(a: &[f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = a[i * n + j] - (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum::<f64>();
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[i * n + k] * y[k]).sum::<f64>()) / l[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[k * n + i] * x[k]).sum::<f64>()) / l[i * n + i];
    }
    Some(x)
}

/// Fits a probe on `rows` (each of length d) with regularisation strength `c` (scikit-learn's C).
pub fn fit(rows: &[&[f64]], labels: &[bool], c: f64, tolerance: f64) -> Probe {
    let d = rows.first().map_or(0, |r| r.len());
    let problem = Problem { rows, labels, c, d };
    let mut beta = vec![0.0; d + 1];
    let mut value = problem.objective(&beta);
    for _ in 0..100 {
        let (grad, hess) = problem.derivatives(&beta);
        if dot(&grad, &grad).sqrt() <= tolerance {
            break;
        }
        let Some(step) = solve_spd(&hess, &grad, d + 1) else { break };
        let slope = dot(&grad, &step);
        let mut t = 1.0;
        loop {
            let candidate: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b - t * s).collect();
            let candidate_value = problem.objective(&candidate);
            if candidate_value <= value - 1e-4 * t * slope || t < 1e-10 {
                beta = candidate;
                value = candidate_value;
                break;
            }
            t *= 0.5;
        }
    }
    let intercept = beta.pop().unwrap_or(0.0);
    Probe { weights: beta, intercept }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_data_is_classified_and_the_gradient_vanishes() {
        let xs: Vec<Vec<f64>> = (0..40).map(|i| vec![i as f64 / 10.0 - 2.0, ((i * 7) % 5) as f64 / 5.0]).collect();
        let rows: Vec<&[f64]> = xs.iter().map(Vec::as_slice).collect();
        let labels: Vec<bool> = xs.iter().map(|x| x[0] > 0.0).collect();
        let probe = fit(&rows, &labels, 1.0, 1e-9);
        let beta: Vec<f64> = probe.weights.iter().copied().chain([probe.intercept]).collect();
        let (grad, _) = Problem { rows: &rows, labels: &labels, c: 1.0, d: 2 }.derivatives(&beta);
        let norm = dot(&grad, &grad).sqrt();
        assert!(norm <= 1e-9, "{norm}");
        assert!(probe.accuracy(&rows, &labels) >= 0.95);
        assert!(probe.weights[0] > 0.0);
    }
}
