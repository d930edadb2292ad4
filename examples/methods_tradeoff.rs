//! The methods side by side: several `bake search` folders of one model, one method each, searched with the
//! same questions, folds, corpus sample and budget, drawn as one trade-off figure (every method's candidates,
//! finalists coloured by method; the ring on the best within the budget across them) and printed as a table of
//! each method's chosen candidate and the base.
//!
//! Usage: `methods_tradeoff OUT_PREFIX SEARCH_DIR...` writes OUT_PREFIX.png and .svg.

use std::path::{Path, PathBuf};

use bake::figure::{write_png, write_svg};
use bake::search::tradeoff::Tradeoff;
use bake::search::{choose, Finalist, Reached, SearchReport};

fn read(dir: &Path) -> SearchReport {
    let path = dir.join("search.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut report: SearchReport =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not a search.json: {e}", path.display()));
    // A search made before methods searched its recipe's method alone.
    if report.methods.is_empty() {
        report.methods = vec![report.recipe.method];
        report.candidates.iter_mut().for_each(|c| c.method = report.recipe.method);
    }
    report
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    assert!(args.len() >= 2, "usage: methods_tradeoff OUT_PREFIX SEARCH_DIR...");
    let reports: Vec<SearchReport> = args[1..].iter().map(|d| read(Path::new(d))).collect();
    let first = &reports[0];
    let protocol = |r: &SearchReport| (r.model.clone(), r.questions, r.folds, r.documents, r.kl_budget, r.objective);
    for (dir, r) in args[1..].iter().zip(&reports) {
        assert_eq!(protocol(r), protocol(first), "{dir}: searched otherwise than {}", args[1]);
    }
    // One base (α = 0) candidate, the first search's; every other candidate of every search.
    let mut merged = first.clone();
    merged.methods = reports.iter().flat_map(|r| r.methods.clone()).collect();
    merged.candidates.extend(reports[1..].iter().flat_map(|r| r.candidates.iter().filter(|c| c.alpha > 0.0).cloned()));
    let finalists: Vec<(usize, Finalist)> = (0..merged.candidates.len())
        .filter_map(|i| {
            let c = &merged.candidates[i];
            let (objective, kl, ce) = (c.objective(merged.objective)?, c.kl?, c.ce?);
            let finalist = Finalist { point: c.point(), objective, kl, ce_increase: ce - merged.base.ce };
            (c.reached == Reached::Final).then_some((i, finalist))
        })
        .collect();
    let list: Vec<Finalist> = finalists.iter().map(|(_, f)| *f).collect();
    merged.chosen = finalists[choose(&list, merged.kl_budget, merged.ce_budget).expect("α = 0 is within")].0;

    let prefix = PathBuf::from(&args[0]);
    let figure = Tradeoff { report: &merged };
    write_png(&figure, &prefix.with_extension("png")).expect("png written");
    write_svg(&figure, &prefix.with_extension("svg")).expect("svg written");

    println!("| method | K | α | MC1 | MC2 | CE | KL |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let base = &merged.base;
    println!("| base | | 0 | {:.4} | {:.4} | {:.4} | 0 |", base.mc1, base.mc2, base.ce);
    for r in &reports {
        let c = r.chosen();
        let number = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
        let won = if c.point() == merged.candidates[merged.chosen].point() { " (best)" } else { "" };
        println!(
            "| {}{won} | {} | {} | {} | {} | {} | {} |",
            c.method,
            c.heads,
            c.alpha,
            number(c.mc1),
            number(c.mc2),
            number(c.ce),
            number(c.kl)
        );
    }
}
