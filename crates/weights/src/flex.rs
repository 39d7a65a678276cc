//! Run-time access to the Flex CPU backend's storage from code generic over `B: Backend`: the
//! one door of the CPU fast paths (`skinny`, `dense`, `attention`, `fused`, `norm`, and the
//! trainer's AdamW and loss).
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

/// Whether `B` is Flex itself (inference on the CPU).
fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
}

/// `Tensor::zeros` in `dtype`, except that on Flex an f32 tensor is one zeroed allocation (Flex's
/// `zeros` allocates bytes and copies them into an aligned buffer: for a KV cache that copy was
/// a visible serial part of a CPU prefill).
pub fn zeros<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device, dtype: DType) -> Tensor<B, D> {
    if dtype == DType::F32 && is_flex::<B>() {
        let n = shape.iter().product();
        if let Some(t) = from_f32(vec![0f32; n], shape) {
            return t;
        }
    }
    Tensor::zeros(shape, (device, dtype))
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

/// `buffer` `[b, capacity, …]` with positions `at .. at + s` of axis 1 replaced by `new`
/// `[b, s, …]`: Burn's `slice_assign`, except that on Flex an f32 buffer nobody else holds is
/// written in place (Flex's `slice_assign` copies the whole buffer first). A preallocated KV
/// cache appends through this, so a decoding step copies only its new keys and values.
pub fn assign_positions<B: Backend, const D: usize>(buffer: Tensor<B, D>, at: usize, new: Tensor<B, D>) -> Tensor<B, D> {
    let (dims, new_dims) = (buffer.dims(), new.dims());
    let s = new_dims[1];
    let fits = D >= 2 && at + s <= dims[1] && (0..D).all(|i| i == 1 || dims[i] == new_dims[i]);
    assert!(fits, "assign_positions: {new_dims:?} at position {at} does not fit in {dims:?}");
    let ranges: [std::ops::Range<usize>; D] = std::array::from_fn(|i| if i == 1 { at..at + s } else { 0..dims[i] });
    let (Some(src), true) = (flex_f32(&new).map(|t| t.to_contiguous()), s > 0 && dims[2..].iter().all(|&d| d > 0)) else { return buffer.slice_assign(ranges, new) };
    let (capacity, block) = (dims[1], s * dims[2..].iter().product::<usize>());
    let row = block / s;
    let written = with_unique_storage(buffer, |dst| {
        for (bi, src) in values(&src).chunks_exact(block).enumerate() {
            let start = (bi * capacity + at) * row;
            dst[start..start + block].copy_from_slice(src);
        }
    });
    match written {
        Ok(buffer) => buffer,
        Err(buffer) => buffer.slice_assign(ranges, new),
    }
}

/// Runs `write` on `t`'s f32 values in place when `t` is a contiguous Flex f32 tensor whose
/// storage nothing else holds, and returns it; otherwise gives `t` back untouched.
pub(crate) fn with_unique_storage<B: Backend, const D: usize>(t: Tensor<B, D>, write: impl FnOnce(&mut [f32])) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let prim: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    let mut flex = match prim.downcast::<FlexTensor>() {
        Ok(flex) => *flex,
        Err(prim) => return Err(Tensor::from_primitive(TensorPrimitive::Float(*prim.downcast::<B::FloatTensorPrimitive>().expect("B's primitive")))),
    };
    let n = flex.layout().num_elements();
    let whole = flex.is_contiguous() && flex.layout().start_offset() == 0 && flex.dtype() == DType::F32;
    match whole.then(|| flex.try_storage_mut::<f32>()).flatten() {
        Some(values) if values.len() == n => {
            write(values);
            Ok(into_tensor(flex).expect("Flex"))
        }
        _ => Err(into_tensor(flex).expect("Flex")),
    }
}
