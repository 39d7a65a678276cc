//! Softmax attention on `[batch, seq, heads, head_dim]` tensors, grouped-query aware.

use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
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
/// `repeat_kv` copy); elsewhere [`reference`].
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    causal: bool,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    return crate::cpu::attention::attention(q, k, v, mask, causal);
    #[cfg(not(feature = "flex"))]
    reference(q, k, v, mask, causal)
}

/// Burn's attention (flash kernels on GPU backends): heads in front, K/V heads repeated for
/// grouped-query attention. The same contract as [`attention`].
pub fn reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
    causal: bool,
) -> Tensor<B, 4> {
    let [b, _, h, d] = q.dims();
    let [_, sk, kv_heads, _] = k.dims();
    let repeat = |t: Tensor<B, 4>| {
        let t = t.swap_dims(1, 2);
        if kv_heads == h {
            return t;
        }
        t.unsqueeze_dim::<5>(2).expand([b, kv_heads, h / kv_heads, sk, d]).reshape([b, h, sk, d])
    };
    let options = AttentionModuleOptions { is_causal: causal, ..Default::default() };
    let mask = mask.map(|m| {
        let [mb, _, mq, mk] = m.dims();
        m.expand([mb, h, mq, mk])
    });
    burn_attention(q.swap_dims(1, 2), repeat(k), repeat(v), mask, None, options).swap_dims(1, 2)
}
