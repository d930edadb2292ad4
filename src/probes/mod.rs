//! Stage 4: per-head probes, head selection, directions and shift sizes — the ITI core.

pub mod heatmap;
pub mod logistic;
pub mod mlp;
pub mod report;

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::activations::Activations;
use crate::data::prompts::Prompt;
use crate::error::{BakeError, Result};
use crate::recipe::{DirectionKind, Method};
use crate::rng::SeededRng;

/// Questions (indices in multiple_choice order) used to train and to rank the probes.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

/// The reference's no-CV split: a seeded permutation of all questions, the first ⌊n(1−r)⌋ train, the rest
/// validation, each listed in ascending order. By question, so all answers of a question land together.
pub fn split_questions(n: usize, validation_ratio: f64, seed: u64) -> Split {
    split_among(&(0..n).collect::<Vec<_>>(), validation_ratio, seed)
}

/// The fewest questions that give a split of `validation_ratio` at least one training and one validation
/// question, and a tuning prompt another question to append (so never fewer than 2).
pub fn minimum_questions(validation_ratio: f64) -> usize {
    let train_fraction = 1.0 - validation_ratio;
    let mut n = ((1.0 / train_fraction).ceil() as usize).max(2);
    while ((n as f64) * train_fraction) as usize == 0 {
        n += 1;
    }
    n
}

/// Refuses a question count too small for `what` (every split non-empty).
pub fn check_question_count(questions: usize, validation_ratio: f64, what: &str) -> Result<()> {
    let minimum = minimum_questions(validation_ratio);
    if questions < minimum {
        return Err(BakeError::Invalid(format!(
            "{what} needs at least {minimum} questions (validation_ratio {validation_ratio} must leave at least one \
             training and one validation question), but has {questions}; use more of the dataset (the recipe's `limit`) or a larger one"
        )));
    }
    Ok(())
}

/// The same split over some questions only (the training fold of a cross-validation).
pub fn split_among(questions: &[usize], validation_ratio: f64, seed: u64) -> Split {
    let n = questions.len();
    let permutation: Vec<usize> =
        SeededRng::for_purpose(seed, "split").permutation(n).iter().map(|&i| questions[i]).collect();
    let train_size = (n as f64 * (1.0 - validation_ratio)) as usize;
    let mut train = permutation[..train_size].to_vec();
    let mut val = permutation[train_size..].to_vec();
    train.sort_unstable();
    val.sort_unstable();
    Split { train, val }
}

/// `mask[q]`: question q is one of `questions` (indexable by every prompt's question).
fn question_mask(prompts: &[Prompt], questions: &[usize]) -> Vec<bool> {
    let size = prompts.iter().map(|p| p.question + 1).chain(questions.iter().map(|q| q + 1)).max().unwrap_or(0);
    let mut mask = vec![false; size];
    questions.iter().for_each(|&q| mask[q] = true);
    mask
}

