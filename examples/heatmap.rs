//! Draws the probe heatmap of a model shape with synthetic accuracies (seeded), to see how the figure reads at
//! sizes no test bakes on CPU: Llama-2-7B's 32 × 32 heads and a 70B's 80 × 64.
//!
//! cargo run --release --example heatmap -- OUT_PREFIX LAYERS HEADS K LABEL
//! e.g. cargo run --release --example heatmap -- docs/figures/heatmap-7b-shape 32 32 48 "Llama-2-7B shape"
//! writes OUT_PREFIX.png and OUT_PREFIX.svg.

use std::path::PathBuf;

use bake::figure::{write_png, write_svg};
use bake::probes::heatmap::Heatmap;
use bake::rng::SeededRng;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 5 {
        eprintln!("usage: heatmap OUT_PREFIX LAYERS HEADS K LABEL");
        std::process::exit(2);
    }
    let number = |i: usize| -> usize { args[i].parse().unwrap_or_else(|_| panic!("argument {i} must be a number")) };
    let (layers, heads, k) = (number(1), number(2), number(3));
    let accuracy = synthetic_accuracy(layers, heads);
    let chosen = bake::probes::select_heads(&accuracy, k).expect("K is at most layers × heads");
    let figure = Heatmap {
        accuracy: &accuracy,
        chosen: &chosen,
        title: "Probe validation accuracy per attention head".into(),
        subtitle: format!("{} · synthetic accuracies · K = {k} heads outlined", args[4]),
        columns: "attention head",
    };
    let prefix = PathBuf::from(&args[0]);
    for (path, written) in [
        (prefix.with_extension("png"), write_png(&figure, &prefix.with_extension("png"))),
        (prefix.with_extension("svg"), write_svg(&figure, &prefix.with_extension("svg"))),
    ] {
        written.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        println!("wrote {}", path.display());
    }
}

/// Accuracies shaped like TruthfulQA probes': near chance in the first layers, best in the middle ones, a few
/// heads well above their layer.
fn synthetic_accuracy(layers: usize, heads: usize) -> Vec<Vec<f64>> {
    let mut rng = SeededRng::new(2023);
    (0..layers)
        .map(|l| {
            let depth = l as f64 / layers.max(2) as f64;
            let layer_level = 0.52 + 0.12 * (std::f64::consts::PI * depth).sin();
            (0..heads).map(|_| (layer_level + 0.04 * rng.normal() + 0.15 * rng.uniform().powi(8)).min(0.95)).collect()
        })
        .collect()
}
