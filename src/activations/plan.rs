//! Choosing how the activation pass runs: the whole model resident, or layer-streamed (one decoder layer's
//! weights at a time, every prompt's hidden states kept between layers), and how many tokens a batch holds.
//! Estimates are of peak host memory on the CPU and of peak device memory on a GPU (where the weights, the
//! hidden states and a batch's scratch live; the host then holds the mapped weights and the captured rows).

use serde::Serialize;

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::error::{BakeError, Result};
use crate::io::names;
use crate::model::{ModelConfig, ModelFiles};

pub use crate::model::Mode;

/// The size of an activation pass, as [`crate::activations::PackedPrompts`] lays it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PassShape {
    pub prompts: usize,
    /// Of those, the labelled probe prompts (the rows the probe stage fits on).
    pub probe_prompts: usize,
    /// Tokens the model runs on (shared leading tokens count once per batch).
    pub tokens: usize,
    /// Tokens in the longest batch.
    pub longest_batch: usize,
    /// Query-key pairs the attention scores, summed over batches (a packed batch of t tokens scores t²).
    pub attention_pairs: u64,
}

/// The binary, the tokenizer, the dataset, allocator slack and candle's temporaries for one batch: measured
/// as the peak RSS beyond the terms the plan counts, on SmolLM2 (resident) and the 7B shape (streamed).
pub(crate) const OVERHEAD_BYTES: u64 = 64 << 20;
/// The checkpoint writer's buffer, one per shard written at a time.
const WRITE_BUFFER_BYTES: u64 = 8 << 20;

/// Where the pass runs and the dtype its matmuls use.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub dtype: DType,
}

impl Compute {
    pub fn cpu_f32() -> Self {
        Compute { device: Device::Cpu, dtype: DType::F32 }
    }

    /// `cpu`, `cuda` or `metal`: what the activation cache keys on (a pass gives the same numbers on any GPU
    /// of a kind).
    pub fn device_kind(&self) -> &'static str {
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu",
            candle_core::DeviceLocation::Cuda { .. } => "cuda",
            candle_core::DeviceLocation::Metal { .. } => "metal",
        }
    }

    /// `cpu` or `cuda:N`.
    pub fn device_name(&self) -> String {
        match self.device.location() {
            candle_core::DeviceLocation::Cpu => self.device_kind().into(),
            candle_core::DeviceLocation::Cuda { gpu_id } | candle_core::DeviceLocation::Metal { gpu_id } => {
                format!("{}:{gpu_id}", self.device_kind())
            }
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        self.dtype.as_str()
    }

    /// Which memory a plan's estimates are of: `host` on the CPU, `device` on a GPU.
    pub fn memory_name(&self) -> &'static str {
        if self.device.is_cpu() {
            "host"
        } else {
            "device"
        }
    }

    /// The memory a batch of `tokens` positions in rows of at most `row` needs besides the weights and hidden
    /// states while a layer runs on it: its MLP's activations, and its attention's mask, scores and softmax,
    /// `[heads, row, row]` in f32 per row; or, for a prefix tree attended sparsely, no mask or scores, only copies
    /// of its queries, keys, values and output.
    pub fn scratch_bytes(&self, c: &ModelConfig, tokens: usize, row: usize, tree: bool) -> u64 {
        let attention = match tree && crate::model::forward::attends_trees_sparsely(&self.device, self.dtype) {
            true => 6 * tokens * c.attn_width(),
            false => 3 * c.num_heads * tokens * row,
        };
        attention as u64 * 4 + mlp_scratch_bytes(c, tokens, self)
    }

    pub fn dtype_bytes(&self) -> u64 {
        self.dtype.size_in_bytes() as u64
    }
}

/// What every plan decides and estimates: the mode, where it runs, each mode's peak memory against the budget,
/// and the work.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub mode: Mode,
    /// `cpu` or `cuda:N`, and the matmuls' dtype.
    pub device: String,
    pub dtype: &'static str,
    /// Which memory the estimates and the budget are of: `host` on the CPU, `device` on a GPU.
    pub memory: &'static str,
    /// The chosen mode's estimated peak memory.
    pub peak_bytes: u64,
    pub resident_bytes: u64,
    pub streamed_bytes: u64,
    /// Hidden states kept between layers in the streamed mode (in the matmuls' dtype).
    pub hidden_state_bytes: u64,
    pub budget_bytes: Option<u64>,
    /// Where the budget came from (`None`: no budget, which is only the case of a plan made for reading).
    pub budget_source: Option<BudgetSource>,
    /// Floating-point operations (matmuls only; they are most of the time).
    pub flops: f64,
    /// The device's matmul rate in the dtype as measured for this plan, and the time at that rate.
    pub matmul_gflops: Option<f64>,
    pub estimated_seconds: Option<f64>,
}

