//! The causal-LM loss of Hugging Face's `LlamaForCausalLM` with `ignore_index = -100`:
//! `logits[:, :-1]` predict `labels[:, 1:]`, cross-entropy averaged over the supervised tokens
//! only (Burn's `CrossEntropyLoss` has no ignore index and would count masked rows in the mean).
//!
//! Training computes the LM head only on the supervised positions ([`lm_head_loss`]): the value is
//! the same, but a 32k-vocabulary projection of every image and prompt token is skipped.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
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
    // As Hugging Face's `logits.float()`: the loss is taken in f32 under mixed precision too.
    let logits = logits.cast(DType::F32);
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
        None => (logits.sum().cast(DType::F32) * 0.0, 0),
    }
}

/// The same loss from the decoder's final hidden states `[batch, seq, hidden]`: the LM head runs
/// on the supervised positions only.
pub fn lm_head_loss<B: Backend>(
    llm: &LlamaModel<B>, hidden: Tensor<B, 3>, labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, usize) {
    let [b, s, d] = hidden.dims();
    match supervised(hidden.clone().reshape([b * s, d]), labels) {
        Some((picked, targets)) => {
            let n = targets.len();
            let logits = llm.logits(picked.reshape([1, n, d])).reshape([n, llm.vocab_size()]);
            (nll(logits, targets), n)
        }
        None => (hidden.sum().cast(DType::F32) * 0.0, 0),
    }
}

/// [`lm_head_loss`] for a training step: the same value and gradient, with the cross-entropy's
/// gradient `(softmax − one-hot) / n` computed in one pass over the logits and attached to them,
/// instead of Burn differentiating log-softmax and gather op by op (about ten passes over the
/// `[n, 32k]` logits, each allocating): [`llava_kernels::cross_entropy_with_grad`], one pass on
/// the CPU backend.
pub fn lm_head_loss_train<B: AutodiffBackend>(
    llm: &LlamaModel<B>, hidden: Tensor<B, 3>, labels: Tensor<B, 2, Int>,
) -> (Tensor<B, 1>, usize) {
    let [b, s, d] = hidden.dims();
    let Some((picked, targets)) = supervised(hidden.clone().reshape([b * s, d]), labels.clone()) else {
        return lm_head_loss(llm, hidden, labels);
    };
    let n = targets.len();
    let logits = llm.logits(picked.reshape([1, n, d])).reshape([n, llm.vocab_size()]);
    let logits = logits.cast(DType::F32);
    let (value, grad) = llava_kernels::cross_entropy_with_grad(logits.clone().inner(), &targets);
    // Forward value `value`, gradient w.r.t. the logits `grad`: `s − detach(s)` is zero but
    // carries the gradient of `s = Σ logits ⊙ grad`.
    let s = (logits * Tensor::from_inner(grad)).sum();
    (s.clone() - s.detach() + Tensor::from_inner(value), n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;
    use llava_llm::LlamaConfig;

    type B = Autodiff<Flex>;

    #[test]
    fn the_fused_training_loss_has_the_value_and_gradients_of_the_op_by_op_loss() {
        let device = Default::default();
        <B as Backend>::seed(&device, 3);
        let config = LlamaConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            ..Default::default()
        };
        let llm = config.init::<B>(&device);
        let hidden = Tensor::<B, 3>::random([2, 6, 16], Distribution::Normal(0.0, 3.0), &device).require_grad();
        // Row 0 supervises positions 2..6, row 1 only position 4 (IGNORE_INDEX elsewhere).
        let labels = [-100i64, -100, 7, 49, 0, 3, -100, -100, -100, -100, 12, -100];
        let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(labels.to_vec(), [2, 6]), &device);
        let run = |fused: bool| {
            let (loss, n) = if fused {
                lm_head_loss_train(&llm, hidden.clone(), labels.clone())
            } else {
                lm_head_loss(&llm, hidden.clone(), labels.clone())
            };
            let grads = loss.backward();
            let head = llm.lm_head.as_ref().and_then(|h| h.as_float()).unwrap().weight.grad(&grads).unwrap();
            (loss.into_scalar(), n, hidden.grad(&grads).unwrap(), head)
        };
        let (fused_value, fused_n, fused_hidden, fused_head) = run(true);
        let (value, n, grad_hidden, grad_head) = run(false);
        assert_eq!((fused_n, n), (5, 5));
        assert!((fused_value - value).abs() < 1e-5 * value.abs(), "{fused_value} vs {value}");
        let diff = |a: Tensor<Flex, 2>, b: Tensor<Flex, 2>| {
            (a - b.clone()).abs().max().into_scalar() / b.abs().max().into_scalar()
        };
        assert!(diff(fused_head, grad_head) < 1e-5);
        let (fh, gh) = (fused_hidden.reshape([12, 16]), grad_hidden.reshape([12, 16]));
        assert!(diff(fh, gh) < 1e-5);
    }
}