/// Shape facts the probes need: the units probed in each layer (attention heads, or the whole residual stream
/// as one unit of `hidden_size`).
#[derive(Debug, Clone, Copy)]
pub struct HeadLayout {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl HeadLayout {
    /// The units a method probes at `site` in a model of `config`.
    pub fn at(site: crate::model::Site, c: &crate::model::ModelConfig) -> Self {
        match site {
            crate::model::Site::AttentionHeads => {
                HeadLayout { layers: c.num_layers, heads: c.num_heads, head_dim: c.head_dim }
            }
            crate::model::Site::Residual => HeadLayout { layers: c.num_layers, heads: 1, head_dim: c.hidden_size },
        }
    }
}

/// Every head's rows of one layer, head by head, into `out`: `[heads][rows][d + extra]`, each row followed by
/// `extra` ones (1 for a design matrix's intercept column, 0 for plain features). Each prompt's layer slice is
/// read once for all heads: gathering head by head would touch every row's pages once per head.
fn head_major(acts: &Activations, rows: &[usize], layer: usize, layout: HeadLayout, extra: usize, out: &mut Vec<f32>) {
    let (d, heads) = (layout.head_dim, layout.heads);
    let stride = d + extra;
    // Every element is written below, so a reused buffer is not filled first (that would add a pass over it).
    out.resize(heads * rows.len() * stride, 0.0);
    for (i, &r) in rows.iter().enumerate() {
        for h in 0..heads {
            let at = (h * rows.len() + i) * stride;
            out[at..at + d].copy_from_slice(acts.head(r, layer, h, d));
            out[at + d..at + stride].fill(1.0);
        }
    }
}

pub struct ProbeResults {
    /// `[layer][head]`.
    pub val_accuracy: Vec<Vec<f64>>,
    /// Flat `layer * heads + head`; empty for MLP probes, which have no weight direction.
    pub probes: Vec<logistic::Probe>,
}

/// The regularisation strength of every probe (scikit-learn's default C, as the reference uses).
pub const PROBE_C: f64 = 1.0;
/// The stopping test of every probe: ‖∇f‖₂ on scikit-learn's objective (see [`logistic`]).
pub const PROBE_TOLERANCE: f64 = 1e-6;

/// Fits one probe per head on the train questions' probe prompts and scores it on the validation questions'
/// prompts: a logistic regression for ITI, an MLP ([`mlp`], seeded by `seed`, the layer and the head) for
/// NL-ITI.
pub fn train_probes(
    acts: &Activations,
    prompts: &[Prompt],
    split: &Split,
    layout: HeadLayout,
    (method, seed): (Method, u64),
) -> ProbeResults {
    match method {
        Method::Iti | Method::Residual => {
            let (val_accuracy, probes) =
                per_head(acts, prompts, split, layout, 1, |_, design, labels, scratch: &mut logistic::Scratch| {
                    let d = layout.head_dim;
                    logistic::fit_design(design, d, labels, PROBE_C, PROBE_TOLERANCE, scratch)
                });
            ProbeResults { val_accuracy, probes }
        }
        Method::NlIti => {
            let (val_accuracy, _) =
                per_head(acts, prompts, split, layout, 0, |head, features, labels, scratch: &mut mlp::Scratch| {
                    let d = layout.head_dim;
                    mlp::fit_from(mlp::initial_params_for(seed, head, d), features, labels, d, scratch)
                });
            ProbeResults { val_accuracy, probes: Vec::new() }
        }
    }
}

/// What [`per_head`] can score on validation rows.
trait Classifier {
    fn accuracy(&self, features: &[f32], labels: &[bool]) -> f64;
}

impl Classifier for logistic::Probe {
    fn accuracy(&self, features: &[f32], labels: &[bool]) -> f64 {
        logistic::Probe::accuracy(self, features, labels)
    }
}

impl Classifier for mlp::MlpProbe {
    fn accuracy(&self, features: &[f32], labels: &[bool]) -> f64 {
        mlp::MlpProbe::accuracy(self, features, labels)
    }
}

/// `fit(head, train rows (each followed by `extra` ones), train labels, a thread's scratch)` for every head,
/// each scored on the validation rows: the validation accuracies `[layer][head]` and the probes, flat
/// `layer * heads + head`. Layers run in parallel, each thread reusing its buffers.
fn per_head<P: Classifier + Send, S: Default>(
    acts: &Activations,
    prompts: &[Prompt],
    split: &Split,
    layout: HeadLayout,
    extra: usize,
    fit: impl Fn(Head, &[f32], &[bool], &mut S) -> P + Sync,
) -> (Vec<Vec<f64>>, Vec<P>) {
    let in_split = |questions: &[usize]| -> Vec<usize> {
        let wanted = question_mask(prompts, questions);
        (0..prompts.len()).filter(|&i| wanted[prompts[i].question]).collect()
    };
    let (train_rows, val_rows) = (in_split(&split.train), in_split(&split.val));
    let labels = |rows: &[usize]| -> Vec<bool> { rows.iter().map(|&r| prompts[r].label).collect() };
    let (train_labels, val_labels) = (labels(&train_rows), labels(&val_rows));
    let d = layout.head_dim;
    let (n_train, n_val) = (train_rows.len(), val_rows.len());
    let stride = (d + extra) * n_train;
    let fitted: Vec<Vec<(P, f64)>> = (0..layout.layers)
        .into_par_iter()
        .map_init(
            || (S::default(), Vec::new(), Vec::new()),
            |(scratch, designs, features), layer| {
                head_major(acts, &train_rows, layer, layout, extra, designs);
                head_major(acts, &val_rows, layer, layout, 0, features);
                (0..layout.heads)
                    .map(|h| {
                        let train = &designs[h * stride..(h + 1) * stride];
                        let probe = fit(Head { layer, head: h }, train, &train_labels, scratch);
                        let accuracy = probe.accuracy(&features[h * n_val * d..(h + 1) * n_val * d], &val_labels);
                        (probe, accuracy)
                    })
                    .collect::<Vec<_>>()
            },
        )
        .collect::<Vec<_>>();
    let val_accuracy = fitted.iter().map(|row| row.iter().map(|(_, a)| *a).collect()).collect();
    (val_accuracy, fitted.into_iter().flatten().map(|(p, _)| p).collect())
}

/// `out = A (m × k) · B (k × n)` in f32, `out` given with its row stride and each operand as (values, column
/// stride, row stride): the one matrix product the probes' fits spend their time in (gemm's kernels).
pub(crate) fn product(
    (out, out_rs): (&mut [f32], usize),
    (m, n, k): (usize, usize, usize),
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) {
    let last = |(cs, rs): (usize, usize), rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && n > 0 && k > 0 && n <= out_rs);
    assert!(
        out.len() > last((1, out_rs), m, n) && a.0.len() > last((a.1, a.2), m, k) && b.0.len() > last((b.1, b.2), k, n)
    );
    // SAFETY: the assertions keep every element the strides reach inside its buffer; `out` does not overlap
    // the operands (it is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            out_rs as isize,
            false,
            a.0.as_ptr(),
            a.1 as isize,
            a.2 as isize,
            b.0.as_ptr(),
            b.1 as isize,
            b.2 as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One attention head: its layer, and its index among the layer's heads. Every file writes it `[layer, head]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Head {
    pub layer: usize,
    pub head: usize,
}

