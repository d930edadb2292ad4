//! GGUF, the file format of llama.cpp and ollama: read (memory-mapped, every offset checked against the file
//! before anything is used) and written back. Version 3 as `ggml/docs/gguf.md` specifies it: a header of
//! typed metadata key-value pairs and tensor descriptions, then the tensors' data, each aligned.
//!
//! Metadata values are kept as they were read (strings as bytes: the format does not promise UTF-8 in every
//! file), so that writing a value back gives the bytes it was read from.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{BakeError, IoContext, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;

/// A metadata value, with the type it was stored as.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(Vec<u8>),
    /// The element type's code and the elements.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn string(text: &str) -> Value {
        Value::Str(text.as_bytes().to_vec())
    }

    fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any non-negative integer, whatever its width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    /// How a message shows it: strings quoted, arrays by length.
    pub fn describe(&self) -> String {
        match self {
            Value::Str(bytes) => format!("\"{}\"", String::from_utf8_lossy(bytes)),
            Value::Array(_, items) => format!("an array of {} values", items.len()),
            Value::Bool(b) => b.to_string(),
            v => v.as_f64().map(|x| x.to_string()).unwrap_or_default(),
        }
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend(v.to_le_bytes()),
            Value::U16(v) => out.extend(v.to_le_bytes()),
            Value::I16(v) => out.extend(v.to_le_bytes()),
            Value::U32(v) => out.extend(v.to_le_bytes()),
            Value::I32(v) => out.extend(v.to_le_bytes()),
            Value::F32(v) => out.extend(v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::Str(bytes) => write_bytes(out, bytes),
            Value::Array(code, items) => {
                out.extend(code.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|item| item.write_to(out));
            }
            Value::U64(v) => out.extend(v.to_le_bytes()),
            Value::I64(v) => out.extend(v.to_le_bytes()),
            Value::F64(v) => out.extend(v.to_le_bytes()),
        }
    }
}

/// A ggml tensor type: its code, name and how its values are packed along the first dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub code: u32,
    pub name: &'static str,
    /// Values per block.
    pub block: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

/// Every type of ggml's `ggml_type` enum that a GGUF may hold (the table of gguf-py's `GGML_QUANT_SIZES`).
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType { code: 0, name: "F32", block: 1, block_bytes: 4 };

    pub fn from_code(code: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.0 == code).map(|&(code, name, block, block_bytes)| GgmlType {
            code,
            name,
            block,
            block_bytes,
        })
    }
}

/// A tensor's description in the header. `dims` are GGUF's, fastest-varying first (the reverse of the
/// row-major shape safetensors and PyTorch give); `offset` is relative to the start of the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of one row (the first dimension's values).
    pub fn row_bytes(&self) -> u64 {
        self.dims[0] / self.ggml_type.block * self.ggml_type.block_bytes
    }

    pub fn rows(&self) -> u64 {
        self.dims[1..].iter().product()
    }

    pub fn byte_len(&self) -> u64 {
        self.row_bytes() * self.rows()
    }

    fn write_to(&self, out: &mut Vec<u8>) {
        write_bytes(out, self.name.as_bytes());
        out.extend((self.dims.len() as u32).to_le_bytes());
        self.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(self.ggml_type.code.to_le_bytes());
        out.extend(self.offset.to_le_bytes());
    }
}

/// The header of a GGUF: everything but the tensors' data.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.alignment`, or GGUF's default of 32.
    pub fn alignment(&self) -> u64 {
        self.get("general.alignment").and_then(Value::as_u64).unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The header's bytes, padded to the alignment: the data section starts right after them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(MAGIC);
        out.extend(VERSION.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_bytes(&mut out, key.as_bytes());
            out.extend(value.type_code().to_le_bytes());
            value.write_to(&mut out);
        }
        self.tensors.iter().for_each(|t| t.write_to(&mut out));
        out.resize(align(out.len() as u64, self.alignment()) as usize, 0);
        out
    }
}

/// An open GGUF file: its header, checked, and its bytes mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    /// Where the data section starts in the file.
    data_start: u64,
    map: memmap2::Mmap,
}

impl GgufFile {
    /// Maps `path` and reads its header; every tensor's data must lie inside the file, aligned, without
    /// overlapping another's.
    pub fn open(path: &Path) -> Result<Self> {
        let file = crate::io::fs::open_regular(path)?;
        // SAFETY: read-only map of a file bake does not modify; a concurrent writer could change the bytes
        // under us, as with the safetensors inputs, which would give wrong data, not undefined reads here.
        let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
        let invalid = |message: String| BakeError::Gguf { path: path.into(), message };
        let (header, header_len) = Reader { bytes: &map, at: 0 }.header().map_err(invalid)?;
        let alignment = header.alignment();
        if !alignment.is_power_of_two() {
            return Err(invalid(format!("general.alignment is {alignment}; expected a power of two")));
        }
        let data_start = align(header_len, alignment);
        check_tensor_ranges(&header, data_start, map.len() as u64).map_err(invalid)?;
        Ok(GgufFile { path: path.into(), header, data_start, map })
    }

