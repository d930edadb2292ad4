//! Stage 5: turning per-layer shifts δ_l into checkpoint tensors.
//!
//! At the attention heads (ITI, NL-ITI) δ is added to the o_proj input, and `o_proj(z + δ) = W_o z + W_o δ`,
//! so the shift becomes the bias `b_l = W_o · δ_l` (plus any bias the base already had). On the residual
//! stream δ is added where down_proj's output joins it, so it is the down_proj bias itself.
//!
//! A bias in one projection needs its config flag, and the flag gives a bias to every projection it governs
//! in every layer: HF LLaMA's `attention_bias: true` to q, k, v and o, `mlp_bias: true` to gate, up and down.
//! A bake writes them all: explicit zeros where the base has none and no shift lands. Nothing is left for
//! transformers to initialise at load.

use crate::error::{BakeError, Result};
use crate::io::dtype::StoredDtype;
use crate::io::names::{self, Attention, Mlp, Param};
use crate::io::safetensors::TensorBytes;
use crate::model::config::Family;
use crate::model::{Checkpoint, ModelConfig, Site};
use crate::probes::Deltas;

/// The bias that carries layer `layer`'s shift at `site`, accumulated in f64: the base's own bias (zero when
/// it has none) plus `W_o · δ` at the heads, or plus δ on the residual stream.
pub fn shift_bias(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    site: Site,
    layer: usize,
    delta: Option<&[f32]>,
) -> Result<Vec<f64>> {
    let names = names::Layer(layer);
    let bias_name = names.shift_bias(site);
    let mut bias = match checkpoint.get(&bias_name) {
        Some(_) => {
            let entry = checkpoint.expect(&bias_name, &[config.hidden_size])?;
            entry.dtype.decode(checkpoint.bytes(entry))
        }
        None => vec![0.0; config.hidden_size],
    };
    let Some(delta) = delta else { return Ok(bias) };
    match site {
        Site::Residual => bias.iter_mut().zip(delta).for_each(|(b, &d)| *b += d as f64),
        Site::AttentionHeads => {
            let weight = names.attention(Attention::O, Param::Weight);
            let entry = checkpoint.expect(&weight, &[config.hidden_size, config.attn_width()])?;
            let bytes = checkpoint.bytes(entry);
            let row_bytes = config.attn_width() * entry.dtype.size_in_bytes();
            for (out, b) in bias.iter_mut().enumerate() {
                let row = entry.dtype.decode(&bytes[out * row_bytes..(out + 1) * row_bytes]);
                *b += row.iter().zip(delta).map(|(w, &d)| w * d as f64).sum::<f64>();
            }
            // Read once; its pages need not stay resident until the writer copies it.
            checkpoint.release(&[weight]);
        }
    }
    Ok(bias)
}

/// The largest |bias| a layer may add to the residual stream. The stream is stored in the model dtype, and
/// the next RMSNorm squares and sums `hidden` of its values in f32 (transformers upcasts there), so each must
/// stay below `sqrt(f32::MAX / hidden)` or the norm becomes infinite and every logit NaN. Half of the smaller
/// bound leaves room for the stream's own values. Finite biases above it would pass a finiteness check and
/// still break every forward pass.
pub fn largest_safe_bias(dtype: StoredDtype, hidden: usize) -> f64 {
    let norm_bound = (f32::MAX as f64 / hidden.max(1) as f64).sqrt();
    dtype.max_finite().min(norm_bound) / 2.0
}

/// Whether a bake at `site` of a model of `family` sets `attention_bias` (and so gives q, k, v and o biases):
/// always at the heads; on the residual stream only for a family written as LLaMA whose base already has
/// q/k/v biases (Qwen2), which LLaMA reads only under that flag.
pub fn sets_attention_bias(site: Site, family: Family) -> bool {
    site == Site::AttentionHeads || family == Family::Qwen2
}

/// Every bias of layer `layer` a bake at `site` makes sure exists, with its width, in the order they are
/// written; the last is the one that carries the shift.
pub fn layer_biases(config: &ModelConfig, site: Site, layer: usize) -> Vec<(String, usize)> {
    let names = names::Layer(layer);
    let (h, a, kv, i) = (config.hidden_size, config.attn_width(), config.kv_width(), config.intermediate_size);
    let mut out = Vec::new();
    if sets_attention_bias(site, config.family) {
        let attention = [(Attention::Q, a), (Attention::K, kv), (Attention::V, kv), (Attention::O, h)];
        out.extend(attention.map(|(p, width)| (names.attention(p, Param::Bias), width)));
    }
    if site == Site::Residual {
        out.extend([(Mlp::Gate, i), (Mlp::Up, i), (Mlp::Down, h)].map(|(p, width)| (names.mlp(p, Param::Bias), width)));
    }
    out
}

/// The bias tensors a bake at `site` adds to `checkpoint` (those it does not have), in the order they are
/// written.
pub fn added_tensors(checkpoint: &Checkpoint, config: &ModelConfig, site: Site) -> Vec<String> {
    (0..config.num_layers)
        .flat_map(|l| layer_biases(config, site, l))
        .map(|(name, _)| name)
        .filter(|name| checkpoint.get(name).is_none())
        .collect()
}

/// Every bias tensor a baked checkpoint holds, in `dtype`, but the base's own (copied with the other base
/// tensors): the shift's bias in every layer, and zeros for the missing companions its flags call for.
pub fn bias_tensors<'a>(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    (site, deltas): (Site, &Deltas),
    dtype: StoredDtype,
) -> Result<Vec<TensorBytes<'a>>> {
    use rayon::prelude::*;
    // W_o · δ reads each shifted layer's o_proj weight once; the layers are independent, so they run side by
    // side.
    let shift_biases = (0..config.num_layers)
        .into_par_iter()
        .map(|layer| shift_bias(checkpoint, config, site, layer, deltas.get(layer).and_then(|d| d.as_deref())))
        .collect::<Result<Vec<_>>>()?;
    let largest = largest_safe_bias(dtype, config.hidden_size);
    let mut out = Vec::new();
    for (layer, bias) in shift_biases.into_iter().enumerate() {
        let shift_name = names::Layer(layer).shift_bias(site);
        for (name, width) in layer_biases(config, site, layer) {
            if name == shift_name {
                check_safe(&name, &bias, largest, (site, dtype))?;
                let bytes = dtype.encode(bias.iter().map(|&v| v as f32)).into();
                out.push(TensorBytes { name, dtype, shape: vec![width], bytes });
            } else if checkpoint.get(&name).is_none() {
                out.push(TensorBytes { name, dtype, shape: vec![width], bytes: dtype.encode(vec![0.0; width]).into() });
            }
        }
    }
    Ok(out)
}

/// Refuses a shift bias the residual stream cannot carry ([`largest_safe_bias`]).
fn check_safe(name: &str, bias: &[f64], largest: f64, (site, dtype): (Site, StoredDtype)) -> Result<()> {
    let Some(v) = bias.iter().find(|v| v.is_nan() || v.abs() > largest) else { return Ok(()) };
    let what = match site {
        Site::AttentionHeads => "W_o·δ reaches",
        Site::Residual => "δ reaches",
    };
    Err(BakeError::NotFinite(format!(
        "{name}: {what} {v}; a {} model carries at most |{largest:.3e}| there (its residual stream and the next \
         RMSNorm would overflow); lower alpha (or check the base's weights)",
        dtype.torch_name()
    )))
}
