//! The text corpus for CE and KL: documents from a local text or jsonl file, a seeded sample of them, each
//! cut to its first tokens (the reference takes 100 OpenWebText documents × 128 tokens).

use std::path::Path;

use crate::error::{BakeError, Result};
use crate::model::TextTokenizer;
use crate::recipe::CorpusSpec;
use crate::rng::SeededRng;

/// The sampled documents, tokenized and cut.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Index of each sampled document among the file's non-empty documents, in sample order.
    pub picked: Vec<usize>,
    pub documents: Vec<Vec<u32>>,
}

/// Reads the file's documents (non-empty after trimming).
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    let text = crate::io::fs::read_text(path, crate::io::fs::limits::DATA)?;
    parse_documents(path, &text)
}

/// The documents of a corpus file's text: jsonl lines' `text` fields, or blocks separated by blank lines.
/// `path` says which and names the file in errors.
fn parse_documents(path: &Path, text: &str) -> Result<Vec<String>> {
    let documents: Vec<String> = if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let row: serde_json::Value =
                    serde_json::from_str(l).map_err(|e| BakeError::parse(path, format!("line {}: {e}", i + 1)))?;
                row.get("text").and_then(|t| t.as_str()).map(str::to_string).ok_or_else(|| {
                    BakeError::field(path, "text", format!("line {}: expected a string field `text`", i + 1))
                })
            })
            .collect::<Result<_>>()?
    } else {
        split_paragraphs(text)
    };
    let documents: Vec<String> = documents.into_iter().filter(|d| !d.trim().is_empty()).collect();
    if documents.is_empty() {
        return Err(BakeError::content(path, "the corpus holds no documents (it is empty)"));
    }
    Ok(documents)
}

/// Blocks of text separated by lines that are empty or hold only spaces.
fn split_paragraphs(text: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    for line in text.lines() {
        if line.trim().is_empty() {
            if !out.last().expect("never empty").is_empty() {
                out.push(String::new());
            }
        } else {
            let current = out.last_mut().expect("never empty");
            if !current.is_empty() {
                current.push('\n');
            }
            current.push_str(line);
        }
    }
    out
}

/// A seeded sample of `spec.documents` documents, each tokenized and cut to `spec.tokens` tokens. Documents
/// of fewer than two tokens have no next-token prediction and are skipped.
pub fn load(spec: &CorpusSpec, tokenizer: &TextTokenizer, seed: u64) -> Result<Corpus> {
    if spec.tokens < 2 || spec.documents == 0 {
        return Err(BakeError::Invalid(format!(
            "corpus {}: documents must be ≥ 1 and tokens ≥ 2 (found {} and {})",
            spec.path.display(),
            spec.documents,
            spec.tokens
        )));
    }
    let texts = read_documents(&spec.path)?;
    let order = SeededRng::for_purpose(seed, "corpus").permutation(texts.len());
    let corpus = cut(&texts, order, spec.documents, spec.tokens, tokenizer)?;
    if corpus.documents.is_empty() {
        return Err(BakeError::content(
            &spec.path,
            "no document has the 2 tokens a next-token prediction needs, so no token can be scored",
        ));
    }
    Ok(corpus)
}

/// The first `wanted` documents of `texts` in `order` that have the 2 tokens a next-token prediction needs,
/// each tokenized and cut to `tokens` tokens.
fn cut(
    texts: &[String],
    order: impl IntoIterator<Item = usize>,
    wanted: usize,
    tokens: usize,
    tokenizer: &TextTokenizer,
) -> Result<Corpus> {
    let mut corpus = Corpus { picked: Vec::new(), documents: Vec::new() };
    for i in order {
        if corpus.documents.len() == wanted {
            break;
        }
        let mut ids = tokenizer.encode(&texts[i])?;
        ids.truncate(tokens);
        if ids.len() >= 2 {
            corpus.picked.push(i);
            corpus.documents.push(ids);
        }
    }
    Ok(corpus)
}

/// The built-in cost corpus ([`crate::data::builtin::COST_CORPUS`]): every document, in file order, each cut to
/// `tokens` tokens.
pub fn builtin(tokenizer: &TextTokenizer, tokens: usize) -> Result<Corpus> {
    let path = Path::new("builtin/corpus/wikitext2_test_sample.jsonl");
    let text = std::str::from_utf8(crate::data::builtin::COST_CORPUS).expect("the built-in corpus is UTF-8");
    let texts = parse_documents(path, text)?;
    cut(&texts, 0..texts.len(), texts.len(), tokens, tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_split_on_blank_lines() {
        let docs = split_paragraphs(" = A = \n \n line one\nline two\n\n\n last \n");
        assert_eq!(docs, vec![" = A = ", " line one\nline two", " last "]);
    }
}
