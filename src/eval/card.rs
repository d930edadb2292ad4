//! `bake eval --card DIR`: the results table in a baked folder's model card, with the card's new sha256 in
//! the manifest, so that `bake verify` and `bake push` keep passing.
//!
//! Two files change together, so the folder is replaced as a whole: a staging copy made of hard links
//! (nothing is copied but the two new files) is swapped in atomically, as a bake replaces its output.

use std::path::Path;

use super::EvalReport;
use crate::error::{BakeError, IoContext, Result};
pub use crate::export::card::with_evaluation;
use crate::export::manifest::Manifest;
use crate::io::fs::{limits, read_text};
use crate::io::listing::{entries_under, FileEntry, MANIFEST_FILE as MANIFEST};
use crate::io::output::{self, Ownership, Published, Request};
use crate::io::safetensors::write_file;
use crate::model::ModelFiles;
use crate::recipe::Recipe;

const CARD: &str = "README.md";

/// What an evaluation compared, as the card says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compared {
    Base,
    BakedAgainstBase,
    CrossValidated { folds: usize },
}

/// The card's evaluation section for `report`: what was measured, how, and the results table.
pub fn section(report: &EvalReport, compared: Compared) -> String {
    let how = match compared {
        Compared::CrossValidated { folds } => {
            format!("ITI fitted and applied with {folds}-fold cross-validation (mean over folds)")
        }
        Compared::BakedAgainstBase => "this model (baked) against its base".to_string(),
        Compared::Base => "the base model".to_string(),
    };
    let documents = report
        .documents
        .map(|d| format!(" CE and KL(base ‖ edited) per token over {d} documents."))
        .unwrap_or_default();
    format!(
        "TruthfulQA, {} questions, {how}; MC1/MC2 as fractions.{documents} Measured with bake {}.\n\n{}",
        report.questions,
        crate::VERSION,
        super::markdown_table(report)
    )
}

/// Before any evaluation: `--card DIR` may only receive numbers about DIR's own bake. The folder must pass
/// `bake verify`'s self-consistency check and be baked from `model`; an evaluated baked folder must be DIR
/// itself; a cross-validation must fit the same K, α and direction as DIR's recipe.
pub fn check_target(
    dir: &Path,
    model: &ModelFiles,
    compared: Compared,
    baked: Option<&Path>,
    recipe: &Recipe,
) -> Result<()> {
    crate::verify::require_intact(dir, "put an evaluation into")?;
    let manifest = Manifest::read(dir)?;
    manifest.check_base(model, dir)?;
    let manifest_path = dir.join(MANIFEST);
    if let (Compared::BakedAgainstBase, Some(evaluated)) = (compared, baked) {
        let same = match (dir.canonicalize(), evaluated.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !same {
            return Err(BakeError::Output {
                path: dir.into(),
                message: format!(
                    "its card can only hold its own evaluation, and the baked folder evaluated is {}",
                    evaluated.display()
                ),
            });
        }
    }
    if let Compared::CrossValidated { .. } = compared {
        let baked_recipe = &manifest.recipe;
        let differing = [
            ("heads", recipe.heads.to_string(), baked_recipe.heads.to_string()),
            ("alpha", recipe.alpha.to_string(), baked_recipe.alpha.to_string()),
            ("direction", format!("{:?}", recipe.direction), format!("{:?}", baked_recipe.direction)),
        ];
        if let Some((field, here, there)) = differing.into_iter().find(|(_, a, b)| a != b) {
            return Err(BakeError::field(
                &manifest_path,
                format!("recipe.{field}"),
                format!(
                    "{there}, but the cross-validation fits {field} = {here}: the card would describe another shift"
                ),
            ));
        }
    }
    Ok(())
}

/// Puts `section` into the model card of the baked folder `dir`. The folder must pass `bake verify`'s file
/// check first: a tampered card or manifest would otherwise be blessed with a new hash.
pub fn put_evaluation(dir: &Path, section: &str) -> Result<Published> {
    crate::verify::require_intact(dir, "put an evaluation into")?;
    let mut manifest = Manifest::read(dir)?;
    let card = read_text(&dir.join(CARD), limits::JSON)?;

    let target =
        output::check(&Request { out: dir, force: true, protected: Vec::new(), ownership: Ownership::Manifest })?;
    let staging = target.stage()?;
    link_tree(dir, staging.path(), &[CARD, MANIFEST])?;
    let written = write_file(&staging.path().join(CARD), with_evaluation(&card, section).as_bytes())?;
    manifest.outputs.0.insert(CARD.into(), FileEntry { sha256: written.sha256, bytes: written.bytes });
    manifest.evaluation = Some(section.to_string());
    write_file(&staging.path().join(MANIFEST), manifest.to_text().as_bytes())?;
    staging.commit()
}

/// Hard-links every file of `from` into `to` (copies where links are not possible), except `skip`.
fn link_tree(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    for name in entries_under(from)?.iter().filter(|n| !skip.contains(&n.as_str())) {
        let (source, target) = (from.join(name), to.join(name));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).at(parent)?;
        }
        if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).at(&target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::with_evaluation;

    #[test]
    fn the_evaluation_section_is_appended_then_replaced() {
        let once = with_evaluation("# card\n", "| a |\n");
        assert!(once.starts_with("# card\n\n<!-- bake eval -->") && once.contains("| a |"));
        let twice = with_evaluation(&(once.clone() + "tail\n"), "| b |\n");
        assert!(twice.contains("| b |") && !twice.contains("| a |") && twice.ends_with("tail\n"), "{twice}");
    }

    #[test]
    fn a_card_ending_in_the_marker_without_a_newline_is_updated() {
        let card = with_evaluation("# card\n", "| a |\n");
        let trimmed = card.trim_end_matches('\n');
        let again = with_evaluation(trimmed, "| b |\n");
        assert!(again.contains("| b |") && !again.contains("| a |"), "{again}");
    }
}
