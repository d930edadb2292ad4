//! The LLaMA forward pass, written for what ITI needs: read every layer's activations at one [`Site`] (the input
//! of `self_attn.o_proj`, or the residual stream after the layer) at chosen positions, add a per-layer vector
//! there, and stop as soon as nothing more is needed. The batches it runs on and their masks are
//! [`super::batch`]'s.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use super::batch::{attention_mask, position_mask, tree_depths, tree_mask, Batch};
use super::config::{ModelConfig, RopeScaling};
use super::tree_attention::{self, Ancestors};
use super::weights::Checkpoint;
use super::ModelFiles;
use crate::error::{BakeError, Result};
use crate::io::names::{self, Attention, Mlp, Param, Site};

struct Layer {
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// Qwen3's per-head RMSNorm weights of queries and keys, `[head_dim]` each.
    head_norms: Option<(Tensor, Tensor)>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// A LLaMA model on one device. Its matmuls run in `dtype` (f32, or the checkpoint's bf16/f16 on a GPU);
/// RMSNorm, rotary and softmax always in f32, as transformers computes them.
pub struct Llama {
    pub config: ModelConfig,
    device: Device,
    dtype: DType,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
}

/// A projection with another bias: the same weights (shared, not copied) and the same product, so it gives
/// bit for bit what a checkpoint holding that bias gives.
trait WithBias {
    fn with_bias(&self, bias: &Tensor) -> Linear;
}

impl WithBias for Linear {
    fn with_bias(&self, bias: &Tensor) -> Linear {
        Linear::new(self.weight().clone(), Some(bias.clone()))
    }
}

/// Per-layer vectors added at the request's [`Site`] (the shift), each of the site's width.
#[derive(Clone)]
pub struct Shift {
    pub per_layer: Vec<Option<Tensor>>,
    /// `None`: every position (what a baked bias does). `Some(p)`: sequence b only from position `p[b]` on.
    pub from_position: Option<Vec<usize>>,
}

/// Rotated keys and values of a prompt prefix shared by many sequences (the TruthfulQA instruction and
/// primer): computed once, then attended to by every batch that continues it.
#[derive(Clone)]
pub struct Prefix {
    pub len: usize,
    /// Per layer, `[heads, head_dim, len]` (KV heads repeated for GQA, transposed for the score product).
    keys_t: Vec<Tensor>,
    /// Per layer, `[heads, len, head_dim]`.
    values: Vec<Tensor>,
}

/// What a caller wants from one forward pass.
#[derive(Default, Clone, Copy)]
pub struct Request<'a> {
    /// The batch continues this prefix: its positions start at `prefix.len`. Capture and shift positions
    /// still count from the batch's first token.
    pub prefix: Option<&'a Prefix>,
    /// Keep every layer's keys and values, to use the (single-sequence) batch as a [`Prefix`] later.
    pub keep_kv: bool,
    /// Where `capture_at`, `shift` and `biases` apply.
    pub site: Site,
    /// Read every layer's activations at the site at these tokens, each given as `row * t + position`.
    pub capture_at: Option<&'a [usize]>,
    pub shift: Option<&'a Shift>,
    /// Per layer, a bias of the site's projection (o_proj, or down_proj for the residual) used in place of the
    /// layer's own: a bake is its base with these biases, so the base's weights and a bake's biases run the
    /// bake, bit for bit, without loading it.
    pub biases: Option<&'a [Option<Tensor>]>,
    /// Compute logits over the vocabulary for every position. Without them the pass stops after the last
    /// layer's attention.
    pub logits: bool,
}

impl Request<'_> {
    /// Whether the last layer can stop after its attention: nothing past it is read.
    fn ends_at_last_attention(&self) -> bool {
        !self.logits && self.site == Site::AttentionHeads
    }
}

pub struct Output {
    /// Per layer, `[captured tokens, site width]` in f32.
    pub captured: Vec<Tensor>,
    /// `[batch, seq, vocab]` when requested.
    pub logits: Option<Tensor>,
    /// With `keep_kv`.
    pub prefix: Option<Prefix>,
}

