//! The cross-entropy's value and gradient in one pass over the logits on Flex (Burn
//! differentiating log-softmax and gather op by op makes about ten passes over `[n, 32k]` logits,
//! each allocating).

use crate::cpu::flex::{flex_f32, from_f32, values};
use crate::fastexp::{self, exp_shifted_sum};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

/// Mean cross-entropy of `targets` under f32 Flex `logits` `[n, vocab]` and its gradient w.r.t.
/// the logits; `None` elsewhere.
pub(crate) fn cross_entropy_with_grad<B: Backend>(
    logits: &Tensor<B, 2>, targets: &[i64],
) -> Option<(f64, Tensor<B, 2>)> {
    let [n, vocab] = logits.dims();
    let flex = flex_f32(logits)?.to_contiguous();
    let mut grad = vec![0f32; n * vocab];
    let total = cross_entropy_rows(values(&flex), vocab, targets, &mut grad);
    Some((total / n as f64, from_f32(grad, [n, vocab])?))
}

/// Per row: `lse − x[target]` (summed over rows, returned) and `(softmax − one-hot) / n` into
/// `grad`. One (vectorised) exponential per logit. Not generic, so compiled once, optimised, in this crate.
fn cross_entropy_rows(logits: &[f32], vocab: usize, targets: &[i64], grad: &mut [f32]) -> f64 {
    let scale = 1.0 / targets.len() as f32;
    grad.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((g, x), &t)| {
            let max = fastexp::max(x);
            g.copy_from_slice(x);
            let sum = exp_shifted_sum(g, max);
            let factor = scale / sum;
            g.iter_mut().for_each(|g| *g *= factor);
            g[t as usize] -= scale;
            (max + sum.ln() - x[t as usize]) as f64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    fn value_and_gradient_equal_the_reference() {
        let device = Default::default();
        Flex::seed(&device, 11);
        let logits = Tensor::<Flex, 2>::random([7, 1000], Distribution::Normal(0.0, 4.0), &device);
        let targets = [0i64, 999, 5, 5, 17, 400, 3];
        let (value, grad) = cross_entropy_with_grad(&logits, &targets).expect("Flex f32");
        let (ref_value, ref_grad) = crate::reference::cross_entropy_with_grad(logits, &targets);
        let ref_value = ref_value.into_scalar() as f64;
        assert!((value - ref_value).abs() < 1e-5 * ref_value.abs(), "{value} vs {ref_value}");
        let diff = (grad - ref_grad).abs().max().into_scalar();
        assert!(diff < 1e-7, "gradient differs by {diff}");
    }
}
