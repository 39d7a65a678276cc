//! RMSNorm as Hugging Face's `LlamaRMSNorm` computes it.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// RMSNorm over the last dimension of `x` with weight `gamma` (its length is that dimension):
/// statistics in f32 whatever `x`'s dtype, then cast back, then the weight (Burn's `RmsNorm`
/// divides in the input dtype). On Flex one threaded pass per row block keeping `1/rms` per row
/// for its own backward; elsewhere [`crate::reference::rms_norm`].
///
/// # Shapes
/// - `x`: `[..., width]`, `gamma`: `[width]`, output: as `x`
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, D> {
    // A half-precision weight under f32 activations: its exact values, widened (it is small).
    let gamma = if gamma.dtype() == x.dtype() { gamma } else { gamma.cast(x.dtype()) };
    #[cfg(feature = "flex")]
    return crate::cpu::norm::rms_norm(x, gamma, epsilon);
    #[cfg(not(feature = "flex"))]
    crate::reference::rms_norm(x, gamma, epsilon)
}
