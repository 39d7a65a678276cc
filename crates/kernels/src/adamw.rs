//! One AdamW step for one parameter tensor.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

/// AdamW hyperparameters, as the reference (and `torch.optim.AdamW`) names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

/// One AdamW step (`time` counts steps from 1), Burn's and `torch.optim.AdamW`'s formula:
/// `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
/// `p ← p·(1 − lr·wd) − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`.
///
/// # Shapes
/// `param`, `grad` and the moments `(m, v)` all have one shape (f32); `moments` is `None` at
/// the first step. Returns `[param, m, v]` after the step.
///
/// On Flex one pass over the four buffers, the moments updated in place when the caller handed
/// over the only reference to them (a kept copy of the state is never written); elsewhere
/// [`reference`].
pub fn adamw_step<B: Backend, const D: usize>(
    params: &AdamWParams,
    lr: f64,
    time: usize,
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
) -> [Tensor<B, D>; 3] {
    #[cfg(feature = "flex")]
    let moments = match crate::cpu::adamw::step(params, lr, time, &param, &grad, moments) {
        Ok(updated) => return updated,
        Err(moments) => moments,
    };
    reference(params, lr, time, param, grad, moments)
}

/// [`adamw_step`] as Burn operations.
pub fn reference<B: Backend, const D: usize>(
    p: &AdamWParams,
    lr: f64,
    time: usize,
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
) -> [Tensor<B, D>; 3] {
    let (m, v) = moments.unwrap_or_else(|| (param.zeros_like(), param.zeros_like()));
    let (b1, b2) = (p.beta_1 as f64, p.beta_2 as f64);
    let m = m * b1 + grad.clone() * (1.0 - b1);
    let v = v * b2 + grad.square() * (1.0 - b2);
    let (bc1, bc2) = (1.0 - b1.powi(time as i32), 1.0 - b2.powi(time as i32));
    let delta = (m.clone() / bc1) / ((v.clone() / bc2).sqrt() + p.epsilon as f64);
    let param = param * (1.0 - lr * p.weight_decay as f64) - delta * lr;
    [param, m, v]
}
