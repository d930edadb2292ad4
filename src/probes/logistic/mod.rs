//! L2-regularised logistic regression with an unpenalised intercept, minimising exactly scikit-learn's
//! objective (`LogisticRegression(C=c)`):
//!
//! ```text
//! f(w, b) = ½‖w‖² + C Σᵢ [log(1 + e^{zᵢ}) − yᵢ zᵢ],   zᵢ = xᵢ·w + b,   yᵢ ∈ {0, 1}
//! ```
//!
//! by Newton's method, stopping at ‖∇f‖₂ ≤ `tolerance` (bake uses 1e-6: on 4,700 prompts that is 2·10⁻¹⁰ of the
//! objective's scale C·n, far tighter than scikit-learn's defaults).
//!
//! Where the precision lives: the margins `zᵢ`, the probabilities, the objective and the gradient are computed
//! in f64 from the f32 features, so the stopping test, and therefore the optimum, are exact to f64. Only the
//! Hessian, which sets the step's direction and not the point it converges to, is built in f32, as one
//! matrix product `(X∘√s)ᵀ(X∘√s)` (the `gemm` crate's kernels, the lower half only): that product is
//! nearly all of a step's work (n·(d+1)² multiply-adds against about 3·n·(d+1) for the rest).
//!
//! Where the time goes, and how it is kept down:
//! - a step whose predecessor cut the gradient tenfold reuses that step's Hessian factor (near the optimum
//!   the Hessian barely changes), so a fit builds 2 to 5 Hessians for its 6 to 10 steps;
//! - a full Newton step is kept when it shrinks the gradient, which the next step needs anyway, so no
//!   objective is evaluated except far from the optimum (a backtracking line search on f there);
//! - each step reads every row once, computing its margin change, probability and gradient term together,
//!   with `σ` evaluated in vector registers ([`exp_nonpositive`] instead of the C library's `exp`);
//! - the loops are compiled for AVX-512 and AVX2 besides the baseline and chosen at run time.
//!
//! [`reference::fit`] is the direct scalar version of the same method, kept to check this one against.

use super::product;

/// A fitted probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub weights: Vec<f64>,
    pub intercept: f64,
}

impl Probe {
    pub fn decision(&self, x: &[f32]) -> f64 {
        self.intercept + lanes_dot(x, &self.weights)
    }

    /// Fraction of the rows of `features` (n × d, row-major) whose predicted class (decision > 0: true)
    /// equals the label.
    pub fn accuracy(&self, features: &[f32], labels: &[bool]) -> f64 {
        let d = self.weights.len();
        if labels.is_empty() || d == 0 {
            return 0.0;
        }
        let correct = features.chunks_exact(d).zip(labels).filter(|(x, &y)| (self.decision(x) > 0.0) == y).count();
        correct as f64 / labels.len() as f64
    }
}

/// log(1 + eˣ) without overflow.
#[inline(always)]
pub(super) fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

#[inline(always)]
pub(super) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `eˣ` for `x ≤ 0`, written with arithmetic and bit operations only, so that a loop over many values compiles
/// to vector instructions (the C library's `exp` is one call per value). Cody–Waite reduction
/// `x = k·ln 2 + r` with |r| ≤ ½ ln 2, then the Taylor series of `eʳ` to degree 13 (its remainder is below
/// 2⁻⁵⁵ there): within 2 ulp of the exact value. Below −708 it returns the smallest normal's scale, far
/// below what a probability in [0, 1] can resolve.
#[inline(always)]
fn exp_nonpositive(x: f64) -> f64 {
    // ln 2 split so that k·LN2_HI is exact for every k used here (fdlibm's constants, by their bits).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    let x = x.max(-708.0);
    let k = (x * std::f64::consts::LOG2_E).round();
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut poly = 1.0 / 6_227_020_800.0; // 1/13!
    for divisor in
        [479_001_600.0, 39_916_800.0, 3_628_800.0, 362_880.0, 40_320.0, 5_040.0, 720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0]
    {
        poly = poly * r + 1.0 / divisor;
    }
    let scale = f64::from_bits(((k as i64 + 1023) as u64) << 52);
    poly * scale
}

