//! The compute kernels of the LLaVA crates: one backend-generic function per layer operation
//! (linear layers on token sequences, attention, RMSNorm, SwiGLU, `quick_gelu`, RoPE, residual
//! adds, KV-cache writes, the training loss's cross-entropy, the AdamW update, greedy argmax).
//!
//! Model code calls these and never sees a backend: each runs Burn's operations (its
//! `reference`) on any backend, and with the `flex` feature (on by default) a kernel of ours
//! where the tensors are the Flex CPU backend's (and, with its own backward pass, under
//! `Autodiff<Flex>`), found by a run-time downcast that is private to this crate. Every kernel
//! is tested against its reference.
//!
//! This crate must not depend on any other crate of the workspace; only it depends on Flex,
//! gemm and burn-autodiff's internals.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::tensor::Tensor;
//!
//! let device = Default::default();
//! let x = Tensor::<Flex, 2>::from_floats([[1.0, -2.0, 3.0, 0.5]], &device);
//! let gamma = Tensor::<Flex, 1>::ones([4], &device);
//! let y = llava_kernels::rms_norm(x.clone(), gamma.clone(), 1e-6);
//! let expected = llava_kernels::reference::rms_norm(x, gamma, 1e-6);
//! assert!((y - expected).abs().max().into_scalar() < 1e-6);
//! ```

pub mod activation;
pub mod adamw;
pub mod attention;
#[cfg(feature = "flex")]
mod cpu;
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
mod fastexp;
pub mod kv;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod probe;
pub mod quant;
pub mod reference;

pub use activation::{add, quick_gelu, rope, silu_mul};
pub use adamw::{AdamWParams, ParamStep};
pub use attention::attention;
pub use linear::linear_tokens;
pub use loss::cross_entropy_with_grad;
pub use norm::{layer_norm, rms_norm};
pub use quant::{AnyLinear, QuantFormat, QuantLinear, QuantMatrix};

/// The dtype activations run in for weights held in `weights`.
///
/// On the Flex CPU backend, with or without autodiff, f32 whatever the weights' dtype: its
/// kernels read f16/bf16 weights directly (half the bytes per decoded token; bf16 weights
/// multiply in bf16 with AVX-512 BF16, the activations rounded as they are read) and the rest of
/// its arithmetic is fastest in f32 (Flex computes bf16 through f32 conversions: a 7B stage-1
/// step with bf16 activations spent half its time in Flex's conversions and f32 gemm). Everywhere
/// else the weights' own dtype, as PyTorch with `torch_dtype`.
pub fn activation_dtype<B: burn::tensor::backend::Backend>(weights: burn::tensor::DType) -> burn::tensor::DType {
    #[cfg(feature = "flex")]
    if matches!(weights, burn::tensor::DType::F16 | burn::tensor::DType::BF16)
        && (crate::cpu::flex::is_flex::<B>() || crate::cpu::flex::is_autodiff_flex::<B>())
    {
        return burn::tensor::DType::F32;
    }
    weights
}

/// Whether products of half-precision tensors on `B` compute through f32 copies of their
/// operands (Flex and `Autodiff<Flex>`: a bf16 training step holds an f32 copy of the matrix it
/// multiplies by), for memory plans.
pub fn half_products_widen<B: burn::tensor::backend::Backend>() -> bool {
    #[cfg(feature = "flex")]
    return crate::cpu::flex::is_flex::<B>() || crate::cpu::flex::is_autodiff_flex::<B>();
    #[cfg(not(feature = "flex"))]
    false
}

/// Whether a quantized layer's product on `B` dequantizes its weight again in the backward pass
/// (`Autodiff<Flex>`: [`QuantLinear`]'s own backward) instead of the autodiff graph keeping the
/// dequantized weight from the forward pass (Burn's dequantize + matmul elsewhere), for memory plans.
pub fn quantized_backward_recomputes<B: burn::tensor::backend::Backend>() -> bool {
    #[cfg(feature = "flex")]
    return crate::cpu::flex::is_autodiff_flex::<B>();
    #[cfg(not(feature = "flex"))]
    false
}

/// One AdamW step, Burn's and `torch.optim.AdamW`'s formula:
/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p·(1 − lr·wd) − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`. Returns `[param, m, v]`.
///
/// On Flex one pass over the four buffers, the moments updated in place when the caller handed
/// over the only reference to them (a kept copy of the state is never written); elsewhere
/// [`crate::reference::adamw_step`].
pub fn adamw_step<B: burn::tensor::backend::Backend, const D: usize>(
    params: &AdamWParams, step: ParamStep<B, D>,
) -> [burn::tensor::Tensor<B, D>; 3] {
    #[cfg(feature = "flex")]
    let step = match crate::cpu::adamw::step(params, step) {
        Ok(updated) => return updated,
        Err(step) => step,
    };
    crate::reference::adamw_step(params, step)
}

/// Index of the largest value; the first one on ties, as `torch.argmax`. What
/// `for v: if v > values[best] { best = i }` gives: NaNs never win, unless first (then nothing
/// beats it). The maximum comes from a vectorised pass (AVX-512/AVX2 where the CPU has it), then
/// its first position.
pub fn argmax(values: &[f32]) -> u32 {
    if values.first().is_none_or(|v| v.is_nan()) {
        return 0;
    }
    let max = fastexp::max(values);
    // The first position holding the maximum, found 64 values at a time (a comparison the
    // compiler vectorises) before the scalar search inside that block: a greedy step of a batch
    // samples every row's 32k logits, and a scalar scan was a quarter of a small model's step.
    const BLOCK: usize = 64;
    let block = values.chunks(BLOCK).position(|c| c.iter().fold(false, |hit, &v| hit | (v == max))).unwrap_or(0);
    let start = block * BLOCK;
    values[start..].iter().position(|&v| v == max).map_or(0, |i| start + i) as u32
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn argmax_agrees_with_the_scalar_loop_on_long_rows() {
        let scalar = |v: &[f32]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32;
        for len in [1usize, 15, 16, 17, 63, 64, 65, 100, 32064] {
            for at in [0, len / 3, len - 1] {
                let mut v: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 2.0).collect();
                v[at] = 5.0;
                assert_eq!(argmax(&v), at as u32, "len {len}, max at {at}");
                // A tie later keeps the first; a NaN elsewhere never wins; a NaN first does.
                v[len - 1] = 5.0;
                assert_eq!(argmax(&v), scalar(&v));
                if len > 2 {
                    v[1] = f32::NAN;
                    assert_eq!(argmax(&v), scalar(&v));
                }
                v[0] = f32::NAN;
                assert_eq!(argmax(&v), 0);
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
        assert_eq!(argmax(&[]), 0);
    }
}
