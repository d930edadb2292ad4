//! `config.json` of a LLaMA-family model (Llama, Mistral, Qwen2, Qwen3), read into a typed, validated
//! [`ModelConfig`].
//!
//! Two key styles are in the wild: transformers 4 (`rope_theta` and `rope_scaling` at top level,
//! `torch_dtype`) and transformers 5 (`rope_parameters`, `dtype`). Both are accepted.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{BakeError, Result};
use crate::io::dtype::StoredDtype;

/// How rotary position embeddings are scaled beyond the training context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// The model families bake reads. All run LLaMA's forward pass (Qwen2's q/k/v biases are ordinary biases
/// there); what differs is whether their own transformers class would read a baked `o_proj.bias`, and so how
/// a bake is written ([`Family::written_as_llama`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    /// transformers' Mistral attention has no biases at all: a written `o_proj.bias` would be dropped.
    Mistral,
    /// transformers' Qwen2 attention has q/k/v biases and never an o_proj bias.
    Qwen2,
    /// Per-head RMSNorm of queries and keys before rotary; transformers' Qwen3 attention honours
    /// `attention_bias` for all four projections, so a bake stays a Qwen3.
    Qwen3,
}

/// The `model_type`s bake reads, as errors list them.
pub const SUPPORTED_MODEL_TYPES: &str =
    "`llama` (LLaMA 1/2/3, Vicuna, SmolLM2, ...), `mistral`, `qwen2` (Qwen2, Qwen2.5), `qwen3` (dense Qwen3)";

impl Family {
    const ALL: [Family; 4] = [Family::Llama, Family::Mistral, Family::Qwen2, Family::Qwen3];

