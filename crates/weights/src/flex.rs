//! Run-time access to the Flex CPU backend's storage from code generic over `B: Backend`: the
//! one door of the CPU fast paths (`skinny`, `heads`, `fused`, and the trainer's AdamW and loss).
//! On any other backend, and under autodiff, the tensor primitive is not a `FlexTensor` and
//! these return `None`, so callers fall back to Burn's own operations.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use std::any::Any;

/// `t`'s f32 Flex tensor (its layout as is; an `Arc` clone, no copy), or `None` when `B` is not
/// Flex or the dtype is not f32.
pub fn flex_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    let prim = t.clone().into_primitive().tensor();
    let flex = (&prim as &dyn Any).downcast_ref::<FlexTensor>()?;
    (flex.dtype() == DType::F32).then(|| flex.clone())
}

/// A tensor of backend `B` holding `values` (row-major) with `shape`, when `B` is Flex.
pub fn from_f32<B: Backend, const D: usize>(values: Vec<f32>, shape: impl Into<Shape>) -> Option<Tensor<B, D>> {
    into_tensor(FlexTensor::from_data(TensorData::new(values, shape.into())))
}

/// `flex` as a tensor of backend `B`, when `B` is Flex.
pub fn into_tensor<B: Backend, const D: usize>(flex: FlexTensor) -> Option<Tensor<B, D>> {
    let flex: Box<dyn Any> = Box::new(flex);
    let prim = *flex.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(prim)))
}
