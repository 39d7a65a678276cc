//! Element-wise layers: LLaMA's SwiGLU activation, CLIP's `quick_gelu`, residual adds, RoPE.

use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;

/// `silu(gate) · up`, LLaMA's MLP activation (same shapes in and out). On Flex one threaded pass
/// (and one for the backward under `Autodiff<Flex>`), bit-identical to [`silu_mul_reference`].
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    return crate::cpu::fused::silu_mul(gate, up);
    #[cfg(not(feature = "flex"))]
    silu_mul_reference(gate, up)
}

/// Burn's `silu(gate) * up`.
pub fn silu_mul_reference<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// `x · σ(1.702 x)`, OpenAI CLIP's `quick_gelu`. On Flex one threaded pass with its own backward
/// (within float rounding of [`quick_gelu_reference`]).
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    return crate::cpu::fused::quick_gelu(x);
    #[cfg(not(feature = "flex"))]
    quick_gelu_reference(x)
}

/// Burn's `x * sigmoid(1.702 x)`.
pub fn quick_gelu_reference<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * sigmoid(x * 1.702)
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
/// elsewhere [`rope_reference`].
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, signed_sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    if let Some(out) = crate::cpu::fused::rope(&x, cos, signed_sin) {
        return out;
    }
    rope_reference(x, cos, signed_sin)
}

/// Burn's expression of [`rope`], broadcasting the tables over the heads.
pub fn rope_reference<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, signed_sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, s, h, d] = x.dims();
    // Tables are made in f32; under mixed precision the activations are bf16.
    let (cos, signed_sin) = (cos.clone().cast(x.dtype()), signed_sin.clone().cast(x.dtype()));
    let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
    let swapped = Tensor::cat(vec![x2, x1], 3);
    x * cos.expand([b, s, h, d]) + swapped * signed_sin.expand([b, s, h, d])
}
