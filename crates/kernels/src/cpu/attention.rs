//! Multi-head attention over `[batch, seq, heads, head_dim]` tensors as one operation on the
//! Flex CPU backend, forwards and, under autodiff, backwards.
//!
//! Burn's autodiff runs attention as its composed fallback: a batched matmul, a mask fill that
//! copies the scores, a five-pass softmax, a second matmul, and the backward of each, every one
//! a separate single-threaded pass over `[b, h, sq, sk]` (a quarter of a CPU training step in
//! the small-LLaVA profile), plus copies of the head-swapped views on both sides. Here each
//! (batch, kv-head) is one task on the rayon pool: the scores, the softmax and the product with
//! V are computed in place on that head's rows, and the probabilities are kept for the backward
//! pass, which is the textbook one:
//!
//! ```text
//! dV = Pᵀ·dO    dP = dO·Vᵀ    dS = P ⊙ (dP − rowsum(P ⊙ dP))    dQ = s·dS·K    dK = s·dSᵀ·Q
//! ```
//!
//! The inputs stay in the projection's `[b, s, h, d]` layout (no head swap either way), and
//! grouped-query heads read their shared K/V head directly (no `repeat_kv` copy).
//! On other backends, and under autodiff with a checkpointing strategy, this is Burn's
//! `attention` with the usual head swap.

use crate::cpu::flex::{
    autodiff_primitive, flex_f32, flex_tensor, from_autodiff, into_tensor, is_autodiff_flex, values,
};
use crate::fastexp::{dot, exp_shifted_sum};
use crate::reference::attention as reference;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Softmax attention. `q` is `[b, sq, h, d]`, `k` and `v` are `[b, sk, kv_heads, d]` with `h` a
/// multiple of `kv_heads`; the result is `[b, sq, h, d]`. `mask` is `[b, 1 or h, sq, sk]`, `true`
/// where a query may not attend; `causal` also hides the future, aligned bottom-right (right for
/// a cached decode step, where `sq < sk`). Neither: every query sees every key (CLIP). A fully
/// masked row gives zeros, as in Burn.
pub(crate) fn attention<B: Backend>(
    q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Tensor<B, 4, Bool>>, causal: bool,
) -> Tensor<B, 4> {
    let all_f32 = [&q, &k, &v].iter().all(|t| t.dtype() == DType::F32);
    if let Some(dims) = Dims::of(&q, &k, &v, mask.as_ref(), causal).filter(|_| all_f32) {
        if is_autodiff_flex::<B>() {
            let mask = mask.map(|m| Arc::new(MaskRows::new(m, &dims)));
            return autodiff_attention(q, k, v, mask, dims);
        }
        if let (Some(qf), Some(kf), Some(vf)) = (flex_f32(&q), flex_f32(&k), flex_f32(&v)) {
            let mask = mask.map(|m| MaskRows::new(m, &dims));
            // K and V are read in place when only their batch axis is strided: a view of the
            // first `sk` positions of a preallocated KV cache `[b, capacity, kv_heads, d]`.
            let q = qf.to_contiguous();
            let (k, v) = (BatchStrided::of(kf, &dims), BatchStrided::of(vf, &dims));
            let fwd =
                forward(&dims, values(&q), k.rows(), v.rows(), k.batch_stride, v.batch_stride, mask.as_ref(), false);
            return into_tensor(flex_tensor(fwd.out, [dims.b, dims.sq, dims.h, dims.d])).expect("Flex");
        }
    }
    reference(q, k, v, mask, causal)
}

/// The problem's sizes; `None` when the shapes do not fit together (Burn's path then reports it).
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    sq: usize,
    sk: usize,
    h: usize,
    kv_heads: usize,
    d: usize,
    scale: f32,
    causal: bool,
}

