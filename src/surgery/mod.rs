//! Stage 5: turning per-layer o_proj-input shifts δ_l into checkpoint tensors.
//!
//! `o_proj(z + δ) = W_o z + W_o δ`, so the shift becomes the bias `b_l = W_o · δ_l` (plus any bias the base
//! already had). HF LLaMA's `attention_bias: true` gives q, k, v and o a bias in every layer, so every layer
//! gets all four: explicit zeros for q/k/v and wherever no head was chosen. Nothing is left for transformers
//! to initialise at load.

use crate::error::{BakeError, Result};
use crate::io::dtype::StoredDtype;
use crate::io::names::{self, Attention, Param};
use crate::io::safetensors::TensorBytes;
use crate::model::{Checkpoint, ModelConfig};
use crate::probes::Deltas;

/// `W_o · δ` accumulated in f64, plus the base's own o_proj bias when it has one.
pub fn o_proj_bias(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    layer: usize,
    delta: Option<&[f32]>,
) -> Result<Vec<f64>> {
    let names = names::Layer(layer);
    let bias_name = names.attention(Attention::O, Param::Bias);
    let mut bias = match checkpoint.get(&bias_name) {
        Some(_) => {
            let entry = checkpoint.expect(&bias_name, &[config.hidden_size])?;
            entry.dtype.decode(checkpoint.bytes(entry))
        }
        None => vec![0.0; config.hidden_size],
    };
    if let Some(delta) = delta {
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

/// The bias tensors a bake adds to `checkpoint` (those it does not have), in the order they are written:
/// per layer q, k, v, o.
pub fn added_tensors(checkpoint: &Checkpoint, config: &ModelConfig) -> Vec<String> {
    (0..config.num_layers)
        .flat_map(|l| Attention::ALL.map(|p| names::Layer(l).attention(p, Param::Bias)))
        .filter(|name| checkpoint.get(name).is_none())
        .collect()
}

/// Every bias tensor a baked checkpoint holds, in `dtype`. Existing q/k/v biases are carried over unchanged
/// by the caller (they are copied with the other base tensors), so only missing ones are created here.
pub fn bias_tensors<'a>(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    deltas: &Deltas,
    dtype: StoredDtype,
) -> Result<Vec<TensorBytes<'a>>> {
    use rayon::prelude::*;
    // W_o · δ reads each shifted layer's o_proj weight once; the layers are independent, so they run side by
    // side.
    let o_biases = (0..config.num_layers)
        .into_par_iter()
        .map(|layer| o_proj_bias(checkpoint, config, layer, deltas.get(layer).and_then(|d| d.as_deref())))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (layer, bias) in o_biases.into_iter().enumerate() {
        let names = names::Layer(layer);
        for (proj, width) in
            [(Attention::Q, config.attn_width()), (Attention::K, config.kv_width()), (Attention::V, config.kv_width())]
        {
            let name = names.attention(proj, Param::Bias);
            if checkpoint.get(&name).is_none() {
                out.push(TensorBytes { name, dtype, shape: vec![width], bytes: dtype.encode(vec![0.0; width]).into() });
            }
        }
        let name = names.attention(Attention::O, Param::Bias);
        let largest = largest_safe_bias(dtype, config.hidden_size);
        if let Some(v) = bias.iter().find(|v| v.is_nan() || v.abs() > largest) {
            return Err(BakeError::NotFinite(format!(
                "{name}: W_o·δ reaches {v}; a {} model carries at most |{largest:.3e}| there (its residual stream \
                 and the next RMSNorm would overflow); lower alpha (or check the base's o_proj weights)",
                dtype.torch_name()
            )));
        }
        out.push(TensorBytes {
            name,
            dtype,
            shape: vec![config.hidden_size],
            bytes: dtype.encode(bias.iter().map(|&v| v as f32)).into(),
        });
    }
    Ok(out)
}