    /// A tensor's bytes as stored.
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        let start = (self.data_start + tensor.offset) as usize;
        &self.map[start..start + tensor.byte_len() as usize]
    }

    /// Writes a tensor's bytes to `out` as stored, a slice at a time, handing each slice's mapped pages back
    /// to the kernel once written: copying a file holds at most one slice of it in memory.
    pub fn copy_data(&self, tensor: &TensorInfo, out: &mut dyn Write) -> std::io::Result<()> {
        const SLICE: usize = 16 << 20;
        let start = (self.data_start + tensor.offset) as usize;
        for from in (0..tensor.byte_len() as usize).step_by(SLICE) {
            let len = SLICE.min(tensor.byte_len() as usize - from);
            out.write_all(&self.map[start + from..start + from + len])?;
            self.release(start + from, len);
        }
        Ok(())
    }

    /// Hands mapped pages back to the kernel once they have been read.
    pub fn release_data(&self, tensor: &TensorInfo) {
        self.release((self.data_start + tensor.offset) as usize, tensor.byte_len() as usize);
    }

    fn release(&self, offset: usize, len: usize) {
        // SAFETY: read-only map; dropped pages are read again from the file if touched.
        let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
}

/// Where a value aligned to `alignment` may start at or after `at`.
pub fn align(at: u64, alignment: u64) -> u64 {
    at.div_ceil(alignment) * alignment
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u64).to_le_bytes());
    out.extend(bytes);
}

fn check_tensor_ranges(header: &Header, data_start: u64, file_len: u64) -> std::result::Result<(), String> {
    let alignment = header.alignment();
    let mut ranges = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        if t.offset % alignment != 0 {
            return Err(format!("tensor `{}` starts at offset {}, not a multiple of {alignment}", t.name, t.offset));
        }
        let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.byte_len()));
        match end {
            Some(end) if end <= file_len => ranges.push((t.offset, t.offset + t.byte_len(), &t.name)),
            _ => {
                return Err(format!(
                    "tensor `{}`'s data ({} bytes at byte {}) ends past the end of the file ({file_len} bytes): \
                     the file is truncated",
                    t.name,
                    t.byte_len(),
                    data_start.saturating_add(t.offset)
                ))
            }
        }
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(format!("the data of tensors `{}` and `{}` overlap", pair[0].2, pair[1].2));
        }
    }
    Ok(())
}

/// A bounds-checked cursor over the header's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

type Parsed<T> = std::result::Result<T, String>;

impl Reader<'_> {
    fn take(&mut self, n: u64, what: &str) -> Parsed<&[u8]> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(format!("{what} at byte {} needs {n} bytes, the file has {left} left: truncated", self.at));
        }
        let slice = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parsed<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Parsed<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Parsed<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bytes(&mut self, what: &str) -> Parsed<Vec<u8>> {
        let len = self.u64(what)?;
        Ok(self.take(len, what)?.to_vec())
    }

    fn text(&mut self, what: &str) -> Parsed<String> {
        String::from_utf8(self.bytes(what)?).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// A count of items that take at least `min_bytes` each: one larger than the rest of the file could hold
    /// is refused before anything is allocated for it.
    fn count(&mut self, what: &str, min_bytes: u64) -> Parsed<u64> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_bytes) > left {
            return Err(format!("{what} is {n}, more than the {left} bytes left could hold: truncated or corrupt"));
        }
        Ok(n)
    }

    fn header(mut self) -> Parsed<(Header, u64)> {
        if self.take(4, "the magic number")? != MAGIC {
            return Err("does not start with `GGUF`".into());
        }
        let version = self.u32("the version")?;
        if version != VERSION {
            return Err(format!("GGUF version {version}; bake reads version {VERSION}"));
        }
        let tensor_count = self.count("the tensor count", 8 + 4 + 8 + 4 + 8)?;
        let kv_count = self.count("the metadata count", 8 + 4 + 1)?;
        let mut metadata = Vec::with_capacity(kv_count as usize);
        for _ in 0..kv_count {
            let key = self.text("a metadata key")?;
            let code = self.u32(&format!("the type of `{key}`"))?;
            let value = self.value(code, &key, 0)?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            tensors.push(self.tensor_info()?);
        }
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|p| p[0] == p[1]) {
            return Err(format!("tensor `{}` is described twice", pair[0]));
        }
        Ok((Header { metadata, tensors }, self.at as u64))
    }

    fn value(&mut self, code: u32, key: &str, depth: usize) -> Parsed<Value> {
        let what = format!("the value of `{key}`");
        Ok(match code {
            0 => Value::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what} is a bool stored as {b}; expected 0 or 1")),
            },
            8 => Value::Str(self.bytes(&what)?),
            9 if depth == 0 => {
                let element = self.u32(&what)?;
                let n = self.count(&format!("the length of `{key}`"), 1)?;
                let items = (0..n).map(|_| self.value(element, key, depth + 1)).collect::<Parsed<Vec<_>>>()?;
                Value::Array(element, items)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            9 => return Err(format!("`{key}` nests arrays, which bake does not read")),
            _ => return Err(format!("`{key}` has value type {code}; expected 0 to 12")),
        })
    }

    fn tensor_info(&mut self) -> Parsed<TensorInfo> {
        let name = self.text("a tensor name")?;
        let n_dims = self.u32(&format!("the dimension count of `{name}`"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions; expected 1 to {MAX_DIMS}"));
        }
        let dims = (0..n_dims).map(|_| self.u64(&format!("the shape of `{name}`"))).collect::<Parsed<Vec<_>>>()?;
        let code = self.u32(&format!("the type of `{name}`"))?;
        let ggml_type = GgmlType::from_code(code)
            .ok_or_else(|| format!("tensor `{name}` has ggml type {code}, which bake does not know"))?;
        if dims[0] % ggml_type.block != 0 {
            return Err(format!(
                "tensor `{name}`: a row of {} values is not a whole number of {} blocks of {}",
                dims[0], ggml_type.name, ggml_type.block
            ));
        }
        if dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).is_none() {
            return Err(format!("tensor `{name}` has a shape {dims:?} too large to address"));
        }
        let offset = self.u64(&format!("the offset of `{name}`"))?;
        Ok(TensorInfo { name, dims, ggml_type, offset })
    }
}

