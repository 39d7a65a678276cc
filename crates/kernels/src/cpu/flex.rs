//! Run-time access to the Flex CPU backend's storage from code generic over `B: Backend`: the
//! one door of the CPU fast paths (`skinny`, `dense`, `attention`, `fused`, `norm`, `adamw`,
//! `loss`, the KV-cache writes). Private to this crate: nothing outside it sees Flex.
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
pub(crate) fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>()
}

/// A zeroed f32 tensor as one zeroed allocation, when `B` is Flex (Flex's `zeros` allocates
/// bytes and copies them into an aligned buffer: for a KV cache that copy was a visible serial
/// part of a CPU prefill); `None` elsewhere or for another dtype.
pub(crate) fn zeros<B: Backend, const D: usize>(shape: [usize; D], dtype: DType) -> Option<Tensor<B, D>> {
    if dtype != DType::F32 || !is_flex::<B>() {
        return None;
    }
    from_f32(vec![0f32; shape.iter().product()], shape)
}

/// `t`'s autodiff primitive; call only when [`is_autodiff_flex`] holds.
pub(crate) fn autodiff_primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> AutodiffFlexTensor {
    let boxed: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    *boxed.downcast::<AutodiffFlexTensor>().expect("B is Autodiff<Flex>")
}

/// The inverse of [`autodiff_primitive`].
pub(crate) fn from_autodiff<B: Backend, const D: usize>(t: AutodiffFlexTensor) -> Tensor<B, D> {
    let boxed: Box<dyn Any> = Box::new(t);
    Tensor::from_primitive(TensorPrimitive::Float(
        *boxed.downcast::<B::FloatTensorPrimitive>().expect("B is Autodiff<Flex>"),
    ))
}

/// `t`'s f32 Flex tensor (its layout as is; an `Arc` clone, no copy), or `None` when `B` is not
/// Flex or the dtype is not f32.
pub(crate) fn flex_f32<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    let prim = t.clone().into_primitive().tensor();
    let flex = (&prim as &dyn Any).downcast_ref::<FlexTensor>()?;
    (flex.dtype() == DType::F32).then(|| flex.clone())
}

/// `t`'s Flex tensor whatever its dtype (an `Arc` clone), or `None` when `B` is not Flex.
pub(crate) fn flex_any<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    let prim = t.clone().into_primitive().tensor();
    (&prim as &dyn Any).downcast_ref::<FlexTensor>().cloned()
}

/// How a 2-D weight `[k, n]` lies in its storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MatrixLayout {
    /// Row-major `[k, n]`, as Burn's own `Linear` initialises it.
    RowMajor,
    /// The transpose of a row-major `[n, k]`: a PyTorch `[out, in]` weight viewed as Burn's
    /// `[in, out]`, as the checkpoint loader keeps it (no copy at load; each output's weights are
    /// one contiguous run, which is what a decode-time dot product wants).
    Transposed,
}

/// The layout of a 2-D Flex tensor whose storage holds exactly its elements from offset 0;
/// `None` for any other view (a slice, a broadcast).
pub(crate) fn matrix_layout(t: &FlexTensor) -> Option<MatrixLayout> {
    let layout = t.layout();
    let dims = layout.shape();
    if dims.num_dims() != 2 || layout.start_offset() != 0 {
        return None;
    }
    let (k, n) = (dims[0], dims[1]);
    let elements = t.bytes().len() / t.dtype().size().max(1);
    if elements != k * n {
        return None;
    }
    match layout.strides() {
        [rs, cs] if *rs == n as isize && *cs == 1 => Some(MatrixLayout::RowMajor),
        [rs, cs] if *rs == 1 && *cs == k as isize => Some(MatrixLayout::Transposed),
        _ if k == 1 || n == 1 => Some(MatrixLayout::RowMajor),
        _ => None,
    }
}

/// An f32 matrix as its storage and strides: row-major and transposed views in place, any other
/// view copied into a contiguous one first.
#[derive(Debug, Clone)]
pub(crate) struct StridedMatrix {
    tensor: FlexTensor,
    /// Elements between consecutive rows, and between consecutive columns.
    pub rs: usize,
    pub cs: usize,
}