/// An [`Estimate`]'s inputs: each mode's peak memory, the streamed mode's hidden states, and the work.
pub struct Peaks {
    pub resident: u64,
    pub streamed: u64,
    pub hidden_states: u64,
    pub flops: f64,
}

impl Estimate {
    /// The mode `budget` allows ([`mode_for`]) for `what` (e.g. "this run", named in the refusal when neither
    /// mode fits) on `compute`.
    pub fn new(
        what: &str,
        compute: &Compute,
        peaks: Peaks,
        matmul_gflops: Option<f64>,
        budget: Option<Budget>,
    ) -> Result<Self> {
        let Peaks { resident, streamed, hidden_states, flops } = peaks;
        let mode = mode_for(resident, streamed, budget).map_err(|b| too_large(what, compute, b, resident, streamed))?;
        Ok(Estimate {
            mode,
            device: compute.device_name(),
            dtype: compute.dtype_name(),
            memory: compute.memory_name(),
            peak_bytes: if mode == Mode::Resident { resident } else { streamed },
            resident_bytes: resident,
            streamed_bytes: streamed,
            hidden_state_bytes: hidden_states,
            budget_bytes: budget.map(|b| b.bytes),
            budget_source: budget.map(|b| b.source),
            flops,
            matmul_gflops,
            estimated_seconds: matmul_gflops.map(|rate| flops / (rate * 1e9)),
        })
    }

    /// "on cpu in f32, layer-streamed (…): peak host memory ~… (resident ~…, streamed ~… incl. … of hidden
    /// states)"; `streaming` says what streaming means for this work.
    pub fn describe_memory(&self, streaming: &str) -> String {
        let gb = |x: u64| x as f64 / 1e9;
        let how = match self.mode {
            Mode::Resident => "resident (all layers loaded)".to_string(),
            Mode::Streamed => format!("layer-streamed ({streaming})"),
        };
        let budget = match (self.budget_bytes, self.budget_source) {
            (Some(b), Some(BudgetSource::Available)) => format!(" ≤ {:.2} GB available", gb(b)),
            (Some(b), _) => format!(" ≤ budget {:.2} GB", gb(b)),
            _ => String::new(),
        };
        format!(
            "on {} in {}, {how}: peak {} memory ~{:.2} GB{budget} (resident ~{:.2} GB, streamed ~{:.2} GB incl. {:.2} \
             GB of hidden states)",
            self.device,
            self.dtype,
            self.memory,
            gb(self.peak_bytes),
            gb(self.resident_bytes),
            gb(self.streamed_bytes),
            gb(self.hidden_state_bytes),
        )
    }

    /// "; 2.7 TFLOP, ~40 s of matmuls at the measured 69 GFLOP/s".
    pub fn describe_time(&self) -> String {
        match (self.estimated_seconds, self.matmul_gflops) {
            (Some(s), Some(rate)) => {
                format!(
                    "; {:.1} TFLOP, ~{} of matmuls at the measured {rate:.0} GFLOP/s",
                    self.flops / 1e12,
                    duration(s)
                )
            }
            _ => format!("; {:.1} TFLOP", self.flops / 1e12),
        }
    }
}

/// The activation pass's plan.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    #[serde(flatten)]
    pub estimate: Estimate,
    /// Most tree tokens per batch.
    pub batch_tokens: usize,
    /// Weight bytes read from disk by the activation pass (each stored byte once, in both modes).
    pub bytes_read: u64,
    pub pass: PassShape,
}

/// How much memory a run may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub bytes: u64,
    pub source: BudgetSource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    /// The user's (`max_memory`).
    Given,
    /// What the machine has for this run (see [`budget_for`]).
    Available,
}

impl Budget {
    /// How messages name it; `memory` is `host` or `device`.
    pub fn describe(&self, memory: &str) -> String {
        let gb = self.bytes as f64 / 1e9;
        match self.source {
            BudgetSource::Given => format!("the memory budget of {gb:.2} GB"),
            BudgetSource::Available => format!("the {gb:.2} GB of {memory} memory available to this run"),
        }
    }
}