    pub fn of_model_type(model_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// `config.json`'s `model_type` for this family.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// transformers' class name for this family.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// Whether queries and keys are RMS-normalised per head before rotary (Qwen3's `q_norm`, `k_norm`).
    pub fn has_head_norms(self) -> bool {
        self == Family::Qwen3
    }

    /// Whether a bake is written as `LlamaForCausalLM` (whose `attention_bias: true` reads all four biases)
    /// because the family's own class would not read the o_proj bias. The forward passes agree once the
    /// sliding window is out of play, which [`ModelConfig::from_map`] checks.
    pub fn written_as_llama(self) -> bool {
        matches!(self, Family::Mistral | Family::Qwen2)
    }

    /// The family a bake of this one is written as.
    pub fn baked_as(self) -> Family {
        if self.written_as_llama() {
            Family::Llama
        } else {
            self
        }
    }
}

/// The architecture facts `bake` needs, validated against each other.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub dtype: Option<StoredDtype>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The file as read, so that a baked checkpoint keeps every original key.
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// The id right-padded batches are filled with: the pad token, else the first EOS token, else 0. Padding
    /// never reaches a real token, so any id would do; these keep the padded rows ordinary.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.or(self.eos_token_ids.first().copied()).unwrap_or(0)
    }

    /// The width of one layer's activations at `site`: the o_proj input's, or the residual stream's.
    pub fn width_at(&self, site: crate::io::names::Site) -> usize {
        match site {
            crate::io::names::Site::AttentionHeads => self.attn_width(),
            crate::io::names::Site::Residual => self.hidden_size,
        }
    }

    /// Width of the o_proj input: the concatenated per-head attention outputs.
    pub fn attn_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::io::fs::read_text(path, crate::io::fs::limits::JSON)?;
        let value: Value = serde_json::from_str(&text).map_err(|e| BakeError::parse(path, e))?;
        let Value::Object(raw) = value else {
            return Err(BakeError::parse(path, "expected a JSON object at the top level"));
        };
        Self::from_map(path, raw)
    }

    pub fn from_map(path: &Path, raw: Map<String, Value>) -> Result<Self> {
        let fields = Fields { path, map: &raw };
        let model_type = fields.string("model_type")?;
        let Some(family) = Family::of_model_type(&model_type) else {
            return Err(BakeError::Unsupported {
                path: path.into(),
                message: format!("model_type `{model_type}` is not supported; bake reads {SUPPORTED_MODEL_TYPES}"),
            });
        };
        if let Some(act) = fields.optional_string("hidden_act")? {
            if act != "silu" {
                return Err(fields.wrong("hidden_act", "`silu` (LLaMA's SwiGLU)"));
            }
        }
        let hidden_size = fields.positive("hidden_size")?;
        let num_heads = fields.positive("num_attention_heads")?;
        let num_kv_heads = fields.optional_positive("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads % num_kv_heads != 0 {
            return Err(fields.wrong(
                "num_key_value_heads",
                &format!("a divisor of num_attention_heads ({num_heads}), found {num_kv_heads}"),
            ));
        }
        let head_dim = match fields.optional_positive("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(
                    fields.wrong("head_dim", "present when hidden_size is not a multiple of num_attention_heads")
                )
            }
        };
        if head_dim % 2 != 0 {
            return Err(fields.wrong("head_dim", "an even number (rotary embeddings rotate pairs)"));
        }
        let (rope_theta, rope_scaling) = read_rope(&fields)?;
        let max_position_embeddings = fields.optional_positive("max_position_embeddings")?.unwrap_or(2048);
        check_no_sliding_window(&fields, family, max_position_embeddings)?;
        let dtype_key = if fields.present("dtype").is_some() { "dtype" } else { "torch_dtype" };
        let dtype = match fields.optional_string(dtype_key)? {
            None => None,
            Some(name) => Some(
                StoredDtype::from_config_name(&name)
                    .ok_or_else(|| fields.wrong(dtype_key, &format!("bfloat16, float16 or float32, found `{name}`")))?,
            ),
        };
        let rms_norm_eps = fields.optional_f64("rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(fields.wrong("rms_norm_eps", &format!("a finite number ≥ 0, found {rms_norm_eps}")));
        }
        for (field, value, bound) in [
            ("hidden_size", hidden_size, MAX_WIDTH),
            ("num_attention_heads", num_heads, MAX_HEADS),
            ("head_dim", head_dim, MAX_WIDTH),
        ] {
            if value > bound {
                return Err(fields.wrong(field, &format!("at most {bound}, found {value}")));
            }
        }
        Ok(ModelConfig {
            path: path.into(),
            family,
            hidden_size,
            intermediate_size: fields.bounded("intermediate_size", MAX_WIDTH * 16)?,
            num_layers: fields.bounded("num_hidden_layers", MAX_LAYERS)?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: fields.bounded("vocab_size", MAX_VOCAB)?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: fields.optional_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: fields.optional_bool("attention_bias")?.unwrap_or(false)
                || fields.optional_bool("oproj_bias")?.unwrap_or(false),
            mlp_bias: fields.optional_bool("mlp_bias")?.unwrap_or(false),
            dtype,
            bos_token_id: fields.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: fields.token_ids("eos_token_id")?,
            pad_token_id: fields.token_ids("pad_token_id")?.first().copied(),
            raw: raw.clone(),
        })
    }
}

/// A sliding window shorter than the context changes what a token attends to beyond it, and the LLaMA class a
/// Mistral or Qwen2 bake is written as has none: such a checkpoint cannot hold the shift exactly, so it is
/// refused rather than silently changed.
fn check_no_sliding_window(fields: &Fields, family: Family, context: usize) -> Result<()> {
    let window = match family {
        Family::Llama => return Ok(()),
        Family::Mistral => fields.optional_positive("sliding_window")?,
        // Qwen2 and Qwen3 apply their window only with use_sliding_window, and then to the layers from
        // max_window_layers on.
        Family::Qwen2 | Family::Qwen3 => match fields.optional_bool("use_sliding_window")? {
            Some(true) => {
                let layers = fields.optional_positive("num_hidden_layers")?.unwrap_or(0);
                let from = fields.optional_positive("max_window_layers")?.unwrap_or(0);
                if from < layers {
                    fields.optional_positive("sliding_window")?
                } else {
                    None
                }
            }
            _ => None,
        },
    };
    match window {
        Some(w) if w < context => Err(fields.wrong(
            "sliding_window",
            &format!(
                "null or at least the context (max_position_embeddings = {context}), found {w}: bake's forward pass \
                 has no sliding window (and a {} bake is written as {}), so the shift found here would not be the \
                 one the model applies beyond {w} tokens",
                family.architecture(),
                family.baked_as().architecture()
            ),
        )),
        _ => Ok(()),
    }
}