impl StridedMatrix {
    /// `t` must be an f32 `[rows, cols]` Flex tensor.
    pub(crate) fn of(t: FlexTensor) -> Self {
        let dims = t.layout().shape().clone();
        let (rows, cols) = (dims[0], dims[1]);
        match matrix_layout(&t) {
            Some(MatrixLayout::RowMajor) => Self { tensor: t, rs: cols, cs: 1 },
            Some(MatrixLayout::Transposed) => Self { tensor: t, rs: 1, cs: rows },
            None => Self { tensor: t.to_contiguous(), rs: cols, cs: 1 },
        }
    }

    pub(crate) fn values(&self) -> &[f32] {
        self.tensor.storage::<f32>()
    }
}

/// A tensor of backend `B` holding `values` (row-major) with `shape`, when `B` is Flex.
pub(crate) fn from_f32<B: Backend, const D: usize>(values: Vec<f32>, shape: impl Into<Shape>) -> Option<Tensor<B, D>> {
    into_tensor(FlexTensor::from_data(TensorData::new(values, shape.into())))
}

/// `flex` as a tensor of backend `B`, when `B` is Flex.
pub(crate) fn into_tensor<B: Backend, const D: usize>(flex: FlexTensor) -> Option<Tensor<B, D>> {
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

/// Writes `new` `[b, s, …]` over positions `at .. at + s` of axis 1 of `buffer` `[b, capacity, …]`
/// in place, when `buffer` is an f32 Flex tensor nobody else holds (Flex's own `slice_assign`
/// copies the whole buffer first); otherwise gives both back. The caller checked that it fits.
pub(crate) fn write_positions<B: Backend, const D: usize>(
    buffer: Tensor<B, D>, at: usize, new: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    let (dims, s) = (buffer.dims(), new.dims()[1]);
    let (Some(src), true) = (flex_f32(&new).map(|t| t.to_contiguous()), s > 0 && dims[2..].iter().all(|&d| d > 0))
    else {
        return Err((buffer, new));
    };
    let (capacity, block) = (dims[1], s * dims[2..].iter().product::<usize>());
    let row = block / s;
    with_unique_storage(buffer, |dst| {
        for (bi, src) in values(&src).chunks_exact(block).enumerate() {
            let start = (bi * capacity + at) * row;
            dst[start..start + block].copy_from_slice(src);
        }
    })
    .map_err(|buffer| (buffer, new))
}

/// `t`'s contiguous f32 Flex tensor with storage of its own (to be written in place): its own
/// buffer when `t` was the last holder, else a copy; `None` when `t` is not an f32 Flex tensor.
pub(crate) fn owned_storage<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<FlexTensor> {
    let mut flex = flex_f32(&t)?.to_contiguous();
    drop(t);
    if flex.try_storage_mut::<f32>().is_none() {
        flex = flex_tensor(flex.as_slice::<f32>()?.to_vec(), flex.layout().shape().clone());
    }
    Some(flex)
}

/// Runs `write` on `t`'s f32 values in place when `t` is a contiguous Flex f32 tensor whose
/// storage nothing else holds, and returns it; otherwise gives `t` back untouched.
pub(crate) fn with_unique_storage<B: Backend, const D: usize>(
    t: Tensor<B, D>, write: impl FnOnce(&mut [f32]),
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    let prim: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    let mut flex = match prim.downcast::<FlexTensor>() {
        Ok(flex) => *flex,
        Err(prim) => {
            return Err(Tensor::from_primitive(TensorPrimitive::Float(
                *prim.downcast::<B::FloatTensorPrimitive>().expect("B's primitive"),
            )));
        }
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

/// `t`'s Flex tensor (an `Arc` clone), or `None` when `B` is not Flex.
pub(crate) fn flex_int<B: Backend, const D: usize>(t: &Tensor<B, D, burn::tensor::Int>) -> Option<FlexTensor> {
    let prim = t.clone().into_primitive();
    (&prim as &dyn Any).downcast_ref::<FlexTensor>().cloned()
}
