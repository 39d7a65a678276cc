//! Burn's own operations for every kernel of this crate: the definition each fast path is tested
//! against, and what runs wherever a fast path does not apply (wgpu, CUDA, other dtypes, autodiff
//! with a checkpointing strategy, or without the `flex` feature).

use burn::tensor::activation::{log_softmax, sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

use crate::adamw::{AdamWParams, ParamStep};

/// Burn's attention (flash kernels on GPU backends): heads in front, K/V heads repeated for
/// grouped-query attention. The same contract as [`crate::attention()`].
pub fn attention<B: Backend>(
    q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>, causal: bool,
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

/// Burn's linear, `x · w + bias`, with the weight and bias cast to `x`'s dtype when they differ
/// (PyTorch refuses mixed dtypes; a half-precision checkpoint under f32 activations lands here
/// on backends without a mixed kernel).
pub fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let dtype = x.dtype();
    burn::tensor::module::linear(x, weight.cast(dtype), bias.map(|b| b.cast(dtype)))
}

/// Burn's `silu(gate) * up`.
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    silu(gate) * up
}

/// Burn's `x * sigmoid(1.702 x)`.
pub fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone() * sigmoid(x * 1.702)
}

/// Burn's expression of [`rope`], broadcasting the tables over the heads.
pub fn rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 4>, signed_sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, s, h, d] = x.dims();
    // Tables are made in f32; under mixed precision the activations are bf16.
    let (cos, signed_sin) = (cos.clone().cast(x.dtype()), signed_sin.clone().cast(x.dtype()));
    let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
    let swapped = Tensor::cat(vec![x2, x1], 3);
    x * cos.expand([b, s, h, d]) + swapped * signed_sin.expand([b, s, h, d])
}

/// Hugging Face's arithmetic on any backend: statistics and normalisation in f32.
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let inv_rms = (x.clone().square().mean_dim(D - 1) + epsilon).sqrt().recip();
    gamma.cast(dtype).unsqueeze() * (x * inv_rms).cast(dtype)
}

/// [`crate::cross_entropy_with_grad()`] as Burn operations.
pub fn cross_entropy_with_grad<B: Backend>(logits: Tensor<B, 2>, targets: &[i64]) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let [n, vocab] = logits.dims();
    let device = logits.device();
    let log_probs = log_softmax(logits.cast(DType::F32), 1);
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(targets.to_vec(), [n]), &device);
    let one_hot: Tensor<B, 2> = index.clone().one_hot::<2>(vocab).float();
    let value = log_probs.clone().gather(1, index.reshape([n, 1])).sum().neg() / n as f64;
    let grad = (log_probs.exp() - one_hot) / n as f64;
    (value, grad)
}

/// [`crate::adamw_step()`] as Burn operations.
pub fn adamw_step<B: Backend, const D: usize>(p: &AdamWParams, step: ParamStep<B, D>) -> [Tensor<B, D>; 3] {
    let ParamStep { lr, time, param, grad, moments } = step;
    let (m, v) = moments.unwrap_or_else(|| (param.zeros_like(), param.zeros_like()));
    let (b1, b2) = (p.beta_1 as f64, p.beta_2 as f64);
    let m = m * b1 + grad.clone() * (1.0 - b1);
    let v = v * b2 + grad.square() * (1.0 - b2);
    let (bc1, bc2) = (1.0 - b1.powi(time as i32), 1.0 - b2.powi(time as i32));
    let delta = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + p.epsilon as f64);
    let param = param * (1.0 - lr * p.weight_decay as f64) - delta * lr;
    [param, m, v]
}

/// `x [m, in] · Wᵀ (+ b)` for a quantized weight: dequantized with Burn's operations
/// ([`crate::quant::QuantLinear::dequantize`]) and multiplied in `x`'s dtype.
pub fn quant_linear<B: Backend>(x: Tensor<B, 2>, q: &crate::quant::QuantLinear<B>) -> Tensor<B, 2> {
    let dtype = x.dtype();
    let w = q.dequantize().cast(dtype);
    let y = x.matmul(w.transpose());
    match &q.bias {
        Some(b) => y + b.val().cast(dtype).unsqueeze::<2>(),
        None => y,
    }
}
