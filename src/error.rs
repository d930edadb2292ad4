//! The library's one error type. Every variant says which file (or model, or field) is wrong and what was
//! expected, so the CLI can print it as is.

use std::path::PathBuf;

/// Everything that can go wrong inside `bake`.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// A file could not be read or written. The OS error is part of the message, not a `source`, so that
    /// error chains print it once.
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },

    /// An input file is not something `bake` may read: not a regular file, or larger than such a file can be.
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },

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

    /// A GGUF file is malformed (bad header, truncated data, offsets out of range).
    #[error("{path}: not a valid GGUF file: {message}")]
    Gguf { path: PathBuf, message: String },

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

    /// A file or folder bake could read holds something it cannot use: a dataset without questions, a corpus
    /// without a scorable document, a folder that fails `bake verify`, a bake of another base.
    #[error("{path}: {message}")]
    Content { path: PathBuf, message: String },

    /// A value is out of range or inconsistent with another (a recipe value, an option, a count).
    #[error("{0}")]
    Invalid(String),

    /// The output already exists, or lies somewhere it must not.
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },

    /// A file could not be encoded (an image, say) for a reason other than I/O.
    #[error("{path}: could not encode: {message}")]
    Encode { path: PathBuf, message: String },

    /// A computation produced a value that is not finite (NaN or infinite); the message names where.
    #[error("{0}")]
    NotFinite(String),

    /// A tensor computation failed. This is a bug or an out-of-memory condition, not bad input.
    #[error("tensor computation: {0}")]
    Compute(candle_core::Error),
}

impl From<candle_core::Error> for BakeError {
    fn from(error: candle_core::Error) -> Self {
        BakeError::Compute(error)
    }
}

pub type Result<T, E = BakeError> = std::result::Result<T, E>;

impl BakeError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        BakeError::Io { path: path.into(), error: source }
    }

    pub fn parse(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        BakeError::Parse { path: path.into(), message: message.to_string() }
    }

    pub fn content(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        BakeError::Content { path: path.into(), message: message.into() }
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

/// An error and its causes on one line, each cause once: libraries often repeat their source's message (or
/// a URL) in their own, which reads as "X (U) (U): X".
pub fn describe_chain(error: &dyn std::error::Error) -> String {
    let mut message = collapse_repeated_groups(&error.to_string());
    let mut source = error.source();
    while let Some(cause) = source {
        let text = collapse_repeated_groups(&cause.to_string());
        if !text.is_empty() && !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}

/// `a (x) (x)` → `a (x)`.
fn collapse_repeated_groups(text: &str) -> String {
    let mut out = text.to_string();
    let mut search_from = 0;
    while let Some(open) = out[search_from..].find('(').map(|i| i + search_from) {
        let Some(close) = out[open..].find(')').map(|i| i + open) else { break };
        let group = out[open..=close].to_string();
        let repeat = format!(" {group}");
        while out[close + 1..].starts_with(&repeat) {
            out.replace_range(close + 1..close + 1 + repeat.len(), "");
        }
        search_from = close + 1;
    }
    out
}

/// User input quoted in a message, cut to `max` characters: a 100 KB argument must not flood the terminal.
pub fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}… ({} characters)", &text[..cut], text.chars().count()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_groups_and_causes_print_once() {
        assert_eq!(
            collapse_repeated_groups("error sending request for url (http://h/x) (http://h/x)"),
            "error sending request for url (http://h/x)"
        );
        let io = std::io::Error::other("connection refused");
        let outer = BakeError::Hub(format!("a: {io}"));
        assert_eq!(describe_chain(&outer), "Hugging Face Hub: a: connection refused");
    }

    #[test]
    fn long_input_is_shortened() {
        let long = "x".repeat(100_000);
        let short = shorten(&long, 50);
        assert!(short.len() < 80 && short.contains("100000 characters"), "{short}");
        assert_eq!(shorten("abc", 50), "abc");
    }
}
