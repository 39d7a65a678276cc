//! Buffers of a preallocated KV cache: allocation and in-place appends.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

/// A zeroed buffer: `Tensor::zeros`, except that on Flex an f32 buffer is one zeroed allocation
/// (Flex's `zeros` copies into an aligned buffer: visible in a CPU prefill).
pub fn zeros<B: Backend, const D: usize>(shape: [usize; D], device: &B::Device, dtype: DType) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    if let Some(t) = crate::cpu::flex::zeros(shape, dtype) {
        return t;
    }
    Tensor::zeros(shape, (device, dtype))
}

/// `buffer` with positions `at .. at + s` of axis 1 replaced by `new`.
///
/// # Shapes
/// - `buffer`: `[b, capacity, ...]`, `new`: `[b, s, ...]` (the other axes equal), `at + s ≤ capacity`
///
/// Burn's `slice_assign`, except that on Flex an f32 buffer nobody else holds is written in place
/// (Flex's `slice_assign` copies the whole buffer first), so a decoding step copies only its new
/// keys and values. A buffer someone else holds (a cloned cache) is never written: it stays a
/// snapshot.
///
/// # Panics
/// When `new` does not fit `buffer` at `at` (a caller's bug, not an input's).
pub fn assign_positions<B: Backend, const D: usize>(
    buffer: Tensor<B, D>, at: usize, new: Tensor<B, D>,
) -> Tensor<B, D> {
    let (dims, new_dims) = (buffer.dims(), new.dims());
    let s = new_dims[1];
    let fits = D >= 2 && at + s <= dims[1] && (0..D).all(|i| i == 1 || dims[i] == new_dims[i]);
    assert!(fits, "assign_positions: {new_dims:?} at position {at} does not fit in {dims:?}");
    #[cfg(feature = "flex")]
    let (buffer, new) = match crate::cpu::flex::write_positions(buffer, at, new) {
        Ok(written) => return written,
        Err(inputs) => inputs,
    };
    let ranges: [std::ops::Range<usize>; D] = std::array::from_fn(|i| if i == 1 { at..at + s } else { 0..dims[i] });
    buffer.slice_assign(ranges, new)
}

/// The address of `t`'s storage, where the backend tells it (Flex): lets a caller test that a
/// cache step wrote in place (the same address after the step) without holding the buffer, which
/// would itself prevent the in-place write. `None` elsewhere.
pub fn storage_address<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<usize> {
    #[cfg(feature = "flex")]
    return crate::cpu::flex::flex_f32(t).map(|f| f.storage::<f32>().as_ptr() as usize);
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        None
    }
}