/// The memory a run on `device` may use: `given` when the user set one, else what the device has: on the CPU
/// the memory available to this process now (`MemAvailable`, or what the cgroup's limit leaves when that is
/// lower; `BAKE_AVAILABLE_MEMORY` overrides both, for containers that misreport), on CUDA the GPU's total
/// memory. It chooses between resident and streamed only: batch sizes never depend on it, so the outputs are
/// the same whatever memory happened to be free.
pub fn budget_for(device: &Device, given: Option<u64>) -> Option<Budget> {
    if let Some(bytes) = given {
        return Some(Budget { bytes, source: BudgetSource::Given });
    }
    let available = match device.is_cpu() {
        true => host_memory_available(),
        false => device_memory(device),
    };
    available.map(|bytes| Budget { bytes, source: BudgetSource::Available })
}

/// The host memory this process can still use: the smaller of `MemAvailable` and the cgroup's limit less its
/// usage (cgroup v2, then v1).
fn host_memory_available() -> Option<u64> {
    if let Some(bytes) = std::env::var("BAKE_AVAILABLE_MEMORY").ok().and_then(|t| crate::units::parse_size(&t).ok()) {
        return Some(bytes);
    }
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let number = |text: Option<String>| text.and_then(|t| t.trim().parse::<u64>().ok());
    let meminfo = read("/proc/meminfo").and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?.to_string();
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ]
    .iter()
    .find_map(|(limit, usage)| Some(number(read(limit))?.saturating_sub(number(read(usage)).unwrap_or(0))));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The mode a budget allows: resident when it fits (it is faster), else streamed; the budget back when
/// neither fits.
pub fn mode_for(resident: u64, streamed: u64, budget: Option<Budget>) -> std::result::Result<Mode, Budget> {
    match budget {
        None => Ok(Mode::Resident),
        Some(b) if resident <= b.bytes => Ok(Mode::Resident),
        Some(b) if streamed <= b.bytes => Ok(Mode::Streamed),
        Some(b) => Err(b),
    }
}

/// The refusal of `what` (e.g. "this run") when neither mode fits `budget`: both estimates, the budget, and
/// what to try.
pub fn too_large(what: &str, compute: &Compute, budget: Budget, resident: u64, streamed: u64) -> BakeError {
    let gb = |x: u64| x as f64 / 1e9;
    let memory = compute.memory_name();
    let try_this = match (compute.device.is_cpu(), compute.dtype == DType::F32) {
        (true, true) => "dtype bf16 (half the weights' memory), a GPU, or a machine with more memory",
        (true, false) => "a GPU, or a machine with more memory",
        (false, _) => "a GPU with more memory, or the CPU",
    };
    BakeError::Invalid(format!(
        "{what} needs more than {} on {}: resident about {:.2} GB, layer-streamed about {:.2} GB of {memory} \
         memory; try {try_this}",
        budget.describe(memory),
        compute.device_name(),
        gb(resident),
        gb(streamed)
    ))
}

/// What a model's weights cost in memory once loaded for a [`Compute`], in the terms every plan adds up. On a
/// GPU the mapped pages are host memory, so only the converted copies count.
#[derive(Debug, Clone, Copy)]
pub struct WeightMemory {
    /// Every weight in the matmuls' dtype.
    pub all: u64,
    /// The peak while loading them all: the largest tensor's mapped pages and copies beside the rest.
    pub loading_all: u64,
    /// The largest decoder layer loaded whole, with (on the CPU) its mapped pages.
    pub one_layer: u64,
    /// The embeddings, and (when untied) the output head, in the matmuls' dtype.
    pub embeddings_and_head: u64,
    /// The peak while loading the embeddings alone.
    pub loading_embeddings: u64,
    /// The largest tensor as stored.
    pub largest_tensor: u64,
    largest_layer_tensor: u64,
    stored_size: u64,
    widens: bool,
}