fn read_rope(fields: &Fields) -> Result<(f64, RopeScaling)> {
    // transformers 5 nests everything under `rope_parameters`; transformers 4 keeps `rope_theta` at the top and
    // the scaling in `rope_scaling`. When both are there, a non-empty `rope_scaling` wins, as in transformers 5
    // (`rope_parameters = rope_scaling or rope_parameters`): the theta inside `rope_parameters` is then not read.
    let legacy = match fields.map.get("rope_scaling") {
        Some(Value::Object(params)) if !params.is_empty() => Some(params),
        Some(Value::Object(_)) | Some(Value::Null) | None => None,
        Some(_) => return Err(fields.wrong("rope_scaling", "an object or null")),
    };
    let (scope, scope_name) = match (legacy, fields.map.get("rope_parameters")) {
        (Some(params), _) => (Some(params), "rope_scaling"),
        (None, Some(Value::Object(params))) => (Some(params), "rope_parameters"),
        (None, Some(Value::Null) | None) => (None, "rope_scaling"),
        (None, Some(_)) => return Err(fields.wrong("rope_parameters", "an object")),
    };
    let nested = scope.map(|map| Fields { path: fields.path, map });
    let theta_nested = match &nested {
        Some(n) => n.optional_f64("rope_theta")?,
        None => None,
    };
    let rope_theta = theta_nested.or(fields.optional_f64("rope_theta")?).unwrap_or(10_000.0);
    if !(rope_theta.is_finite() && rope_theta > 0.0) {
        let field = if theta_nested.is_some() { format!("{scope_name}.rope_theta") } else { "rope_theta".into() };
        return Err(BakeError::field(fields.path, field, format!("expected a finite number > 0, found {rope_theta}")));
    }
    let Some(n) = nested else { return Ok((rope_theta, RopeScaling::Default)) };
    let kind = match n.optional_string("rope_type")? {
        Some(kind) => kind,
        None => n.optional_string("type")?.unwrap_or_else(|| "default".into()),
    };
    let field = |name: &str| format!("{scope_name}.{name}");
    let required = |name: &str| -> Result<f64> {
        let number = n.optional_f64(name).map_err(|_| {
            let found = n.map.get(name).map(Value::to_string).unwrap_or_default();
            BakeError::field(fields.path, field(name), format!("expected a number, found {found}"))
        })?;
        match number {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            Some(v) => {
                Err(BakeError::field(fields.path, field(name), format!("expected a finite number > 0, found {v}")))
            }
            None => Err(BakeError::field(fields.path, field(name), "a number (required by this rope_type)")),
        }
    };
    // A factor is read only by some rope types, but one that is there must be a number whatever the type.
    if n.map.contains_key("factor") {
        required("factor")?;
    }
    let scaling = match kind.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: required("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: required("factor")?,
            low_freq_factor: required("low_freq_factor")?,
            high_freq_factor: required("high_freq_factor")?,
            original_max_position_embeddings: required("original_max_position_embeddings")?,
        },
        other => {
            return Err(BakeError::field(
                fields.path,
                field("rope_type"),
                format!("one of `default`, `linear`, `llama3`; `{other}` is not supported"),
            ))
        }
    };
    Ok((rope_theta, scaling))
}

