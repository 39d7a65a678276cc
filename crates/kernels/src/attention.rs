//! Softmax attention on `[batch, seq, heads, head_dim]` tensors, grouped-query aware.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

/// Softmax attention.
///
/// # Shapes
/// - `q`: `[b, sq, h, d]`; `k`, `v`: `[b, sk, kv_heads, d]` with `h` a multiple of `kv_heads`
/// - `mask`: `[b, 1 or h, sq, sk]`, `true` where a query may not attend
/// - output: `[b, sq, h, d]`
///
/// `causal` also hides the future, aligned bottom-right (right for a cached decode step, where
/// `sq < sk`). Neither: every query sees every key (CLIP). A fully masked row gives zeros, as in
/// Burn. On Flex (and `Autodiff<Flex>`, with its own backward) one task per (batch, kv head)
/// computes scores, softmax and `P·V` in place, reading K/V through strides (no head swap, no
/// `repeat_kv` copy); elsewhere [`crate::reference::attention`].
pub fn attention<B: Backend>(
    q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>, causal: bool,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    return crate::cpu::attention::attention(q, k, v, mask, causal);
    #[cfg(not(feature = "flex"))]
    crate::reference::attention(q, k, v, mask, causal)
}
