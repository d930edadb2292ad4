//! TruthfulQA as the Hub serves it: the `multiple_choice` config (probe labels, and the question order every
//! index in `bake` refers to) and the `generation` config (answers for the tuning prompts), from a local
//! folder in the HF layout, the Hub, or the copy built into the binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::builtin;
use crate::error::{BakeError, Result};
use crate::io::fs::limits;
use crate::io::hub::{Repo, RepoKind};

/// One question, in multiple_choice order, with its generation-config answers.
#[derive(Debug, Clone)]
pub struct Question {
    pub question: String,
    /// mc2 choices and labels (true = correct), in file order.
    pub mc2: Vec<(String, bool)>,
    /// mc1 choices; the first is the correct one.
    pub mc1: Vec<String>,
    /// The question as the generation config (and the reference's CSV) spells it; it differs from
    /// `question` by a trailing space once. The MC evaluation prompts use it.
    pub generation_question: String,
    pub best_answer: String,
    /// Generation-config answers as listed (empty strings kept, as the reference does).
    pub correct_answers: Vec<String>,
    pub incorrect_answers: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TruthfulQa {
    pub questions: Vec<Question>,
    /// sha256 of the two source files, for cache keys and manifests.
    pub files: Vec<(PathBuf, String)>,
}

impl TruthfulQa {
    /// Reads the `multiple_choice` and `generation` configs from the copy built into `bake` (`builtin`), a
    /// local folder in the HF layout (`<config>/<split>.jsonl` or `<config>/<split>-00000-of-00001.parquet`)
    /// or a Hub dataset repository (its parquet files), keeping the first `limit` questions in
    /// multiple_choice order.
    pub fn load(source: &str, split: &str, limit: Option<usize>) -> Result<Self> {
        let mc = DataFile::find(source, "multiple_choice", split)?;
        let gen_file = DataFile::find(source, "generation", split)?;
        let (mc_path, gen_path) = (mc.path.clone(), gen_file.path.clone());
        let mc_rows = mc.rows()?;
        let gen_rows = gen_file.rows()?;
        let mut generation: HashMap<String, (usize, &Value)> = HashMap::new();
        for (line, row) in gen_rows.iter().enumerate() {
            let question = string_field(&gen_path, line, row, "question")?;
            generation.insert(question.trim().to_string(), (line, row));
        }
        let take = limit.unwrap_or(usize::MAX).min(mc_rows.len());
        let mut questions = Vec::with_capacity(take);
        for (line, row) in mc_rows.iter().enumerate().take(take) {
            let question = string_field(&mc_path, line, row, "question")?;
            let mc2 = targets(&mc_path, line, row, "mc2_targets")?;
            let mc1 = targets(&mc_path, line, row, "mc1_targets")?.into_iter().map(|(c, _)| c).collect();
            if !mc2.iter().any(|(_, t)| *t) || mc2.iter().all(|(_, t)| *t) {
                return Err(BakeError::content(
                    &mc_path,
                    format!(
                        "line {}: question `{question}` needs at least one true and one false mc2 answer",
                        line + 1
                    ),
                ));
            }
            let Some(&(gen_line, gen_row)) = generation.get(question.trim()) else {
                return Err(BakeError::content(
                    &gen_path,
                    format!("no row for the question `{question}` of {} line {}", mc_path.display(), line + 1),
                ));
            };
            questions.push(Question {
                question,
                mc2,
                mc1,
                generation_question: string_field(&gen_path, gen_line, gen_row, "question")?,
                best_answer: string_field(&gen_path, gen_line, gen_row, "best_answer")?,
                correct_answers: strings_field(&gen_path, gen_line, gen_row, "correct_answers")?,
                incorrect_answers: strings_field(&gen_path, gen_line, gen_row, "incorrect_answers")?,
            });
        }
        if questions.is_empty() {
            return Err(BakeError::content(&mc_path, "the dataset has no questions"));
        }
        let files = vec![(mc_path, mc.sha256()), (gen_path, gen_file.sha256())];
        Ok(TruthfulQa { questions, files })
    }

