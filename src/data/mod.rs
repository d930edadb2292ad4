//! Stage 2: the labelled data. TruthfulQA's two configs, matched question by question, and the prompts built
//! from them.

pub mod builtin;
pub mod prompts;
pub mod truthfulqa;

pub use prompts::{build_prompt_sets, PromptSets};
pub use truthfulqa::{DatasetSource, Question, TruthfulQa};
