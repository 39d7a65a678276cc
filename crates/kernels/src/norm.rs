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
    let gamma = gamma.cast(x.dtype());
    #[cfg(feature = "flex")]
    return crate::cpu::norm::rms_norm(x, gamma, epsilon);
    #[cfg(not(feature = "flex"))]
    crate::reference::rms_norm(x, gamma, epsilon)
}

/// LayerNorm over the last dimension, as PyTorch's `layer_norm` computes it for any input dtype:
/// mean, variance, normalisation and the affine step in f32, one rounding to `x`'s dtype at the
/// end (Burn's `LayerNorm` works in the input dtype, and refuses a weight of another dtype).
///
/// # Shapes
/// - `x`: `[..., width]`, `gamma`, `beta`: `[width]`, output: as `x`
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>, gamma: Tensor<B, 1>, beta: Option<Tensor<B, 1>>, epsilon: f64,
) -> Tensor<B, D> {
    use burn::tensor::DType;
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    let normalised = (x - mean) / (var + epsilon).sqrt();
    let y = normalised * gamma.cast(DType::F32).unsqueeze();
    let y = match beta {
        Some(beta) => y + beta.cast(DType::F32).unsqueeze(),
        None => y,
    };
    y.cast(dtype)
}