impl Layer {
    /// Layer `l`'s weights (and any biases) on `device`: the projections in `dtype`, the norms in f32.
    fn load(c: &ModelConfig, checkpoint: &Checkpoint, l: usize, device: &Device, dtype: DType) -> Result<Self> {
        let (h, a, kv, i) = (c.hidden_size, c.attn_width(), c.kv_width(), c.intermediate_size);
        let names = names::Layer(l);
        let tensor = |name: &str, shape: &[usize]| checkpoint.load_as(name, shape, dtype, device);
        let norm = |name: &str| checkpoint.load_as(name, &[h], DType::F32, device);
        let head_norm = |proj| checkpoint.load_as(&names.head_norm(proj), &[c.head_dim], DType::F32, device);
        let head_norms = match c.family.has_head_norms() {
            true => Some((head_norm(Attention::Q)?, head_norm(Attention::K)?)),
            false => None,
        };
        let linear = |weight: String, bias: String, rows: usize, cols: usize| -> Result<Linear> {
            let weight = tensor(&weight, &[rows, cols])?;
            let bias = match checkpoint.get(&bias) {
                Some(_) => Some(tensor(&bias, &[rows])?),
                None => None,
            };
            Ok(Linear::new(weight, bias))
        };
        let attention = |proj, rows, cols| {
            linear(names.attention(proj, Param::Weight), names.attention(proj, Param::Bias), rows, cols)
        };
        let mlp = |proj, rows, cols| linear(names.mlp(proj, Param::Weight), names.mlp(proj, Param::Bias), rows, cols);
        Ok(Layer {
            input_norm: norm(&names.input_norm())?,
            post_attention_norm: norm(&names.post_attention_norm())?,
            head_norms,
            q_proj: attention(Attention::Q, a, h)?,
            k_proj: attention(Attention::K, kv, h)?,
            v_proj: attention(Attention::V, kv, h)?,
            o_proj: attention(Attention::O, h, a)?,
            gate_proj: mlp(Mlp::Gate, i, h)?,
            up_proj: mlp(Mlp::Up, i, h)?,
            down_proj: mlp(Mlp::Down, h, i)?,
        })
    }
}

/// Per-batch tensors every layer reads: rotary tables, masks and the rows to capture.
struct Context {
    b: usize,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    visibility: Visibility,
    capture_rows: Option<Tensor>,
    shift_mask: Option<Tensor>,
}

/// Which keys each query attends to.
enum Visibility {
    /// `[b, heads, t, past + t]`: 0 or −∞, added to the scores.
    Mask(Tensor),
    /// A prefix tree, attended to without a mask ([`tree_attention`]): every prefix key and the ancestors.
    Tree(Ancestors),
}

impl Prefix {
    fn empty(len: usize) -> Self {
        Prefix { len, keys_t: Vec::new(), values: Vec::new() }
    }

    /// Appends the next layer's rotated keys and values `[1, kv_heads, len, head_dim]`, each KV head repeated
    /// for the `group` query heads that read it.
    fn push(&mut self, k: Tensor, v: Tensor, group: usize) -> Result<()> {
        let shared_heads =
            |x: Tensor| -> Result<Tensor> { Ok(candle_transformers::utils::repeat_kv(x, group)?.squeeze(0)?) };
        self.keys_t.push(shared_heads(k)?.transpose(1, 2)?.contiguous()?);
        self.values.push(shared_heads(v)?.contiguous()?);
        Ok(())
    }
}

/// One batch of a layer-major pass ([`Llama::layers_streamed`]): what is asked of it and its hidden states
/// between layers.
pub(super) struct InFlight<'a> {
    pub batch: &'a Batch,
    pub request: Request<'a>,
    pub hidden: Tensor,
}

/// What one layer gives back besides the new hidden states.
struct StepOutput {
    captured: Option<Tensor>,
    kv: Option<(Tensor, Tensor)>,
}

