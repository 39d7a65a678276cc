//! Linear layers on token sequences.

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// A linear layer on `[batch, tokens, in]` computed as one `[batch × tokens, in]` product.
///
/// # Shapes
/// - `x`: `[b, s, in]`, output: `[b, s, out]` (Burn's `Linear` weight is `[in, out]`)
///
/// Burn's `Linear` on a 3-D input runs one matrix product per batch row, and a CPU gemm packs the
/// whole weight matrix again for each of them: at decode time (one token per row) that packing is
/// most of the work, and in training the weight gradient becomes `batch` small products instead of
/// one. Flattening the tokens first gives the same values with one product. On Flex, up to 16
/// rows (decoding) stream the weight once in panels instead of packing it, more call gemm
/// directly (no zeroed, copied output; own backward under autodiff).
///
/// The weight may be in another dtype than `x` (an f16/bf16 checkpoint kept in half precision
/// under f32 activations): on Flex the kernels read it directly (decode: converted as it streams;
/// more rows: converted block by block, also with a frozen weight under autodiff); elsewhere it is
/// cast to `x`'s dtype for the product.
pub fn linear_tokens<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, s, d] = x.dims();
    let x = x.reshape([b * s, d]);
    let (weight, bias) = (linear.weight.val(), linear.bias.as_ref().map(|b| b.val()));
    #[cfg(feature = "flex")]
    let fast = {
        use crate::cpu::{dense, half_weight, skinny};
        skinny::skinny_linear(&x, &weight, bias.as_ref())
            .or_else(|| dense::linear(&x, &weight, bias.as_ref()))
            .or_else(|| half_weight::linear(&x, &weight, bias.as_ref()))
    };
    #[cfg(not(feature = "flex"))]
    let fast = None;
    let y = fast.unwrap_or_else(|| crate::reference::linear(x, weight, bias));
    let out = y.dims()[1];
    y.reshape([b, s, out])
}
