//! The recipe's typed choices that are written as words (`auto`, `cuda:1`, `bf16`): each read once, when the
//! recipe or the flag is read, into a value nothing below has to parse again.

use serde::{Deserialize, Serialize};

/// How many tokens a batch of the activation pass may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchTokens {
    /// Chosen from the model's shape and the memory the run may use
    /// ([`crate::activations::plan::auto_batch_tokens`]).
    #[default]
    Auto,
    Fixed(usize),
}

impl Serialize for BatchTokens {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            BatchTokens::Auto => s.serialize_str("auto"),
            BatchTokens::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for BatchTokens {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(BatchTokens::Fixed(n as usize)),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for BatchTokens {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BatchTokens::Auto),
            n => n.parse().map(BatchTokens::Fixed).map_err(|_| format!("a number of tokens or `auto`, found `{n}`")),
        }
    }
}

impl std::fmt::Display for BatchTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            BatchTokens::Auto => f.write_str("auto"),
            BatchTokens::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Where the forward pass runs, as a recipe or `--device` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA's first GPU when bake is built with CUDA and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// `cuda` (the first GPU) or `cuda:N`; kept apart so that a recipe is written back as it was read.
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Ok(DeviceChoice::Cuda(Some(n))),
                None => Err(format!("expected cpu, cuda, cuda:N or auto, found `{other}`")),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The dtype of the forward pass's matmuls, as a recipe or `--dtype` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// f32 on the CPU, the checkpoint's dtype on a GPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for DtypeChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DtypeChoice::Auto),
            "f32" => Ok(DtypeChoice::F32),
            "bf16" => Ok(DtypeChoice::Bf16),
            "f16" => Ok(DtypeChoice::F16),
            other => Err(format!("expected auto, f32, bf16 or f16, found `{other}`")),
        }
    }
}

impl std::fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "f32",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::F16 => "f16",
        })
    }
}

/// Serde as the text `FromStr` reads and `Display` writes: the recipe holds the typed value, the YAML the word,
/// and a bad word is an error at its line and column.
macro_rules! serde_as_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_text!(DeviceChoice, DtypeChoice);