impl Serialize for Head {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        [self.layer, self.head].serialize(s)
    }
}

impl<'de> Deserialize<'de> for Head {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let [layer, head] = <[usize; 2]>::deserialize(d)?;
        Ok(Head { layer, head })
    }
}

/// The K heads with the highest validation accuracy. Ties go to the lower layer, then the lower head, so the
/// choice never depends on sort stability.
pub fn select_heads(val_accuracy: &[Vec<f64>], k: usize) -> Result<Vec<Head>> {
    let mut all: Vec<Head> = val_accuracy
        .iter()
        .enumerate()
        .flat_map(|(layer, row)| (0..row.len()).map(move |head| Head { layer, head }))
        .collect();
    check_head_count(k, (all.len(), "probed units"))?;
    let accuracy = |h: &Head| val_accuracy[h.layer][h.head];
    all.sort_by(|a, b| accuracy(b).total_cmp(&accuracy(a)).then(a.cmp(b)));
    all.truncate(k);
    Ok(all)
}

/// K must not exceed the number of units probed (heads: layers × heads per layer; or layers), named `what`.
pub fn check_head_count(k: usize, (available, what): (usize, &str)) -> Result<()> {
    if k > available {
        return Err(BakeError::Invalid(format!("heads: K = {k} is more than the model's {available} {what}")));
    }
    Ok(())
}

/// A chosen head's shift.
#[derive(Debug, Clone)]
pub struct HeadShift {
    pub layer: usize,
    pub head: usize,
    /// Standard deviation of the tuning activations projected on θ̂ (population, ddof = 0).
    pub sigma: f64,
    /// δ = α σ θ̂.
    pub delta: Vec<f64>,
}

fn unit(v: Vec<f64>) -> Vec<f64> {
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        v
    } else {
        v.into_iter().map(|x| x / norm).collect()
    }
}

/// Everything `compute_shifts` reads.
pub struct ShiftInputs<'a> {
    pub probe_acts: &'a Activations,
    pub probe_prompts: &'a [Prompt],
    pub tuning_acts: &'a Activations,
    pub tuning_prompts: &'a [Prompt],
    /// σ is measured over these questions' tuning prompts; `None`: all of them (the reference's bake).
    pub sigma_questions: Option<&'a [usize]>,
    pub split: &'a Split,
    pub probes: &'a ProbeResults,
    pub layout: HeadLayout,
    pub direction: DirectionKind,
    pub alpha: f64,
    pub seed: u64,
}

/// Directions, σ and δ for each chosen head, in the order given. A σ or δ that is not finite (in the f32
/// the biases are computed from) is an error naming the head.
pub fn compute_shifts(inputs: &ShiftInputs, chosen: &[Head]) -> Result<Vec<HeadShift>> {
    let d = inputs.layout.head_dim;
    let fit_questions: Vec<usize> = inputs.split.train.iter().chain(&inputs.split.val).copied().collect();
    let in_fit = question_mask(inputs.probe_prompts, &fit_questions);
    let mut random = SeededRng::for_purpose(inputs.seed, "random-direction");
    let sigma_rows: Vec<usize> = match inputs.sigma_questions {
        None => (0..inputs.tuning_acts.rows).collect(),
        Some(questions) => {
            let wanted = question_mask(inputs.tuning_prompts, questions);
            (0..inputs.tuning_acts.rows).filter(|&r| wanted[inputs.tuning_prompts[r].question]).collect()
        }
    };
    chosen
        .iter()
        .map(|&Head { layer, head }| {
            let direction = unit(match inputs.direction {
                DirectionKind::CenterOfMass => center_of_mass(inputs, &in_fit, layer, head),
                DirectionKind::Probe => inputs.probes.probes[layer * inputs.layout.heads + head].weights.clone(),
                DirectionKind::Random => (0..d).map(|_| random.normal()).collect(),
            });
            let projections: Vec<f64> = sigma_rows
                .iter()
                .map(|&r| inputs.tuning_acts.head(r, layer, head, d).iter().zip(&direction).map(|(&x, t)| x as f64 * t).sum())
                .collect();
            let sigma = population_std(&projections);
            let delta: Vec<f64> = direction.iter().map(|t| inputs.alpha * sigma * t).collect();
            if !sigma.is_finite() || delta.iter().any(|&v| !(v as f32).is_finite()) {
                return Err(BakeError::NotFinite(format!(
                    "layer {layer}, head {head}: the shift δ = α·σ·θ is not a finite f32 (α = {}, σ = {sigma}); lower alpha",
                    inputs.alpha
                )));
            }
            Ok(HeadShift { layer, head, sigma, delta })
        })
        .collect()
}

