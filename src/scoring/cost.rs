//! What a bake costs the model as a language model: CE of the base and of the bake, and KL(base ‖ baked), on a
//! small corpus sample (the recipe's corpus, or the built-in one), with the base's weights and the biases the
//! bake writes: one model in memory, the bake's numbers to the last bit.

use candle_core::Tensor;

use super::corpus::{self, Corpus};
use super::logprobs::{self, Variant};
use super::plan;
use crate::data::builtin::COST_CORPUS_NAME;
use crate::error::Result;
use crate::export::manifest::Cost;
use crate::model::{ModelFiles, Runner};
use crate::pipeline::Resolved;
use crate::probes::Deltas;
use crate::progress::Progress;
use crate::recipe::Recipe;

/// Tokens per document of the built-in sample (its 20 documents hold about 350 each).
pub const BUILTIN_TOKENS: usize = 128;

/// Measures the cost of shifting `model` by `deltas`: the corpus is read, the run planned within its budget,
/// then the base runs once plain and once with the bake's shift biases. When the plan does not fit the budget
/// (the vocabulary's logits can outweigh a small model), the bake goes on without its cost: `None`, and a
/// warning naming both estimates.
pub fn measure(
    model: &ModelFiles,
    recipe: &Recipe,
    deltas: &Deltas,
    run: &Resolved,
    progress: &dyn Progress,
) -> Result<Option<Cost>> {
    progress.stage("cost: CE and KL");
    let tokenizer = model.tokenizer()?;
    let (corpus, name, tokens) = match &recipe.corpus {
        Some(spec) => (corpus::load(spec, &tokenizer, recipe.seed)?, spec.path.display().to_string(), spec.tokens),
        None => (corpus::builtin(&tokenizer, BUILTIN_TOKENS)?, COST_CORPUS_NAME.to_string(), BUILTIN_TOKENS),
    };
    let Corpus { documents, .. } = corpus;
    let (device, dtype) = (&run.compute.device, run.compute.dtype);
    let pad_id = model.config.pad_id();
    let size = logprobs::language_pass(&[Variant::plain()], &documents, recipe.batch_size, pad_id, device)?.size();
    let rate = crate::activations::plan::measure_matmul_rate(&model.config, &run.compute).ok();
    let plan = match plan::plan(model, &run.compute, &[size], rate, run.budget()) {
        Ok(plan) => plan,
        Err(e) => {
            progress.warn(&format!("the bake's cost (CE and KL) is not measured: {e}"));
            return Ok(None);
        }
    };
    progress.note(&format!("cost: {}", plan.describe()));
    let site = recipe.method.site();
    let biases = baked_biases(model, (site, deltas), device, dtype)?;
    let runner = Runner::load(model, device, dtype, plan.estimate.mode)?;
    let (base, edited) = logprobs::language_scores(
        &runner,
        &[Variant::baked(site, &biases)],
        &documents,
        recipe.batch_size,
        pad_id,
        progress,
    )?;
    Ok(Some(Cost {
        corpus: name,
        documents: documents.len(),
        tokens_per_document: tokens,
        computed_on: format!("{}, {}", run.compute.device_kind(), run.compute.dtype_name()),
        ce_base: base.ce,
        ce_baked: edited[0].ce,
        kl: edited[0].kl,
        kl_budget: recipe.kl_budget,
    }))
}

/// Every shifted layer's shift bias as the bake writes it (W_o · δ, or δ on the residual stream, plus any bias
/// of the base, rounded to the checkpoint's dtype), then in the run's dtype on its device; `None` for the layers
/// a bake leaves as they are.
fn baked_biases(
    model: &ModelFiles,
    (site, deltas): (crate::model::Site, &Deltas),
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> Result<Vec<Option<Tensor>>> {
    let stored = model.dtype();
    deltas
        .iter()
        .enumerate()
        .map(|(layer, delta)| {
            let Some(delta) = delta else { return Ok(None) };
            let bias = crate::surgery::shift_bias(&model.checkpoint, &model.config, site, layer, Some(delta))?;
            let written = stored.decode(&stored.encode(bias.iter().map(|&v| v as f32)));
            let values: Vec<f32> = written.iter().map(|&v| v as f32).collect();
            Ok(Some(Tensor::from_vec(values, model.config.hidden_size, device)?.to_dtype(dtype)?))
        })
        .collect()
}
