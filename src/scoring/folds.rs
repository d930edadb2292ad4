//! The reference's cross-validation folds: contiguous, as numpy's `array_split` cuts them, each fold's training
//! part split 80/20 into probe training and validation questions.

use crate::error::{BakeError, Result};
use crate::pipeline::{self, Fit};
use crate::probes;
use crate::recipe::Recipe;

/// Contiguous folds in multiple_choice order, the first ones one longer (numpy's `array_split`).
pub fn contiguous_folds(n: usize, k: usize) -> Vec<Vec<usize>> {
    let (size, extra) = (n / k, n % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let len = size + usize::from(i < extra);
            start += len;
            (start - len..start).collect()
        })
        .collect()
}

/// One fold of the reference's cross-validation: ITI is fitted on `train` (split 80/20 into probe training
/// and validation questions, σ over all of `train`) and measured on `test`.
pub struct FoldSplit {
    pub test: Vec<usize>,
    pub train: Vec<usize>,
    pub split: probes::Split,
}

impl FoldSplit {
    /// What the probe stage fits on for this fold.
    pub fn fit<'a>(&'a self, prepared: &'a pipeline::Prepared) -> Fit<'a> {
        Fit { prepared, split: &self.split, sigma_questions: Some(&self.train) }
    }
}

/// The folds of `n` questions, each with enough training questions.
pub fn fold_splits(n: usize, folds: usize, recipe: &Recipe) -> Result<Vec<FoldSplit>> {
    if folds < 2 || folds > n {
        return Err(BakeError::Invalid(format!("{folds} folds: expected between 2 and the number of questions ({n})")));
    }
    contiguous_folds(n, folds)
        .into_iter()
        .enumerate()
        .map(|(i, test)| {
            let train: Vec<usize> = (0..n).filter(|q| !test.contains(q)).collect();
            probes::check_question_count(
                train.len(),
                recipe.validation_ratio,
                &format!("the training part of fold {i}"),
            )?;
            let split = probes::split_among(&train, recipe.validation_ratio, recipe.seed);
            Ok(FoldSplit { test, train, split })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_contiguous_like_array_split() {
        let f = contiguous_folds(817, 2);
        assert_eq!((f[0].len(), f[1].len()), (409, 408));
        assert_eq!((f[0][0], f[0][408], f[1][0], f[1][407]), (0, 408, 409, 816));
    }
}
