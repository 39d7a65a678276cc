//! `silu(gate) · up`, LLaMA's MLP activation, in one multi-threaded pass on the Flex CPU backend.
//!
//! Burn computes it as three passes (sigmoid, two products), each allocating, on one thread;
//! the exponential makes it a visible part of a CPU prefill. Here it is one pass over both
//! inputs with the same arithmetic as Flex's sigmoid (so the same bits), split among the rayon
//! threads. Under autodiff, or on other backends, Burn's own operations run.

use crate::flex::{flex_f32, from_f32};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

/// `silu(gate) * up` (same shapes).
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    match on_flex(&gate, &up) {
        Some(out) => out,
        None => silu(gate) * up,
    }
}

fn on_flex<B: Backend, const D: usize>(gate: &Tensor<B, D>, up: &Tensor<B, D>) -> Option<Tensor<B, D>> {
    if gate.dims() != up.dims() {
        return None;
    }
    let (g, u) = (flex_f32(gate)?.to_contiguous(), flex_f32(up)?.to_contiguous());
    let (g, u) = (g.as_slice::<f32>()?, u.as_slice::<f32>()?);
    let n = gate.shape().num_elements();
    if g.len() != n || u.len() != n {
        return None;
    }
    let mut out = vec![0f32; n];
    silu_mul_slices(g, u, &mut out);
    from_f32(out, gate.shape())
}

/// Flex's sigmoid, written the same way so that results are bit-identical.
#[inline]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub fn silu_mul_slices(gate: &[f32], up: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 1 << 13;
    let run = |((o, g), u): ((&mut [f32], &[f32]), &[f32])| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    };
    if out.len() >= 2 * CHUNK {
        out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(run);
    } else {
        run(((out, gate), up));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn same_bits_as_burns_silu_times_up_on_flex() {
        type B = burn::backend::Flex;
        let device = Default::default();
        B::seed(&device, 5);
        for shape in [[3usize, 7], [40, 1000]] {
            let gate = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 4.0), &device);
            let up = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let fused = silu_mul(gate.clone(), up.clone()).to_data().to_vec::<f32>().unwrap();
            let burn = (silu(gate) * up).to_data().to_vec::<f32>().unwrap();
            assert_eq!(fused, burn);
        }
    }
}
