//! Products with a quantized weight on Flex: `y [m, out] = x [m, in] · Wᵀ (+ b)`, `W` in q8 /
//! q4 / nf4 blocks of 32 (see [`crate::quant`]).
//!
//! Decoding (`m ≤ 16` rows) is bound by reading the weights: each output's row of blocks is
//! streamed once, each block widened to 32 f32 weights in registers (`code × scale`, the exact
//! values [`crate::quant::dequantize_block`] gives) and multiplied into up to 8 rows of `x` at a
//! time; 4 bits per weight is about a quarter of the bytes of f16. AVX-512 where the CPU has it
//! (a 4-bit block is one 16-byte load, its nibbles widened by `vpmovzxbd`, NF4's table lookup one
//! `vpermps`), else a portable loop compiled for AVX2 + FMA and for the baseline. Activations stay
//! f32: an int8-activation product (VNNI) would be faster still but no longer the float product
//! of the dequantized weight, which is this kernel's contract (and the reference's numerics).
//!
//! More rows (prefill) dequantize a block of 256 outputs' weights into an f32 panel per task and
//! multiply it with gemm, as the half-precision path does: the dequantization is paid once per
//! product and shared by every row.

use crate::cpu::bf16_dot;
use crate::cpu::dense::{gemm_into, matmul};
use crate::cpu::flex::{
    AutodiffFlexTensor, autodiff_primitive, flex_f32, flex_int, flex_tensor, from_autodiff, from_f32, is_autodiff_flex,
    values as f32_values,
};
use crate::cpu::skinny::{MAX_ROWS, OutPtr};
use crate::quant::{BLOCK, NF4_LEVELS, QuantFormat, QuantLinear, dequantize_block};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use half::f16;
use rayon::prelude::*;

/// Outputs dequantized per prefill task (`256 × in` f32: 4 MiB for in = 4096).
const PANEL_ROWS: usize = 256;

/// A quantized `[n, k]` weight in Flex storage.
#[derive(Clone, Copy)]
pub(crate) struct QuantView<'a> {
    pub format: QuantFormat,
    /// Outputs.
    pub n: usize,
    /// Inputs (a multiple of 32).
    pub k: usize,
    pub codes: &'a [u8],
    pub scales: &'a [f16],
    /// Prefill products in bf16 (see [`QuantLinear::bf16_products`]).
    pub bf16: bool,
}

impl QuantView<'_> {
    fn row_bytes(&self) -> usize {
        self.k / BLOCK * self.format.block_bytes()
    }

    /// Output `j`'s weights as f32 into `dst` (`k` values).
    /// `x [m, k]` times the weight's transpose, `[m, n]`: the decode kernel for few rows, the
    /// dequantized-panel one for more.
    fn product(&self, x: &[f32], m: usize) -> Vec<f32> {
        if m <= MAX_ROWS { decode(x, m, self) } else { prefill(x, m, self) }
    }

    fn dequantize_row(&self, j: usize, dst: &mut [f32]) {
        let (rb, blocks) = (self.row_bytes(), self.k / BLOCK);
        let codes = &self.codes[j * rb..(j + 1) * rb];
        for (b, dst) in dst.chunks_exact_mut(BLOCK).enumerate() {
            let bytes = &codes[b * self.format.block_bytes()..(b + 1) * self.format.block_bytes()];
            dequantize_block(self.format, bytes, self.scales[j * blocks + b].to_f32(), dst);
        }
    }
}

/// The product on Flex f32 activations; `None` (nothing done) for any other backend or dtype.
pub(crate) fn linear<B: Backend>(x: &Tensor<B, 2>, q: &QuantLinear<B>) -> Option<Tensor<B, 2>> {
    let [m, k] = x.dims();
    let [n, qk] = q.dims();
    if qk != k || m == 0 || n == 0 {
        return None;
    }
    if is_autodiff_flex::<B>() {
        return autodiff_linear(x, q);
    }
    let weight = QuantWeight::new(q, n, k, flex_int(&q.values)?, crate::cpu::flex::flex_any(&q.scales)?)?;
    let x = flex_f32(x)?.to_contiguous();
    let mut out = weight.view().product(f32_values(&x), m);
    if let Some(bias) = &q.bias {
        let bias = bias.val().cast(DType::F32).into_data().into_vec::<f32>().ok()?;
        for row in out.chunks_mut(n) {
            row.iter_mut().zip(&bias).for_each(|(o, b)| *o += b);
        }
    }
    from_f32(out, [m, n])
}

