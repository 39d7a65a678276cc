//! `silu(gate) · up`, LLaMA's MLP activation, in one multi-threaded pass on the Flex CPU backend,
//! forwards and, under autodiff, backwards.
//!
//! Burn computes it as three passes (sigmoid, two products), each allocating, on one thread, and
//! its backward as several more; the exponential makes it a visible part of a CPU prefill and
//! training step. Here the forward is one pass over both inputs, split among the rayon threads,
//! with a vectorised sigmoid (`fastexp::sigmoid_into`, within 4·10⁻⁷ of exact, where glibc's
//! scalar `expf` was a tenth of a CPU prefill), and the backward one pass that gives both
//! gradients:
//!
//! ```text
//! d_up = g · silu(gate)        d_gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate)))
//! ```
//!
//! On other backends Burn's own operations run.

use crate::cpu::flex::{
    AutodiffFlexTensor, autodiff_primitive, flex_f32, flex_tensor, from_autodiff, from_f32, is_autodiff_flex, values,
};
use crate::fastexp::sigmoid_into;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

/// `silu(gate) * up` (same shapes).
pub(crate) fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let same = gate.dims() == up.dims() && gate.dtype() == DType::F32 && up.dtype() == DType::F32;
    if same && is_autodiff_flex::<B>() {
        return from_autodiff(autodiff_silu_mul(autodiff_primitive(gate), autodiff_primitive(up)));
    }
    match on_flex(&gate, &up) {
        Some(out) => out,
        None => crate::reference::silu_mul(gate, up),
    }
}

/// `a + b` (same shapes), for residual connections: on Flex (inference) written into `a`'s storage
/// when nothing else holds it, in one threaded pass (4× faster than Burn's add into a new buffer
/// for a batch-8 prefill's `[8, 96, 512]`); otherwise, and under autodiff, Burn's add.
pub(crate) fn add<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let fits = a.dims() == b.dims() && a.dtype() == DType::F32;
    let Some(bf) = flex_f32(&b).filter(|_| fits) else { return a + b };
    let bf = bf.to_contiguous();
    match crate::cpu::flex::with_unique_storage(a, |dst| {
        par_chunks(dst, |at, d| {
            let n = d.len();
            d.iter_mut().zip(&values(&bf)[at..at + n]).for_each(|(d, s)| *d += s)
        })
    }) {
        Ok(sum) => sum,
        Err(a) => a + b,
    }
}

/// `x · σ(1.702 x)`, OpenAI CLIP's `quick_gelu`: one threaded pass on Flex (Burn's
/// `x * sigmoid(x * 1.702)` within float rounding), with its own backward under `Autodiff<Flex>`.
pub(crate) fn quick_gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if x.dtype() == DType::F32 && is_autodiff_flex::<B>() {
        return from_autodiff(autodiff_quick_gelu(autodiff_primitive(x)));
    }
    if let Some(flex) = flex_f32(&x) {
        let flex = flex.to_contiguous();
        let mut out = vec![0f32; values(&flex).len()];
        quick_gelu_slices(values(&flex), &mut out);
        if let Some(out) = from_f32(out, x.shape()) {
            return out;
        }
    }
    crate::reference::quick_gelu(x)
}

/// Rotary embedding, `x · cos + swap_halves(x) · signed_sin`, for `x` `[b, s, heads, d]` and
/// tables `[b, s, 1, d]` (`signed_sin` = `sin` with its first half negated, so that this is
/// Hugging Face's `x·cos + rotate_half(x)·sin`): one threaded pass on Flex, with its own backward
/// (`dx[j] = g[j]·cos[j] + g[p]·signed_sin[p]`, `p` = `j`'s partner in the other half) under
/// `Autodiff<Flex>`; `None` elsewhere (or for tables that carry a gradient), for the caller's
/// Burn expression.
pub(crate) fn rope<B: Backend>(
    x: &Tensor<B, 4>, cos: &Tensor<B, 4>, signed_sin: &Tensor<B, 4>,
) -> Option<Tensor<B, 4>> {
    let [b, s, _, d] = x.dims();
    if cos.dims() != [b, s, 1, d] || signed_sin.dims() != [b, s, 1, d] || d % 2 != 0 || x.dtype() != DType::F32 {
        return None;
    }
    if is_autodiff_flex::<B>() {
        let (x, cos, sin) =
            (autodiff_primitive(x.clone()), autodiff_primitive(cos.clone()), autodiff_primitive(signed_sin.clone()));
        if cos.is_tracked() || sin.is_tracked() {
            return None;
        }
        return Some(from_autodiff(autodiff_rope(x, cos.primitive.to_contiguous(), sin.primitive.to_contiguous())));
    }
    let (xf, cf, sf) =
        (flex_f32(x)?.to_contiguous(), flex_f32(cos)?.to_contiguous(), flex_f32(signed_sin)?.to_contiguous());
    let mut out = vec![0f32; values(&xf).len()];
    rope_slices(values(&xf), values(&cf), values(&sf), d, &mut out, false);
    from_f32(out, x.shape())
}

