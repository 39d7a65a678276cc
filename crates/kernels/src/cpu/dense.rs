//! Linear layers as direct `gemm` calls on the Flex CPU backend, forwards and, under autodiff,
//! backwards.
//!
//! Flex's matmul allocates each output as a zeroed byte vector and then copies it into a fresh
//! aligned allocation (`FlexTensor::empty` → `Bytes::from_bytes_vec`): a memset and a memcpy of
//! every product, on one thread, before gemm writes it again. In a prefill profile that was a
//! tenth of the time. Here the output is allocated once, uninitialised, and gemm writes it; the
//! backward pass is the two products `dX = dY · Wᵀ` and `dW = Xᵀ · dY` (each only when needed),
//! with the transposes as strides. Few-row products (decoding) go to [`crate::cpu::skinny`] first.

use crate::cpu::flex::{
    AutodiffFlexTensor, StridedMatrix, autodiff_primitive, flex_f32, flex_tensor, from_autodiff, from_f32,
    is_autodiff_flex, values,
};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};

/// `x · w (+ bias)` for `x` `[m, k]`, `w` `[k, n]` (Burn's `Linear` layout), on Flex or
/// `Autodiff<Flex>` f32 tensors; `None` on other backends (the caller then uses Burn's).
pub(crate) fn linear<B: Backend>(
    x: &Tensor<B, 2>, w: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let ([m, k], [wk, n]) = (x.dims(), w.dims());
    if wk != k || m == 0 || n == 0 || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return None;
    }
    if is_autodiff_flex::<B>() {
        let y: Tensor<B, 2> =
            from_autodiff(autodiff_matmul(autodiff_primitive(x.clone()), autodiff_primitive(w.clone()), [m, k, n]));
        return Some(match bias {
            Some(bias) => y + bias.clone().unsqueeze::<2>(),
            None => y,
        });
    }
    // The weight is read in place, row-major or as the loader's transposed view.
    let (xf, wf) = (flex_f32(x)?.to_contiguous(), StridedMatrix::of(flex_f32(w)?));
    let mut out = matmul(m, k, n, (values(&xf), k, 1), (wf.values(), wf.rs, wf.cs));
    if let Some(bias) = bias {
        let bias = flex_f32(bias)?.to_contiguous();
        let bias = values(&bias);
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(bias).for_each(|(o, b)| *o += b);
        }
    }
    from_f32(out, [m, n])
}

/// Same threshold as Flex's: below about 192³ multiply-adds one thread is faster.
pub(crate) const PARALLEL_WORK: usize = 192 * 192 * 192;