/// The codes and scales of a frozen quantized weight, as the backward pass needs them (shared
/// with the layer, not copied).
#[derive(Debug, Clone)]
struct QuantWeight {
    format: QuantFormat,
    bf16: bool,
    n: usize,
    k: usize,
    codes: FlexTensor,
    scales: FlexTensor,
}

impl QuantWeight {
    /// `None` unless the codes are contiguous `i32` words from offset 0 and the scales
    /// contiguous f16 (what the kernels read).
    fn new<B: Backend>(q: &QuantLinear<B>, n: usize, k: usize, codes: FlexTensor, scales: FlexTensor) -> Option<Self> {
        let (format, bf16) = (q.format, q.bf16_products);
        let usable = codes.dtype() == DType::I32
            && scales.dtype() == DType::F16
            && codes.is_contiguous()
            && codes.layout().start_offset() == 0
            && scales.is_contiguous();
        usable.then(|| QuantWeight { format, bf16, n, k, codes, scales: scales.to_contiguous() })
    }

    fn view(&self) -> QuantView<'_> {
        QuantView {
            format: self.format,
            bf16: self.bf16,
            n: self.n,
            k: self.k,
            codes: &self.codes.bytes()[..self.n * self.k * self.format.bits() / 8],
            scales: &self.scales.storage::<f16>()[..self.n * self.k / BLOCK],
        }
    }
}

/// Under `Autodiff<Flex>` (QLoRA): the product with a frozen quantized weight, whose backward
/// pass dequantizes the weight again for `dX = dY · W` instead of keeping a float copy of it
/// from the forward pass, as bitsandbytes does. Burn's dequantize-then-matmul kept every layer's
/// dequantized weight in the graph: at 7B, the whole base again (measured: out of memory at 24
/// GiB). The weight is frozen, so it gets no gradient; `x` in another dtype goes through f32
/// (Burn's differentiable cast) and the result back.
fn autodiff_linear<B: Backend>(x: &Tensor<B, 2>, q: &QuantLinear<B>) -> Option<Tensor<B, 2>> {
    let [m, k] = x.dims();
    let [n, _] = q.dims();
    let scales = autodiff_primitive(q.scales.clone()).primitive;
    let weight = QuantWeight::new(q, n, k, flex_int(&q.values)?, scales)?;
    let dtype = x.dtype();
    let x: AutodiffFlexTensor =
        autodiff_primitive(if dtype == DType::F32 { x.clone() } else { x.clone().cast(DType::F32) });
    let xf = x.primitive.to_contiguous();
    let out = flex_tensor(weight.view().product(f32_values(&xf), m), [m, n]);
    let y = match QuantLinearBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(weight, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let mut y: Tensor<B, 2> = from_autodiff(y);
    if let Some(bias) = &q.bias {
        y = y + bias.val().cast(DType::F32).unsqueeze::<2>();
    }
    Some(if dtype == DType::F32 { y } else { y.cast(dtype) })
}

#[derive(Debug)]
struct QuantLinearBackward;

impl Backward<Flex, 1> for QuantLinearBackward {
    type State = QuantWeight;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let w = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [x_node] = ops.parents;
        let Some(node) = x_node else { return };
        let (n, k) = (w.n, w.k);
        let m = grad.layout().shape().num_elements() / n;
        // W dequantized for this product only ([n, k] f32, one layer's worth, freed at once).
        let view = w.view();
        let mut dense = vec![0f32; n * k];
        dense.par_chunks_mut(k).enumerate().for_each(|(j, row)| view.dequantize_row(j, row));
        let dx = matmul(m, n, k, (f32_values(&grad), n, 1), (&dense, k, 1));
        grads.register::<Flex>(node.id, flex_tensor(dx, [m, k]));
    }
}