/// Forward (`transpose = false`) or backward over rows of `d`: `x` has `heads` rows per table row.
fn rope_slices(x: &[f32], cos: &[f32], sin: &[f32], d: usize, out: &mut [f32], transpose: bool) {
    let half = d / 2;
    let heads = x.len() / cos.len().max(1);
    let rows_per_chunk = (CHUNK / d).max(1);
    let run = |(chunk, (o, x)): (usize, (&mut [f32], &[f32]))| {
        for (r, (o, x)) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
            let t = (chunk * rows_per_chunk + r) / heads * d;
            let (c, sn) = (&cos[t..t + d], &sin[t..t + d]);
            for j in 0..d {
                let p = if j < half { j + half } else { j - half };
                // Forward: out[j] = x[j]·cos[j] + x[p]·sin[j]; its transpose reads sin at p.
                o[j] = x[j] * c[j] + x[p] * if transpose { sn[p] } else { sn[j] };
            }
        }
    };
    out.par_chunks_mut(rows_per_chunk * d).zip(x.par_chunks(rows_per_chunk * d)).enumerate().for_each(run);
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// The contiguous `cos` and `signed_sin` tables.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [node] = ops.parents;
        if let Some(node) = node {
            let d = *cos.layout().shape().last().expect("4-D table");
            let mut dx = vec![0f32; values(&grad).len()];
            rope_slices(values(&grad), values(&cos), values(&sin), d, &mut dx, true);
            grads.register::<Flex>(node.id, flex_like(dx, &grad));
        }
    }
}

fn autodiff_rope(x: AutodiffFlexTensor, cos: FlexTensor, sin: FlexTensor) -> AutodiffFlexTensor {
    let xf = x.primitive.to_contiguous();
    let d = *cos.layout().shape().last().expect("4-D table");
    let mut out = vec![0f32; values(&xf).len()];
    rope_slices(values(&xf), values(&cos), values(&sin), d, &mut out, false);
    let out = flex_like(out, &xf);
    match RopeBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((cos, sin), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
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

fn flex_like(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    flex_tensor(values, like.layout().shape().clone())
}

#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Flex, 2> for SiluMulBackward {
    /// The contiguous gate and up inputs.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let n = values(&gate).len();
        let (mut d_gate, mut d_up) = (vec![0f32; n], vec![0f32; n]);
        silu_mul_backward_slices(values(&gate), values(&up), values(&grad), &mut d_gate, &mut d_up);
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, flex_like(d_gate, &gate));
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, flex_like(d_up, &up));
        }
    }
}

fn autodiff_silu_mul(gate: AutodiffFlexTensor, up: AutodiffFlexTensor) -> AutodiffFlexTensor {
    let (g, u) = (gate.primitive.to_contiguous(), up.primitive.to_contiguous());
    let mut out = vec![0f32; values(&g).len()];
    silu_mul_slices(values(&g), values(&u), &mut out);
    let out = flex_like(out, &g);
    match SiluMulBackward.prepare::<NoCheckpointing>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((g, u), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct QuickGeluBackward;

impl Backward<Flex, 1> for QuickGeluBackward {
    /// The contiguous input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let x = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [node] = ops.parents;
        if let Some(node) = node {
            let mut dx = vec![0f32; values(&x).len()];
            let (x_values, g_values) = (values(&x), values(&grad));
            par_chunks(&mut dx, |at, dx| {
                let (x, g) = (&x_values[at..at + dx.len()], &g_values[at..at + dx.len()]);
                sigmoid_into(x, 1.702, dx);
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                    let s = *dx;
                    *dx = g * (s + 1.702 * x * s * (1.0 - s));
                }
            });
            grads.register::<Flex>(node.id, flex_like(dx, &x));
        }
    }
}

