//! The direct scalar version: the Hessian and gradient accumulated row by row in f64. Slow; kept as the
//! reference the fast fitter is tested against.

use super::{accept_step, dot, sigmoid, softplus, solve_spd, Probe};

/// Fits a probe on `rows` (each of length d, f64) with regularisation strength `c`.
pub fn fit(rows: &[&[f64]], labels: &[bool], c: f64, tolerance: f64) -> Probe {
    let d = rows.first().map_or(0, |r| r.len());
    let mut beta = vec![0.0; d + 1];
    let mut value = objective(rows, labels, c, &beta);
    for _ in 0..100 {
        let (grad, hess) = derivatives(rows, labels, c, &beta);
        if dot(&grad, &grad).sqrt() <= tolerance {
            break;
        }
        let Some(step) = solve_spd(&hess, &grad, d + 1) else { break };
        let slope = dot(&grad, &step);
        let mut t = 1.0;
        loop {
            let candidate: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b - t * s).collect();
            let candidate_value = objective(rows, labels, c, &candidate);
            if accept_step(candidate_value, value, t, slope) {
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

/// Parameters are `[w₀ … w_{d−1}, b]`.
fn objective(rows: &[&[f64]], labels: &[bool], c: f64, beta: &[f64]) -> f64 {
    let (w, b) = beta.split_at(beta.len() - 1);
    let loss: f64 = rows
        .iter()
        .zip(labels)
        .map(|(x, &y)| {
            let z = dot(w, x) + b[0];
            softplus(z) - if y { z } else { 0.0 }
        })
        .sum();
    0.5 * dot(w, w) + c * loss
}

/// Gradient and Hessian (dense, (d+1)²).
pub fn derivatives(rows: &[&[f64]], labels: &[bool], c: f64, beta: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let d = beta.len() - 1;
    let n = d + 1;
    let (w, b) = beta.split_at(d);
    let mut grad = vec![0.0; n];
    let mut hess = vec![0.0; n * n];
    for (x, &y) in rows.iter().zip(labels) {
        let p = sigmoid(dot(w, x) + b[0]);
        let r = c * (p - if y { 1.0 } else { 0.0 });
        let s = c * p * (1.0 - p);
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