    /// A hash of the data actually used (files and limit).
    pub fn fingerprint(&self) -> String {
        let mut parts: Vec<String> = self.files.iter().map(|(_, h)| h.clone()).collect();
        parts.push(self.questions.len().to_string());
        parts.join(":")
    }
}

/// Where a recipe's `dataset.source` points, worked out in this one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetSource<'a> {
    /// The copy built into bake.
    Builtin,
    /// A local folder in the Hub's layout.
    Folder(&'a Path),
    /// A Hub dataset id `org/name`.
    Hub(&'a str),
    /// None of them.
    Unknown,
}

impl<'a> DatasetSource<'a> {
    pub fn of(source: &'a str) -> Self {
        if source == builtin::SOURCE {
            DatasetSource::Builtin
        } else if Path::new(source).is_dir() {
            DatasetSource::Folder(Path::new(source))
        } else if crate::model::resolve::parse_repo_id(source).is_some_and(|(_, rev)| rev.is_none()) {
            DatasetSource::Hub(source)
        } else {
            DatasetSource::Unknown
        }
    }

    /// The local folder, if that is what it is.
    pub fn folder(self) -> Option<&'a Path> {
        match self {
            DatasetSource::Folder(dir) => Some(dir),
            _ => None,
        }
    }
}

/// One config's file, read whole (a TruthfulQA file is about 1 MB), from wherever the source names.
struct DataFile {
    /// Where it came from; for the built-in copy, `builtin/<config>/<file>`. The manifest keys it by its
    /// last two components, so the built-in copy and the same files from the Hub record the same entries.
    path: PathBuf,
    bytes: bytes::Bytes,
}

impl DataFile {
    fn find(source: &str, config: &str, split: &str) -> Result<Self> {
        let path = match DatasetSource::of(source) {
            DatasetSource::Builtin => return Self::builtin(config, split),
            DatasetSource::Folder(dir) => config_file(dir, config, split)?,
            DatasetSource::Hub(id) => {
                let repo = Repo { kind: RepoKind::Dataset, id, revision: None };
                repo.fetch(&format!("{config}/{split}-00000-of-00001.parquet"))?
            }
            DatasetSource::Unknown => {
                return Err(BakeError::Invalid(format!(
                    "dataset `{}`: neither `{}` (the copy built into bake), a local folder nor a Hub dataset id \
                     (org/name)",
                    crate::error::shorten(source, 100),
                    builtin::SOURCE
                )))
            }
        };
        let bytes = crate::io::fs::read_bytes(&path, limits::DATA)?;
        Ok(DataFile { path, bytes: bytes.into() })
    }

    fn builtin(config: &str, split: &str) -> Result<Self> {
        if split != builtin::SPLIT {
            return Err(BakeError::Invalid(format!(
                "dataset split `{}`: the built-in TruthfulQA has only `{}`",
                crate::error::shorten(split, 100),
                builtin::SPLIT
            )));
        }
        let (name, bytes) = builtin::file(config).expect("bake reads only configs it has built in");
        Ok(DataFile { path: Path::new(builtin::SOURCE).join(name), bytes: bytes::Bytes::from_static(bytes) })
    }

    fn sha256(&self) -> String {
        crate::io::hash::sha256_hex(&self.bytes)
    }

    /// Rows as JSON objects (parquet lists and structs become arrays and objects).
    fn rows(&self) -> Result<Vec<Value>> {
        if self.path.extension().is_some_and(|e| e == "parquet") {
            self.parquet_rows()
        } else {
            self.jsonl_rows()
        }
    }

    fn parquet_rows(&self) -> Result<Vec<Value>> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let path = &self.path;
        // A cheap clone: `Bytes` shares its buffer.
        let reader = SerializedFileReader::new(self.bytes.clone()).map_err(|e| BakeError::parse(path, e))?;
        let rows = reader.get_row_iter(None).map_err(|e| BakeError::parse(path, e))?;
        rows.map(|row| row.map(|r| r.to_json_value()).map_err(|e| BakeError::parse(path, e))).collect()
    }

    fn jsonl_rows(&self) -> Result<Vec<Value>> {
        let path = &self.path;
        let text = std::str::from_utf8(&self.bytes).map_err(|e| BakeError::Input {
            path: path.clone(),
            message: format!("is not UTF-8 text (byte {})", e.valid_up_to()),
        })?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| BakeError::parse(path, format!("line {}: {e}", i + 1))))
            .collect()
    }
}

fn config_file(dir: &Path, config: &str, split: &str) -> Result<PathBuf> {
    let jsonl = dir.join(config).join(format!("{split}.jsonl"));
    let parquet = dir.join(config).join(format!("{split}-00000-of-00001.parquet"));
    match (jsonl.exists(), parquet.exists()) {
        (true, _) => Ok(jsonl),
        (false, true) => Ok(parquet),
        _ => Err(BakeError::content(&jsonl, format!("missing (nor is there {})", parquet.display()))),
    }
}

fn schema_error(path: &Path, line: usize, field: &str, expected: &str) -> BakeError {
    BakeError::field(path, field, format!("line {}: expected {expected}", line + 1))
}

fn string_field(path: &Path, line: usize, row: &Value, field: &str) -> Result<String> {
    row.get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| schema_error(path, line, field, "a string"))
}

fn strings_field(path: &Path, line: usize, row: &Value, field: &str) -> Result<Vec<String>> {
    row.get(field)
        .and_then(Value::as_array)
        .and_then(|items| items.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| schema_error(path, line, field, "a list of strings"))
}

fn targets(path: &Path, line: usize, row: &Value, field: &str) -> Result<Vec<(String, bool)>> {
    let expected = "an object {choices: [string], labels: [0|1]} of equal lengths";
    let target = row.get(field).ok_or_else(|| schema_error(path, line, field, expected))?;
    let choices =
        strings_field(path, line, target, "choices").map_err(|_| schema_error(path, line, field, expected))?;
    let labels: Option<Vec<bool>> = target
        .get("labels")
        .and_then(Value::as_array)
        .and_then(|l| l.iter().map(|v| v.as_u64().filter(|&n| n <= 1).map(|n| n == 1)).collect());
    match labels {
        Some(labels) if labels.len() == choices.len() => Ok(choices.into_iter().zip(labels).collect()),
        _ => Err(schema_error(path, line, &format!("{field}.labels"), expected)),
    }
}