/// `lhs · rhs`, `[m, k] · [k, n]`, each operand given as (values, row stride, column stride).
pub(crate) fn matmul(
    m: usize, k: usize, n: usize, (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
) -> Vec<f32> {
    if k == 0 {
        return vec![0.0; m * n];
    }
    assert!(
        lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs && rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
        "operand too short"
    );
    let parallelism = if m * n * k >= PARALLEL_WORK { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    let mut out = Vec::<f32>::with_capacity(m * n);
    unsafe {
        gemm_into(
            m,
            k,
            n,
            out.as_mut_ptr(),
            n,
            (lhs.as_ptr(), lhs_rs, lhs_cs),
            (rhs.as_ptr(), rhs_rs, rhs_cs),
            parallelism,
        );
        out.set_len(m * n);
    }
    out
}

/// `dst [m, n] (row stride dst_rs, column stride 1) = lhs · rhs`, every element written, none read.
///
/// # Safety
/// The operands must cover the strided `[m, k]` and `[k, n]` views, `dst` must cover `m` rows of
/// `dst_rs` floats starting at `dst`, and no one else may touch those `m × n` elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    m: usize, k: usize, n: usize, dst: *mut f32, dst_rs: usize, (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize), parallelism: gemm::Parallelism,
) {
    unsafe {
        // With `read_dst = false` gemm writes every element of dst without reading it.
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[derive(Debug)]
struct MatmulBackward;

/// What the backward pass needs: `[m, k, n]`, X (for dW, when W is trained) and W (for dX).
type Saved = ([usize; 3], Option<FlexTensor>, Option<StridedMatrix>);

impl Backward<Flex, 2> for MatmulBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let ([m, k, n], x, w) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [x_node, w_node] = ops.parents;
        if let (Some(node), Some(w)) = (x_node, w) {
            // dX = dY · Wᵀ: Wᵀ[j, c] = W[c, j], so Wᵀ's rows step by W's column stride and its
            // columns by W's row stride.
            grads.register::<Flex>(
                node.id,
                flex_tensor(matmul(m, n, k, (values(&grad), n, 1), (w.values(), w.cs, w.rs)), [m, k]),
            );
        }
        if let (Some(node), Some(x)) = (w_node, x) {
            // dW = Xᵀ · dY: Xᵀ[c, i] = X[i, c].
            grads.register::<Flex>(
                node.id,
                flex_tensor(matmul(k, m, n, (values(&x), 1, k), (values(&grad), n, 1)), [k, n]),
            );
        }
    }
}

fn autodiff_matmul(x: AutodiffFlexTensor, w: AutodiffFlexTensor, [m, k, n]: [usize; 3]) -> AutodiffFlexTensor {
    let (xf, wf) = (x.primitive.to_contiguous(), StridedMatrix::of(w.primitive.clone()));
    let out = flex_tensor(matmul(m, k, n, (values(&xf), k, 1), (wf.values(), wf.rs, wf.cs)), [m, n]);
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    match MatmulBackward.prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
        // X is kept only to give W its gradient, and W only to give X its own.
        OpsKind::Tracked(prep) => prep.finish(([m, k, n], w_tracked.then_some(xf), x_tracked.then_some(wf)), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::TensorData;

    type AD = burn::backend::Autodiff<Flex>;

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: {x} vs {y}");
        }
    }

    #[test]
    fn values_and_gradients_match_burns_matmul() {
        let device = Default::default();
        AD::seed(&device, 4);
        // Small (one thread) and large enough for gemm's threads.
        for (m, k, n) in [(5, 3, 7), (300, 256, 200)] {
            let x = Tensor::<AD, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<AD, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
            let bias = Tensor::<AD, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
            let probe = Tensor::<AD, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
            for with_bias in [false, true] {
                let run = |ours: bool| {
                    let (x, w, bias) =
                        (x.clone().require_grad(), w.clone().require_grad(), bias.clone().require_grad());
                    let y = if ours {
                        linear(&x, &w, with_bias.then_some(&bias)).expect("Autodiff<Flex> takes the direct path")
                    } else {
                        burn::tensor::module::linear(x.clone(), w.clone(), with_bias.then(|| bias.clone()))
                    };
                    let grads = (y.clone() * probe.clone()).sum().backward();
                    let v = |t: TensorData| t.to_vec::<f32>().unwrap();
                    let db = with_bias.then(|| v(bias.grad(&grads).unwrap().into_data()));
                    (
                        v(y.into_data()),
                        v(x.grad(&grads).unwrap().into_data()),
                        v(w.grad(&grads).unwrap().into_data()),
                        db,
                    )
                };
                let (ours, burn) = (run(true), run(false));
                close(&ours.0, &burn.0, "y");
                close(&ours.1, &burn.1, "dX");
                close(&ours.2, &burn.2, "dW");
                if let (Some(a), Some(b)) = (&ours.3, &burn.3) {
                    close(a, b, "dbias");
                }
                // Plain Flex (inference): the same values.
                let plain = |t: &Tensor<AD, 2>| Tensor::<Flex, 2>::from_data(t.to_data(), &device);
                let b1 = Tensor::<Flex, 1>::from_data(bias.to_data(), &device);
                let y = linear(&plain(&x), &plain(&w), with_bias.then_some(&b1)).unwrap();
                close(&y.into_data().to_vec::<f32>().unwrap(), &burn.0, "inference y");
            }
        }
    }

    /// The loader's transposed view of an `[n, k]` weight is read in place, forwards and backwards.
    #[test]
    fn a_transposed_weight_view_gives_burns_values_and_gradients() {
        let device = Default::default();
        AD::seed(&device, 5);
        let (m, k, n) = (40, 33, 70);
        let x = Tensor::<AD, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let storage = Tensor::<AD, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
        let probe = Tensor::<AD, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| {
            let (x, leaf) = (x.clone().require_grad(), storage.clone().require_grad());
            let w = leaf.clone().transpose();
            let y = if ours { linear(&x, &w, None).unwrap() } else { x.clone().matmul(w.clone()) };
            let grads = (y.clone() * probe.clone()).sum().backward();
            let v = |t: TensorData| t.to_vec::<f32>().unwrap();
            (v(y.into_data()), v(x.grad(&grads).unwrap().into_data()), v(leaf.grad(&grads).unwrap().into_data()))
        };
        let (ours, burn) = (run(true), run(false));
        close(&ours.0, &burn.0, "y");
        close(&ours.1, &burn.1, "dX");
        close(&ours.2, &burn.2, "dW");
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_a_frozen_input_none_either() {
        let device = Default::default();
        let x = Tensor::<AD, 2>::from_data([[1.0f32, 2.0], [3.0, 4.0]], &device);
        let w = Tensor::<AD, 2>::from_data([[1.0f32, 0.0, 2.0], [0.5, 1.0, -1.0]], &device);
        let (xt, wt) = (x.clone().require_grad(), w.clone());
        let grads = linear(&xt, &wt, None).unwrap().sum().backward();
        assert!(wt.grad(&grads).is_none());
        // dX = 1 · Wᵀ row sums: [1+0+2, 0.5+1-1] per row.
        assert_eq!(xt.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(), vec![3.0, 0.5, 3.0, 0.5]);
        let (xf, wt) = (x, w.require_grad());
        let grads = linear(&xf, &wt, None).unwrap().sum().backward();
        assert!(xf.grad(&grads).is_none());
        assert_eq!(wt.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(), vec![4.0, 4.0, 4.0, 6.0, 6.0, 6.0]);
    }
}
