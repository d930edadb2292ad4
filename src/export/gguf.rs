//! `bake gguf`: a bake's shift written into a GGUF of its base, for llama.cpp and ollama, whatever the file's
//! quantization. Every tensor and metadata key of the input is copied as is (quantized data byte for byte, the
//! data layout kept), and each shifted layer gains an F32 `blk.N.attn_output.bias` (or, for a residual bake,
//! `blk.N.ffn_down.bias`), which llama.cpp's `llama` graph adds after `attn_output` (`ffn_down`); its loader
//! creates both tensors as optional.
//!
//! Only the `llama` architecture reads that bias. A `qwen2` file is rewritten as `llama`: the two graphs differ
//! only in rotary layout (qwen2 rotates the two halves of each head, llama adjacent pairs), so the keys are
//! renamed and the query and key rows permuted within each head exactly as llama.cpp's converter permutes a
//! Hugging Face LLaMA's; a permutation moves whole rows, so quantized rows move as they are. Qwen3 (its graph
//! normalises q and k per head, and takes no output bias) and every other architecture are refused.
//!
//! Nothing is read whole: the copy goes 16 MB at a time from the mapped input, each slice's pages released
//! once written (a query or key tensor being reordered is held whole).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{BakeError, IoContext, Result};
use crate::export::manifest::Manifest;
use crate::io::gguf::{align, GgmlType, GgufFile, Header, TensorInfo, Value};
use crate::io::names::{Layer, FINAL_NORM};
use crate::io::output::{self, Ownership, Protected, Request, Target};
use crate::model::config::Family;
use crate::model::{ModelFiles, Site};
use crate::progress::Progress;

/// The metadata keys of a bake's provenance (all under `bake.`).
pub const PROVENANCE_PREFIX: &str = "bake.";

/// How the input's architecture becomes one that adds the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// A `llama` file: only the biases are added.
    None,
    /// A `qwen2` file, written as `llama`.
    Qwen2AsLlama,
}

impl Rewrite {
    /// The input's `general.architecture`.
    pub fn source_architecture(self) -> &'static str {
        match self {
            Rewrite::None => "llama",
            Rewrite::Qwen2AsLlama => "qwen2",
        }
    }

    /// What a GGUF of a `family` base is and how it is written; Qwen3 is refused, naming the bake.
    fn for_family(family: Family, bake_dir: &Path) -> Result<Rewrite> {
        match family {
            Family::Llama | Family::Mistral => Ok(Rewrite::None),
            Family::Qwen2 => Ok(Rewrite::Qwen2AsLlama),
            Family::Qwen3 => Err(BakeError::Unsupported {
                path: bake_dir.into(),
                message: "a Qwen3 bake cannot be written into a GGUF: llama.cpp's qwen3 graph has no attention \
                          output bias (its loader refuses a file with `attn_output.bias`), and Qwen3 cannot be \
                          rewritten as llama (it normalises queries and keys per head). Serve this bake with \
                          transformers."
                    .into(),
            }),
        }
    }

    /// What the GGUF's `general.architecture` asks for; architectures llama.cpp cannot bias are refused.
    fn of_file(source: &GgufFile) -> Result<Rewrite> {
        let field = "general.architecture";
        let architecture = source.header.get(field).and_then(Value::as_str).ok_or_else(|| {
            BakeError::field(&source.path, field, "a string naming the model's architecture; the key is missing")
        })?;
        match architecture {
            "llama" => Ok(Rewrite::None),
            "qwen2" => Ok(Rewrite::Qwen2AsLlama),
            "qwen3" => Err(BakeError::field(
                &source.path,
                field,
                "`llama` or `qwen2`; found `qwen3`, whose llama.cpp graph takes no attention output bias",
            )),
            other => Err(BakeError::field(
                &source.path,
                field,
                format!(
                    "`llama` (LLaMA, Mistral, SmolLM2) or `qwen2` (Qwen2, Qwen2.5), the architectures whose shift \
                     llama.cpp can apply; found `{other}`"
                ),
            )),
        }
    }
}

