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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Resident,
    Streamed,
}

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
const OVERHEAD_BYTES: u64 = 64 << 20;
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

    fn dtype_bytes(&self) -> u64 {
        self.dtype.size_in_bytes() as u64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: Mode,
    /// `cpu` or `cuda:N`, and the matmuls' dtype.
    pub device: String,
    pub dtype: &'static str,
    /// Which memory the estimates and the budget are of: `host` on the CPU, `device` on a GPU.
    pub memory: &'static str,
    /// Most tree tokens per batch.
    pub batch_tokens: usize,
    /// The chosen mode's estimated peak memory (the activation pass or the write step, whichever is larger).
    pub peak_bytes: u64,
    pub resident_bytes: u64,
    pub streamed_bytes: u64,
    /// Weight bytes read from disk by the activation pass (each stored byte once, in both modes).
    pub bytes_read: u64,
    /// Hidden states kept between layers in the streamed mode (in the matmuls' dtype).
    pub hidden_state_bytes: u64,
    pub budget_bytes: Option<u64>,
    /// Where the budget came from (`None`: no budget, which is only the case of a plan made for reading).
    pub budget_source: Option<BudgetSource>,
    pub pass: PassShape,
    /// Floating-point operations of the pass (matmuls only; they are most of its time).
    pub flops: f64,
    /// The device's matmul rate in the pass's dtype as measured for this plan, and the pass's time at that
    /// rate.
    pub matmul_gflops: Option<f64>,
    pub estimated_seconds: Option<f64>,
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

/// The mode a budget allows: resident when it fits (it is faster), else streamed; `None` when neither fits.
pub fn mode_for(resident: u64, streamed: u64, budget: Option<u64>) -> Option<Mode> {
    match budget {
        None => Some(Mode::Resident),
        Some(b) if resident <= b => Some(Mode::Resident),
        Some(b) if streamed <= b => Some(Mode::Streamed),
        Some(_) => None,
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
    let ck = &model.checkpoint;
    let on_cpu = compute.device.is_cpu();
    let parameters: u64 = ck.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64).sum();
    let stored = ck.total_bytes();
    let captured = (pass.prompts * c.num_layers * c.attn_width()) as u64 * 4;
    let stored_size = model.dtype().size_in_bytes() as u64;
    let converted = |stored: u64| stored * compute.dtype_bytes() / stored_size;
    let converting = compute.dtype_bytes() != stored_size;
    // While a tensor is converted, its mapped pages and a copy in the stored dtype exist beside the result
    // (which is that copy itself when the dtypes agree).
    let loading = |stored: u64| 2 * stored + if converting { converted(stored) } else { 0 };
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
    let embeddings_stored = ck.get(names::EMBED_TOKENS).map_or(0, stored_bytes);
    let hidden_state_bytes = (pass.tokens * c.hidden_size) as u64 * compute.dtype_bytes();
    let batch_scratch = batch_scratch_bytes(c, pass.longest_batch, compute)
        + if on_cpu && compute.dtype == DType::BF16 {
            // candle's CPU matmul has no bf16 kernel: it widens both operands to f32 and narrows the result.
            largest_layer_tensor * 4 / stored_size + 3 * (pass.longest_batch * c.intermediate_size) as u64 * 4
        } else {
            0
        };
    let model_bytes = converted(parameters * stored_size);
    // On a GPU the mapped pages and the captured rows are host memory; only the converted copies, the hidden
    // states and the scratch are on the device.
    let loading_here = |stored: u64| if on_cpu { loading(stored) } else { converted(stored) };
    let mapped_layer = if on_cpu { largest_layer_stored + largest_layer_tensor } else { 0 };
    let captured_here = if on_cpu { captured } else { 0 };
    // Each mode peaks either while loading (the captured rows are still untouched zero pages then) or at the
    // end of the pass, when every captured row has been written.
    let resident = (model_bytes - converted(largest_tensor) + loading_here(largest_tensor))
        .max(model_bytes + captured_here + batch_scratch)
        + OVERHEAD_BYTES;
    // Streamed, the embeddings are loaded first and dropped once every batch is embedded; then one layer at a
    // time is loaded whole (its mapped pages handed back after it ran) beside the hidden states.
    let streamed = (hidden_state_bytes + loading_here(embeddings_stored))
        .max(converted(largest_layer_stored) + mapped_layer + hidden_state_bytes + captured_here + batch_scratch)
        + OVERHEAD_BYTES;
    // After the pass (the model is gone by then): the probe stage holds the activations and, per thread,
    // one layer's rows head by head (probe prompts × attention width, plus an intercept column per head)
    // and one head's weighted copy; the write step one tensor at a time and each shard's write buffer.
    let threads = rayon::current_num_threads() as u64;
    let probe_rows = pass.probe_prompts as u64;
    let per_thread = probe_rows * (c.attn_width() + c.num_heads) as u64 * 4 + probe_rows * (c.head_dim + 1) as u64 * 4;
    let probe_stage = captured + threads * per_thread + OVERHEAD_BYTES;
    let write_step = largest_tensor + threads * WRITE_BUFFER_BYTES + OVERHEAD_BYTES;
    let after_pass = probe_stage.max(write_step);
    // The stages after the pass use host memory, which only the CPU's estimates are of.
    let (resident, streamed) = match on_cpu {
        true => (resident.max(after_pass), streamed.max(after_pass)),
        false => (resident, streamed),
    };
    let memory = if on_cpu { "host" } else { "device" };
    let flops = pass_flops(c, pass);
    let Some(mode) = mode_for(resident, streamed, budget.map(|b| b.bytes)) else {
        let budget = budget.expect("without a budget a mode always exists");
        let gb = |x: u64| x as f64 / 1e9;
        let try_this = match (on_cpu, compute.dtype == DType::F32) {
            (true, true) => "dtype bf16 (half the weights' memory), a GPU, or a machine with more memory",
            (true, false) => "a GPU, or a machine with more memory",
            (false, _) => "a GPU with more memory, or the CPU",
        };
        return Err(BakeError::Invalid(format!(
            "this run needs more than {} on {}: resident about {:.2} GB, layer-streamed about {:.2} GB of {memory} \
             memory; try {try_this}",
            budget.describe(memory),
            compute.device_name(),
            gb(resident),
            gb(streamed)
        )));
    };
    Ok(Plan {
        mode,
        device: compute.device_name(),
        dtype: compute.dtype_name(),
        memory,
        batch_tokens,
        peak_bytes: if mode == Mode::Resident { resident } else { streamed },
        resident_bytes: resident,
        streamed_bytes: streamed,
        bytes_read: stored,
        hidden_state_bytes,
        budget_bytes: budget.map(|b| b.bytes),
        budget_source: budget.map(|b| b.source),
        pass: *pass,
        flops,
        matmul_gflops,
        estimated_seconds: matmul_gflops.map(|rate| flops / (rate * 1e9)),
    })
}

/// One batch's scratch: the head-expanded mask, the scores and their softmax, each `[heads, t, t]` in f32,
/// plus the layer's activations at the MLP's width in the matmuls' dtype.
fn batch_scratch_bytes(c: &ModelConfig, tokens: usize, compute: &Compute) -> u64 {
    (3 * c.num_heads * tokens * tokens) as u64 * 4 + (4 * tokens * c.intermediate_size) as u64 * compute.dtype_bytes()
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

/// Matmul FLOPs of the capture pass: every layer's projections for every token, and the attention's two
/// products (scores, weighted values) for every query-key pair the batches score.
fn pass_flops(c: &ModelConfig, pass: &PassShape) -> f64 {
    let (h, a, kv, i) = (c.hidden_size as f64, c.attn_width() as f64, c.kv_width() as f64, c.intermediate_size as f64);
    let per_token = 2.0 * (2.0 * h * a + 2.0 * h * kv + 3.0 * h * i);
    let attention = 4.0 * pass.attention_pairs as f64 * (c.num_heads * c.head_dim) as f64;
    (pass.tokens as f64 * per_token + attention) * c.num_layers as f64
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
        let gb = |x: u64| x as f64 / 1e9;
        let how = match self.mode {
            Mode::Resident => "resident (all layers loaded)",
            Mode::Streamed => "layer-streamed (one layer loaded at a time)",
        };
        let budget = match (self.budget_bytes, self.budget_source) {
            (Some(b), Some(BudgetSource::Available)) => format!(" ≤ {:.2} GB available", gb(b)),
            (Some(b), _) => format!(" ≤ budget {:.2} GB", gb(b)),
            _ => String::new(),
        };
        let time = match (self.estimated_seconds, self.matmul_gflops) {
            (Some(s), Some(rate)) => format!(
                "; {:.1} TFLOP, ~{} of matmuls at the measured {rate:.0} GFLOP/s",
                self.flops / 1e12,
                duration(s)
            ),
            _ => format!("; {:.1} TFLOP", self.flops / 1e12),
        };
        format!(
            "{} prompts, {} tokens after prefix sharing, batches of ≤ {} tokens; on {} in {}, {how}: peak {} memory ~{:.2} GB{budget} (resident ~{:.2} GB, streamed ~{:.2} GB incl. {:.2} GB of hidden states); reads {:.2} GB of weights{time}",
            self.pass.prompts,
            self.pass.tokens,
            self.batch_tokens,
            self.device,
            self.dtype,
            self.memory,
            gb(self.peak_bytes),
            gb(self.resident_bytes),
            gb(self.streamed_bytes),
            gb(self.hidden_state_bytes),
            gb(self.bytes_read)
        )
    }
}

fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}
