//! `tokenizer.json` through the `tokenizers` crate, with the model's own special-token behaviour: whatever
//! the file's post-processor adds (LLaMA-2 adds BOS, SmolLM2 adds nothing) is what `bake` adds.

use std::path::{Path, PathBuf};

use crate::error::{BakeError, Result};

/// A token's byte range in the text it came from.
pub type Span = (usize, usize);

pub struct TextTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
    /// The model's vocabulary size, when known: an id at or above it is refused (the forward pass could only
    /// fail on it, far from the cause).
    vocab_size: Option<usize>,
}

impl TextTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(BakeError::Tokenizer {
                path: path.into(),
                message: "missing; bake needs the model's tokenizer.json (fast tokenizer format)".into(),
            });
        }
        let bytes = crate::io::fs::read_bytes(path, crate::io::fs::limits::TOKENIZER)?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| BakeError::Tokenizer { path: path.into(), message: e.to_string() })?;
        Ok(TextTokenizer { path: path.into(), inner, vocab_size: None })
    }

    /// The same tokenizer, refusing ids outside a model vocabulary of `vocab_size`.
    pub fn for_vocabulary(self, vocab_size: usize) -> Self {
        TextTokenizer { vocab_size: Some(vocab_size), ..self }
    }

    /// Token ids as `tokenizer(text).input_ids` gives them in transformers (special tokens included).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Token ids and each token's byte span in `text` (special tokens get an empty span).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| BakeError::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        let ids = encoding.get_ids();
        if let Some(vocab) = self.vocab_size {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                let start: String = text.chars().take(60).collect();
                return Err(BakeError::Tokenizer {
                    path: self.path.clone(),
                    message: format!(
                        "token id {id} (for `{start}`) is outside the model's vocabulary (vocab_size {vocab} in \
                         config.json): the tokenizer does not belong to this model"
                    ),
                });
            }
        }
        Ok((ids.to_vec(), encoding.get_offsets().to_vec()))
    }
}