/// Everything a GGUF bake writes, resolved and checked before a byte is written.
pub struct GgufBake {
    pub source: GgufFile,
    pub rewrite: Rewrite,
    /// Query and key heads, whose rows a rewrite reorders.
    heads: (usize, usize),
    /// The output's header: the input's keys (renamed for a rewrite) and the provenance; the input's tensors
    /// at their offsets, then one bias per shifted layer.
    pub header: Header,
    /// The bias of each shifted layer, in layer order.
    pub biases: Vec<(usize, Vec<f32>)>,
    /// Where the bake's shift sits, and so which bias each layer gains.
    pub site: Site,
    /// The output file's name: the input's.
    pub file_name: String,
}

impl GgufBake {
    /// Reads the bake in `bake_dir` and the GGUF at `gguf`, and checks that the GGUF holds the bake's base.
    pub fn prepare(bake_dir: &Path, gguf: &Path) -> Result<Self> {
        let manifest = Manifest::read(bake_dir)?;
        let baked = ModelFiles::open(&bake_dir.to_string_lossy())?;
        let family = base_family(&manifest, &baked);
        let rewrite = Rewrite::for_family(family, bake_dir)?;
        let source = GgufFile::open(gguf)?;
        check_architecture_matches(&source, rewrite, family)?;
        check_shapes(&source, rewrite, &baked)?;
        check_norms_match(&source, &baked)?;
        let site = manifest.recipe.method.site();
        let biases = shifted_layer_biases(&baked, site)?;
        let manifest_sha256 = crate::io::hash::sha256_file(&bake_dir.join(crate::io::listing::MANIFEST_FILE))?;
        let mut header = output_header(&source.header, rewrite, (site, &biases), baked.config.hidden_size);
        header.metadata.extend(provenance(&manifest, &manifest_sha256, rewrite));
        let file_name = gguf.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or("model.gguf".into());
        let heads = (baked.config.num_heads, baked.config.num_kv_heads);
        Ok(GgufBake { source, rewrite, heads, header, biases, site, file_name })
    }

    /// Checks the output folder before any work: never one holding the bake or the input GGUF, and an existing
    /// folder only when bake wrote it (its `outputs.json`).
    pub fn check_output(out: &Path, force: bool, bake_dir: &Path, gguf: &Path) -> Result<Target> {
        let protected = vec![
            Protected { path: bake_dir, what: "the baked folder", refuse_inside: true },
            Protected { path: gguf, what: "the input GGUF", refuse_inside: false },
        ];
        output::check(&Request { out, force, protected, ownership: Ownership::Listing })
    }