/// Sanity bounds, checked before anything is sized from the config: well above every released model
/// (Llama 3.1 405B: 126 layers, 128 heads, width 16,384; the largest vocabularies hold about 260k tokens).
const MAX_LAYERS: usize = 4096;
const MAX_HEADS: usize = 4096;
const MAX_WIDTH: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;

/// Typed access to the fields of one JSON object, with errors naming the file and the field.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn wrong(&self, field: &str, expected: &str) -> BakeError {
        BakeError::field(self.path, field, format!("expected {expected}"))
    }

    fn present(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn string(&self, field: &str) -> Result<String> {
        self.optional_string(field)?.ok_or_else(|| BakeError::field(self.path, field, "missing (expected a string)"))
    }

    fn optional_string(&self, field: &str) -> Result<Option<String>> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.wrong(field, "a string")),
        }
    }

    fn positive(&self, field: &str) -> Result<usize> {
        self.optional_positive(field)?
            .ok_or_else(|| BakeError::field(self.path, field, "missing (expected a positive integer)"))
    }

    fn bounded(&self, field: &str, bound: usize) -> Result<usize> {
        let value = self.positive(field)?;
        if value > bound {
            return Err(self.wrong(field, &format!("at most {bound}, found {value}")));
        }
        Ok(value)
    }

    fn optional_positive(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n as usize)),
                _ => Err(self.wrong(field, &format!("a positive integer, found {v}"))),
            },
        }
    }

    fn optional_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong(field, &format!("a number, found {v}"))),
        }
    }

    fn optional_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.present(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(field, &format!("true or false, found {v}"))),
        }
    }

    /// A token id field may be one integer or a list of them (Llama 3 lists several EOS ids).
    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.present(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                items.iter().map(|v| as_id(v).ok_or_else(|| self.wrong(field, "a list of token ids"))).collect()
            }
            Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(|| self.wrong(field, "a token id")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let Value::Object(map) = serde_json::from_str(json).unwrap() else { panic!() };
        ModelConfig::from_map(Path::new("config.json"), map)
    }

    const BASE: &str = r#""model_type":"llama","hidden_size":48,"intermediate_size":96,"num_hidden_layers":3,
        "num_attention_heads":4,"vocab_size":100"#;

    #[test]
    fn other_families_are_read_and_unsupported_ones_refused_naming_the_supported() {
        let base = BASE.replace("\"llama\"", "\"{}\"");
        let with = |model_type: &str, extra: &str| parse(&format!("{{{}{extra}}}", base.replace("{}", model_type)));
        assert_eq!(with("mistral", "").unwrap().family, Family::Mistral);
        assert_eq!(with("qwen2", r#","use_sliding_window":false,"sliding_window":8"#).unwrap().family, Family::Qwen2);
        let err = with("gemma2", "").unwrap_err().to_string();
        assert!(
            err.contains("`gemma2` is not supported") && err.contains("`mistral`") && err.contains("`qwen2`"),
            "{err}"
        );
    }

    #[test]
    fn a_sliding_window_shorter_than_the_context_is_refused_with_the_reason() {
        let mistral = BASE.replace("\"llama\"", "\"mistral\"");
        let err = parse(&format!(r#"{{{mistral},"sliding_window":4096,"max_position_embeddings":32768}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sliding_window") && err.contains("LlamaForCausalLM") && err.contains("4096"), "{err}");
        // A window as long as the context never slides.
        parse(&format!(r#"{{{mistral},"sliding_window":32768,"max_position_embeddings":32768}}"#)).unwrap();
        let qwen2 = BASE.replace("\"llama\"", "\"qwen2\"");
        let sliding = format!(r#"{{{qwen2},"use_sliding_window":true,"sliding_window":64,"max_window_layers":1}}"#);
        assert!(parse(&sliding).unwrap_err().to_string().contains("sliding_window"));
        // From max_window_layers = num_hidden_layers on, no layer slides.
        parse(&format!(r#"{{{qwen2},"use_sliding_window":true,"sliding_window":64,"max_window_layers":3}}"#)).unwrap();
    }

    #[test]
    fn both_rope_key_styles_give_the_same_theta() {
        let old = parse(&format!("{{{BASE},\"rope_theta\":500000.0}}")).unwrap();
        let new =
            parse(&format!("{{{BASE},\"rope_parameters\":{{\"rope_theta\":500000.0,\"rope_type\":\"default\"}}}}"))
                .unwrap();
        assert_eq!(old.rope_theta, 500000.0);
        assert_eq!(new.rope_theta, 500000.0);
        assert_eq!(old.rope_scaling, RopeScaling::Default);
        assert_eq!(old.head_dim, 12);
    }

    #[test]
    fn a_legacy_rope_scaling_beside_rope_parameters_wins_as_in_transformers_5() {
        let both = parse(&format!(
            "{{{BASE},\"rope_theta\":5e5,\"rope_parameters\":{{\"rope_theta\":1e6,\"rope_type\":\"default\"}},\
             \"rope_scaling\":{{\"rope_type\":\"linear\",\"factor\":2.0}}}}"
        ))
        .unwrap();
        assert_eq!(both.rope_theta, 5e5);
        assert_eq!(both.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let empty_legacy = parse(&format!(
            "{{{BASE},\"rope_parameters\":{{\"rope_theta\":1e6,\"rope_type\":\"default\"}},\"rope_scaling\":{{}}}}"
        ))
        .unwrap();
        assert_eq!(empty_legacy.rope_theta, 1e6);
        let text = parse(&format!(
            "{{{BASE},\"rope_parameters\":{{\"rope_type\":\"default\"}},\"rope_scaling\":{{\"rope_type\":\"default\",\"factor\":\"abc\"}}}}"
        ))
        .unwrap_err()
        .to_string();
        assert!(text.contains("rope_scaling.factor"), "{text}");
    }

    #[test]
    fn llama3_scaling_in_rope_scaling_is_read() {
        let c = parse(&format!(
            "{{{BASE},\"rope_theta\":5e5,\"rope_scaling\":{{\"rope_type\":\"llama3\",\"factor\":8.0,\
             \"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192}}}}"
        ))
        .unwrap();
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn errors_name_the_field() {
        let missing =
            parse(&format!("{{{}}}", BASE.replace(r#""intermediate_size":96,"#, ""))).unwrap_err().to_string();
        assert!(missing.contains("config.json") && missing.contains("intermediate_size"), "{missing}");
        let yarn = parse(&format!("{{{BASE},\"rope_scaling\":{{\"type\":\"yarn\",\"factor\":2}}}}")).unwrap_err();
        assert!(yarn.to_string().contains("rope_scaling.rope_type") && yarn.to_string().contains("yarn"), "{yarn}");
        let other = parse(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(other.contains("gpt2") && other.contains("llama"), "{other}");
        let gqa = parse(&format!("{{{BASE},\"num_key_value_heads\":3}}")).unwrap_err().to_string();
        assert!(gqa.contains("num_key_value_heads"), "{gqa}");
    }

    #[test]
    fn a_bad_dtype_is_named_by_the_key_it_came_from() {
        let new = parse(&format!("{{{BASE},\"dtype\":\"int8\"}}")).unwrap_err().to_string();
        assert!(new.contains("field `dtype`") && new.contains("int8"), "{new}");
        let old = parse(&format!("{{{BASE},\"torch_dtype\":\"int8\"}}")).unwrap_err().to_string();
        assert!(old.contains("field `torch_dtype`"), "{old}");
    }

    #[test]
    fn non_finite_and_absurd_values_are_refused() {
        for (json, field) in [
            (format!("{{{BASE},\"rope_theta\":0}}"), "rope_theta"),
            (format!("{{{BASE},\"rms_norm_eps\":-1}}"), "rms_norm_eps"),
            (
                format!("{{{}}}", BASE.replace("\"num_hidden_layers\":3", "\"num_hidden_layers\":1000000000000")),
                "num_hidden_layers",
            ),
        ] {
            let e = parse(&json).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
