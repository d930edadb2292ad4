//! The search folder: `search.json` (every candidate's numbers), `search.log` (seconds), `tradeoff.png` and
//! `.svg`, and `recipe.yaml`, the input recipe with the chosen K and α and a summary of the search, which
//! `bake --recipe DIR/recipe.yaml` bakes and records in the model card and `bake.json`.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{SearchOutcome, SearchReport};
use crate::data::DatasetSource;
use crate::error::{IoContext, Result};
use crate::figure;
use crate::io::listing::SEARCH_LOG_FILE;
use crate::recipe::{HeldOut, Recipe, SearchSummary};

pub const FILES: &[&str] = &["search.json", SEARCH_LOG_FILE, "tradeoff.png", "tradeoff.svg", "recipe.yaml"];

/// `search.json` as written: its sha256 names the search in the recipe it chose.
pub fn report_json(report: &SearchReport) -> String {
    serde_json::to_string_pretty(report).expect("the report serializes") + "\n"
}

/// Writes [`FILES`] into `dir`; returns their paths.
pub fn write_files(outcome: &SearchOutcome, dir: &Path) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
    let report = &outcome.report;
    let json = report_json(report);
    std::fs::write(&paths[0], &json).at(&paths[0])?;
    std::fs::write(&paths[1], log_text(outcome)).at(&paths[1])?;
    let plot = super::tradeoff::Tradeoff { report };
    figure::write_png(&plot, &paths[2])?;
    figure::write_svg(&plot, &paths[3])?;
    let recipe = chosen_recipe(report, &crate::io::hash::hex(&Sha256::digest(json.as_bytes())));
    std::fs::write(&paths[4], recipe_text(&recipe, report)).at(&paths[4])?;
    Ok(paths)
}

/// Seconds per stage and per candidate: what differs from run to run, kept out of `search.json`.
fn log_text(outcome: &SearchOutcome) -> String {
    let mut s = String::new();
    for (stage, seconds) in &outcome.timings {
        let _ = writeln!(s, "{stage}: {seconds:.2} s");
    }
    for (c, seconds) in outcome.report.candidates.iter().zip(&outcome.candidate_seconds) {
        let _ = writeln!(s, "candidate {}: {seconds:.2} s", c.point());
    }
    s
}

/// The searched recipe with the chosen K and α, and the search's summary. Local paths (the corpus, a
/// dataset folder) are made absolute, so the recipe means the same from the search folder.
pub fn chosen_recipe(report: &SearchReport, search_sha256: &str) -> Recipe {
    let chosen = report.chosen();
    let mut recipe = report.recipe.clone();
    recipe.method = chosen.method;
    recipe.heads = chosen.heads;
    recipe.alpha = chosen.alpha;
    if let Some(corpus) = recipe.corpus.as_mut() {
        corpus.path = std::path::absolute(&corpus.path).unwrap_or(corpus.path.clone());
    }
    let dataset = DatasetSource::of(&recipe.dataset.source).folder().and_then(|dir| std::path::absolute(dir).ok());
    if let Some(abs) = dataset {
        recipe.dataset.source = abs.to_string_lossy().into_owned();
    }
    let held_out = |mc1: Option<f64>, mc2: Option<f64>, ce: Option<f64>, kl: Option<f64>| HeldOut {
        mc1: mc1.unwrap_or(f64::NAN),
        mc2: mc2.unwrap_or(f64::NAN),
        ce: ce.unwrap_or(f64::NAN),
        kl: kl.unwrap_or(f64::NAN),
    };
    recipe.search = Some(SearchSummary {
        sha256: search_sha256.to_string(),
        objective: report.objective.name().to_string(),
        folds: report.folds,
        questions: report.questions,
        candidates: report.candidates.len(),
        kl_budget: report.kl_budget,
        ce_budget: report.ce_budget,
        chosen: held_out(chosen.mc1, chosen.mc2, chosen.ce, chosen.kl),
        base: held_out(Some(report.base.mc1), Some(report.base.mc2), Some(report.base.ce), Some(0.0)),
    });
    recipe
}

