//! LLaMA's RMSNorm as Hugging Face's `LlamaRMSNorm` computes it: in f32 whatever the input's
//! dtype, the normalised input cast back, then scaled by the weight:
//!
//! ```text
//! y = γ · cast(x · 1/√(mean(x²) + ε))
//! ```
//!
//! (Burn's `RmsNorm` divides in the input's dtype, which differs under bf16.) On the Flex CPU
//! backend with f32 tensors it is one threaded pass, and under `Autodiff<Flex>` an autodiff node
//! of its own, with `r = 1/√(mean(x²) + ε)` per row and `u = γ ⊙ dy`:
//!
//! ```text
//! dx = r·u − x · r³ · mean(u ⊙ x)          dγ = Σ_rows dy ⊙ x · r
//! ```
//!
//! Burn composes it from five element-wise operations and their backward, each a single-threaded
//! pass that allocates; two norms per decoder layer made them a visible part of a CPU step.

use crate::cpu::flex::{
    AutodiffFlexTensor, autodiff_primitive, flex_f32, flex_tensor, from_autodiff, from_f32, is_autodiff_flex, values,
};
use crate::fastexp::dot;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// RMSNorm over the last dimension of `x` with weight `gamma` (its length is that dimension).
pub(crate) fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, epsilon: f64) -> Tensor<B, D> {
    let width = x.dims()[D - 1];
    let fast = x.dtype() == DType::F32 && gamma.dtype() == DType::F32 && gamma.dims() == [width] && width > 0;
    if fast && is_autodiff_flex::<B>() {
        return from_autodiff(autodiff_rms_norm(autodiff_primitive(x), autodiff_primitive(gamma), epsilon as f32));
    }
    if fast && let (Some(xf), Some(gf)) = (flex_f32(&x), flex_f32(&gamma)) {
        let (xf, gf) = (xf.to_contiguous(), gf.to_contiguous());
        let mut out = vec![0f32; values(&xf).len()];
        let mut inv_rms = vec![0f32; values(&xf).len() / width];
        forward_rows(values(&xf), values(&gf), epsilon as f32, &mut out, &mut inv_rms);
        if let Some(out) = from_f32(out, x.shape()) {
            return out;
        }
    }
    crate::reference::rms_norm(x, gamma, epsilon)
}

/// Rows of `x` (each `gamma.len()` wide) per rayon task.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width).max(1)
}

const CHUNK: usize = 1 << 13;