fn autodiff_quick_gelu(x: AutodiffFlexTensor) -> AutodiffFlexTensor {
    let input = x.primitive.to_contiguous();
    let mut out = vec![0f32; values(&input).len()];
    quick_gelu_slices(values(&input), &mut out);
    let out = flex_like(out, &input);
    match QuickGeluBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(input, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

pub(crate) fn quick_gelu_slices(x: &[f32], out: &mut [f32]) {
    par_chunks(out, |at, o| {
        let x = &x[at..at + o.len()];
        sigmoid_into(x, 1.702, o);
        o.iter_mut().zip(x).for_each(|(o, &x)| *o *= x);
    });
}

/// `f(offset, chunk)` over `out` in chunks of `CHUNK` on the rayon threads when long enough.
fn par_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= 2 * CHUNK {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| f(i * CHUNK, o));
    } else {
        f(0, out);
    }
}

const CHUNK: usize = 1 << 13;

/// Both input gradients of `silu(gate) · up` for the output gradient `grad`.
pub(crate) fn silu_mul_backward_slices(gate: &[f32], up: &[f32], grad: &[f32], d_gate: &mut [f32], d_up: &mut [f32]) {
    type Chunks<'a> = (((&'a mut [f32], &'a mut [f32]), &'a [f32]), (&'a [f32], &'a [f32]));
    let run = |(((dg, du), g), (u, gr)): Chunks<'_>| {
        sigmoid_into(g, 1.0, dg);
        for i in 0..dg.len() {
            let s = dg[i];
            let silu = g[i] * s;
            du[i] = gr[i] * silu;
            dg[i] = gr[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    };
    if gate.len() >= 2 * CHUNK {
        d_gate
            .par_chunks_mut(CHUNK)
            .zip(d_up.par_chunks_mut(CHUNK))
            .zip(gate.par_chunks(CHUNK))
            .zip(up.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
            .for_each(run);
    } else {
        run((((d_gate, d_up), gate), (up, grad)));
    }
}

pub(crate) fn silu_mul_slices(gate: &[f32], up: &[f32], out: &mut [f32]) {
    par_chunks(out, |at, o| {
        let (g, u) = (&gate[at..at + o.len()], &up[at..at + o.len()]);
        sigmoid_into(g, 1.0, o);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * *o * u;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::TensorData;
    use burn::tensor::activation::silu;

    /// Element-wise `|a − b| ≤ tol · (1 + |b|)`.
    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}: {x} vs {y}");
        }
    }

    #[test]
    fn silu_times_up_matches_burns_on_flex() {
        type B = burn::backend::Flex;
        let device = Default::default();
        B::seed(&device, 5);
        for shape in [[3usize, 7], [40, 1000]] {
            let gate = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 4.0), &device);
            let up = Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let fused = silu_mul(gate.clone(), up.clone()).to_data().to_vec::<f32>().unwrap();
            let burn = (silu(gate) * up).to_data().to_vec::<f32>().unwrap();
            close(&fused, &burn, 1e-6, "values");
        }
    }

    #[test]
    fn autodiff_gradients_match_burns() {
        type AD = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        AD::seed(&device, 11);
        // Both sizes: the single-threaded path and the chunked parallel one.
        for shape in [[3usize, 7], [40, 1000]] {
            let gate = Tensor::<AD, 2>::random(shape, Distribution::Normal(0.0, 4.0), &device);
            let up = Tensor::<AD, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<AD, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let (g, u) = (gate.clone().require_grad(), up.clone().require_grad());
                let out = if fused { silu_mul(g.clone(), u.clone()) } else { silu(g.clone()) * u.clone() };
                let grads = (out.clone() * w.clone()).sum().backward();
                let v = |t: TensorData| t.to_vec::<f32>().unwrap();
                (v(out.into_data()), v(g.grad(&grads).unwrap().into_data()), v(u.grad(&grads).unwrap().into_data()))
            };
            let (ours, burn) = (run(true), run(false));
            close(&ours.0, &burn.0, 1e-6, "values");
            for (what, a, b) in [("d_gate", &ours.1, &burn.1), ("d_up", &ours.2, &burn.2)] {
                for (x, y) in a.iter().zip(b.iter()) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn quick_gelu_matches_burn_values_and_gradient() {
        type AD = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        AD::seed(&device, 3);
        for shape in [[5usize, 3], [20, 1000]] {
            let x = Tensor::<AD, 2>::random(shape, Distribution::Normal(0.0, 3.0), &device);
            let w = Tensor::<AD, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let burn_quick_gelu = |x: Tensor<AD, 2>| x.clone() * burn::tensor::activation::sigmoid(x * 1.702);
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let out = if fused { quick_gelu(x.clone()) } else { burn_quick_gelu(x.clone()) };
                let grads = (out.clone() * w.clone()).sum().backward();
                (out.into_data().to_vec::<f32>().unwrap(), x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap())
            };
            let (ours, burn) = (run(true), run(false));
            close(&ours.0, &burn.0, 1e-6, "values");
            for (a, b) in ours.1.iter().zip(&burn.1) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "gradient {a} vs {b}");
            }
            // Inference on plain Flex: the same values.
            let plain = Tensor::<burn::backend::Flex, 2>::from_data(x.to_data(), &device);
            close(&quick_gelu(plain).into_data().to_vec::<f32>().unwrap(), &burn.0, 1e-6, "inference");
        }
    }

    #[test]
    fn rope_matches_burns_expression_values_and_gradient() {
        type AD = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        AD::seed(&device, 8);
        // Small, and large enough to be split among threads (rows straddle chunk boundaries).
        for [b, s, h, d] in [[2usize, 3, 2, 8], [2, 37, 6, 64]] {
            let x = Tensor::<AD, 4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), &device);
            let cos = Tensor::<AD, 4>::random([b, s, 1, d], Distribution::Normal(0.0, 1.0), &device);
            let sin = Tensor::<AD, 4>::random([b, s, 1, d], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<AD, 4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), &device);
            let burn_rope = |x: Tensor<AD, 4>| {
                let swapped = Tensor::cat(
                    vec![x.clone().slice([0..b, 0..s, 0..h, d / 2..d]), x.clone().slice([0..b, 0..s, 0..h, 0..d / 2])],
                    3,
                );
                x * cos.clone() + swapped * sin.clone()
            };
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let out = if fused { rope(&x, &cos, &sin).expect("Autodiff<Flex>") } else { burn_rope(x.clone()) };
                let grads = (out.clone() * w.clone()).sum().backward();
                (out.into_data().to_vec::<f32>().unwrap(), x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap())
            };
            let (ours, burn) = (run(true), run(false));
            for (what, a, c) in [("values", &ours.0, &burn.0), ("gradient", &ours.1, &burn.1)] {
                for (p, q) in a.iter().zip(c.iter()) {
                    assert!((p - q).abs() <= 1e-6 * (1.0 + q.abs()), "{what}: {p} vs {q}");
                }
            }
            let plain = |t: &Tensor<AD, 4>| Tensor::<burn::backend::Flex, 4>::from_data(t.to_data(), &device);
            let inference = rope(&plain(&x), &plain(&cos), &plain(&sin)).unwrap().into_data().to_vec::<f32>().unwrap();
            for (p, q) in inference.iter().zip(&burn.0) {
                assert!((p - q).abs() <= 1e-6 * (1.0 + q.abs()), "inference: {p} vs {q}");
            }
        }
    }

    #[test]
    fn residual_add_matches_burn_and_never_changes_a_shared_input() {
        let device = Default::default();
        Flex::seed(&device, 12);
        for shape in [[3usize, 5], [40, 1000]] {
            let a = Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let b = Tensor::<Flex, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let expected = (a.clone() + b.clone()).into_data().to_vec::<f32>().unwrap();
            // `a` is shared (a clone is alive): a new tensor, `a` unchanged.
            let before = a.to_data().to_vec::<f32>().unwrap();
            assert_eq!(add(a.clone(), b.clone()).into_data().to_vec::<f32>().unwrap(), expected);
            assert_eq!(a.to_data().to_vec::<f32>().unwrap(), before, "a shared input was written");
            // `a` held by no one else: written in place, same values.
            let ptr = flex_f32(&a).unwrap().storage::<f32>().as_ptr() as usize;
            let sum = add(a, b.clone());
            assert_eq!(flex_f32(&sum).unwrap().storage::<f32>().as_ptr() as usize, ptr, "in place");
            assert_eq!(sum.into_data().to_vec::<f32>().unwrap(), expected);
        }
    }

    #[test]
    fn frozen_inputs_get_no_gradient() {
        type AD = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        let gate = Tensor::<AD, 2>::from_data([[1.0f32, -2.0]], &device).require_grad();
        let up = Tensor::<AD, 2>::from_data([[3.0f32, 4.0]], &device);
        let grads = silu_mul(gate.clone(), up.clone()).sum().backward();
        assert!(up.grad(&grads).is_none());
        let expected = (silu(gate.clone()) * up.clone()).sum().backward();
        let ours = gate.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let burn = gate.grad(&expected).unwrap().into_data().to_vec::<f32>().unwrap();
        for (x, y) in ours.iter().zip(&burn) {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{ours:?} vs {burn:?}");
        }
    }
}
