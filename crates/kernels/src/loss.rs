//! The cross-entropy of a language-model head, with its gradient computed in the forward pass.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// Mean cross-entropy of `targets` under `logits` and its gradient with respect to the logits,
/// `(softmax − one-hot) / n`.
///
/// # Shapes
/// - `logits`: `[n, vocab]` (any float dtype; computed in f32, as HF's `logits.float()`)
/// - `targets`: `n` class indices in `0..vocab`
/// - returns the loss `[1]` (f32) and the gradient `[n, vocab]` (f32)
///
/// A trainer attaches the gradient to the logits (`s − detach(s) + loss` with
/// `s = Σ logits ⊙ grad` has the loss's value and gradient), instead of autodiff differentiating
/// log-softmax and gather op by op. On Flex one pass with a vectorised `exp`; elsewhere Burn's
/// operations ([`crate::reference::cross_entropy_with_grad`]).
pub fn cross_entropy_with_grad<B: Backend>(logits: Tensor<B, 2>, targets: &[i64]) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let logits = logits.cast(DType::F32);
    #[cfg(feature = "flex")]
    if let Some((value, grad)) = crate::cpu::loss::cross_entropy_with_grad(&logits, targets) {
        let value = Tensor::from_data(burn::tensor::TensorData::new(vec![value as f32], [1]), &logits.device());
        return (value, grad);
    }
    crate::reference::cross_entropy_with_grad(logits, targets)
}