/// Writes a GGUF: the header, then each tensor's data at its offset, in the order of the offsets, the gaps
/// zero-filled. `data(i, tensor, out)` writes the bytes of `header.tensors[i]`.
pub fn write(
    out: &mut impl Write,
    header: &Header,
    mut data: impl FnMut(usize, &TensorInfo, &mut dyn Write) -> Result<()>,
    path: &Path,
) -> Result<()> {
    out.write_all(&header.to_bytes()).at(path)?;
    let mut at = 0u64;
    let mut order: Vec<usize> = (0..header.tensors.len()).collect();
    order.sort_by_key(|&i| header.tensors[i].offset);
    for i in order {
        let tensor = &header.tensors[i];
        assert!(tensor.offset >= at, "tensor data do not overlap");
        out.write_all(&vec![0u8; (tensor.offset - at) as usize]).at(path)?;
        let mut counted = CountingWriter { inner: &mut *out, bytes: 0 };
        data(i, tensor, &mut counted)?;
        assert_eq!(counted.bytes, tensor.byte_len(), "tensor `{}` written whole", tensor.name);
        at = tensor.offset + tensor.byte_len();
    }
    Ok(())
}

struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    bytes: u64,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Header {
        let f32_tensor = |name: &str, dims: Vec<u64>, offset| TensorInfo {
            name: name.into(),
            dims,
            ggml_type: GgmlType::F32,
            offset,
        };
        Header {
            metadata: vec![
                ("general.architecture".into(), Value::string("llama")),
                ("llama.block_count".into(), Value::U32(1)),
                ("tokenizer.ggml.scores".into(), Value::Array(6, vec![Value::F32(0.5), Value::F32(-1.0)])),
            ],
            tensors: vec![f32_tensor("a", vec![3], 0), f32_tensor("b", vec![2, 2], 32)],
        }
    }

    fn written(header: &Header) -> Vec<u8> {
        let mut bytes = Vec::new();
        write(&mut bytes, header, |_, t, w| w.write_all(&vec![7u8; t.byte_len() as usize]).at("x"), Path::new("x"))
            .unwrap();
        bytes
    }

    #[test]
    fn a_written_header_reads_back_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, written(&tiny())).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.header, tiny());
        assert_eq!(file.data(&file.header.tensors[1]), &[7u8; 16]);
    }

    #[test]
    fn an_alignment_that_is_no_power_of_two_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aligned.gguf");
        let mut header = tiny();
        header.metadata.push(("general.alignment".into(), Value::U32(32)));
        let valid = written(&header);
        // The key, its type (u32), then its value: set in place to what a writer cannot align to.
        let at = valid.windows(17).position(|w| w == b"general.alignment").unwrap() + 17 + 4;
        for alignment in [0u32, 24] {
            let mut bytes = valid.clone();
            bytes[at..at + 4].copy_from_slice(&alignment.to_le_bytes());
            std::fs::write(&path, bytes).unwrap();
            let error = GgufFile::open(&path).err().unwrap().to_string();
            assert!(error.contains(&format!("general.alignment is {alignment}")), "{error}");
        }
    }

    #[test]
    fn a_truncated_file_names_the_tensor_whose_data_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.gguf");
        let bytes = written(&tiny());
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let error = GgufFile::open(&path).err().unwrap().to_string();
        assert!(error.contains("tensor `b`") && error.contains("truncated"), "{error}");
        std::fs::write(&path, &bytes[..40]).unwrap();
        let error = GgufFile::open(&path).err().unwrap().to_string();
        assert!(error.contains("truncated"), "{error}");
    }
}
