//! The model card (`README.md` with Hugging Face front matter) of a baked model.

use std::fmt::Write;

use crate::export::manifest::Cost;
use crate::export::runtimes;
use crate::model::ModelFiles;
use crate::probes::report::ProbeReport;
use crate::recipe::Method;

fn licence(model: &ModelFiles) -> Option<String> {
    // A licence the base states in its own card's front matter, when the folder has one.
    let card = std::fs::read_to_string(model.location.dir.join("README.md")).ok()?;
    let front = card.strip_prefix("---")?.split("\n---").next()?;
    front.lines().find_map(|l| l.strip_prefix("license:").map(|v| v.trim().to_string()))
}

/// What a user of this family must know for the shift to be applied: why a Mistral or Qwen2 bake is a
/// `LlamaForCausalLM`, or where a Qwen3 bake may lose it. For the card and the terminal.
pub fn architecture_note(model: &ModelFiles, site: crate::model::Site) -> Option<String> {
    let family = model.config.family;
    if family == crate::model::config::Family::Qwen3 {
        return Some(
            "Qwen3 keeps its class: transformers' `Qwen3Attention` gives all four projections a bias when \
             `attention_bias` is true. pyvene 0.1.8 predates Qwen3: register it as Qwen2 before \
             `IntervenableModel.load` (`for t in (intervenable_modelcard.type_to_module_mapping, \
             intervenable_modelcard.type_to_dimension_mapping): t[Qwen3ForCausalLM] = t[Qwen2ForCausalLM]`)."
                .to_string(),
        );
    }
    let (flag, block, bias) = match site {
        crate::model::Site::AttentionHeads => ("attention_bias", "attention", "o_proj"),
        crate::model::Site::Residual => ("mlp_bias", "MLP", "down_proj"),
    };
    family.written_as_llama().then(|| {
        format!(
            "The base is a `{base}`; this checkpoint is written as `LlamaForCausalLM` (`model_type: llama`, \
             `{flag}: true`), which runs the same forward pass with the sliding window off, because the base \
             class's {block} has no `{bias}` bias in transformers and would drop the shift when loading. Keep it a \
             Llama: converted back to `{base}`, the shift is lost.",
            base = family.architecture()
        )
    })
}

/// Which runtimes apply the shift, as measured.
fn runtimes_section(family: crate::model::config::Family, site: crate::model::Site) -> String {
    let mut s = String::from(
        "## Runtimes\n\n| runtime | version checked | applies the shift | how |\n| --- | --- | --- | --- |\n",
    );
    for v in runtimes::verdicts(family, site) {
        let applies = match v.applies {
            runtimes::Applies::Yes => "yes",
            runtimes::Applies::DropsSilently => "**no: drops it silently**",
            runtimes::Applies::Refuses => "**no: refuses it**",
        };
        let _ = writeln!(s, "| {} | {} | {applies} | {} |", v.runtime, v.version, v.how);
    }
    s.push('\n');
    s
}

/// Why these K and α: the search that chose them, its budget and its held-out numbers.
fn search_section(search: &crate::recipe::SearchSummary) -> String {
    let mut s = String::from("## How K and α were chosen\n\n");
    let ce_budget = search.ce_budget.map(|b| format!(" and a CE increase of at most {b}")).unwrap_or_default();
    let _ = writeln!(
        s,
        "`bake search` chose them among {} candidates (K, α) by {}-fold cross-validation on {} TruthfulQA questions: \
         the best held-out {} (reference MC protocol) with KL(base ‖ edited) at most {} nats per token{ce_budget}, \
         ties to smaller α, then smaller K. The search's `search.json` has sha256 `{}`.\n",
        search.candidates,
        search.folds,
        search.questions,
        search.objective.to_uppercase(),
        search.kl_budget,
        search.sha256
    );
    s.push_str("| held out | MC1 | MC2 | CE | KL |\n| --- | --- | --- | --- | --- |\n");
    for (name, h) in [("base", &search.base), ("chosen K and α", &search.chosen)] {
        let _ = writeln!(s, "| {name} | {:.4} | {:.4} | {:.4} | {:.4} |", h.mc1, h.mc2, h.ce, h.kl);
    }
    s.push('\n');
    s
}