/// σ(z) for each value, without overflow, in a loop that vectorizes.
#[inline(always)]
fn sigmoid_into(z: &[f64], out: &mut [f64]) {
    for (p, &z) in out.iter_mut().zip(z) {
        let e = exp_nonpositive(-z.abs());
        *p = if z >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    }
}

#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `x · w` accumulated in eight partial sums: one running sum would make every addition wait for the one
/// before (the rows' dot products are most of an iteration's non-matrix work).
#[inline(always)]
fn lanes_dot<T: Copy + Into<f64>>(x: &[T], w: &[f64]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let (x_blocks, w_blocks) = (x.chunks_exact(8), w.chunks_exact(8));
    let (x_rest, w_rest) = (x_blocks.remainder(), w_blocks.remainder());
    for (xs, ws) in x_blocks.zip(w_blocks) {
        for i in 0..8 {
            lanes[i] += xs[i].into() * ws[i];
        }
    }
    let tail: f64 = x_rest.iter().zip(w_rest).map(|(&a, b)| a.into() * b).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Armijo's test with room for rounding: near the optimum a step's decrease of f (about ½‖∇f‖² over the
/// curvature) falls below what f64 can resolve in a sum of thousands of terms, and a strict test would then
/// reject the full Newton step that is exactly right there. Steps within that noise are taken; the gradient,
/// not the objective, decides when to stop.
fn accept_step(candidate: f64, value: f64, t: f64, slope: f64) -> bool {
    let rounding = 1e-12 * value.abs().max(1.0);
    candidate <= value - 1e-4 * t * slope + rounding || t < 1e-10
}

/// The Cholesky factor `L` (lower, row-major) of a symmetric positive definite `A` (n×n).
#[inline(always)]
fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = a[i * n + j] - lanes_dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
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
    Some(l)
}

/// Solves `L Lᵀ x = b`.
#[inline(always)]
fn solve_cholesky(l: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0.0; n];
    for i in 0..n {
        y[i] = (b[i] - (0..i).map(|k| l[i * n + k] * y[k]).sum::<f64>()) / l[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        x[i] = (y[i] - (i + 1..n).map(|k| l[k * n + i] * x[k]).sum::<f64>()) / l[i * n + i];
    }
    x
}

/// Solves `A x = b` for symmetric positive definite `A` (n×n, row-major).
fn solve_spd(a: &[f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    cholesky(a, n).map(|l| solve_cholesky(&l, b, n))
}

/// Buffers one fit needs, reused from head to head (one per thread).
#[derive(Default)]
pub struct Scratch {
    /// The design with each row scaled by √(C pᵢ(1−pᵢ)), for the Hessian's matrix product.
    weighted: Vec<f32>,
    hessian: Vec<f32>,
    /// Margins zᵢ and probabilities σ(zᵢ) at the current point, and at a trial point.
    margins: Vec<f64>,
    probabilities: Vec<f64>,
    trial_margins: Vec<f64>,
    trial_probabilities: Vec<f64>,
    /// The margins' change along the last step.
    step_margins: Vec<f64>,
}

/// More Newton steps than any probe has needed (they take 5 to 15, the cheap ones included).
const MAX_STEPS: usize = 100;

/// A step reuses the previous step's Hessian (its Cholesky factor) when that step cut the gradient's norm
/// by at least this factor: near the optimum the Hessian barely changes, and reusing it turns a step's
/// n·(d+1)² work into n·(d+1). A step that does not shrink the gradient brings a fresh Hessian.
const REUSE_WHEN_GRADIENT_SHRANK_BY: f64 = 0.1;

/// The design matrix of `features` (n rows × d, row-major): each row followed by a 1 for the intercept.
pub fn design(features: &[f32], d: usize) -> Vec<f32> {
    features.chunks_exact(d.max(1)).flat_map(|row| row.iter().copied().chain([1.0])).collect()
}

/// Fits a probe on `features` (n rows × d, row-major, f32) with regularisation strength `c`.
pub fn fit(features: &[f32], d: usize, labels: &[bool], c: f64, tolerance: f64, scratch: &mut Scratch) -> Probe {
    assert_eq!(features.len(), labels.len() * d, "features must hold n × d values");
    fit_design(&design(features, d), d, labels, c, tolerance, scratch)
}

/// Fits a probe on a design matrix (n rows of `d` features and a trailing 1, see [`design`]).
///
/// The loops are compiled three times (AVX-512, AVX2 + FMA, and the baseline) and the widest the CPU has is
/// picked at run time: the release binary targets the baseline x86-64, which has only 2-wide f64 vectors.
/// Every variant performs the same operations in the same order, so all give the same bits.
pub fn fit_design(design: &[f32], d: usize, labels: &[bool], c: f64, tolerance: f64, scratch: &mut Scratch) -> Probe {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { fit_avx512(design, d, labels, c, tolerance, scratch) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { fit_avx2(design, d, labels, c, tolerance, scratch) };
        }
    }
    newton(design, d, labels, c, tolerance, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fit_avx512(
    design: &[f32],
    d: usize,
    labels: &[bool],
    c: f64,
    tolerance: f64,
    scratch: &mut Scratch,
) -> Probe {
    newton(design, d, labels, c, tolerance, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fit_avx2(design: &[f32], d: usize, labels: &[bool], c: f64, tolerance: f64, scratch: &mut Scratch) -> Probe {
    newton(design, d, labels, c, tolerance, scratch)
}

#[inline(always)]
fn newton(design: &[f32], d: usize, labels: &[bool], c: f64, tolerance: f64, scratch: &mut Scratch) -> Probe {
    let n = labels.len();
    let cols = d + 1;
    assert_eq!(design.len(), n * cols, "the design must have a row per label");
    scratch.weighted.resize(n * cols, 0.0);
    scratch.hessian.resize(cols * cols, 0.0);
    for buffer in [
        &mut scratch.margins,
        &mut scratch.probabilities,
        &mut scratch.trial_margins,
        &mut scratch.trial_probabilities,
        &mut scratch.step_margins,
    ] {
        buffer.clear();
        buffer.resize(n, 0.0);
    }
    let y: Vec<f64> = labels.iter().map(|&l| if l { 1.0 } else { 0.0 }).collect();

    let mut beta = vec![0.0f64; cols];
    let objective = |beta: &[f64], margins: &mut dyn Iterator<Item = f64>| -> f64 {
        let loss: f64 = margins.zip(&y).map(|(z, &y)| softplus(z) - y * z).sum();
        0.5 * dot(&beta[..d], &beta[..d]) + c * loss
    };
    let zero = vec![0.0; cols];
    let mut gradient = trial_pass(design, scratch, cols, &zero, &y, &beta, c);
    scratch.accept_trial();
    let mut norm = dot(&gradient, &gradient).sqrt();
    let mut factor: Option<Vec<f64>> = None;
    let mut norm_before_step = f64::INFINITY;
    for _ in 0..MAX_STEPS {
        if norm <= tolerance {
            break;
        }
        let reused = factor.is_some() && norm <= REUSE_WHEN_GRADIENT_SHRANK_BY * norm_before_step;
        if !reused {
            factor = cholesky(&weighted_gram(design, scratch, n, cols, c), cols);
        }
        let Some(l) = &factor else { break };
        let step = solve_cholesky(l, &gradient, cols);
        // The full step, kept when it shrinks the gradient: the next step needs that gradient anyway, so
        // near the optimum no objective is evaluated at all.
        let full: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b - s).collect();
        let full_gradient = trial_pass(design, scratch, cols, &step, &y, &full, c);
        let full_norm = dot(&full_gradient, &full_gradient).sqrt();
        if full_norm < norm {
            norm_before_step = norm;
            scratch.accept_trial();
            (beta, gradient, norm) = (full, full_gradient, full_norm);
            continue;
        }
        if reused {
            // A stale Hessian misled the step: build a fresh one and try again from here.
            factor = None;
            continue;
        }
        // Far from the optimum: a backtracking line search on the objective (Armijo).
        let value = objective(&beta, &mut scratch.margins.iter().copied());
        let slope = dot(&gradient, &step);
        let mut t = 0.5;
        loop {
            let candidate: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b - t * s).collect();
            let mut moved = scratch.margins.iter().zip(&scratch.step_margins).map(|(z, dz)| z - t * dz);
            if accept_step(objective(&candidate, &mut moved), value, t, slope) {
                beta = candidate;
                for (z, dz) in scratch.margins.iter_mut().zip(&scratch.step_margins) {
                    *z -= t * dz;
                }
                break;
            }
            t *= 0.5;
        }
        gradient = trial_pass(design, scratch, cols, &zero, &y, &beta, c);
        scratch.accept_trial();
        norm_before_step = f64::INFINITY;
        norm = dot(&gradient, &gradient).sqrt();
    }
    let intercept = beta.pop().unwrap_or(0.0);
    Probe { weights: beta, intercept }
}

impl Scratch {
    /// The trial point becomes the current one.
    fn accept_trial(&mut self) {
        std::mem::swap(&mut self.margins, &mut self.trial_margins);
        std::mem::swap(&mut self.probabilities, &mut self.trial_probabilities);
    }
}

/// One pass over the rows for the point `beta_trial` = current point − `step`: each row's margin change
/// (kept in `step_margins`), its new margin and probability (the trial buffers), and the gradient there,
/// `C Σ (pᵢ − yᵢ)[xᵢ, 1] + [w, 0]`, all in f64. Rows go in blocks small enough to stay in the first-level
/// cache between the three sweeps over them, and the probabilities of a block are computed together, in
/// vector registers.
#[inline(always)]
fn trial_pass(
    design: &[f32],
    scratch: &mut Scratch,
    cols: usize,
    step: &[f64],
    y: &[f64],
    beta_trial: &[f64],
    c: f64,
) -> Vec<f64> {
    const BLOCK: usize = 64;
    let mut g = vec![0.0f64; cols];
    let n = y.len();
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let design = &design[start * cols..end * cols];
        let dz = &mut scratch.step_margins[start..end];
        for (out, row) in dz.iter_mut().zip(design.chunks_exact(cols)) {
            *out = lanes_dot(row, step);
        }
        let z_trial = &mut scratch.trial_margins[start..end];
        for ((out, &z), &dz) in z_trial.iter_mut().zip(&scratch.margins[start..end]).zip(dz.iter()) {
            *out = z - dz;
        }
        let p_trial = &mut scratch.trial_probabilities[start..end];
        sigmoid_into(z_trial, p_trial);
        let mut residuals = [0.0f64; BLOCK];
        for ((r, &p), &y) in residuals.iter_mut().zip(p_trial.iter()).zip(&y[start..end]) {
            *r = c * (p - y);
        }
        accumulate_columns(design, cols, &residuals[..end - start], &mut g);
    }
    for (gj, w) in g.iter_mut().zip(&beta_trial[..cols - 1]) {
        *gj += w;
    }
    g
}

/// `g += Σᵢ rᵢ · rowᵢ` over a block of rows, eight columns at a time so that each group's sums stay in a
/// register while the block's rows (already in the first-level cache) stream past.
#[inline(always)]
fn accumulate_columns(rows: &[f32], cols: usize, residuals: &[f64], g: &mut [f64]) {
    let mut j = 0;
    while j + 8 <= cols {
        let mut sums = [0.0f64; 8];
        for (row, &r) in rows.chunks_exact(cols).zip(residuals) {
            let x = &row[j..j + 8];
            for k in 0..8 {
                sums[k] += r * x[k] as f64;
            }
        }
        for k in 0..8 {
            g[j + k] += sums[k];
        }
        j += 8;
    }
    for (jj, gj) in g.iter_mut().enumerate().skip(j) {
        *gj += rows.chunks_exact(cols).zip(residuals).map(|(row, &r)| r * row[jj] as f64).sum::<f64>();
    }
}

/// The Hessian `Σ C pᵢ(1−pᵢ) [xᵢ,1][xᵢ,1]ᵀ + diag(1,…,1,0)` as one f32 matrix product, returned in f64.
#[inline(always)]
fn weighted_gram(design: &[f32], scratch: &mut Scratch, n: usize, cols: usize, c: f64) -> Vec<f64> {
    let rows = design.chunks_exact(cols).zip(scratch.weighted.chunks_exact_mut(cols));
    for ((row, out), &p) in rows.zip(&scratch.probabilities) {
        let scale = (c * p * (1.0 - p)).sqrt();
        for (o, &x) in out.iter_mut().zip(row) {
            *o = (x as f64 * scale) as f32;
        }
    }
    // The product is symmetric: only the blocks on and below the diagonal are computed (in two column
    // blocks, three quarters of the work), the rest is mirrored.
    let split = cols.div_ceil(2);
    for (first, last) in [(0, split), (split, cols)] {
        // Rows first..cols of Wᵀ (W read with its strides swapped) times columns first..last of W, into the
        // same block of the row-major destination.
        let w = &scratch.weighted[first..];
        product(
            (&mut scratch.hessian[first * cols + first..], cols),
            (cols - first, last - first, n),
            (w, cols, 1),
            (w, 1, cols),
        );
    }
    for i in 0..split {
        for j in split..cols {
            scratch.hessian[i * cols + j] = scratch.hessian[j * cols + i];
        }
    }
    let mut hessian: Vec<f64> = scratch.hessian.iter().map(|&v| v as f64).collect();
    for j in 0..cols - 1 {
        hessian[j * cols + j] += 1.0;
    }
    hessian
}

/// ∇f at `probe` on these rows, in f64 (to report how close a fit is to the optimum).
pub fn gradient_at(features: &[f32], d: usize, labels: &[bool], c: f64, probe: &Probe) -> Vec<f64> {
    let mut g = vec![0.0f64; d + 1];
    for (x, &label) in features.chunks_exact(d).zip(labels) {
        let r = c * (sigmoid(probe.decision(x)) - if label { 1.0 } else { 0.0 });
        for (gj, &v) in g.iter_mut().zip(x) {
            *gj += r * v as f64;
        }
        g[d] += r;
    }
    for (gj, w) in g.iter_mut().zip(&probe.weights) {
        *gj += w;
    }
    g
}

/// The direct scalar version, kept as the reference the fast fitter is tested against.
pub mod reference;

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> (Vec<f32>, Vec<bool>) {
        let xs: Vec<[f32; 2]> = (0..40).map(|i| [i as f32 / 10.0 - 2.0, ((i * 7) % 5) as f32 / 5.0]).collect();
        let labels = xs.iter().map(|x| x[0] > 0.0).collect();
        (xs.into_iter().flatten().collect(), labels)
    }

    #[test]
    fn separable_data_is_classified_and_the_gradient_vanishes() {
        let (features, labels) = data();
        let probe = fit(&features, 2, &labels, 1.0, 1e-9, &mut Scratch::default());
        let g = gradient_at(&features, 2, &labels, 1.0, &probe);
        let norm = dot(&g, &g).sqrt();
        assert!(norm <= 1e-9, "{norm}");
        assert!(probe.accuracy(&features, &labels) >= 0.95);
        assert!(probe.weights[0] > 0.0);
    }

    #[test]
    fn the_vector_exp_is_within_two_ulp_of_the_library_one() {
        let mut worst = 0u64;
        for i in 0..200_000 {
            let x = -(i as f64) * 0.003_54;
            worst = worst.max(exp_nonpositive(x).to_bits().abs_diff(x.exp().to_bits()));
        }
        assert!(worst <= 2, "largest difference {worst} ulp");
        let mut p = [0.0; 3];
        sigmoid_into(&[-800.0, 0.0, 800.0], &mut p);
        assert_eq!(p, [0.0f64.max(p[0]), 0.5, 1.0]);
        assert!(p[0] < 1e-300);
    }

    #[test]
    fn the_fast_fit_equals_the_reference() {
        let (features, labels) = data();
        let rows64: Vec<Vec<f64>> = features.chunks(2).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
        let rows: Vec<&[f64]> = rows64.iter().map(Vec::as_slice).collect();
        let slow = reference::fit(&rows, &labels, 1.0, 1e-9);
        let fast = fit(&features, 2, &labels, 1.0, 1e-9, &mut Scratch::default());
        for (a, b) in slow.weights.iter().chain([&slow.intercept]).zip(fast.weights.iter().chain([&fast.intercept])) {
            assert!((a - b).abs() <= 1e-9, "{slow:?} {fast:?}");
        }
    }
}