impl Dims {
    fn of<B: Backend>(
        q: &Tensor<B, 4>, k: &Tensor<B, 4>, v: &Tensor<B, 4>, mask: Option<&Tensor<B, 4, Bool>>, causal: bool,
    ) -> Option<Self> {
        let [b, sq, h, d] = q.dims();
        let [kb, sk, kv_heads, kd] = k.dims();
        let fits = kb == b
            && kd == d
            && v.dims() == k.dims()
            && kv_heads > 0
            && h % kv_heads == 0
            && d > 0
            && sq > 0
            && sk > 0;
        let mask_fits = mask.is_none_or(|m| {
            let [mb, mh, mq, mk] = m.dims();
            mb == b && (mh == 1 || mh == h) && mq == sq && mk == sk
        });
        (fits && mask_fits).then(|| Dims { b, sq, sk, h, kv_heads, d, scale: 1.0 / (d as f32).sqrt(), causal })
    }
    fn n_rep(&self) -> usize {
        self.h / self.kv_heads
    }
    fn q_len(&self) -> usize {
        self.b * self.sq * self.h * self.d
    }
    fn kv_len(&self) -> usize {
        self.b * self.sk * self.kv_heads * self.d
    }
    fn probs_len(&self) -> usize {
        self.b * self.h * self.sq * self.sk
    }
}

/// The mask as `true`-means-masked bytes `[b, mask_heads, sq, sk]`.
#[derive(Debug)]
struct MaskRows {
    masked: Vec<bool>,
    per_head: bool,
}

impl MaskRows {
    fn new<B: Backend>(mask: Tensor<B, 4, Bool>, dims: &Dims) -> Self {
        let per_head = mask.dims()[1] == dims.h && dims.h > 1;
        let masked = mask.into_data().convert::<bool>().to_vec::<bool>().expect("bool mask");
        MaskRows { masked, per_head }
    }
    /// Row `i` of head `head` in batch `bi`.
    fn row(&self, dims: &Dims, bi: usize, head: usize, i: usize) -> &[bool] {
        let heads = if self.per_head { dims.h } else { 1 };
        let head = if self.per_head { head } else { 0 };
        let start = ((bi * heads + head) * dims.sq + i) * dims.sk;
        &self.masked[start..start + dims.sk]
    }
}

/// A raw pointer that rayon tasks share; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not the raw field).
    fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

struct Forward {
    out: Vec<f32>,
    /// Softmax probabilities `[b, h, sq, sk]`, kept for the backward pass.
    probs: Vec<f32>,
}

/// `dst = beta · lhs · rhs (+ dst if accumulate)`, strides in elements (row, column).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, accumulate: bool, lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize), rhs: *const f32, (rhs_rs, rhs_cs): (usize, usize), beta: f32,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Whether key `j` is hidden from query `i`.
#[inline]
fn hidden(dims: &Dims, mask_row: Option<&[bool]>, i: usize, j: usize) -> bool {
    mask_row.is_some_and(|row| row[j]) || (dims.causal && j + dims.sq > i + dims.sk)
}

/// `[b, sk, kv_heads, d]` keys or values whose `[sk, kv_heads, d]` blocks are contiguous, batch
/// `i` starting `i · batch_stride` elements after the first.
struct BatchStrided {
    tensor: FlexTensor,
    batch_stride: usize,
}

impl BatchStrided {
    fn of(t: FlexTensor, dims: &Dims) -> Self {
        let block = dims.sk * dims.kv_heads * dims.d;
        let shape = [dims.b, dims.sk, dims.kv_heads, dims.d];
        let wanted = [block, dims.kv_heads * dims.d, dims.d, 1];
        let strides = t.layout().strides();
        // A stride of a length-1 axis is never used; the batch stride may exceed the block.
        let fits = (0..4).all(|i| {
            shape[i] == 1
                || (strides[i] >= 0
                    && if i == 0 { strides[0] as usize >= block } else { strides[i] as usize == wanted[i] })
        });
        if fits {
            let batch_stride = if dims.b == 1 { block } else { strides[0] as usize };
            return Self { tensor: t, batch_stride };
        }
        Self { tensor: t.to_contiguous(), batch_stride: block }
    }
    /// The storage from the first element on (the last batch's block ends within it).
    fn rows(&self) -> &[f32] {
        &self.tensor.storage::<f32>()[self.tensor.layout().start_offset()..]
    }
}