/// What the shift costs, as the bake measured it.
fn cost_section(cost: &Cost) -> String {
    let mut s = String::from("## Cost\n\n");
    let _ = writeln!(
        s,
        "Measured by the bake on {} ({} documents, at most {} tokens each; {}):\n",
        cost.corpus, cost.documents, cost.tokens_per_document, cost.computed_on
    );
    s.push_str("| | base | baked |\n| --- | --- | --- |\n");
    let _ = writeln!(s, "| CE (nats/token) | {:.4} | {:.4} |", cost.ce_base, cost.ce_baked);
    let _ = writeln!(s, "| KL(base ‖ baked) (nats/token) | | {:.4} |", cost.kl);
    let verdict = if cost.kl > cost.kl_budget { "over" } else { "within" };
    let _ = writeln!(s, "\nThe KL is {verdict} the recipe's budget of {} nats per token.\n", cost.kl_budget);
    s
}

pub fn model_card(model: &ModelFiles, report: &ProbeReport, cost: Option<&Cost>) -> String {
    let (base, recipe) = (&report.model, &report.recipe);
    let mut s = String::from("---\n");
    let _ = writeln!(s, "base_model: {base}");
    if let Some(l) = licence(model) {
        let _ = writeln!(s, "license: {l}");
    }
    s.push_str(
        "library_name: transformers\ntags:\n- bake\n- inference-time-intervention\n- iti\n- truthfulqa\n---\n\n",
    );
    let title = match recipe.method {
        Method::Residual => "residual-stream shifts",
        Method::Iti | Method::NlIti => "Inference-Time Intervention",
    };
    let _ = writeln!(s, "# {base}, baked with {title}\n");
    if let Some(warning) = runtimes::warning(model.config.family) {
        let _ = writeln!(s, "> **Warning:** {warning}\n");
    }
    if let Some(warning) = cost.and_then(Cost::warning) {
        let _ = writeln!(s, "> **Warning:** {warning}\n");
    }
    match recipe.method {
        Method::Residual => {
            let _ = writeln!(
                s,
                "This is `{base}` with residual-stream shifts (activation addition) baked into its weights by \
                 [`bake`](https://crates.io/crates/bake) {}. Linear probes on TruthfulQA picked the {} layers whose \
                 residual stream (the mean over the last {} tokens of each prompt) best separates true from false \
                 answers; each layer's stream is shifted by α = {} standard deviations along its {:?} direction. The \
                 shift δ of layer l is stored as the `down_proj` bias `b_l = δ_l` (`mlp_bias: true`; the gate and up \
                 biases are zero), so it applies at every position of every forward pass. Every other tensor is \
                 byte-identical to the base model (`bake verify` proves it).\n",
                report.tool_version,
                report.heads.len(),
                recipe.answer_tokens(),
                recipe.alpha,
                recipe.direction
            );
        }
        Method::Iti | Method::NlIti => {
            let _ = writeln!(
            s,
            "This is `{base}` with an Inference-Time Intervention (Li et al., NeurIPS 2023) baked into its weights by \
             [`bake`](https://crates.io/crates/bake) {}. Linear probes on TruthfulQA picked the {} attention heads whose \
             outputs best separate true from false answers; each is shifted by α = {} standard deviations along its \
             {:?} direction. The shift δ of layer l is stored as the `o_proj` bias `b_l = W_o · δ_l`, so it applies at \
             every position of every forward pass. Every other tensor is byte-identical to the base model \
             (`bake verify` proves it).\n",
            report.tool_version,
            report.heads.len(),
            recipe.alpha,
            recipe.direction
        );
        }
    }
    if let Some(note) = architecture_note(model, recipe.method.site()) {
        let _ = writeln!(s, "{note}\n");
    }
    if recipe.method == Method::NlIti {
        let _ = writeln!(
            s,
            "The heads were ranked by non-linear probes (NL-ITI, Hoscilowicz et al. 2024: one hidden layer of {} ReLU \
             units) and every activation is the mean over the last {} tokens of its prompt.\n",
            crate::probes::mlp::HIDDEN,
            recipe.answer_tokens()
        );
    }
    if let Some(cost) = cost {
        s.push_str(&cost_section(cost));
    }
    if let Some(search) = &recipe.search {
        s.push_str(&search_section(search));
    }
    s.push_str("## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n");
    s.push_str("model = AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH_OR_REPO\")\n```\n\n");
    s.push_str("The same shift as a pyvene intervention on the base model (`activation_diff/`):\n\n```python\nimport pyvene as pv\n");
    let _ = writeln!(s, "base = AutoModelForCausalLM.from_pretrained(\"{base}\")");
    s.push_str("pv_model = pv.IntervenableModel.load(\"PATH/activation_diff\", base)\npv_model.set_device(base.device)\n```\n\n");
    s.push_str(&runtimes_section(model.config.family, recipe.method.site()));
    s.push_str("## Recipe\n\n| field | value |\n| --- | --- |\n");
    for (k, v) in [
        ("dataset", format!("{} ({})", recipe.dataset.source, recipe.dataset.split)),
        ("questions", recipe.limit.map_or("all".to_string(), |n| format!("first {n}"))),
        ("probe prompt", format!("`{}`", recipe.prompts.probe)),
        ("tuning prompt", format!("`{}`", recipe.prompts.tuning)),
        ("method", recipe.method.to_string()),
        ("activations", recipe.describe_tokens()),
        (&format!("{} (K)", recipe.method.units()), recipe.heads.to_string()),
        ("alpha", recipe.alpha.to_string()),
        ("direction", format!("{:?}", recipe.direction)),
        ("validation ratio", recipe.validation_ratio.to_string()),
        ("seed", recipe.seed.to_string()),
    ] {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push_str(&chosen_section(report));
    s.push_str(
        "\n## Data\n\nTruthfulQA (Stephanie Lin, Jacob Hilton, Owain Evans: \"TruthfulQA: Measuring How Models Mimic \
         Human Falsehoods\", ACL 2022; <https://github.com/sylinrl/TruthfulQA>), licensed under the Apache License \
         2.0. The probes were trained on its `multiple_choice` config and σ measured on its `generation` config.\n",
    );
    s.push_str(
        "\n`report.json` holds every probe's accuracy, the splits and δ; `bake.json` the sha256 of every input \
                and output file.\n",
    );
    s
}

/// The chosen heads (or layers, for the residual method), best first, with their probes' accuracy and σ.
fn chosen_section(report: &ProbeReport) -> String {
    let chosen = report.heads.iter().zip(&report.sigma).enumerate();
    let accuracy = |h: &crate::probes::Head| report.val_accuracy[h.layer][h.head];
    let mut s = String::new();
    if report.recipe.method == Method::Residual {
        s.push_str("\n## Chosen layers\n\n");
        s.push_str(
            "![Probe validation accuracy per layer's residual stream; the chosen layers outlined](heatmap.png)\n\n",
        );
        s.push_str("| rank | layer | probe validation accuracy | σ |\n| --- | --- | --- | --- |\n");
        for (rank, (h, (_, _, sigma))) in chosen {
            let _ = writeln!(s, "| {} | {} | {:.3} | {sigma:.4} |", rank + 1, h.layer, accuracy(h));
        }
        return s;
    }
    s.push_str("\n## Chosen heads\n\n");
    s.push_str(
        "![Probe validation accuracy per attention head, layers by heads; the chosen heads outlined](heatmap.png)\n\n",
    );
    s.push_str("| rank | layer | head | probe validation accuracy | σ |\n| --- | --- | --- | --- | --- |\n");
    for (rank, (h, (_, _, sigma))) in chosen {
        let _ = writeln!(s, "| {} | {} | {} | {:.3} | {sigma:.4} |", rank + 1, h.layer, h.head, accuracy(h));
    }
    s
}

const EVAL_START: &str = "<!-- bake eval -->";
const EVAL_END: &str = "<!-- /bake eval -->";

/// `card` with its evaluation section set to `section` (replaced when present, appended otherwise).
pub fn with_evaluation(card: &str, section: &str) -> String {
    let block = format!("{EVAL_START}\n## Evaluation (`bake eval`)\n\n{section}{EVAL_END}\n");
    match (card.find(EVAL_START), card.find(EVAL_END)) {
        (Some(start), Some(end)) if end > start => {
            let after = card[end + EVAL_END.len()..].strip_prefix('\n').unwrap_or(&card[end + EVAL_END.len()..]);
            format!("{}{block}{after}", &card[..start])
        }
        _ => format!("{}\n{block}", card.trim_end_matches('\n').to_string() + "\n"),
    }
}
