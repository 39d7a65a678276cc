//! RMSNorm as Hugging Face's `LlamaRMSNorm` computes it.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// RMSNorm over the last dimension of `x` with weight `gamma` (its length is that dimension):
/// statistics in f32 whatever `x`'s dtype, then cast back, then the weight (Burn's `RmsNorm`
/// divides in the input dtype). On Flex one threaded pass per row block keeping `1/rms` per row
/// for its own backward; elsewhere [`reference`].
///
/// # Shapes
/// - `x`: `[..., width]`, `gamma`: `[width]`, output: as `x`
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    return crate::cpu::norm::rms_norm(x, gamma, epsilon);
    #[cfg(not(feature = "flex"))]
    reference(x, gamma, epsilon)
}

/// Hugging Face's arithmetic on any backend: statistics and normalisation in f32.
pub fn reference<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let inv_rms = (x.clone().square().mean_dim(D - 1) + epsilon).sqrt().recip();
    gamma.unsqueeze() * (x * inv_rms).cast(dtype)
}