/// `k` and `v` hold batch `i` at `i · k_batch` and `i · v_batch`; `q` is contiguous.
#[allow(clippy::too_many_arguments)]
fn forward(
    dims: &Dims, q: &[f32], k: &[f32], v: &[f32], k_batch: usize, v_batch: usize, mask: Option<&MaskRows>,
    keep_probs: bool,
) -> Forward {
    let Dims { b, sq, sk, h, kv_heads, d, scale, .. } = *dims;
    let block = sk * kv_heads * d;
    assert!(k.len() >= (b - 1) * k_batch + block && v.len() >= (b - 1) * v_batch + block, "K/V storage too short");
    let mut out = vec![0f32; dims.q_len()];
    let out_ptr = SharedMut(out.as_mut_ptr());
    // Probabilities of every head when the backward pass needs them, else one scratch per task.
    let mut probs = if keep_probs { vec![0f32; dims.probs_len()] } else { Vec::new() };
    let probs_ptr = SharedMut(probs.as_mut_ptr());
    (0..b * h).into_par_iter().for_each_init(
        || if keep_probs { Vec::new() } else { vec![0f32; sq * sk] },
        |scratch, task| {
            let (bi, head) = (task / h, task % h);
            let kv = head / dims.n_rep();
            let p: &mut [f32] = if keep_probs {
                unsafe { std::slice::from_raw_parts_mut(probs_ptr.at(task * sq * sk), sq * sk) }
            } else {
                scratch
            };
            let q_at = (bi * sq * h + head) * d;
            let (k_at, v_at) = (bi * k_batch + kv * d, bi * v_batch + kv * d);
            let direct = sq <= DIRECT_MAX_QUERIES;
            if direct {
                // S = scale · Q_h · K_hᵀ as dot products: for a few queries (a decoding step)
                // gemm's packing of K costs more than the products.
                scores_direct(&q[q_at..], h * d, &k[k_at..], kv_heads * d, sq, sk, d, scale, p);
            } else {
                unsafe {
                    // S = scale · Q_h · K_hᵀ
                    gemm_f32(
                        sq,
                        sk,
                        d,
                        p.as_mut_ptr(),
                        sk,
                        false,
                        q[q_at..].as_ptr(),
                        (h * d, 1),
                        k[k_at..].as_ptr(),
                        (1, kv_heads * d),
                        scale,
                    );
                }
            }
            for (i, row) in p.chunks_exact_mut(sk).enumerate() {
                let mask_row = mask.map(|m| m.row(dims, bi, head, i));
                softmax_row(row, |j| hidden(dims, mask_row, i, j));
            }
            if direct {
                // O_h = P · V_h as a weighted sum of V's rows.
                for (i, p_row) in p.chunks_exact(sk).enumerate() {
                    // SAFETY: query i of this head: d elements no other task writes.
                    let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(q_at + i * h * d), d) };
                    output_direct(p_row, &v[v_at..], kv_heads * d, d, out);
                }
            } else {
                unsafe {
                    // O_h = P · V_h, written into the [b, sq, h, d] output.
                    gemm_f32(
                        sq,
                        d,
                        sk,
                        out_ptr.at(q_at),
                        h * d,
                        false,
                        p.as_ptr(),
                        (sk, 1),
                        v[v_at..].as_ptr(),
                        (kv_heads * d, 1),
                        1.0,
                    );
                }
            }
        },
    );
    Forward { out, probs }
}

/// Query counts up to which the products are computed directly rather than with gemm.
const DIRECT_MAX_QUERIES: usize = 4;

