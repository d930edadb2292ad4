//! The library's one error type. Every variant says which file (or model, or field) is wrong and what was
//! expected, so the CLI can print it as is.

use std::path::PathBuf;

/// Everything that can go wrong inside `bake`.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON or YAML file is not well-formed or does not have the expected structure.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },

    /// A field of a configuration file is missing or has a value `bake` cannot use.
    #[error("{path}: field `{field}`: {expected}")]
    Field { path: PathBuf, field: String, expected: String },

    /// The model is of an architecture or storage format `bake` does not handle.
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },

    /// A safetensors file is malformed (bad header, truncated data, offsets out of range).
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    /// A tensor the configuration calls for is missing, or has the wrong shape or dtype.
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor { path: PathBuf, tensor: String, message: String },

    /// `--model` names nothing `bake` can find.
    #[error("{0}")]
    ModelNotFound(String),

    /// A Hugging Face Hub request failed.
    #[error("Hugging Face Hub: {0}")]
    Hub(String),

    /// The tokenizer could not be loaded or failed on an input.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// A user-supplied value (flag, recipe value, dataset content) is out of range.
    #[error("{0}")]
    Invalid(String),

    /// The output already exists, or lies somewhere it must not.
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },

    /// A tensor computation failed. This is a bug or an out-of-memory condition, not bad input.
    #[error("tensor computation: {0}")]
    Compute(#[from] candle_core::Error),
}

pub type Result<T, E = BakeError> = std::result::Result<T, E>;

impl BakeError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BakeError::Io { path: path.into(), source }
    }

    pub fn parse(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        BakeError::Parse { path: path.into(), message: message.to_string() }
    }

    pub fn field(path: impl Into<PathBuf>, field: impl Into<String>, expected: impl Into<String>) -> Self {
        BakeError::Field { path: path.into(), field: field.into(), expected: expected.into() }
    }

    pub fn tensor(path: impl Into<PathBuf>, tensor: impl Into<String>, message: impl Into<String>) -> Self {
        BakeError::Tensor { path: path.into(), tensor: tensor.into(), message: message.into() }
    }
}

/// Attaches a path to `std::io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| BakeError::io(path, source))
    }
}
