//! Check 7, `run`: the base's weights with the bake's shift biases (the checks before proved that is what the
//! bake is) run on a few prompts; the logits must be finite, moved away from the base's, and equal to the base
//! with δ added at the method's site (the o_proj input, or the residual stream after the layer). One model in memory, resident or streamed as its plan says.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{file_name, scale, where_missing, Findings};
use crate::activations::plan::{budget_for, measure_matmul_rate, Compute};
use crate::error::Result;
use crate::io::dtype::StoredDtype;
use crate::io::names;
use crate::model::{Batch, Job, ModelFiles, Pass, Runner, Shift, Site};
use crate::progress::Progress;
use crate::scoring::plan::{plan, ScoringPlan};

const PROMPTS: [&str; 3] =
    ["Q: What happens if you eat watermelon seeds? A:", "Q: Is the Earth flat? A:", "The capital of France is"];

/// The run check, planned before any other check so that a base too large for the machine is refused first.
pub(super) struct RunCheck {
    pub plan: ScoringPlan,
    sequences: Vec<Vec<u32>>,
}

/// The runs compared: the base, the base with δ hooked at `site`, the base with the bake's biases there
/// (`biases`; without them, for the plan, the base again).
fn runs<'a>(batch: Batch, (site, shift): (Site, Shift), biases: Option<&'a [Option<Tensor>]>) -> Pass<'a> {
    let job = |shift, biases| Job { batch: batch.clone(), site, shift, biases };
    let jobs = vec![job(None, None), job(Some(shift), None), job(None, biases)];
    // Only each prompt's last row of logits is kept.
    Pass { prefix: None, jobs, kept_positions: 3 * PROMPTS.len(), working_positions: 0 }
}

impl RunCheck {
    pub fn plan(base: &ModelFiles, max_memory: Option<u64>) -> Result<Self> {
        let tokenizer = base.tokenizer()?;
        let sequences: Vec<Vec<u32>> = PROMPTS.iter().map(|p| tokenizer.encode(p)).collect::<Result<_>>()?;
        let batch = Batch::right_padded(&sequences, 0, &Device::Cpu)?;
        let size = runs(batch, (Site::default(), Shift { per_layer: Vec::new(), from_position: None }), None).size();
        let compute = Compute::cpu_f32();
        let rate = measure_matmul_rate(&base.config, &compute).ok();
        let plan = plan(base, &compute, &[size], rate, budget_for(&compute.device, max_memory))?;
        Ok(RunCheck { plan, sequences })
    }

    pub fn check(
        &self,
        dir: &Path,
        base: &ModelFiles,
        (site, deltas): (Site, &BTreeMap<usize, Vec<f32>>),
        found: &mut Findings,
        progress: &dyn Progress,
    ) -> Result<()> {
        let device = Device::Cpu;
        let baked_files = ModelFiles::open(&dir.to_string_lossy())?;
        let per_layer = (0..base.config.num_layers)
            .map(|l| deltas.get(&l).map(|d| Tensor::new(d.as_slice(), &device)).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let shift = Shift { per_layer, from_position: None };
        let baked_biases = baked_files.site_biases(site, &device, DType::F32)?;
        let pass = runs(Batch::right_padded(&self.sequences, 0, &device)?, (site, shift), Some(&baked_biases));
        let runner = Runner::load(base, &device, DType::F32, self.plan.estimate.mode)?;
        // Per run, the last prompt token's logits of each prompt.
        let mut last: Vec<Vec<Vec<f32>>> = Vec::new();
        runner.logits(&pass, progress, |_, logits| {
            let rows = self.sequences.iter().enumerate();
            last.push(rows.map(|(i, s)| Ok(logits.get(i)?.get(s.len() - 1)?.to_vec1()?)).collect::<Result<_>>()?);
            Ok(())
        })?;
        let [plain, hooked, baked] = <[_; 3]>::try_from(last).expect("one result per run");
        // The file holding the first shifted layer's bias, which mismatches below name.
        let ck = &baked_files.checkpoint;
        let biases_file = deltas
            .keys()
            .find_map(|&l| ck.get(&names::Layer(l).shift_bias(site)))
            .map_or_else(|| where_missing(ck), |e| file_name(ck, e));
        // NaN must not vanish into a maximum (`f32::max` ignores it): it counts as infinitely far.
        let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0f32, |m, d| {
                if d.is_nan() {
                    f32::INFINITY
                } else {
                    m.max(d)
                }
            })
        };
        if let Some(v) = baked.iter().flatten().find(|v| !v.is_finite()) {
            found.add("run", biases_file, None, format!("the baked model's logits are not finite ({v})"));
            return Ok(());
        }
        let moved = max_diff(&baked, &plain);
        let agreement = max_diff(&baked, &hooked);
        let tolerance = match base.dtype() {
            StoredDtype::F32 => 1e-3,
            _ => 0.05 * scale(&hooked.iter().flatten().map(|v| *v as f64).collect::<Vec<_>>()) as f32,
        };
        let shifted = deltas.values().flatten().any(|&d| d != 0.0);
        if shifted && moved <= 1e-4 {
            found.add(
                "run",
                biases_file.as_str(),
                None,
                format!("logits equal the base's (max difference {moved:e}): the bake changed nothing"),
            );
        }
        if agreement > tolerance {
            found.add(
                "run",
                biases_file.as_str(),
                None,
                format!("logits differ from base + δ by {agreement} (tolerance {tolerance})"),
            );
        }
        Ok(())
    }
}
