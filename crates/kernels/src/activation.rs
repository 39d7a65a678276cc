//! Element-wise layers: LLaMA's SwiGLU activation, CLIP's `quick_gelu`, residual adds, RoPE.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// `silu(gate) · up`, LLaMA's MLP activation (same shapes in and out). On Flex one threaded pass
/// (and one for the backward under `Autodiff<Flex>`), bit-identical to [`crate::reference::silu_mul`].
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    return crate::cpu::fused::silu_mul(gate, up);
    #[cfg(not(feature = "flex"))]
    crate::reference::silu_mul(gate, up)
}

/// `x · σ(1.702 x)`, OpenAI CLIP's `quick_gelu`. On Flex one threaded pass with its own backward
/// (within float rounding of [`crate::reference::quick_gelu`]).
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    return crate::cpu::fused::quick_gelu(x);
    #[cfg(not(feature = "flex"))]
    crate::reference::quick_gelu(x)
}

/// `a + b` (same shapes), for residual connections. On Flex inference the sum is written into
/// `a`'s storage when nothing else holds it, in one threaded pass (4× Burn's add into a new
/// buffer for a batch-8 prefill's `[8, 96, 512]`); elsewhere, and under autodiff, Burn's add.
pub fn add<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    return crate::cpu::fused::add(a, b);
    #[cfg(not(feature = "flex"))]
    (a + b)
}

/// Rotary embedding as Hugging Face's `x·cos + rotate_half(x)·sin`, written as
/// `x · cos + swap_halves(x) · signed_sin` (`signed_sin` = `sin` with its first half negated).
///
/// # Shapes
/// - `x`: `[b, s, heads, d]`, `d` even
/// - `cos`, `signed_sin`: `[b, s, 1, d]` (f32; cast to `x`'s dtype here)
/// - output: `[b, s, heads, d]`
///
/// On Flex one threaded pass over the tables, with its own backward under `Autodiff<Flex>`;
/// elsewhere [`crate::reference::rope`].
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, signed_sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if let Some(out) = crate::cpu::fused::rope(&x, cos, signed_sin) {
        return out;
    }
    crate::reference::rope(x, cos, signed_sin)
}
