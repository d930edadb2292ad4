//! The two prompt sets of ITI: labelled probe prompts (one per mc2 choice) and unlabelled tuning prompts (one
//! per generation answer, with another question appended) used only for the shift size σ.

use super::truthfulqa::TruthfulQa;
use crate::recipe::PromptSpec;
use crate::rng::SeededRng;

#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    /// Index of its question in multiple_choice order.
    pub question: usize,
    pub label: bool,
}

#[derive(Debug, Clone)]
pub struct PromptSets {
    pub probe: Vec<Prompt>,
    pub tuning: Vec<Prompt>,
    /// For question i, the question appended to its tuning prompts.
    pub tuning_question: Vec<usize>,
}

impl PromptSets {
    /// Probe prompts, then tuning prompts: the order of the one activation pass (and of its cache entry).
    pub fn texts(&self) -> Vec<&str> {
        self.probe.iter().chain(&self.tuning).map(|p| p.text.as_str()).collect()
    }
}

fn fill(template: &str, question: &str, answer: &str, other: &str) -> String {
    template.replace("{question}", question).replace("{answer}", answer).replace("{other_question}", other)
}

/// Builds both sets. The other question of each tuning prompt is drawn (seeded) from the other questions; the
/// reference draws unseeded from all, itself included, which makes its σ irreproducible.
pub fn build_prompt_sets(data: &TruthfulQa, spec: &PromptSpec, seed: u64) -> PromptSets {
    let n = data.questions.len();
    let mut rng = SeededRng::for_purpose(seed, "tuning-question");
    let tuning_question: Vec<usize> = (0..n).map(|i| if n == 1 { i } else { (i + 1 + rng.below(n - 1)) % n }).collect();
    let mut probe = Vec::new();
    let mut tuning = Vec::new();
    for (i, q) in data.questions.iter().enumerate() {
        for (answer, label) in &q.mc2 {
            probe.push(Prompt { text: fill(&spec.probe, &q.question, answer, ""), question: i, label: *label });
        }
        let other = &data.questions[tuning_question[i]].question;
        let answers = q.correct_answers.iter().map(|a| (a, true)).chain(q.incorrect_answers.iter().map(|a| (a, false)));
        for (answer, label) in answers {
            tuning.push(Prompt { text: fill(&spec.tuning, &q.question, answer, other), question: i, label });
        }
    }
    PromptSets { probe, tuning, tuning_question }
}
