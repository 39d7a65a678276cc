//! The causal-LM loss of Hugging Face's `LlamaForCausalLM` with `ignore_index = -100`:
//! `logits[:, :-1]` predict `labels[:, 1:]`, cross-entropy averaged over the supervised tokens
//! only (Burn's `CrossEntropyLoss` has no ignore index and would count masked rows in the mean).

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use llava_data::IGNORE_INDEX;

/// Returns the mean loss (a 1-element tensor) and the number of supervised tokens. Only the
/// supervised rows go through the vocabulary-wide log-softmax.
pub fn causal_lm_loss<B: Backend>(logits: Tensor<B, 3>, labels: Tensor<B, 2, Int>) -> (Tensor<B, 1>, usize) {
    let [b, s, v] = logits.dims();
    let device = logits.device();
    let labels_host = labels.into_data().convert::<i64>().into_vec::<i64>().expect("i64 labels");
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for i in 0..b {
        for j in 0..s.saturating_sub(1) {
            let t = labels_host[i * s + j + 1];
            if t != IGNORE_INDEX {
                rows.push((i * s + j) as i64);
                targets.push(t);
            }
        }
    }
    let n = rows.len();
    if n == 0 {
        // No supervised token (e.g. a sample the mismatch rule masked): zero loss, no gradient.
        return (logits.sum() * 0.0, 0);
    }
    let flat = logits.reshape([b * s, v]);
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [n]), &device);
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [n, 1]), &device);
    let picked = log_softmax(flat.select(0, rows), 1).gather(1, targets);
    (picked.sum().neg() / n as f64, n)
}