/// Few rows: outputs split among the threads, each output's blocks streamed once per 8 rows.
pub(crate) fn decode(x: &[f32], m: usize, w: &QuantView) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let mut out = vec![0f32; m * n];
    let chunk = (n / (4 * rayon::current_num_threads())).clamp(1, 256);
    let tasks = n.div_ceil(chunk);
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |task: usize| {
        let (j0, j1) = (task * chunk, ((task + 1) * chunk).min(n));
        for j in j0..j1 {
            // Two rows ahead, as the float dot-product kernel does: the hardware prefetchers stop
            // at page boundaries, and a row is a few hundred bytes to a few KiB.
            if j + 2 < j1 {
                prefetch_row(&w.codes[(j + 2) * w.row_bytes()..(j + 3) * w.row_bytes()]);
            }
            let scales = &w.scales[j * (k / BLOCK)..(j + 1) * (k / BLOCK)];
            let codes = &w.codes[j * w.row_bytes()..(j + 1) * w.row_bytes()];
            let mut i0 = 0;
            while i0 < m {
                let rows = (m - i0).min(8);
                let xr = &x[i0 * k..(i0 + rows) * k];
                let mut sums = [0f32; 8];
                match rows {
                    1 => dot_dispatch::<1>(w.format, codes, scales, xr, k, &mut sums),
                    2 => dot_dispatch::<2>(w.format, codes, scales, xr, k, &mut sums),
                    3 => dot_dispatch::<3>(w.format, codes, scales, xr, k, &mut sums),
                    4 => dot_dispatch::<4>(w.format, codes, scales, xr, k, &mut sums),
                    5 => dot_dispatch::<5>(w.format, codes, scales, xr, k, &mut sums),
                    6 => dot_dispatch::<6>(w.format, codes, scales, xr, k, &mut sums),
                    7 => dot_dispatch::<7>(w.format, codes, scales, xr, k, &mut sums),
                    _ => dot_dispatch::<8>(w.format, codes, scales, xr, k, &mut sums),
                }
                for (i, s) in sums[..rows].iter().enumerate() {
                    // SAFETY: output j of every row is written by this task only.
                    unsafe { *ptr.get().add((i0 + i) * n + j) = *s };
                }
                i0 += rows;
            }
        }
    };
    if n * k >= 1 << 16 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
    out
}