/// `p[i·sk + j] = scale · q_i · k_j` (rows `q_stride` / `k_stride` apart).
#[allow(clippy::too_many_arguments)]
fn scores_direct(
    q: &[f32], q_stride: usize, k: &[f32], k_stride: usize, sq: usize, sk: usize, d: usize, scale: f32, p: &mut [f32],
) {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn body(
        q: &[f32], q_stride: usize, k: &[f32], k_stride: usize, sq: usize, sk: usize, d: usize, scale: f32,
        p: &mut [f32],
    ) {
        for i in 0..sq {
            let qi = &q[i * q_stride..i * q_stride + d];
            for (j, s) in p[i * sk..(i + 1) * sk].iter_mut().enumerate() {
                *s = scale * dot(qi, &k[j * k_stride..j * k_stride + d]);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    fn avx512(
        q: &[f32], q_stride: usize, k: &[f32], k_stride: usize, sq: usize, sk: usize, d: usize, scale: f32,
        p: &mut [f32],
    ) {
        body(q, q_stride, k, k_stride, sq, sk, d, scale, p)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return unsafe { avx512(q, q_stride, k, k_stride, sq, sk, d, scale, p) };
    }
    body(q, q_stride, k, k_stride, sq, sk, d, scale, p)
}

/// `out = Σ_j p[j] · v_j` (rows of `v` `v_stride` apart).
fn output_direct(p: &[f32], v: &[f32], v_stride: usize, d: usize, out: &mut [f32]) {
    #[inline(always)]
    fn body(p: &[f32], v: &[f32], v_stride: usize, d: usize, out: &mut [f32]) {
        out.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                for (o, &x) in out.iter_mut().zip(&v[j * v_stride..j * v_stride + d]) {
                    *o += pj * x;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn avx512(p: &[f32], v: &[f32], v_stride: usize, d: usize, out: &mut [f32]) {
        body(p, v, v_stride, d, out)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return unsafe { avx512(p, v, v_stride, d, out) };
    }
    body(p, v, v_stride, d, out)
}

/// In-place softmax of one row of scores, hidden entries 0; a fully hidden row is all 0.
#[inline]
fn softmax_row(row: &mut [f32], hidden: impl Fn(usize) -> bool) {
    let mut max = f32::NEG_INFINITY;
    for (j, x) in row.iter_mut().enumerate() {
        if hidden(j) {
            *x = f32::NEG_INFINITY;
        } else {
            max = max.max(*x);
        }
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    // Hidden entries are −∞: exactly 0 after the exponential.
    let inv = 1.0 / exp_shifted_sum(row, max);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// Gradients of Q, K and V given the output's gradient `grad` (`[b, sq, h, d]`).
fn backward(
    dims: &Dims, q: &[f32], k: &[f32], v: &[f32], probs: &[f32], grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, sq, sk, h, kv_heads, d, scale, .. } = *dims;
    let mut dq = vec![0f32; dims.q_len()];
    let mut dk = vec![0f32; dims.kv_len()];
    let mut dv = vec![0f32; dims.kv_len()];
    let (dq_ptr, dk_ptr, dv_ptr) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
    // One task per (batch, kv head): the query heads sharing a K/V head add into the same dK/dV
    // rows, so they run one after another inside the task.
    (0..b * kv_heads).into_par_iter().for_each_init(
        || vec![0f32; sq * sk],
        |ds, task| {
            let (bi, kv) = (task / kv_heads, task % kv_heads);
            let kv_at = (bi * sk * kv_heads + kv) * d;
            for r in 0..dims.n_rep() {
                let head = kv * dims.n_rep() + r;
                let q_at = (bi * sq * h + head) * d;
                let p = &probs[(bi * h + head) * sq * sk..][..sq * sk];
                unsafe {
                    // dV_h += Pᵀ · dO_h
                    gemm_f32(
                        sk,
                        d,
                        sq,
                        dv_ptr.at(kv_at),
                        kv_heads * d,
                        r > 0,
                        p.as_ptr(),
                        (1, sk),
                        grad[q_at..].as_ptr(),
                        (h * d, 1),
                        1.0,
                    );
                    // dP = dO_h · V_hᵀ
                    gemm_f32(
                        sq,
                        sk,
                        d,
                        ds.as_mut_ptr(),
                        sk,
                        false,
                        grad[q_at..].as_ptr(),
                        (h * d, 1),
                        v[kv_at..].as_ptr(),
                        (1, kv_heads * d),
                        1.0,
                    );
                }
                // dS = P ⊙ (dP − Σⱼ P ⊙ dP), row by row.
                for (dsr, pr) in ds.chunks_exact_mut(sk).zip(p.chunks_exact(sk)) {
                    let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (x, &pj) in dsr.iter_mut().zip(pr) {
                        *x = pj * (*x - dot);
                    }
                }
                unsafe {
                    // dQ_h = scale · dS · K_h
                    gemm_f32(
                        sq,
                        d,
                        sk,
                        dq_ptr.at(q_at),
                        h * d,
                        false,
                        ds.as_ptr(),
                        (sk, 1),
                        k[kv_at..].as_ptr(),
                        (kv_heads * d, 1),
                        scale,
                    );
                    // dK_h += scale · dSᵀ · Q_h
                    gemm_f32(
                        sk,
                        d,
                        sq,
                        dk_ptr.at(kv_at),
                        kv_heads * d,
                        r > 0,
                        ds.as_ptr(),
                        (1, sk),
                        q[q_at..].as_ptr(),
                        (h * d, 1),
                        scale,
                    );
                }
            }
        },
    );
    (dq, dk, dv)
}

#[derive(Debug)]
struct AttentionBackward;

#[derive(Debug, Clone)]
struct SavedForBackward {
    dims: Dims,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    probs: Arc<Vec<f32>>,
}

impl Backward<Flex, 3> for AttentionBackward {
    type State = SavedForBackward;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let saved = ops.state;
        let dims = saved.dims;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (dq, dk, dv) =
            backward(&dims, values(&saved.q), values(&saved.k), values(&saved.v), &saved.probs, values(&grad));
        let [q_node, k_node, v_node] = ops.parents;
        let kv_shape = [dims.b, dims.sk, dims.kv_heads, dims.d];
        if let Some(node) = q_node {
            grads.register::<Flex>(node.id, flex_tensor(dq, [dims.b, dims.sq, dims.h, dims.d]));
        }
        if let Some(node) = k_node {
            grads.register::<Flex>(node.id, flex_tensor(dk, kv_shape));
        }
        if let Some(node) = v_node {
            grads.register::<Flex>(node.id, flex_tensor(dv, kv_shape));
        }
    }
}

fn autodiff_attention<B: Backend>(
    q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Option<Arc<MaskRows>>, dims: Dims,
) -> Tensor<B, 4> {
    let (q, k, v) = (autodiff_primitive(q), autodiff_primitive(k), autodiff_primitive(v));
    let (qf, kf, vf) = (q.primitive.to_contiguous(), k.primitive.to_contiguous(), v.primitive.to_contiguous());
    let output = match AttentionBackward
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let block = dims.kv_len() / dims.b;
            let fwd = forward(&dims, values(&qf), values(&kf), values(&vf), block, block, mask.as_deref(), true);
            let out = flex_tensor(fwd.out, [dims.b, dims.sq, dims.h, dims.d]);
            prep.finish(SavedForBackward { dims, q: qf, k: kf, v: vf, probs: Arc::new(fwd.probs) }, out)
        }
        OpsKind::UnTracked(prep) => {
            let block = dims.kv_len() / dims.b;
            let fwd = forward(&dims, values(&qf), values(&kf), values(&vf), block, block, mask.as_deref(), false);
            prep.finish(flex_tensor(fwd.out, [dims.b, dims.sq, dims.h, dims.d]))
        }
    };
    from_autodiff(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::TensorData;

    type AD = burn::backend::Autodiff<Flex>;

    fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    fn vec4<B: Backend>(t: Tensor<B, 4>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// Padding mask like the decoder's: row `bi` has `pad[bi]` left-padded keys, plus causality.
    fn padded_mask<B: Backend>(
        b: usize, sq: usize, sk: usize, pad: &[usize], device: &B::Device,
    ) -> Tensor<B, 4, Bool> {
        let mut m = Vec::new();
        for &p in pad.iter().take(b) {
            for i in 0..sq {
                for j in 0..sk {
                    let qpos = i + sk - sq;
                    m.push(j > qpos || (j < p && j != qpos));
                }
            }
        }
        Tensor::from_data(TensorData::new(m, [b, 1, sq, sk]), device)
    }

    /// Values and the gradients of Q, K, V for `sum(out ⊙ w)` on the fused path and on Burn's.
    #[allow(clippy::too_many_arguments)] // the problem's sizes, as the test cases list them
    fn compare(
        b: usize, sq: usize, sk: usize, h: usize, kv_heads: usize, d: usize, pad: Option<&[usize]>, causal: bool,
    ) {
        let device = Default::default();
        AD::seed(&device, 7);
        let q = Tensor::<AD, 4>::random([b, sq, h, d], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<AD, 4>::random([b, sk, kv_heads, d], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<AD, 4>::random([b, sk, kv_heads, d], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<AD, 4>::random([b, sq, h, d], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
            let mask = pad.map(|p| padded_mask::<AD>(b, sq, sk, p, &device));
            let out = if fused {
                attention(q.clone(), k.clone(), v.clone(), mask, causal)
            } else {
                reference(q.clone(), k.clone(), v.clone(), mask, causal)
            };
            let grads = (out.clone() * w.clone()).sum().backward();
            let g = |t: &Tensor<AD, 4>| vec4(t.grad(&grads).unwrap());
            (vec4(out), g(&q), g(&k), g(&v))
        };
        let (ours, reference) = (run(true), run(false));
        close(&ours.0, &reference.0, 1e-5, "output");
        close(&ours.1, &reference.1, 1e-4, "dQ");
        close(&ours.2, &reference.2, 1e-4, "dK");
        close(&ours.3, &reference.3, 1e-4, "dV");
        // Plain Flex (inference) takes the fused forward too.
        let plain = |t: &Tensor<AD, 4>| Tensor::<Flex, 4>::from_data(t.to_data(), &device);
        let mask = pad.map(|p| padded_mask::<Flex>(b, sq, sk, p, &device));
        close(&vec4(attention(plain(&q), plain(&k), plain(&v), mask, causal)), &reference.0, 1e-5, "inference output");
    }

    #[test]
    fn causal_matches_burn_values_and_gradients() {
        compare(2, 9, 9, 4, 4, 8, None, true);
    }

    #[test]
    fn grouped_query_heads_match() {
        compare(2, 7, 7, 6, 2, 4, None, true);
    }

    #[test]
    fn decode_step_aligns_causality_bottom_right() {
        compare(1, 3, 10, 2, 1, 8, None, true);
    }

    #[test]
    fn single_query_with_padding_and_odd_head_width_matches() {
        // The direct (no gemm) path of decoding steps, with a remainder after 16 lanes.
        compare(3, 1, 12, 4, 2, 20, Some(&[0, 5, 11]), false);
        compare(2, 2, 7, 4, 4, 64, None, true);
    }

    #[test]
    fn keys_and_values_read_in_place_from_a_larger_buffer() {
        // A preallocated KV cache hands attention the first `sk` positions of `[b, capacity, …]`.
        let device = Default::default();
        Flex::seed(&device, 9);
        let (b, sq, sk, capacity, h, kv_heads, d) = (3, 2, 6, 10, 4, 2, 16);
        let q = Tensor::<Flex, 4>::random([b, sq, h, d], Distribution::Normal(0.0, 1.0), &device);
        let k_buf = Tensor::<Flex, 4>::random([b, capacity, kv_heads, d], Distribution::Normal(0.0, 1.0), &device);
        let v_buf = Tensor::<Flex, 4>::random([b, capacity, kv_heads, d], Distribution::Normal(0.0, 1.0), &device);
        let (k, v) = (k_buf.slice([0..b, 0..sk]), v_buf.slice([0..b, 0..sk]));
        assert!(!flex_f32(&k).unwrap().is_contiguous(), "the test needs a strided view");
        let copy = |t: &Tensor<Flex, 4>| Tensor::<Flex, 4>::from_data(t.to_data(), &device);
        for mask in [None, Some(padded_mask::<Flex>(b, sq, sk, &[0, 2, 5], &device))] {
            let in_place = vec4(attention(q.clone(), k.clone(), v.clone(), mask.clone(), mask.is_none()));
            let reference = vec4(reference(q.clone(), copy(&k), copy(&v), mask.clone(), mask.is_none()));
            close(&in_place, &reference, 1e-5, "strided K/V");
        }
    }

    #[test]
    fn padding_mask_matches_including_rows_of_padding() {
        compare(3, 8, 8, 2, 2, 16, Some(&[0, 3, 7]), false);
    }

    #[test]
    fn unmasked_like_clip_matches() {
        compare(2, 5, 5, 4, 4, 8, None, false);
    }

    #[test]
    fn fully_masked_row_is_zero_like_burn() {
        let device = Default::default();
        let q = Tensor::<Flex, 4>::ones([1, 2, 1, 4], &device);
        let mask =
            Tensor::<Flex, 4, Bool>::from_data(TensorData::new(vec![true, true, false, true], [1, 1, 2, 2]), &device);
        let out = vec4(attention(q.clone(), q.clone(), q.clone() * 3.0, Some(mask), false));
        assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 3.0]);
    }
}
