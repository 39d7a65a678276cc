//! The causal-LM loss of Hugging Face's `LlamaForCausalLM` with `ignore_index = -100`:
//! `logits[:, :-1]` predict `labels[:, 1:]`, cross-entropy averaged over the supervised tokens
//! only (Burn's `CrossEntropyLoss` has no ignore index and would count masked rows in the mean).
//!
//! Training computes the LM head only on the supervised positions ([`lm_head_loss`]): the value is
//! the same, but a 32k-vocabulary projection of every image and prompt token is skipped.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use llava_data::IGNORE_INDEX;
use llava_llm::LlamaModel;

/// Flat row indices `i * seq + j` whose next label is supervised, and those labels.
fn supervised_rows(labels: Tensor<impl Backend, 2, Int>) -> (Vec<i64>, Vec<i64>) {
    let [b, s] = labels.dims();
    let labels = labels.into_data().convert::<i64>().into_vec::<i64>().expect("i64 labels");
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for i in 0..b {
        for j in 0..s.saturating_sub(1) {
            let t = labels[i * s + j + 1];
            if t != IGNORE_INDEX {
                rows.push((i * s + j) as i64);
                targets.push(t);
            }
        }
    }
    (rows, targets)
}

/// Mean negative log-likelihood of `targets` under `logits` `[n, vocab]`.
fn nll<B: Backend>(logits: Tensor<B, 2>, targets: Vec<i64>) -> Tensor<B, 1> {
    let n = targets.len();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &logits.device());
    log_softmax(logits, 1).gather(1, targets).sum().neg() / n as f64
}

/// The rows of `flat` `[batch × seq, width]` whose next label is supervised, with those labels;
/// `None` when no token is supervised.
fn supervised<B: Backend>(flat: Tensor<B, 2>, labels: Tensor<B, 2, Int>) -> Option<(Tensor<B, 2>, Vec<i64>)> {
    let (rows, targets) = supervised_rows(labels);
    if rows.is_empty() {
        return None;
    }
    let n = rows.len();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &flat.device());
    Some((flat.select(0, rows), targets))
}

/// Returns the mean loss (a 1-element tensor) and the number of supervised tokens, from full
/// logits `[batch, seq, vocab]`. Only the supervised rows go through the log-softmax.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 1>, usize) {
    let [b, s, v] = logits.dims();
    match supervised(logits.clone().reshape([b * s, v]), labels) {
        Some((picked, targets)) => (nll(picked, targets.clone()), targets.len()),
        // No supervised token (e.g. a sample the mismatch rule masked): zero loss, no gradient.
        None => (logits.sum() * 0.0, 0),
    }
}

/// The same loss from the decoder's final hidden states `[batch, seq, hidden]`: the LM head runs
/// on the supervised positions only.
pub fn lm_head_loss<B: Backend>(llm: &LlamaModel<B>, hidden: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 1>, usize) {
    let [b, s, d] = hidden.dims();
    match supervised(hidden.clone().reshape([b * s, d]), labels) {
        Some((picked, targets)) => {
            let n = targets.len();
            let logits = llm.logits(picked.reshape([1, n, d])).reshape([n, llm.vocab_size()]);
            (nll(logits, targets), n)
        }
        None => (hidden.sum() * 0.0, 0),
    }
}
