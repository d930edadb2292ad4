//! The floating-point storage dtypes `bake` reads and writes, and their little-endian encodings.

use std::borrow::Cow;

/// The storage dtype of a checkpoint's floating-point tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredDtype {
    Bf16,
    F16,
    F32,
}

impl StoredDtype {
    pub fn from_config_name(name: &str) -> Option<Self> {
        match name {
            "bfloat16" => Some(Self::Bf16),
            "float16" | "half" => Some(Self::F16),
            "float32" | "float" => Some(Self::F32),
            _ => None,
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }

    pub fn candle(self) -> candle_core::DType {
        match self {
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
            Self::F32 => candle_core::DType::F32,
        }
    }

    /// Little-endian bytes of `values` in this dtype (round to nearest even for bf16/f16, as torch does).
    pub fn encode(self, values: impl IntoIterator<Item = f32>) -> Vec<u8> {
        let values = values.into_iter();
        match self {
            Self::F32 => values.flat_map(f32::to_le_bytes).collect(),
            Self::Bf16 => values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            Self::F16 => values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect(),
        }
    }

    /// Values of little-endian bytes in this dtype, widened to f64.
    pub fn decode(self, bytes: &[u8]) -> Vec<f64> {
        match self {
            Self::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            Self::Bf16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()).collect(),
            Self::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64()).collect(),
        }
    }

    /// The largest magnitude this dtype stores as a finite number.
    pub fn max_finite(self) -> f64 {
        match self {
            Self::Bf16 => half::bf16::MAX.to_f64(),
            Self::F16 => half::f16::MAX.to_f64(),
            Self::F32 => f32::MAX as f64,
        }
    }

    /// The name transformers uses in `torch_dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
        }
    }

    pub fn safetensors_name(self) -> &'static str {
        match self {
            Self::Bf16 => "BF16",
            Self::F16 => "F16",
            Self::F32 => "F32",
        }
    }
}

/// The little-endian bytes of `values`: the values' own memory on little-endian machines (no copy), an
/// encoded copy elsewhere.
pub fn f32_le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and every byte pattern is a valid u8; the slice covers exactly the
        // values' memory and borrows it for the same lifetime.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        })
    } else {
        Cow::Owned(StoredDtype::F32.encode(values.iter().copied()))
    }
}
