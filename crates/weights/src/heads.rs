//! Moving attention heads in front of the sequence (`[b, s, h, d]` ↔ `[b, h, s, d]`) as one
//! contiguous copy of `d`-float rows on the Flex CPU backend.
//!
//! Burn's `swap_dims` is a free view, but the CPU backend's attention (and the reshape after it)
//! then copies the view element by element through a generic strided iterator, because the
//! layout cannot be flattened to two dimensions: in a profile of prefill, a third of the
//! non-matmul time. Copying whole head rows instead is a memcpy per row. Under autodiff, or on
//! other backends, this is the plain view.

use crate::flex::{flex_f32, from_f32};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

/// `x.swap_dims(1, 2)`, materialised contiguous on Flex (inference); the view elsewhere.
pub fn swap_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    match swap_on_flex(&x) {
        Some(swapped) => swapped,
        None => x.swap_dims(1, 2),
    }
}

fn swap_on_flex<B: Backend>(x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    let [a, b, c, d] = x.dims();
    let flex = flex_f32(x)?.to_contiguous();
    let src = flex.as_slice::<f32>()?;
    if src.len() != a * b * c * d {
        return None;
    }
    let mut out = vec![0f32; src.len()];
    swap_middle(src, &mut out, a, b, c, d);
    from_f32(out, [a, c, b, d])
}

/// `out[i, k, j, :] = src[i, j, k, :]` for `src` `[a, b, c, d]`, both row-major.
pub fn swap_middle(src: &[f32], out: &mut [f32], a: usize, b: usize, c: usize, d: usize) {
    assert!(src.len() == a * b * c * d && out.len() == src.len());
    if d == 0 || b == 0 {
        return;
    }
    // One output block [i, k, :, :] (b rows of d) per task.
    let copy_block = |(block, dst): (usize, &mut [f32])| {
        let (i, k) = (block / c, block % c);
        for (j, row) in dst.chunks_exact_mut(d).enumerate() {
            let from = ((i * b + j) * c + k) * d;
            row.copy_from_slice(&src[from..from + d]);
        }
    };
    if src.len() >= 1 << 15 {
        out.par_chunks_mut(b * d).enumerate().for_each(copy_block);
    } else {
        out.chunks_mut(b * d).enumerate().for_each(copy_block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn equals_burns_swap_dims_on_flex_and_is_its_own_inverse() {
        type B = burn::backend::Flex;
        let device = Default::default();
        for shape in [[2usize, 5, 3, 4], [1, 70, 8, 64]] {
            let n: usize = shape.iter().product();
            let x = Tensor::<B, 4>::from_data(TensorData::new((0..n).map(|i| i as f32).collect::<Vec<_>>(), shape), &device);
            let fast = swap_heads(x.clone());
            assert_eq!(fast.dims(), [shape[0], shape[2], shape[1], shape[3]]);
            assert_eq!(fast.to_data().to_vec::<f32>().unwrap(), x.clone().swap_dims(1, 2).to_data().to_vec::<f32>().unwrap());
            assert_eq!(swap_heads(fast).to_data().to_vec::<f32>().unwrap(), x.to_data().to_vec::<f32>().unwrap());
        }
    }
}
