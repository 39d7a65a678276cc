//! Rotary position embeddings as Hugging Face computes them (`rotate_half` pairing).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Rotary embedding tables for given positions: `cos`, `sin` of shape `[batch, seq, 1, head_dim]`
/// (applied to q/k in the projections' `[batch, seq, heads, head_dim]` layout, where they are contiguous).
#[derive(Debug, Clone)]
pub struct Rotary<B: Backend> {
    cos: Tensor<B, 4>,
    /// `sin` with its first half negated: `rotate_half(x) * sin = swap_halves(x) * signed_sin`.
    signed_sin: Tensor<B, 4>,
}

impl<B: Backend> Rotary<B> {
    /// Computed as Hugging Face does, in f32: `inv_freq = theta^(-2i/d)`, angles = pos × inv_freq,
    /// duplicated over both halves of the head.
    pub fn new(positions: Tensor<B, 2, Int>, head_dim: usize, theta: f64) -> Self {
        let device = positions.device();
        let [b, s] = positions.dims();
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let inv_freq = Tensor::<B, 1>::from_data(TensorData::new(inv_freq, [half]), &device).reshape([1, 1, half]);
        let angles = positions.float().reshape([b, s, 1]) * inv_freq; // [b, s, half]
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        Self {
            cos: Tensor::cat(vec![cos.clone(), cos], 2).reshape([b, s, 1, head_dim]),
            signed_sin: Tensor::cat(vec![sin.clone().neg(), sin], 2).reshape([b, s, 1, head_dim]),
        }
    }

    /// `x * cos + rotate_half(x) * sin` on `[batch, seq, heads, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        llava_kernels::rope(x, &self.cos, &self.signed_sin)
    }
}