impl Llama {
    /// Loads every weight onto `device`, the projections and embeddings in `dtype` (the files were validated
    /// against the config when opened).
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        let mut model = Self::load_shell(files, device, dtype, true)?;
        model.layers = (0..model.config.num_layers)
            .map(|l| Layer::load(&model.config, &files.checkpoint, l, device, dtype))
            .collect::<Result<_>>()?;
        Ok(model)
    }

    /// Everything but the decoder layers; the output head only `with_head` (a capture-only pass never
    /// computes logits, and an untied head is as large as the embeddings).
    pub(super) fn load_shell(files: &ModelFiles, device: &Device, dtype: DType, with_head: bool) -> Result<Self> {
        let (c, checkpoint) = (&files.config, &files.checkpoint);
        let (h, v) = (c.hidden_size, c.vocab_size);
        let embed_tokens = checkpoint.load_as(names::EMBED_TOKENS, &[v, h], dtype, device)?;
        let lm_head = match checkpoint.get(names::LM_HEAD) {
            _ if !with_head => Tensor::zeros(0, dtype, device)?,
            Some(_) if !c.tie_word_embeddings => checkpoint.load_as(names::LM_HEAD, &[v, h], dtype, device)?,
            _ => embed_tokens.clone(),
        };
        Ok(Llama {
            inv_freq: inverse_frequencies(c),
            norm: checkpoint.load_as(names::FINAL_NORM, &[h], DType::F32, device)?,
            embed_tokens,
            lm_head,
            layers: Vec::new(),
            device: device.clone(),
            dtype,
            config: c.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the matmuls run in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// RMSNorm in f32, returned in the model's dtype.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, weight, self.config.rms_norm_eps as f32)?;
        Ok(normed.to_dtype(self.dtype)?)
    }

    pub fn forward(&self, batch: &Batch, request: &Request) -> Result<Output> {
        let ctx = self.context(batch, request)?;
        let mut x = self.embed(batch)?;
        let mut captured = Vec::new();
        let mut kept = Prefix::empty(ctx.t);
        for (l, layer) in self.layers.iter().enumerate() {
            let last = l + 1 == self.layers.len() && request.ends_at_last_attention();
            let step = self.step(l, layer, &mut x, &ctx, request, last)?;
            captured.extend(step.captured);
            if let Some((k, v)) = step.kv {
                kept.push(k, v, self.config.num_heads / self.config.num_kv_heads)?;
            }
        }
        let logits = if request.logits { Some(self.head(&x)?) } else { None };
        let prefix = request.keep_kv.then_some(kept);
        Ok(Output { captured, logits, prefix })
    }

    /// The logits `[b, t, vocab]` in f32 of the last layer's hidden states `x`: the final norm, then the head.
    pub(super) fn head(&self, x: &Tensor) -> Result<Tensor> {
        let normed = self.rms_norm(x, &self.norm)?;
        Ok(normed.broadcast_matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)?)
    }

    /// The token embeddings of a batch, `[b, t, hidden]`.
    pub(super) fn embed(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t) = batch.ids.dims2()?;
        Ok(self.embed_tokens.embedding(&batch.ids.flatten_all()?)?.reshape((b, t, self.config.hidden_size))?)
    }

    fn context(&self, batch: &Batch, request: &Request) -> Result<Context> {
        let (b, t) = batch.ids.dims2()?;
        let c = &self.config;
        if let Some(tokens) = request.capture_at {
            if tokens.iter().any(|&i| i >= b * t || i % t >= batch.lengths[i / t]) {
                return Err(BakeError::Invalid("capture positions must lie inside each prompt".into()));
            }
        }
        let past = request.prefix.map_or(0, |p| p.len);
        if request.keep_kv && (b != 1 || past != 0 || batch.parents.is_some()) {
            return Err(BakeError::Invalid("a prefix is built from one sequence, without a prefix of its own".into()));
        }
        let from_position = request.shift.and_then(|s| s.from_position.as_ref());
        // Expanded over the heads once, so each layer's addition is a plain elementwise one.
        let expanded = |mask: Tensor| -> Result<Visibility> {
            Ok(Visibility::Mask(mask.broadcast_as((b, c.num_heads, t, past + t))?.contiguous()?))
        };
        let (positions, visibility): (Vec<usize>, Visibility) = match &batch.parents {
            None => ((past..past + t).collect(), expanded(attention_mask(&batch.lengths, past, t, &self.device)?)?),
            Some(_) if from_position.is_some() => {
                return Err(BakeError::Invalid("a prefix-tree batch takes no shift start".into()));
            }
            Some(parents) => {
                let positions = tree_depths(parents).into_iter().map(|d| past + d).collect();
                let visibility = if self.attends_trees_sparsely() {
                    Visibility::Tree(Ancestors::of(parents))
                } else {
                    expanded(tree_mask(parents, past, &self.device)?)?
                };
                (positions, visibility)
            }
        };
        let (cos, sin) = self.rotary_tables(&positions)?;
        let capture_rows = match request.capture_at {
            Some(tokens) => Some(Tensor::from_vec(
                tokens.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                tokens.len(),
                &self.device,
            )?),
            None => None,
        };
        let shift_mask = match from_position {
            Some(from) => Some(position_mask(from, t, &self.device)?),
            None => None,
        };
        Ok(Context { b, t, cos, sin, visibility, capture_rows, shift_mask })
    }

    /// Runs decoder layer `l` on the hidden states `x` in place: attention, then o_proj and the MLP unless
    /// `stop_after_attention`, with the request's shift, biases and capture at its site. Both the resident
    /// forward and the layer-streamed pass go through here.
    fn step(
        &self,
        l: usize,
        layer: &Layer,
        x: &mut Tensor,
        ctx: &Context,
        request: &Request,
        stop_after_attention: bool,
    ) -> Result<StepOutput> {
        let normed = self.rms_norm(x, &layer.input_norm)?;
        let past_kv = request.prefix.map(|p| (&p.keys_t[l], &p.values[l]));
        let (mut attn, k, v) = self.attention(layer, &normed, ctx, past_kv)?;
        let kv = request.keep_kv.then_some((k, v));
        let bias = request.biases.and_then(|b| b.get(l)).and_then(Option::as_ref);
        let with_bias = |proj: &Linear| bias.map_or_else(|| proj.clone(), |b| proj.with_bias(b));
        if request.site == Site::AttentionHeads {
            attn = self.shifted(l, attn, ctx, request)?;
            let captured = self.captured(&attn, ctx)?;
            if !stop_after_attention {
                let h = (&*x + with_bias(&layer.o_proj).forward(&attn)?)?;
                *x = self.mlp_block(layer, h, &layer.down_proj)?;
            }
            return Ok(StepOutput { captured, kv });
        }
        let h = (&*x + layer.o_proj.forward(&attn)?)?;
        *x = self.shifted(l, self.mlp_block(layer, h, &with_bias(&layer.down_proj))?, ctx, request)?;
        Ok(StepOutput { captured: self.captured(x, ctx)?, kv })
    }

    /// `h` plus the MLP of its post-attention norm, through `down_proj`.
    fn mlp_block(&self, layer: &Layer, h: Tensor, down_proj: &Linear) -> Result<Tensor> {
        let normed = self.rms_norm(&h, &layer.post_attention_norm)?;
        let gated = candle_nn::ops::silu(&layer.gate_proj.forward(&normed)?)?;
        Ok((&h + down_proj.forward(&(gated * layer.up_proj.forward(&normed)?)?)?)?)
    }

    /// `x` (`[b, t, width]` at the request's site) plus layer `l`'s shift, where the shift applies.
    fn shifted(&self, l: usize, x: Tensor, ctx: &Context, request: &Request) -> Result<Tensor> {
        let Some(delta) = request.shift.and_then(|s| s.per_layer.get(l)).and_then(Option::as_ref) else {
            return Ok(x);
        };
        let delta = delta.reshape((1, 1, x.dim(2)?))?;
        let delta = match &ctx.shift_mask {
            None => delta,
            Some(m) => m.broadcast_mul(&delta)?,
        };
        Ok(x.broadcast_add(&delta.to_dtype(self.dtype)?)?)
    }

    /// The rows of `x` (`[b, t, width]`) the request captures, in f32.
    fn captured(&self, x: &Tensor, ctx: &Context) -> Result<Option<Tensor>> {
        let Some(rows) = &ctx.capture_rows else { return Ok(None) };
        let width = x.dim(2)?;
        Ok(Some(x.reshape((ctx.b * ctx.t, width))?.index_select(rows, 0)?.to_dtype(DType::F32)?))
    }

    /// The capture-only pass run layer-major ([`Self::layers_streamed`]): only one layer's weights are ever
    /// resident. `sink(layer, batch, captured)` receives each batch's o_proj inputs at `capture[batch]`, exactly
    /// as [`Llama::forward`] would capture them.
    pub fn capture_streamed(
        files: &ModelFiles,
        (device, dtype): (&Device, DType),
        site: Site,
        batches: &[(&Batch, &[usize])],
        sink: impl FnMut(usize, usize, Tensor) -> Result<()>,
        layer_done: impl FnMut(usize),
    ) -> Result<()> {
        let mut shell = Self::load_shell(files, device, dtype, false)?;
        let mut in_flight = batches
            .iter()
            .map(|&(batch, at)| {
                let request = Request { site, capture_at: Some(at), ..Default::default() };
                Ok(InFlight { batch, request, hidden: shell.embed(batch)? })
            })
            .collect::<Result<Vec<_>>>()?;
        // The pass ends at the last layer: the embeddings are not needed again.
        shell.embed_tokens = Tensor::zeros(0, dtype, device)?;
        files.checkpoint.release(&[names::EMBED_TOKENS, names::LM_HEAD]);
        shell.layers_streamed(files, None, &mut in_flight, sink, layer_done)
    }

    /// Runs every batch of `in_flight` through every decoder layer, layer-major: all of them go through layer l
    /// before layer l + 1 is read, so only one layer's weights are ever resident (read from the map, used,
    /// dropped, and their mapped pages released). A `prefix`, when given, goes first at each layer and its keys
    /// and values are what every batch continues (as [`Request::prefix`] in [`Llama::forward`]). Each batch's
    /// hidden states end as the last layer left them; `sink(layer, batch, captured)` receives what its request
    /// captures. Each step is [`Llama::forward`]'s own, so both give the same numbers.
    pub(super) fn layers_streamed(
        &self,
        files: &ModelFiles,
        mut prefix: Option<&mut InFlight>,
        in_flight: &mut [InFlight],
        mut sink: impl FnMut(usize, usize, Tensor) -> Result<()>,
        mut layer_done: impl FnMut(usize),
    ) -> Result<()> {
        let checkpoint = &files.checkpoint;
        let layers = self.config.num_layers;
        let group = self.config.num_heads / self.config.num_kv_heads;
        let mut kept = prefix.as_ref().map(|p| Prefix::empty(p.batch.lengths[0]));
        for l in 0..layers {
            let layer = Layer::load(&self.config, checkpoint, l, &self.device, self.dtype)?;
            if let (Some(p), Some(kept)) = (prefix.as_deref_mut(), kept.as_mut()) {
                let request = Request { keep_kv: true, ..p.request };
                let ctx = self.context(p.batch, &request)?;
                let step = self.step(l, &layer, &mut p.hidden, &ctx, &request, l + 1 == layers)?;
                let (k, v) = step.kv.expect("keys and values kept");
                kept.push(k, v, group)?;
            }
            for (i, job) in in_flight.iter_mut().enumerate() {
                let request = Request { prefix: kept.as_ref(), ..job.request };
                // Rebuilt per layer: keeping every batch's head-expanded mask would cost more memory than
                // its hidden states, and building it is small next to the layer's products.
                let ctx = self.context(job.batch, &request)?;
                let last = l + 1 == layers && request.ends_at_last_attention();
                let step = self.step(l, &layer, &mut job.hidden, &ctx, &request, last)?;
                if let Some(captured) = step.captured {
                    sink(l, i, captured)?;
                }
            }
            drop(layer);
            checkpoint.release(&checkpoint.layer_tensor_names(l));
            layer_done(l);
        }
        Ok(())
    }

    /// Self-attention up to (not including) o_proj: returns the o_proj input `[b, t, heads * head_dim]` and
    /// this batch's rotated keys and values `[b, kv_heads, t, head_dim]`.
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        ctx: &Context,
        past: Option<(&Tensor, &Tensor)>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (cos, sin) = (&ctx.cos, &ctx.sin);
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let heads = |proj: &Linear, n: usize| -> Result<Tensor> {
            Ok(proj.forward(x)?.reshape((b, t, n, c.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        // Rotary in f32 (as transformers computes the angles), after Qwen3's per-head norm where there is one;
        // the result back in the model's dtype.
        let eps = c.rms_norm_eps as f32;
        let rotate = |x: Tensor, head_norm: Option<&Tensor>| -> Result<Tensor> {
            let mut x = x.to_dtype(DType::F32)?;
            if let Some(weight) = head_norm {
                x = candle_nn::ops::rms_norm(&x, weight, eps)?;
            }
            Ok(candle_nn::rotary_emb::rope(&x, cos, sin)?.to_dtype(self.dtype)?)
        };
        let (q_norm, k_norm) = match &layer.head_norms {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        // Scaled here, on [t, head_dim] per head, rather than on the [t, past + t] scores.
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let q = (rotate(heads(&layer.q_proj, c.num_heads)?, q_norm)? * scale)?;
        let k = rotate(heads(&layer.k_proj, c.num_kv_heads)?, k_norm)?;
        let v = heads(&layer.v_proj, c.num_kv_heads)?;
        let mask = match &ctx.visibility {
            Visibility::Mask(mask) => mask,
            Visibility::Tree(tree) => {
                let out = self.tree_attention(&q, &k, &v, tree, past)?;
                return Ok((out.transpose(1, 2)?.reshape((b, t, c.attn_width()))?, k, v));
            }
        };
        let group = c.num_heads / c.num_kv_heads;
        let own_k = candle_transformers::utils::repeat_kv(k.clone(), group)?.contiguous()?;
        let own_v = candle_transformers::utils::repeat_kv(v.clone(), group)?.contiguous()?;
        // Scores are masked and normalised in f32; the weights go back to the model's dtype for the product.
        let own_scores = q.matmul(&own_k.t()?)?.to_dtype(DType::F32)?;
        let softmax = |scores: &Tensor| -> Result<Tensor> {
            Ok(candle_nn::ops::softmax_last_dim(&scores.broadcast_add(mask)?)?.to_dtype(self.dtype)?)
        };
        let out = match past {
            None => softmax(&own_scores)?.matmul(&own_v)?,
            Some((keys_t, values)) => {
                // The prefix is the same for every sequence: one product per head over all b·t queries,
                // instead of b·heads small ones.
                let p = keys_t.dim(2)?;
                let by_head = q.transpose(0, 1)?.contiguous()?.reshape((c.num_heads, b * t, c.head_dim))?;
                let prefix_scores = by_head
                    .matmul(keys_t)?
                    .reshape((c.num_heads, b, t, p))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .to_dtype(DType::F32)?;
                let weights = softmax(&Tensor::cat(&[&prefix_scores, &own_scores], 3)?)?;
                let prefix_weights =
                    weights.narrow(3, 0, p)?.transpose(0, 1)?.contiguous()?.reshape((c.num_heads, b * t, p))?;
                let from_prefix =
                    prefix_weights.matmul(values)?.reshape((c.num_heads, b, t, c.head_dim))?.transpose(0, 1)?;
                (from_prefix + weights.narrow(3, p, t)?.contiguous()?.matmul(&own_v)?)?
            }
        }; // [b, heads, t, head_dim]
        Ok((out.transpose(1, 2)?.reshape((b, t, c.attn_width()))?, k, v))
    }

    fn attends_trees_sparsely(&self) -> bool {
        attends_trees_sparsely(&self.device, self.dtype)
    }

    /// Attention of one prefix-tree row (`q` `[1, heads, t, head_dim]`, scaled; `k`, `v` `[1, kv_heads, t,
    /// head_dim]`) over the prefix, if any, and each token's ancestors: `[1, heads, t, head_dim]`.
    fn tree_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        tree: &Ancestors,
        past: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = tree.len();
        let by_head = q.squeeze(0)?.contiguous()?;
        let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
        let (mut prefix_scores, p) = match past {
            Some((keys_t, _)) => (flat(&by_head.matmul(keys_t)?)?, keys_t.dim(2)?),
            None => (Vec::new(), 0),
        };
        let dims = tree_attention::Dims { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim, past: p };
        let own = tree_attention::attend(&flat(&by_head)?, &flat(k)?, &flat(v)?, &mut prefix_scores, dims, tree);
        let mut out = Tensor::from_vec(own, (c.num_heads, t, c.head_dim), &self.device)?;
        if let Some((_, values)) = past {
            let weights = Tensor::from_vec(prefix_scores, (c.num_heads, t, p), &self.device)?;
            out = (out + weights.matmul(values)?)?;
        }
        Ok(out.unsqueeze(0)?)
    }

    /// cos and sin of the rotary angles at each token's position, `[t, head_dim / 2]`.
    fn rotary_tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            angles.extend(self.inv_freq.iter().map(|f| pos as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (positions.len(), half), &self.device)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// Whether a prefix-tree batch's attention is computed over each token's ancestors only ([`tree_attention`]),
/// without a `[heads, t, t]` mask and scores: in f32 on the CPU; elsewhere the masked dense products are faster.
pub fn attends_trees_sparsely(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// Rotary inverse frequencies, scaled as transformers' `ROPE_INIT_FUNCTIONS` do (computed in f32 like torch).
pub fn inverse_frequencies(c: &ModelConfig) -> Vec<f32> {
    let dim = c.head_dim;
    let base = c.rope_theta as f32;
    let plain: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect();
    match c.rope_scaling {
        RopeScaling::Default => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let (factor, low, high, context) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = context / low;
            let high_freq_wavelen = context / high;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen > low_freq_wavelen {
                        f / factor
                    } else if wavelen < high_freq_wavelen {
                        f
                    } else {
                        let smooth = (context / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}