impl WeightMemory {
    pub fn of(model: &ModelFiles, compute: &Compute) -> Self {
        let (c, ck) = (&model.config, &model.checkpoint);
        let on_cpu = compute.device.is_cpu();
        let parameters: u64 = ck.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64).sum();
        let stored_size = model.dtype().size_in_bytes() as u64;
        let converted = |stored: u64| stored * compute.dtype_bytes() / stored_size;
        let converting = compute.dtype_bytes() != stored_size;
        // While a tensor is converted, its mapped pages and a copy in the stored dtype exist beside the result
        // (which is that copy itself when the dtypes agree).
        let loading = |stored: u64| match on_cpu {
            true => 2 * stored + if converting { converted(stored) } else { 0 },
            false => converted(stored),
        };
        let stored_bytes = |e: &crate::model::weights::TensorEntry| (e.end - e.start) as u64;
        let largest_tensor = ck.tensors.values().map(stored_bytes).max().unwrap_or(0);
        let largest_layer_tensor = ck
            .tensors
            .iter()
            .filter(|(n, _)| names::layer_of(n).is_some())
            .map(|(_, e)| stored_bytes(e))
            .max()
            .unwrap_or(0);
        let largest_layer_stored = (0..c.num_layers).map(|l| ck.layer_bytes(l)).max().unwrap_or(0);
        let embeddings = ck.get(names::EMBED_TOKENS).map_or(0, stored_bytes);
        let head = match ck.get(names::LM_HEAD) {
            Some(e) if !c.tie_word_embeddings => stored_bytes(e),
            _ => 0,
        };
        let all = converted(parameters * stored_size);
        let mapped_layer = if on_cpu { largest_layer_stored + largest_layer_tensor } else { 0 };
        WeightMemory {
            all,
            loading_all: all - converted(largest_tensor) + loading(largest_tensor),
            one_layer: converted(largest_layer_stored) + mapped_layer,
            embeddings_and_head: converted(embeddings + head),
            loading_embeddings: loading(embeddings),
            largest_tensor,
            largest_layer_tensor,
            stored_size,
            widens: on_cpu && compute.dtype == DType::BF16,
        }
    }

    /// candle's CPU matmul has no bf16 kernel: it widens both operands of a product to f32 and narrows the
    /// result, which for a batch of `tokens` costs the largest layer tensor and the MLP's activations in f32.
    pub fn widening(&self, c: &ModelConfig, tokens: usize) -> u64 {
        match self.stored_size {
            _ if !self.widens => 0,
            size => self.largest_layer_tensor * 4 / size + 3 * (tokens * c.intermediate_size) as u64 * 4,
        }
    }
}

/// The estimates for a pass of this shape, and the mode `budget` allows ([`mode_for`]), or an error giving
/// both estimates, the budget and what to try.
pub fn plan(
    model: &ModelFiles,
    pass: &PassShape,
    compute: &Compute,
    batch_tokens: usize,
    matmul_gflops: Option<f64>,
    budget: Option<Budget>,
) -> Result<Plan> {
    let c = &model.config;
    let on_cpu = compute.device.is_cpu();
    let weights = WeightMemory::of(model, compute);
    let captured = (pass.prompts * c.num_layers * c.attn_width()) as u64 * 4;
    let hidden_state_bytes = (pass.tokens * c.hidden_size) as u64 * compute.dtype_bytes();
    // Every batch of the pass is a prefix tree.
    let batch_scratch = compute.scratch_bytes(c, pass.longest_batch, pass.longest_batch, true)
        + weights.widening(c, pass.longest_batch);
    let captured_here = if on_cpu { captured } else { 0 };
    // Each mode peaks either while loading (the captured rows are still untouched zero pages then) or at the
    // end of the pass, when every captured row has been written.
    let resident = weights.loading_all.max(weights.all + captured_here + batch_scratch) + OVERHEAD_BYTES;
    // Streamed, the embeddings are loaded first and dropped once every batch is embedded; then one layer at a
    // time is loaded whole (its mapped pages handed back after it ran) beside the hidden states.
    let streamed = (hidden_state_bytes + weights.loading_embeddings)
        .max(weights.one_layer + hidden_state_bytes + captured_here + batch_scratch)
        + OVERHEAD_BYTES;
    // After the pass (the model is gone by then): the probe stage holds the activations and, per thread,
    // one layer's rows head by head (probe prompts × attention width, plus an intercept column per head)
    // and one head's weighted copy; the write step one tensor at a time and each shard's write buffer.
    let threads = rayon::current_num_threads() as u64;
    let probe_rows = pass.probe_prompts as u64;
    let per_thread = probe_rows * (c.attn_width() + c.num_heads) as u64 * 4 + probe_rows * (c.head_dim + 1) as u64 * 4;
    let probe_stage = captured + threads * per_thread + OVERHEAD_BYTES;
    let write_step = weights.largest_tensor + threads * WRITE_BUFFER_BYTES + OVERHEAD_BYTES;
    let after_pass = probe_stage.max(write_step);
    // The stages after the pass use host memory, which only the CPU's estimates are of.
    let (resident, streamed) = match on_cpu {
        true => (resident.max(after_pass), streamed.max(after_pass)),
        false => (resident, streamed),
    };
    let peaks = Peaks { resident, streamed, hidden_states: hidden_state_bytes, flops: pass_flops(c, pass) };
    Ok(Plan {
        estimate: Estimate::new("this run", compute, peaks, matmul_gflops, budget)?,
        batch_tokens,
        bytes_read: model.checkpoint.total_bytes(),
        pass: *pass,
    })
}

