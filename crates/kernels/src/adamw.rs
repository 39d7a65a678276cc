//! The inputs of one AdamW step ([`crate::adamw_step()`]).

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

/// One parameter's inputs to an AdamW step.
///
/// # Shapes
/// `param`, `grad` and the moments `(m, v)` all have one shape (f32).
#[derive(Debug, Clone)]
pub struct ParamStep<B: Backend, const D: usize> {
    pub lr: f64,
    /// Steps so far, this one included (from 1).
    pub time: usize,
    pub param: Tensor<B, D>,
    pub grad: Tensor<B, D>,
    /// `(m, v)` after the previous step; `None` at the first.
    pub moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
}
