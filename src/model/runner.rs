//! Running many batches for their logits, with the whole model resident or one layer at a time. Scoring
//! (`bake eval`, `bake search`, `bake verify --run`) describes its work as one [`Pass`] and does not care which:
//! both give each batch's logits from the same steps, in the same order.

use candle_core::{DType, Device, Tensor};

use super::forward::InFlight;
use super::{Batch, Llama, ModelFiles, Request, Shift, Site};
use crate::error::Result;
use crate::progress::Progress;

/// How a model's weights are held while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// All layers loaded.
    Resident,
    /// One decoder layer loaded at a time, every batch's hidden states kept between layers.
    Streamed,
}

/// One batch of a pass and how the model runs on it.
pub struct Job<'a> {
    pub batch: Batch,
    /// Where the shift and the biases apply.
    pub site: Site,
    pub shift: Option<Shift>,
    /// Per layer, a bias of the site's projection in place of the layer's own ([`Request::biases`]).
    pub biases: Option<&'a [Option<Tensor>]>,
}

impl Job<'_> {
    fn request(&self) -> Request<'_> {
        Request { site: self.site, shift: self.shift.as_ref(), biases: self.biases, ..Default::default() }
    }
}

/// Batches whose logits are wanted, all continuing one optional prefix: a sequence run once whose keys and
/// values every batch attends to (the TruthfulQA instruction and primer).
pub struct Pass<'a> {
    pub prefix: Option<Job<'a>>,
    pub jobs: Vec<Job<'a>>,
    /// What the logits' consumer holds, for the plan: positions of vocabulary-wide rows (f32) it keeps from one
    /// batch to the next, and at most while it reads one batch.
    pub kept_positions: usize,
    pub working_positions: usize,
}

/// The size of a pass, for planning its memory and time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PassSize {
    pub jobs: usize,
    /// Token positions the model runs on (rows × width of every batch, padding included), prefix excluded.
    pub tokens: usize,
    pub prefix_tokens: usize,
    /// Token positions of the largest batch: its scratch and its logits are the largest.
    pub largest_job: usize,
    /// Token positions of the longest row of any batch.
    pub widest_row: usize,
    /// Whether every batch is a prefix tree (attended sparsely on the CPU in f32).
    pub trees: bool,
    /// [`Pass::kept_positions`] and [`Pass::working_positions`].
    pub kept_positions: usize,
    pub working_positions: usize,
    /// Query-key pairs scored, summed over batches (prefix keys included).
    pub attention_pairs: u64,
}

impl Pass<'_> {
    pub fn size(&self) -> PassSize {
        let prefix_tokens = self.prefix.as_ref().map_or(0, |p| p.batch.len());
        let positions = |b: &Batch| b.ids.elem_count();
        let pairs = |b: &Batch| {
            let (rows, t) = b.ids.dims2().unwrap_or((0, 0));
            (rows * t * (t + prefix_tokens)) as u64
        };
        PassSize {
            jobs: self.jobs.len(),
            tokens: self.jobs.iter().map(|j| positions(&j.batch)).sum(),
            prefix_tokens,
            largest_job: self.jobs.iter().map(|j| positions(&j.batch)).max().unwrap_or(0),
            widest_row: self.jobs.iter().map(|j| j.batch.ids.dims2().map_or(0, |d| d.1)).max().unwrap_or(0),
            trees: self.jobs.iter().all(|j| j.batch.parents.is_some()),
            kept_positions: self.kept_positions,
            working_positions: self.working_positions,
            attention_pairs: self.jobs.iter().map(|j| pairs(&j.batch)).sum::<u64>()
                + (prefix_tokens * prefix_tokens) as u64,
        }
    }
}

/// A model ready to run passes.
pub enum Runner<'a> {
    /// Every weight loaded once.
    Resident(Llama),
    /// The embeddings, final norm and head loaded; each pass reads the decoder layers from the map one at a
    /// time ([`Llama::layers_streamed`]), every batch's hidden states held between layers.
    Streamed { files: &'a ModelFiles, shell: Llama },
}

impl<'a> Runner<'a> {
    pub fn load(files: &'a ModelFiles, device: &Device, dtype: DType, mode: Mode) -> Result<Self> {
        Ok(match mode {
            Mode::Resident => Runner::Resident(Llama::load(files, device, dtype)?),
            Mode::Streamed => Runner::Streamed { files, shell: Llama::load_shell(files, device, dtype, true)? },
        })
    }

    fn model(&self) -> &Llama {
        match self {
            Runner::Resident(model) | Runner::Streamed { shell: model, .. } => model,
        }
    }

    pub fn device(&self) -> &Device {
        self.model().device()
    }

    pub fn dtype(&self) -> DType {
        self.model().dtype()
    }

    pub fn mode(&self) -> Mode {
        match self {
            Runner::Resident(_) => Mode::Resident,
            Runner::Streamed { .. } => Mode::Streamed,
        }
    }

    /// Runs `pass` and hands each job's logits `[rows, t, vocab]` (f32) to `sink`, in job order, one at a time.
    /// Progress counts batches when resident, layers when streamed.
    pub fn logits(
        &self,
        pass: &Pass,
        progress: &dyn Progress,
        mut sink: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        match self {
            Runner::Resident(model) => {
                let prefix = match &pass.prefix {
                    Some(p) => model.forward(&p.batch, &Request { keep_kv: true, ..p.request() })?.prefix,
                    None => None,
                };
                progress.start(pass.jobs.len() as u64, "batches");
                for (i, job) in pass.jobs.iter().enumerate() {
                    let request = Request { prefix: prefix.as_ref(), logits: true, ..job.request() };
                    sink(i, model.forward(&job.batch, &request)?.logits.expect("logits requested"))?;
                    progress.advance(1);
                }
            }
            Runner::Streamed { files, shell } => {
                let mut prefix = pass.prefix.as_ref().map(|p| embedded(shell, p, false)).transpose()?;
                let mut jobs = pass.jobs.iter().map(|j| embedded(shell, j, true)).collect::<Result<Vec<_>>>()?;
                progress.start(shell.config.num_layers as u64 + 1, "layers");
                shell.layers_streamed(files, prefix.as_mut(), &mut jobs, |_, _, _| Ok(()), |_| progress.advance(1))?;
                for (i, job) in jobs.into_iter().enumerate() {
                    sink(i, shell.head(&job.hidden)?)?;
                }
                progress.advance(1);
            }
        }
        progress.finish();
        Ok(())
    }
}

/// A job about to enter the first layer.
fn embedded<'j>(shell: &Llama, job: &'j Job, logits: bool) -> Result<InFlight<'j>> {
    let request = Request { logits, ..job.request() };
    Ok(InFlight { batch: &job.batch, request, hidden: shell.embed(&job.batch)? })
}