/// `recipe.yaml`: a comment saying where K and α came from, then the recipe.
pub fn recipe_text(recipe: &Recipe, report: &SearchReport) -> String {
    let chosen = report.chosen();
    let search = recipe.search.as_ref().expect("a chosen recipe has a search summary");
    let mut s = String::new();
    let _ = writeln!(s, "# Written by `bake search` ({}) for {}.", crate::VERSION, report.model);
    let methods = match report.methods.len() {
        1 => String::new(),
        _ => format!(" of methods {}", report.methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")),
    };
    let _ = writeln!(
        s,
        "# method {}, K = {} and α = {} were chosen among {} candidates{methods} by {}-fold cross-validation on {} \
         TruthfulQA questions:",
        chosen.method,
        chosen.heads,
        chosen.alpha,
        report.candidates.len(),
        report.folds,
        report.questions
    );
    let _ = writeln!(
        s,
        "# the best held-out {} (reference MC protocol) with KL(base ‖ edited) ≤ {}{}, ties to smaller α, then K.",
        report.objective.name().to_uppercase(),
        report.kl_budget,
        report.ce_budget.map(|b| format!(" and a CE increase ≤ {b}")).unwrap_or_default()
    );
    let _ = writeln!(s, "# Every candidate's numbers: search.json (sha256 {}).", search.sha256);
    let _ = writeln!(s, "# `bake --recipe THIS_FILE` bakes it; the model card and bake.json record `search:`.\n");
    s.push_str(&serde_yaml::to_string(recipe).expect("a recipe serializes"));
    s
}

/// The candidates as a table for the terminal and the README: finalists best first, then the candidates
/// dropped in a rung (latest first), then those over the budget at the KL screen.
pub fn table(report: &SearchReport) -> String {
    let objective = |c: &super::CandidateReport| c.objective(report.objective);
    let stage = |c: &super::CandidateReport| match c.reached {
        super::Reached::Final => 0,
        super::Reached::Rung { rung, .. } => 1000 - rung,
        super::Reached::KlScreen => 2000,
        super::Reached::KlImplied => 3000,
    };
    let mut order: Vec<usize> = (0..report.candidates.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&report.candidates[a], &report.candidates[b]);
        stage(x).cmp(&stage(y)).then(objective(y).unwrap_or(f64::MIN).total_cmp(&objective(x).unwrap_or(f64::MIN)))
    });
    let number = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.4}"));
    // A search of several methods names each candidate's in a first column.
    let several = report.methods.len() > 1;
    let mut s = match several {
        true => "| method | K | α | reached | questions | MC1 | MC2 | CE | KL | within budget |\n|---|---:|---:|---|---:|---:|---:|---:|---:|---|\n",
        false => "| K | α | reached | questions | MC1 | MC2 | CE | KL | within budget |\n|---:|---:|---|---:|---:|---:|---:|---:|---|\n",
    }
    .to_string();
    for i in order {
        let c = &report.candidates[i];
        let reached = match &c.reached {
            super::Reached::Final => "final".to_string(),
            super::Reached::Rung { rung, .. } => format!("rung {}", rung + 1),
            super::Reached::KlScreen => "KL screen".to_string(),
            super::Reached::KlImplied => "KL screen (smaller α over)".to_string(),
        };
        let kl = match c.kl {
            Some(kl) => format!("{kl:.4}"),
            None => c.screen_kl().map_or("—".into(), |kl| format!("{kl:.4} (screen)")),
        };
        let verdict = match (c.within_budget, i == report.chosen) {
            (_, true) => "yes: **chosen**",
            (Some(true), false) => "yes",
            (Some(false), false) => "no",
            (None, false) if matches!(c.reached, super::Reached::KlScreen | super::Reached::KlImplied) => "no",
            (None, false) => "—",
        };
        let questions: usize = c.folds.iter().map(|f| f.questions).sum();
        if several {
            let _ = write!(s, "| {} ", if c.point().is_base() { "—".to_string() } else { c.method.to_string() });
        }
        let _ = writeln!(
            s,
            "| {} | {} | {reached} | {questions} | {} | {} | {} | {kl} | {verdict} |",
            c.heads,
            c.alpha,
            number(c.mc1),
            number(c.mc2),
            number(c.ce)
        );
    }
    let base = &report.base;
    let cost = &report.cost;
    let _ = writeln!(
        s,
        "\nbase (α = 0): MC1 {:.4}, MC2 {:.4}, CE {:.4}. Work: {} of {} candidate-questions scored ({}), {} \
         documents run against the full grid's {} ({}), {} probe fits instead of {}.",
        base.mc1,
        base.mc2,
        base.ce,
        cost.questions_scored,
        cost.questions_full_grid,
        compared_with_full(cost.questions_scored, cost.questions_full_grid),
        cost.documents_run,
        cost.documents_full_grid,
        compared_with_full(cost.documents_run, cost.documents_full_grid),
        cost.probe_fits,
        cost.probe_fits_full_grid
    );
    s
}

/// How much work a search did against the full grid, read at a glance: `9.2× fewer`, `the same`, or
/// `1.3× more` (the KL screen's documents come on top of the finalists', so a small grid can run more).
fn compared_with_full(done: usize, full: usize) -> String {
    match done.cmp(&full) {
        std::cmp::Ordering::Less => format!("{:.1}× fewer", full as f64 / done.max(1) as f64),
        std::cmp::Ordering::Equal => "the same".to_string(),
        std::cmp::Ordering::Greater => format!("{:.1}× more", done as f64 / full.max(1) as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::compared_with_full;

    #[test]
    fn work_against_the_full_grid_reads_right_either_way() {
        assert_eq!(compared_with_full(3270, 30229), "9.2× fewer");
        assert_eq!(compared_with_full(60, 60), "the same");
        assert_eq!(compared_with_full(90, 60), "1.5× more");
    }
}