/// Asks the cache for every line of `bytes` (no effect off x86-64).
#[inline(always)]
fn prefetch_row(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch reads nothing architecturally; the address is inside `bytes`.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// `sums[i] = x[i] · row` for `M` rows of `x`, the row given as its blocks' codes and scales.
#[inline(always)]
fn dot_dispatch<const M: usize>(
    format: QuantFormat, codes: &[u8], scales: &[f16], x: &[f32], k: usize, sums: &mut [f32; 8],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the features are present; slices hold k / 32 blocks and M rows of k.
            return unsafe {
                match format {
                    QuantFormat::Q8 => dot_avx512::<M, 0>(codes, scales, x, k, sums),
                    QuantFormat::Q4 => dot_avx512::<M, 1>(codes, scales, x, k, sums),
                    QuantFormat::Nf4 => dot_avx512::<M, 2>(codes, scales, x, k, sums),
                }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { dot_avx2::<M>(format, codes, scales, x, k, sums) };
        }
    }
    dot_portable::<M>(format, codes, scales, x, k, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<const M: usize>(
    format: QuantFormat, codes: &[u8], scales: &[f16], x: &[f32], k: usize, sums: &mut [f32; 8],
) {
    dot_portable::<M>(format, codes, scales, x, k, sums)
}

/// The portable loop: each block widened into 32 f32 lanes, multiplied into 32 lane sums per
/// row (written so that the compiler vectorises it for the enabled target features).
#[inline(always)]
fn dot_portable<const M: usize>(
    format: QuantFormat, codes: &[u8], scales: &[f16], x: &[f32], k: usize, sums: &mut [f32; 8],
) {
    let bb = format.block_bytes();
    let mut lanes = [[0f32; BLOCK]; M];
    let mut w = [0f32; BLOCK];
    for (b, &scale) in scales.iter().enumerate() {
        dequantize_block(format, &codes[b * bb..(b + 1) * bb], scale.to_f32(), &mut w);
        for (i, lane) in lanes.iter_mut().enumerate() {
            let xb = &x[i * k + b * BLOCK..i * k + (b + 1) * BLOCK];
            for l in 0..BLOCK {
                lane[l] = xb[l].mul_add(w[l], lane[l]);
            }
        }
    }
    for (s, lane) in sums.iter_mut().zip(&lanes) {
        *s = lane.iter().sum();
    }
}

/// AVX-512: `KIND` 0 = q8, 1 = q4, 2 = nf4 (a constant, so each loop is specialised).
///
/// A 4-bit block: its 16 bytes widened to 16 lanes, low nibbles codes 0..16, high nibbles codes
/// 16..32; the code table (q4: `c − 8`, nf4: the NF4 levels) times the block's scale is
/// computed once (one multiply), then each half is one `vpermps` of it: the same f32 products
/// `level × scale` as the reference, with no multiply per half.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,fma")]
unsafe fn dot_avx512<const M: usize, const KIND: u8>(
    codes: &[u8], scales: &[f16], x: &[f32], k: usize, sums: &mut [f32; 8],
) {
    use std::arch::x86_64::*;
    let levels: [f32; 16] = match KIND {
        1 => std::array::from_fn(|c| c as f32 - 8.0),
        _ => NF4_LEVELS,
    };
    let table = unsafe { _mm512_loadu_ps(levels.as_ptr()) };
    let (cp, xp) = (codes.as_ptr(), x.as_ptr());
    let mut lo = [_mm512_setzero_ps(); M];
    let mut hi = [_mm512_setzero_ps(); M];
    let bb = if KIND == 0 { 32 } else { 16 };
    // The scales widened 16 at a time (one `vcvtph2ps`; a scalar f16 conversion per block
    // cost as much as the block's products).
    let mut widened = [0f32; 16];
    let blocks = scales.len();
    for b in 0..blocks {
        if b % 16 == 0 {
            let mut h = [f16::ZERO; 16];
            if blocks - b >= 16 {
                h.copy_from_slice(&scales[b..b + 16]);
            } else {
                h[..blocks - b].copy_from_slice(&scales[b..]);
            }
            // SAFETY: 16 f16 values are 32 bytes; 16 f32 values fill `widened`.
            unsafe {
                _mm512_storeu_ps(
                    widened.as_mut_ptr(),
                    _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr() as *const __m256i)),
                )
            };
        }
        let s = _mm512_set1_ps(widened[b % 16]);
        // SAFETY: block b's bytes are inside `codes` (k / 32 blocks).
        let (w0, w1) = unsafe {
            let p = cp.add(b * bb);
            if KIND == 0 {
                let c0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
                let c1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
                (_mm512_mul_ps(_mm512_cvtepi32_ps(c0), s), _mm512_mul_ps(_mm512_cvtepi32_ps(c1), s))
            } else {
                let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
                let n0 = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
                let n1 = _mm512_srli_epi32::<4>(bytes);
                let scaled = _mm512_mul_ps(table, s);
                (_mm512_permutexvar_ps(n0, scaled), _mm512_permutexvar_ps(n1, scaled))
            }
        };
        for i in 0..M {
            // SAFETY: row i of x holds k values; block b covers [32b, 32b + 32).
            unsafe {
                let xr = xp.add(i * k + b * BLOCK);
                lo[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xr), w0, lo[i]);
                hi[i] = _mm512_fmadd_ps(_mm512_loadu_ps(xr.add(16)), w1, hi[i]);
            }
        }
    }
    for i in 0..M {
        sums[i] = _mm512_reduce_add_ps(_mm512_add_ps(lo[i], hi[i]));
    }
}

/// Many rows: per task, a panel of up to 256 outputs dequantized to f32 `[width, k]` and
/// multiplied with gemm.
pub(crate) fn prefill(x: &[f32], m: usize, w: &QuantView) -> Vec<f32> {
    if w.bf16
        && let Some(out) = prefill_bf16(x, m, w)
    {
        return out;
    }
    let (n, k) = (w.n, w.k);
    let mut out = Vec::<f32>::with_capacity(m * n);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(PANEL_ROWS)).into_par_iter().for_each_init(Vec::new, |panel: &mut Vec<f32>, p| {
        let (j0, j1) = (p * PANEL_ROWS, ((p + 1) * PANEL_ROWS).min(n));
        let width = j1 - j0;
        panel.clear();
        panel.resize(width * k, 0.0);
        for (j, dst) in (j0..j1).zip(panel.chunks_exact_mut(k)) {
            w.dequantize_row(j, dst);
        }
        // SAFETY: this task alone writes columns [j0, j1) of every row of `out` (m × n floats);
        // the panel is the `[k, width]` operand Wᵀ with strides (1, k).
        unsafe {
            gemm_into(
                m,
                k,
                width,
                ptr.get().add(j0),
                n,
                (x.as_ptr(), k, 1),
                (panel.as_ptr(), 1, k),
                gemm::Parallelism::None,
            )
        };
    });
    // SAFETY: the panels cover every column of every row.
    unsafe { out.set_len(m * n) };
    out
}