/// mean(true) − mean(false) of one head over the train and validation questions' probe prompts.
fn center_of_mass(inputs: &ShiftInputs, in_fit: &[bool], layer: usize, head: usize) -> Vec<f64> {
    let d = inputs.layout.head_dim;
    let (mut sum_true, mut sum_false) = (vec![0.0; d], vec![0.0; d]);
    let (mut n_true, mut n_false) = (0usize, 0usize);
    for (row, prompt) in inputs.probe_prompts.iter().enumerate() {
        if !in_fit[prompt.question] {
            continue;
        }
        let (sum, n) = if prompt.label { (&mut sum_true, &mut n_true) } else { (&mut sum_false, &mut n_false) };
        for (s, &x) in sum.iter_mut().zip(inputs.probe_acts.head(row, layer, head, d)) {
            *s += x as f64;
        }
        *n += 1;
    }
    sum_true.iter().zip(&sum_false).map(|(t, f)| t / n_true.max(1) as f64 - f / n_false.max(1) as f64).collect()
}

fn population_std(values: &[f64]) -> f64 {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// The shift of every layer: one δ vector in o_proj-input layout (head h at h·D..(h+1)·D), `None` where no head
/// was chosen. What the probe stage hands to surgery, export, the scorer's hooks and verify.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Deltas(pub Vec<Option<Vec<f32>>>);

impl Deltas {
    /// As `report.json` holds them: the shifted layers only, keyed by the layer's number.
    pub fn by_layer_number(&self) -> BTreeMap<String, Vec<f32>> {
        let shifted = self.0.iter().enumerate().filter_map(|(l, d)| Some((l.to_string(), d.clone()?)));
        shifted.collect()
    }

    /// From `report.json`'s map, for a model of `layers` layers.
    pub fn from_layer_numbers(map: &BTreeMap<String, Vec<f32>>, layers: usize) -> Self {
        Deltas((0..layers).map(|l| map.get(&l.to_string()).cloned()).collect())
    }
}

impl std::ops::Deref for Deltas {
    type Target = [Option<Vec<f32>>];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The chosen heads' shifts placed in their layers.
pub fn per_layer_deltas(shifts: &[HeadShift], layout: HeadLayout) -> Deltas {
    let mut out: Vec<Option<Vec<f32>>> = vec![None; layout.layers];
    for s in shifts {
        let layer = out[s.layer].get_or_insert_with(|| vec![0.0; layout.heads * layout.head_dim]);
        for (i, v) in s.delta.iter().enumerate() {
            layer[s.head * layout.head_dim + i] = *v as f32;
        }
    }
    Deltas(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_by_question_seeded_and_complete() {
        let a = split_questions(817, 0.2, 42);
        assert_eq!(a, split_questions(817, 0.2, 42));
        assert_ne!(a, split_questions(817, 0.2, 43));
        assert_eq!((a.train.len(), a.val.len()), (653, 164));
        let mut all: Vec<usize> = a.train.iter().chain(&a.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..817).collect::<Vec<_>>());
    }

    #[test]
    fn ties_go_to_the_lower_layer_then_head() {
        let acc = vec![vec![0.5, 0.9], vec![0.9, 0.7]];
        let chosen: Vec<(usize, usize)> = select_heads(&acc, 3).unwrap().iter().map(|h| (h.layer, h.head)).collect();
        assert_eq!(chosen, vec![(0, 1), (1, 0), (1, 1)]);
        // Written as [layer, head] wherever a head is written.
        assert_eq!(serde_json::to_string(&Head { layer: 3, head: 7 }).unwrap(), "[3,7]");
        assert_eq!(serde_json::from_str::<Head>("[3,7]").unwrap(), Head { layer: 3, head: 7 });
        assert!(select_heads(&acc, 5).unwrap_err().to_string().contains("more than"));
    }
}
