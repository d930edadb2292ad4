//! TruthfulQA compiled into the binary: the default, offline, pinned dataset (`dataset.source: builtin`).
//! The files and their attribution are in `src/data/builtin/`.

/// The `dataset.source` that selects the built-in copy.
pub const SOURCE: &str = "builtin";

/// The only split TruthfulQA has.
pub const SPLIT: &str = "validation";

/// The Hub's `multiple_choice` config, as served for the pinned revision.
pub const MULTIPLE_CHOICE: &[u8] = include_bytes!("builtin/multiple_choice/validation-00000-of-00001.parquet");

/// The Hub's `generation` config, as served for the pinned revision.
pub const GENERATION: &[u8] = include_bytes!("builtin/generation/validation-00000-of-00001.parquet");

/// Ouyang et al. (2022), figure 17, as TruthfulQA's and the reference's `INSTR_DEFAULT` hold it.
pub const INSTRUCTION_DEFAULT: &str = include_str!("builtin/prompts/instruction_default.txt");

/// The same, without the clause about "I have no comment" (`INSTR_INFORMATIVE`).
pub const INSTRUCTION_INFORMATIVE: &str = include_str!("builtin/prompts/instruction_informative.txt");

/// TruthfulQA's `preset_map['qa']`: six question–answer pairs, joined by blank lines.
pub const QA_PRIMER: &str = include_str!("builtin/prompts/qa_primer.txt");

/// The corpus every bake measures its cost on when the recipe names none: the beginnings of 20 WikiText-2 test
/// articles (CC BY-SA 3.0; `builtin/corpus/README.md` attributes them).
pub const COST_CORPUS: &[u8] = include_bytes!("builtin/corpus/wikitext2_test_sample.jsonl");

/// How reports name [`COST_CORPUS`].
pub const COST_CORPUS_NAME: &str = "built-in: WikiText-2 test, first 20 articles (CC BY-SA 3.0)";

/// The built-in bytes of one config, under the file name the Hub serves it as.
pub fn file(config: &str) -> Option<(String, &'static [u8])> {
    let bytes = match config {
        "multiple_choice" => MULTIPLE_CHOICE,
        "generation" => GENERATION,
        _ => return None,
    };
    Some((format!("{config}/{SPLIT}-00000-of-00001.parquet"), bytes))
}