/// Many rows in bf16 (AVX-512 BF16): per task, a panel of up to 256 outputs dequantized and
/// rounded to bf16, multiplied by `x` rounded to bf16 with f32 sums (`bf16_dot`); `None`
/// without the instructions.
fn prefill_bf16(x: &[f32], m: usize, w: &QuantView) -> Option<Vec<f32>> {
    let (n, k) = (w.n, w.k);
    let rows = bf16_dot::RoundedRows::new(x, m, k)?;
    let mut out = Vec::<f32>::with_capacity(m * n);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(PANEL_ROWS)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(wide, panel): &mut (Vec<f32>, Vec<u16>), p| {
            let (j0, j1) = (p * PANEL_ROWS, ((p + 1) * PANEL_ROWS).min(n));
            wide.resize(k, 0.0);
            panel.resize((j1 - j0) * k, 0);
            for (j, dst) in (j0..j1).zip(panel.chunks_exact_mut(k)) {
                w.dequantize_row(j, wide);
                bf16_dot::round_into(wide, dst);
            }
            // SAFETY: this task alone writes columns [j0, j1) of every row of `out` (m × n).
            unsafe { rows.times_rows(panel, j1 - j0, ptr.get().add(j0), n) };
        },
    );
    // SAFETY: the panels cover every column of every row.
    unsafe { out.set_len(m * n) };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantMatrix;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    /// With bf16 products (a bf16 model, AVX-512 BF16): prefill rows equal the exact product of
    /// bf16-rounded activations and bf16-rounded dequantized weights (f64 here) within f32
    /// summation error; decode rows stay the exact f32 product of the dequantized weight.
    #[test]
    fn bf16_products_are_the_product_of_the_bf16_rounded_operands() {
        if !bf16_dot::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        use half::bf16;
        let device = Default::default();
        Flex::seed(&device, 9);
        for format in QuantFormat::ALL {
            for (m, k, n) in [(17, 64, 50), (40, 288, 300), (3, 64, 20)] {
                let w = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 0.05), &device);
                let matrix = QuantMatrix::quantize(format, n, k, &w.to_data().to_vec::<f32>().unwrap()).unwrap();
                let layer = QuantLinear::<Flex>::new(&matrix, None, &device).with_bf16_products(true);
                let x = Tensor::<Flex, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
                let ours = linear(&x, &layer).unwrap().to_data().to_vec::<f32>().unwrap();
                let (xs, deq) = (x.to_data().to_vec::<f32>().unwrap(), matrix.dequantize());
                let round = |v: f32| if m > MAX_ROWS { bf16::from_f32(v).to_f64() } else { v as f64 };
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|t| round(xs[i * k + t]) * round(deq[j * k + t]));
                        let (exact, mag) = terms.fold((0f64, 0f64), |(s, a), v| (s + v, a + v.abs()));
                        let got = ours[i * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * mag + 1e-30,
                            "{format} {m}x{k}x{n} ({i}, {j}): {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// The kernels' products equal the f32 product with the dequantized weight within 1e-5 of
    /// the sum of |terms| (they differ only in summation order), for every format, row counts
    /// on both sides of the decode/prefill split, every SIMD path's row count, and a bias.
    #[test]
    fn quantized_products_equal_the_dequantized_float_product() {
        let device = Default::default();
        Flex::seed(&device, 5);
        for format in QuantFormat::ALL {
            for (m, k, n) in [(1, 32, 16), (3, 64, 50), (8, 96, 33), (9, 256, 300), (16, 64, 40), (40, 128, 520)] {
                let w = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 0.05), &device);
                let values = w.to_data().to_vec::<f32>().unwrap();
                let matrix = QuantMatrix::quantize(format, n, k, &values).unwrap();
                let bias = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
                let layer = QuantLinear::<Flex>::new(&matrix, Some(bias.clone()), &device);
                let x = Tensor::<Flex, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
                let ours = linear(&x, &layer).expect("Flex takes the kernel").to_data().to_vec::<f32>().unwrap();
                // The reference: Burn's dequantization (checked against the host one) and matmul.
                let deq = layer.dequantize();
                assert_eq!(deq.to_data().to_vec::<f32>().unwrap(), matrix.dequantize(), "{format} dequantize");
                let want = crate::reference::quant_linear(x.clone(), &layer).to_data().to_vec::<f32>().unwrap();
                let magnitude = x.clone().abs().matmul(deq.abs().transpose()) + bias.abs().unsqueeze::<2>();
                let magnitude = magnitude.to_data().to_vec::<f32>().unwrap();
                for (i, ((a, b), mag)) in ours.iter().zip(&want).zip(&magnitude).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * mag, "{format} {m}x{k}x{n} [{i}]: {a} vs {b} (|terms| {mag})");
                }
            }
        }
    }

    /// On `Autodiff<Flex>` (QLoRA training) the product and the input's gradient equal Burn's
    /// dequantize-and-matmul (the reference path), in f32 and under bf16 compute, for every
    /// format, with the weight re-dequantized in the backward pass instead of kept.
    #[test]
    fn the_autodiff_product_and_input_gradient_equal_the_dequantized_reference() {
        type AD = burn::backend::Autodiff<Flex>;
        use burn::tensor::TensorData;
        let device = Default::default();
        for format in QuantFormat::ALL {
            for (m, k, n) in [(3, 64, 50), (20, 128, 72)] {
                // Fixed values, not the shared generator (tests run in parallel).
                let values: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0).collect();
                let matrix = QuantMatrix::quantize(format, n, k, &values).unwrap();
                let bias = Tensor::<AD, 1>::from_data(
                    TensorData::new((0..n).map(|i| i as f32 / n as f32).collect(), [n]),
                    &device,
                );
                let layer = QuantLinear::<AD>::new(&matrix, Some(bias), &device);
                let xs: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0).collect();
                let rs: Vec<f32> = (0..m * n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0).collect();
                for (dtype, tol) in [(DType::F32, 1e-4f32), (DType::BF16, 5e-2)] {
                    let run = |ours: bool| {
                        let x = Tensor::<AD, 2>::from_data(TensorData::new(xs.clone(), [m, k]), &device)
                            .cast(dtype)
                            .require_grad();
                        let y = if ours {
                            linear(&x, &layer).expect("Autodiff<Flex> takes the kernel")
                        } else {
                            crate::reference::quant_linear(x.clone(), &layer)
                        };
                        assert_eq!(y.dtype(), dtype);
                        let r = Tensor::<AD, 2>::from_data(TensorData::new(rs.clone(), [m, n]), &device);
                        let grads = (y.clone().cast(DType::F32) * r).sum().backward();
                        let dx = x.grad(&grads).expect("x has a gradient");
                        let host = |t: Tensor<Flex, 2>| t.cast(DType::F32).into_data().to_vec::<f32>().unwrap();
                        (host(y.inner()), host(dx))
                    };
                    let ((y, dx), (y_ref, dx_ref)) = (run(true), run(false));
                    for (what, a, b) in [("y", &y, &y_ref), ("dx", &dx, &dx_ref)] {
                        for (i, (a, b)) in a.iter().zip(b.iter()).enumerate() {
                            assert!(
                                (a - b).abs() <= tol * (1.0 + b.abs()),
                                "{format} {dtype:?} {what}[{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The portable loop (what CPUs without AVX-512 run) gives the same sums as the SIMD one,
    /// within float reordering.
    #[test]
    fn the_portable_loop_agrees_with_the_dispatched_one() {
        let k = 128;
        let values: Vec<f32> = (0..k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 300.0).collect();
        let x: Vec<f32> = (0..3 * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0).collect();
        for format in QuantFormat::ALL {
            let q = QuantMatrix::quantize(format, 1, k, &values).unwrap();
            let (mut a, mut b) = ([0f32; 8], [0f32; 8]);
            dot_dispatch::<3>(format, &q.values, &q.scales, &x, k, &mut a);
            dot_portable::<3>(format, &q.values, &q.scales, &x, k, &mut b);
            for i in 0..3 {
                assert!((a[i] - b[i]).abs() <= 1e-5 * (1.0 + b[i].abs()), "{format} row {i}: {} vs {}", a[i], b[i]);
            }
        }
    }
}