/// One batch's scratch: the head-expanded mask, the scores and their softmax, each `[heads, t, t]` in f32,
/// plus the layer's activations at the MLP's width in the matmuls' dtype.
/// It also sizes `auto` batches ([`auto_batch_tokens`]), a fixed rule whatever the attention's kernel.
pub(crate) fn batch_scratch_bytes(c: &ModelConfig, tokens: usize, compute: &Compute) -> u64 {
    (3 * c.num_heads * tokens * tokens) as u64 * 4 + mlp_scratch_bytes(c, tokens, compute)
}

/// A batch's activations at the MLP's width, in the matmuls' dtype.
fn mlp_scratch_bytes(c: &ModelConfig, tokens: usize, compute: &Compute) -> u64 {
    (4 * tokens * c.intermediate_size) as u64 * compute.dtype_bytes()
}

/// The most tokens a batch holds when the recipe says `auto`. Two limits, whichever is smaller:
/// - waste: a prefix-tree batch of t tokens scores all t² pairs although each token sees only its ancestors,
///   so the attention's 4·t·(heads·head_dim) FLOPs per token are kept within a quarter of the projections';
/// - memory: its scratch stays within an eighth of `memory` (the budget, or the GPU's total memory, or 8 GiB
///   on the CPU).
///
/// Rounded down to a multiple of 64. Free memory is deliberately not read: the same model, device kind and
/// flags give the same batches, so the same activations to the last bit.
pub fn auto_batch_tokens(c: &ModelConfig, compute: &Compute, memory: Option<u64>) -> usize {
    let (h, a, kv, i) = (c.hidden_size as f64, c.attn_width() as f64, c.kv_width() as f64, c.intermediate_size as f64);
    let projections_per_token = 2.0 * (2.0 * h * a + 2.0 * h * kv + 3.0 * h * i);
    let by_waste = (projections_per_token / (16.0 * a)) as usize;
    let allowance = memory.or_else(|| device_memory(&compute.device)).unwrap_or(8 << 30) / 8;
    let by_memory = (64..=by_waste.max(64))
        .step_by(64)
        .take_while(|&t| batch_scratch_bytes(c, t, compute) <= allowance)
        .last()
        .unwrap_or(64);
    (by_waste.min(by_memory) / 64 * 64).max(64)
}

/// A GPU's total memory; `None` on the CPU.
fn device_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d.cuda_stream().context().total_mem().ok().map(|b| b as u64);
    }
    let _ = device;
    None
}

/// Matmul FLOPs of the capture pass.
fn pass_flops(c: &ModelConfig, pass: &PassShape) -> f64 {
    layer_flops(c, pass.tokens, pass.attention_pairs)
}

/// Matmul FLOPs of `tokens` going through every decoder layer: the projections for every token, and the
/// attention's two products (scores, weighted values) for each of the `pairs` query-key pairs scored.
pub(crate) fn layer_flops(c: &ModelConfig, tokens: usize, pairs: u64) -> f64 {
    let (h, a, kv, i) = (c.hidden_size as f64, c.attn_width() as f64, c.kv_width() as f64, c.intermediate_size as f64);
    let per_token = 2.0 * (2.0 * h * a + 2.0 * h * kv + 3.0 * h * i);
    let attention = 4.0 * pairs as f64 * a;
    (tokens as f64 * per_token + attention) * c.num_layers as f64
}

/// The device's matmul rate in the pass's dtype in GFLOP/s, on the MLP's shape at a typical batch (capped so
/// that measuring needs at most ~150 MB), over about 0.2 s after a warm-up.
pub fn measure_matmul_rate(c: &ModelConfig, compute: &Compute) -> Result<f64> {
    let device = &compute.device;
    let (m, k, n) = (512, c.hidden_size.min(4096), c.intermediate_size.min(8192));
    let x = Tensor::ones((m, k), compute.dtype, device)?;
    let w = Tensor::ones((n, k), compute.dtype, device)?;
    let product = || -> Result<()> {
        x.matmul(&w.t()?)?;
        Ok(device.synchronize()?)
    };
    product()?;
    let start = Instant::now();
    let mut reps = 0u32;
    while reps < 3 || start.elapsed() < Duration::from_millis(200) {
        product()?;
        reps += 1;
    }
    Ok(2.0 * (m * k * n) as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9)
}

impl Plan {
    pub fn describe(&self) -> String {
        format!(
            "{} prompts, {} tokens after prefix sharing, batches of ≤ {} tokens; {}; reads {:.2} GB of weights{}",
            self.pass.prompts,
            self.pass.tokens,
            self.batch_tokens,
            self.estimate.describe_memory("one layer loaded at a time"),
            self.bytes_read as f64 / 1e9,
            self.estimate.describe_time()
        )
    }
}

pub(crate) fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}
