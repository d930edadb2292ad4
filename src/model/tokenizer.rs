//! `tokenizer.json` through the `tokenizers` crate, with the model's own special-token behaviour: whatever
//! the file's post-processor adds (LLaMA-2 adds BOS, SmolLM2 adds nothing) is what `bake` adds.

use std::path::{Path, PathBuf};

use crate::error::{BakeError, Result};

pub struct TextTokenizer {
    path: PathBuf,
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(BakeError::Tokenizer {
                path: path.into(),
                message: "missing; bake needs the model's tokenizer.json (fast tokenizer format)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| BakeError::Tokenizer { path: path.into(), message: e.to_string() })?;
        Ok(TextTokenizer { path: path.into(), inner })
    }

    /// Token ids as `tokenizer(text).input_ids` gives them in transformers (special tokens included).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Token ids and each token's byte span in `text` (special tokens get an empty span).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| BakeError::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }
}