    /// The layers that gain a bias, for messages: `9, 12, 14`.
    pub fn shifted_layers(&self) -> String {
        self.biases.iter().map(|(l, _)| l.to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Writes the GGUF into `dir`; its path.
    pub fn write(&self, dir: &Path, progress: &dyn Progress) -> Result<PathBuf> {
        let path = dir.join(&self.file_name);
        let file = std::fs::File::create(&path).at(&path)?;
        let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
        let copied = self.source.header.tensors.len();
        let total: u64 = self.header.tensors.iter().map(TensorInfo::byte_len).sum();
        progress.start(total, "bytes");
        crate::io::gguf::write(
            &mut out,
            &self.header,
            |i, tensor, w| {
                let written = match i < copied {
                    true => self.copy_tensor(tensor, w),
                    false => w.write_all(&crate::io::dtype::f32_le_bytes(&self.biases[i - copied].1)),
                };
                written.map_err(|e| BakeError::io(&path, e))?;
                progress.advance(tensor.byte_len());
                Ok(())
            },
            &path,
        )?;
        progress.finish();
        let file = out.into_inner().map_err(|e| BakeError::io(&path, e.into_error()))?;
        file.sync_all().at(&path)?;
        Ok(path)
    }

    /// An input tensor as stored, or with its rows permuted for a rewrite (a query or key tensor, held whole).
    fn copy_tensor(&self, tensor: &TensorInfo, out: &mut dyn Write) -> std::io::Result<()> {
        let Some(heads) = self.rotary_heads(&tensor.name) else { return self.source.copy_data(tensor, out) };
        let permuted = interleave_rotary_halves(self.source.data(tensor), unit_bytes(tensor), heads);
        self.source.release_data(tensor);
        out.write_all(&permuted)
    }

    /// For a rewrite, how many heads share the rows of a query or key tensor (weight or bias).
    fn rotary_heads(&self, tensor: &str) -> Option<usize> {
        if self.rewrite != Rewrite::Qwen2AsLlama {
            return None;
        }
        match tensor.split('.').nth(2)? {
            "attn_q" => Some(self.heads.0),
            "attn_k" => Some(self.heads.1),
            _ => None,
        }
    }
}

/// The family the bake was made from: a Mistral or Qwen2 bake is written as a Llama, and its manifest keeps
/// the base's `model_type`.
fn base_family(manifest: &Manifest, baked: &ModelFiles) -> Family {
    manifest
        .config_changes
        .get("model_type")
        .and_then(|change| change.base.as_ref()?.as_str().and_then(Family::of_model_type))
        .unwrap_or(baked.config.family)
}

/// The GGUF's architecture is the one a base of the bake's family has, and no bake has written into it.
fn check_architecture_matches(source: &GgufFile, expected: Rewrite, family: Family) -> Result<()> {
    let found = Rewrite::of_file(source)?;
    if found != expected {
        return Err(BakeError::field(
            &source.path,
            "general.architecture",
            format!(
                "`{}` (the bake's base is a {}); found `{}`: this GGUF is not of the bake's base",
                expected.source_architecture(),
                family.architecture(),
                found.source_architecture()
            ),
        ));
    }
    if source.header.metadata.iter().any(|(k, _)| k.starts_with(PROVENANCE_PREFIX)) {
        return Err(BakeError::content(
            &source.path,
            "already carries a bake's shift (its `bake.*` metadata); give the base model's GGUF",
        ));
    }
    Ok(())
}

/// The GGUF's hyperparameters and tensor shapes against the bake's config.
fn check_shapes(source: &GgufFile, rewrite: Rewrite, baked: &ModelFiles) -> Result<()> {
    let c = &baked.config;
    let architecture = rewrite.source_architecture();
    let header = &source.header;
    let number = |key: &str| header.get(&format!("{architecture}.{key}")).and_then(Value::as_u64);
    let mismatch = |key: &str, expected: usize, what: &str, found: String| {
        BakeError::field(
            &source.path,
            format!("{architecture}.{key}"),
            format!("{expected} (the bake's {what}); found {found}: this GGUF is not of the bake's base"),
        )
    };
    let kv_heads = number("attention.head_count_kv").or(number("attention.head_count"));
    for (key, expected, what, found) in [
        ("block_count", c.num_layers, "num_hidden_layers", number("block_count")),
        ("embedding_length", c.hidden_size, "hidden_size", number("embedding_length")),
        ("feed_forward_length", c.intermediate_size, "intermediate_size", number("feed_forward_length")),
        ("attention.head_count", c.num_heads, "num_attention_heads", number("attention.head_count")),
        ("attention.head_count_kv", c.num_kv_heads, "num_key_value_heads", kv_heads),
    ] {
        if found != Some(expected as u64) {
            let found = found.map(|n| n.to_string()).unwrap_or("nothing (the key is missing)".into());
            return Err(mismatch(key, expected, what, found));
        }
    }
    let shape = |name: &str, dims: [usize; 2]| -> Result<()> {
        let expected: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        match header.tensor(name) {
            Some(t) if t.dims == expected => Ok(()),
            found => Err(BakeError::tensor(
                &source.path,
                name,
                format!(
                    "expected shape {expected:?} (GGUF order: input width first) from the bake's config; found {}: \
                     this GGUF is not of the bake's base",
                    found.map(|t| format!("{:?}", t.dims)).unwrap_or("no such tensor".into())
                ),
            )),
        }
    };
    shape("token_embd.weight", [c.hidden_size, c.vocab_size])?;
    for l in 0..c.num_layers {
        shape(&format!("blk.{l}.attn_output.weight"), [c.attn_width(), c.hidden_size])?;
        if rewrite == Rewrite::Qwen2AsLlama {
            shape(&format!("blk.{l}.attn_q.weight"), [c.hidden_size, c.attn_width()])?;
            shape(&format!("blk.{l}.attn_k.weight"), [c.hidden_size, c.kv_width()])?;
        }
        let bias = format!("blk.{l}.attn_output.bias");
        if header.tensor(&bias).is_some() {
            return Err(BakeError::tensor(
                &source.path,
                bias,
                "already present: this GGUF has an attention output bias of its own, which bake would replace",
            ));
        }
    }
    Ok(())
}

/// Norm weights are stored unquantized in every GGUF: the final norm must equal the bake's (rounded to the
/// bake's dtype), which tells a fine-tune of the same shapes from the base.
fn check_norms_match(source: &GgufFile, baked: &ModelFiles) -> Result<()> {
    let name = "output_norm.weight";
    let Some(tensor) = source.header.tensor(name).filter(|t| t.ggml_type == GgmlType::F32) else { return Ok(()) };
    let ours = baked.checkpoint.load_f32(FINAL_NORM, &[baked.config.hidden_size], &candle_core::Device::Cpu)?;
    let ours: Vec<f32> = ours.to_vec1()?;
    let dtype = baked.dtype();
    let theirs = source.data(tensor).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")));
    let theirs = dtype.decode(&dtype.encode(theirs));
    let differing = theirs.iter().zip(&ours).filter(|(t, o)| **t != f64::from(**o)).count();
    if differing > 0 {
        return Err(BakeError::tensor(
            &source.path,
            name,
            format!(
                "{differing} of {} values differ from the bake's `{FINAL_NORM}` (compared in {}): \
                 this GGUF holds other weights than the bake's base",
                ours.len(),
                dtype.torch_name()
            ),
        ));
    }
    Ok(())
}

/// The bake's shift bias (o_proj's, or down_proj's) of every layer the shift touches, as f32.
fn shifted_layer_biases(baked: &ModelFiles, site: Site) -> Result<Vec<(usize, Vec<f32>)>> {
    let mut biases = Vec::new();
    let loaded = baked.site_biases(site, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    for (l, bias) in loaded.into_iter().enumerate() {
        let Some(bias) = bias else { continue };
        let bias: Vec<f32> = bias.to_vec1()?;
        if let Some(bad) = bias.iter().find(|v| !v.is_finite()) {
            let name = Layer(l).shift_bias(site);
            return Err(BakeError::tensor(&baked.location.dir, name, format!("holds {bad}; expected finite values")));
        }
        if bias.iter().any(|&v| v != 0.0) {
            biases.push((l, bias));
        }
    }
    Ok(biases)
}

/// The input's header with the keys renamed for a rewrite and a bias tensor appended per shifted layer, each
/// aligned after the input's data.
fn output_header(
    input: &Header,
    rewrite: Rewrite,
    (site, biases): (Site, &[(usize, Vec<f32>)]),
    hidden: usize,
) -> Header {
    let metadata = input
        .metadata
        .iter()
        .map(|(key, value)| match rewrite {
            Rewrite::None => (key.clone(), value.clone()),
            Rewrite::Qwen2AsLlama => renamed_for_llama(key, value),
        })
        .collect();
    let mut tensors = input.tensors.clone();
    let alignment = input.alignment();
    let mut end = tensors.iter().map(|t| t.offset + t.byte_len()).max().unwrap_or(0);
    for (layer, _) in biases {
        let offset = align(end, alignment);
        let bias = TensorInfo {
            name: gguf_bias_name(site, *layer),
            dims: vec![hidden as u64],
            ggml_type: GgmlType::F32,
            offset,
        };
        end = offset + bias.byte_len();
        tensors.push(bias);
    }
    Header { metadata, tensors }
}

/// llama.cpp's name of the bias that carries a shift at `site` in layer `layer`.
pub fn gguf_bias_name(site: Site, layer: usize) -> String {
    match site {
        Site::AttentionHeads => format!("blk.{layer}.attn_output.bias"),
        Site::Residual => format!("blk.{layer}.ffn_down.bias"),
    }
}

fn renamed_for_llama(key: &str, value: &Value) -> (String, Value) {
    match (key, key.strip_prefix("qwen2.")) {
        ("general.architecture", _) => (key.to_string(), Value::string("llama")),
        (_, Some(rest)) => (format!("llama.{rest}"), value.clone()),
        _ => (key.to_string(), value.clone()),
    }
}

/// Where the shift came from, in keys of bake's own.
fn provenance(manifest: &Manifest, manifest_sha256: &str, rewrite: Rewrite) -> Vec<(String, Value)> {
    let key = |k: &str| format!("{PROVENANCE_PREFIX}{k}");
    let heads = manifest.heads.iter().map(|h| Value::string(&format!("{}.{}", h.layer, h.head))).collect();
    let recipe = serde_json::to_string(&manifest.recipe).expect("a recipe serializes");
    let mut keys = vec![
        (key("tool_version"), Value::string(&manifest.tool_version)),
        (key("method"), Value::string(&manifest.method)),
        (key("base_model"), Value::string(&manifest.base_model)),
        (key("manifest_sha256"), Value::string(manifest_sha256)),
        (key("recipe"), Value::string(&recipe)),
        (key("heads"), Value::Array(8, heads)),
        (key("alpha"), Value::F64(manifest.recipe.alpha)),
    ];
    if rewrite != Rewrite::None {
        keys.push((key("rewritten_from"), Value::string(rewrite.source_architecture())));
    }
    keys
}

/// The bytes of one row of the permutation: a matrix's row, or a bias's single value.
fn unit_bytes(tensor: &TensorInfo) -> usize {
    match tensor.dims.len() {
        1 => (tensor.ggml_type.block_bytes / tensor.ggml_type.block) as usize,
        _ => tensor.row_bytes() as usize,
    }
}

/// Rows of each head reordered from rotary halves (Hugging Face, qwen2: `[x0 … x(d/2-1), y0 … y(d/2-1)]`) to
/// adjacent pairs (llama: `[x0, y0, x1, y1, …]`), as llama.cpp's `convert_hf_to_gguf.py` permutes LLaMA's q and k.
pub fn interleave_rotary_halves(bytes: &[u8], unit: usize, heads: usize) -> Vec<u8> {
    let rows = bytes.len() / unit;
    let half = rows / heads / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for side in 0..2 {
            for i in 0..half {
                let from = h * 2 * half + side * half + i;
                let to = h * 2 * half + 2 * i + side;
                out[to * unit..(to + 1) * unit].copy_from_slice(&bytes[from * unit..(from + 1) * unit]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_halves_interleave_as_llama_cpp_permutes_queries() {
        // One byte per row, two heads of four rows: [a0 a1 b0 b1] -> [a0 b0 a1 b1] per head.
        let rows: Vec<u8> = (0..8).collect();
        assert_eq!(interleave_rotary_halves(&rows, 1, 2), vec![0, 2, 1, 3, 4, 6, 5, 7]);
        // Rows of several bytes move whole.
        let wide: Vec<u8> = (0..8).flat_map(|r| [r, 100 + r]).collect();
        let moved = interleave_rotary_halves(&wide, 2, 2);
        assert_eq!(&moved[2..4], &[2, 102]);
    }
}