/// `out = γ · x · r` per row, and `r` per row into `inv_rms`.
fn forward_rows(x: &[f32], gamma: &[f32], epsilon: f32, out: &mut [f32], inv_rms: &mut [f32]) {
    let d = gamma.len();
    let rows = rows_per_task(d);
    out.par_chunks_mut(rows * d).zip(x.par_chunks(rows * d)).zip(inv_rms.par_chunks_mut(rows)).for_each(
        |((out, x), inv_rms)| {
            for ((o, x), r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(inv_rms.iter_mut()) {
                *r = 1.0 / (dot(x, x) / d as f32 + epsilon).sqrt();
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(gamma) {
                    *o = g * (x * *r);
                }
            }
        },
    );
}

/// `dx` per row (when `dx` is given) and `dγ` summed over rows (when `want_dgamma`).
fn backward_rows(
    x: &[f32], gamma: &[f32], inv_rms: &[f32], dy: &[f32], mut dx: Option<&mut [f32]>, want_dgamma: bool,
) -> Option<Vec<f32>> {
    let d = gamma.len();
    let rows = rows_per_task(d);
    let task = |(t, (x, dy)): (usize, (&[f32], &[f32])), dx: Option<&mut [f32]>| -> Option<Vec<f32>> {
        let r = &inv_rms[t * rows..];
        if let Some(dx) = dx {
            let mut u = vec![0f32; d];
            for (i, (dx, (x, dy))) in dx.chunks_exact_mut(d).zip(x.chunks_exact(d).zip(dy.chunks_exact(d))).enumerate()
            {
                for ((u, &g), &dy) in u.iter_mut().zip(gamma).zip(dy) {
                    *u = g * dy;
                }
                let r = r[i];
                let c = r * r * r * dot(&u, x) / d as f32;
                for ((dx, &u), &x) in dx.iter_mut().zip(&u).zip(x) {
                    *dx = r * u - x * c;
                }
            }
        }
        want_dgamma.then(|| {
            let mut dg = vec![0f32; d];
            for (i, (x, dy)) in x.chunks_exact(d).zip(dy.chunks_exact(d)).enumerate() {
                let r = r[i];
                for ((dg, &x), &dy) in dg.iter_mut().zip(x).zip(dy) {
                    *dg += dy * x * r;
                }
            }
            dg
        })
    };
    let sum = |a: Option<Vec<f32>>, b: Option<Vec<f32>>| match (a, b) {
        (Some(mut a), Some(b)) => {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            Some(a)
        }
        (a, b) => a.or(b),
    };
    let inputs = x.par_chunks(rows * d).zip(dy.par_chunks(rows * d)).enumerate();
    match dx.take() {
        Some(dx) => {
            inputs.zip(dx.par_chunks_mut(rows * d)).map(|(input, dx)| task(input, Some(dx))).reduce(|| None, sum)
        }
        None => inputs.map(|input| task(input, None)).reduce(|| None, sum),
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// The contiguous input, the weight and `1/rms` per row.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (x, gamma, inv_rms) = ops.state;
        let dy = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [x_node, gamma_node] = ops.parents;
        let mut dx = x_node.as_ref().map(|_| vec![0f32; values(&x).len()]);
        let dgamma =
            backward_rows(values(&x), values(&gamma), &inv_rms, values(&dy), dx.as_deref_mut(), gamma_node.is_some());
        if let (Some(node), Some(dx)) = (x_node, dx) {
            grads.register::<Flex>(node.id, flex_tensor(dx, x.layout().shape().clone()));
        }
        if let (Some(node), Some(dg)) = (gamma_node, dgamma) {
            grads.register::<Flex>(node.id, flex_tensor(dg, gamma.layout().shape().clone()));
        }
    }
}

fn autodiff_rms_norm(x: AutodiffFlexTensor, gamma: AutodiffFlexTensor, epsilon: f32) -> AutodiffFlexTensor {
    let (xf, gf) = (x.primitive.to_contiguous(), gamma.primitive.to_contiguous());
    let mut out = vec![0f32; values(&xf).len()];
    let mut inv_rms = vec![0f32; values(&xf).len() / values(&gf).len()];
    forward_rows(values(&xf), values(&gf), epsilon, &mut out, &mut inv_rms);
    let out = flex_tensor(out, xf.layout().shape().clone());
    match RmsNormBackward.prepare::<NoCheckpointing>([x.node.clone(), gamma.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((xf, gf, inv_rms), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::rms_norm as reference;
    use burn::tensor::Distribution;

    type AD = burn::backend::Autodiff<Flex>;

    fn close(what: &str, ours: &[f32], expected: &[f32], tol: f32) {
        assert_eq!(ours.len(), expected.len(), "{what}: lengths");
        for (a, b) in ours.iter().zip(expected) {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs {b}");
        }
    }

    #[test]
    fn values_and_gradients_match_the_reference_expression() {
        let device = Default::default();
        AD::seed(&device, 21);
        // One row per task and several (rows straddle the chunks), widths with and without a
        // 16-lane remainder.
        for [b, s, d] in [[2usize, 3, 20], [3, 50, 256], [1, 7, 8200]] {
            let x = Tensor::<AD, 3>::random([b, s, d], Distribution::Normal(0.5, 2.0), &device);
            let gamma = Tensor::<AD, 1>::random([d], Distribution::Normal(1.0, 0.3), &device);
            let w = Tensor::<AD, 3>::random([b, s, d], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let (x, g) = (x.clone().require_grad(), gamma.clone().require_grad());
                let out =
                    if fused { rms_norm(x.clone(), g.clone(), 1e-6) } else { reference(x.clone(), g.clone(), 1e-6) };
                let grads = (out.clone() * w.clone()).sum().backward();
                let v = |t: Tensor<AD, 3>| t.into_data().to_vec::<f32>().unwrap();
                (
                    v(out),
                    x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
                    g.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
                )
            };
            let (ours, expected) = (run(true), run(false));
            close("values", &ours.0, &expected.0, 1e-6);
            close("dx", &ours.1, &expected.1, 1e-5);
            // dγ sums over every row: summation order differs, so relative to the row count.
            close("dgamma", &ours.2, &expected.2, 1e-5 * (b * s) as f32);
            // Inference on plain Flex: the same values.
            let plain = |t: &Tensor<AD, 3>| Tensor::<Flex, 3>::from_data(t.to_data(), &device);
            let g = Tensor::<Flex, 1>::from_data(gamma.to_data(), &device);
            close("inference", &rms_norm(plain(&x), g, 1e-6).into_data().to_vec::<f32>().unwrap(), &expected.0, 1e-6);
        }
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_frozen_input_none_either() {
        let device = Default::default();
        let x = Tensor::<AD, 2>::from_data([[3.0f32, 4.0], [1.0, -1.0]], &device).require_grad();
        let gamma = Tensor::<AD, 1>::from_data([2.0f32, 0.5], &device);
        let out = rms_norm(x.clone(), gamma.clone(), 0.0);
        // Row [3, 4]: rms = √12.5; y = [2·3, 0.5·4] / √12.5.
        let r = 1.0 / 12.5f32.sqrt();
        close("values", &out.clone().into_data().to_vec::<f32>().unwrap()[..2], &[6.0 * r, 2.0 * r], 1e-6);
        let grads = out.sum().backward();
        assert!(gamma.grad(&grads).is_none());
        assert!(x.grad(&grads).is_some());
        let x2 = Tensor::<AD, 2>::from_data([[3.0f32, 4.0]], &device);
        let g2 = Tensor::<AD, 1>::from_data([2.0f32, 0.5], &device).require_grad();
        let grads = rms_norm(x2.clone(), g2.clone(), 0.0).sum().backward();
        assert!(x2.grad(&grads).is_none());
        close("dgamma", &g2.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(), &[3.0 * r, 4.0 * r], 1e-6);
    }

    #[test]
    fn bf16_input_is_normalised_in_f32_and_keeps_its_dtype() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::from_data([[300.0f32, 400.0, 0.001, -2.5]], &device);
        let gamma = Tensor::<Flex, 1>::from_data([1.0f32, 2.0, 3.0, 4.0], &device);
        let f32_out = rms_norm(x.clone(), gamma.clone(), 1e-6).into_data().to_vec::<f32>().unwrap();
        let out = rms_norm(x.cast(DType::BF16), gamma.cast(DType::BF16), 1e-6);
        assert_eq!(out.dtype(), DType::BF16);
        close("bf16", &out.cast(DType::F32).into_data().to_vec::<f32>().unwrap(), &f32_out, 1e-2);
    }
}
