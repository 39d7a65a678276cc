//! Run-time access to the Flex CPU backend's storage from code generic over `B: Backend`: the
//! one door of the CPU fast paths (`skinny`, `heads`, `fused`, and the trainer's AdamW and loss).
//! On any other backend, and under autodiff, the tensor primitive is not a `FlexTensor` and
//! these return `None`, so callers fall back to Burn's own operations.

use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use std::any::{Any, TypeId};

/// The tensor primitive of `Autodiff<Flex>`, the CPU training backend, whose fused operations
/// (attention, SwiGLU) implement their own backward pass.
pub(crate) type AutodiffFlexTensor = <Autodiff<Flex> as BackendTypes>::FloatTensorPrimitive;

/// Whether `B` is `Autodiff<Flex>` (with its default, non-checkpointing strategy).
pub(crate) fn is_autodiff_flex<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<AutodiffFlexTensor>()
}

/// `t`'s autodiff primitive; call only when [`is_autodiff_flex`] holds.
pub(crate) fn autodiff_primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> AutodiffFlexTensor {
    let boxed: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    *boxed.downcast::<AutodiffFlexTensor>().expect("B is Autodiff<Flex>")
}

/// The inverse of [`autodiff_primitive`].
pub(crate) fn from_autodiff<B: Backend, const D: usize>(t: AutodiffFlexTensor) -> Tensor<B, D> {
    let boxed: Box<dyn Any> = Box::new(t);
    Tensor::from_primitive(TensorPrimitive::Float(*boxed.downcast::<B::FloatTensorPrimitive>().expect("B is Autodiff<Flex>")))
}

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

/// The values of a contiguous f32 Flex tensor (the fast paths call `to_contiguous` first).
pub(crate) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32")
}

/// A contiguous f32 Flex tensor holding `values` (row-major) with `shape`.
pub(crate) fn flex_tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}
