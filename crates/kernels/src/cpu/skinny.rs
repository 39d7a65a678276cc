//! A CPU kernel for linear layers on a few rows: `x [m, k] · W [k, n]` with `m ≤ 16`.
//!
//! Why: at decode time every linear layer sees one token per sequence (m = batch size). A
//! general gemm packs the whole weight matrix into panels before multiplying and its register
//! tile is 64 rows tall, so for m = 1..16 it spends most of its time copying and on masked
//! lanes; for m = 1 it falls back to a single-threaded matrix-vector loop. Here the weight is
//! streamed once, straight from its row-major storage, in panels of up to 512 columns (long
//! sequential runs per row, prefetched), each panel in 32-column strips whose sums for up to 8
//! rows stay in registers; the panels are shared among the rayon threads. Decoding is then
//! bound by reading the weights, as it should be.
//!
//! It applies only where the tensors are Burn's `Flex` CPU backend in f32 without autodiff
//! (inference); everything else takes Burn's own `matmul`. Each output element is one
//! sequential sum over `k`, independent of `m` and of the thread split, so a row's result does
//! not depend on which other rows share the batch.

use crate::cpu::flex::{MatrixLayout, flex_any, flex_f32, from_f32, matrix_layout};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Largest row count handled here; above it a gemm's packing pays off.
pub const MAX_ROWS: usize = 16;
/// Widest panel: a 2 KiB run of each weight row (and, in the portable loop, 8 rows of sums in
/// 16 KiB of L1).
const PANEL: usize = 512;
/// Bytes of weights per row block of a panel (a quarter of a 2 MiB L2).
const L2_BLOCK_BYTES: usize = 512 * 1024;

/// `x [m, k] · w [k, n] (+ bias [n])` on Flex f32 tensors with `m ≤ MAX_ROWS`; `None` (inputs
/// untouched) when the backend, dtype, shape or weight layout does not fit.
pub(crate) fn skinny_linear<B: Backend>(
    x: &Tensor<B, 2>, w: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let [m, k] = x.dims();
    let [wk, n] = w.dims();
    if m == 0 || m > MAX_ROWS || wk != k || n < 16 {
        return None;
    }
    let w_flex = flex_any(w)?;
    // The weight is used in place: row-major, or the transposed view the checkpoint loader makes;
    // any other view is left to Burn.
    let layout = matrix_layout(&w_flex)?;
    let x_contig = flex_f32(x)?.to_contiguous();
    let rows = x_contig.as_slice::<f32>()?;
    let bias_values = match bias {
        Some(b) => Some(b.clone().cast(DType::F32).into_data().into_vec::<f32>().ok()?),
        None => None,
    };
    let mut out = vec![0f32; m * n];
    macro_rules! run {
        ($t:ty) => {{
            let weights = &w_flex.storage::<$t>()[..k * n];
            match layout {
                MatrixLayout::RowMajor => matmul_rows(rows, weights, &mut out, m, k, n),
                MatrixLayout::Transposed => matmul_dots(rows, weights, &mut out, m, k, n),
            }
        }};
    }
    match w_flex.dtype() {
        DType::F32 => run!(f32),
        DType::BF16 => run!(bf16),
        DType::F16 => run!(f16),
        _ => return None,
    }
    if let Some(bias) = bias_values {
        for row in out.chunks_mut(n) {
            row.iter_mut().zip(&bias).for_each(|(o, b)| *o += b);
        }
    }
    from_f32(out, [m, n])
}

/// Output pointer shared by the threads; each writes a disjoint set of columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer, through a method so that closures capture the whole (Send + Sync) wrapper
    /// rather than its raw-pointer field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A weight element the panels read: f32, or f16/bf16 converted to f32 as each 32-column run
/// is loaded (decoding is bound by reading the weights, so half the bytes is nearly half the
/// time; the sums stay f32).
pub trait PanelWeight: Copy + Send + Sync + 'static {
    /// Selects the load in the SIMD loops (a constant per type, so each loop is specialised).
    const KIND: WeightKind;
    fn to_f32(self) -> f32;
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WeightKind {
    F32,
    BF16,
    F16,
}

impl PanelWeight for f32 {
    const KIND: WeightKind = WeightKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl PanelWeight for bf16 {
    const KIND: WeightKind = WeightKind::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: exact, one shift.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl PanelWeight for f16 {
    const KIND: WeightKind = WeightKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// `out [m, n] = x [m, k] · w [k, n]`, all row-major and contiguous.
pub fn matmul_rows<W: PanelWeight>(x: &[f32], w: &[W], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(x.len() == m * k && w.len() == k * n && out.len() == m * n);
    // At least two panels per thread where the width allows, so that narrow layers use every core.
    let width = (n / (2 * rayon::current_num_threads()) / 32 * 32).clamp(32, PANEL);
    let panels = n.div_ceil(width);
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |panel: usize| {
        let (c0, c1) = (panel * width, ((panel + 1) * width).min(n));
        // SAFETY: columns [c0, c1) of `out` are written by this panel only.
        unsafe { column_panel(x, w, ptr, m, k, n, c0, c1) };
    };
    if k * n >= 1 << 16 && panels > 1 {
        (0..panels).into_par_iter().for_each(run);
    } else {
        (0..panels).for_each(run);
    }
}

/// Columns `[c0, c1)` of every row, eight rows at a time.
///
/// # Safety
/// `out` must point to `m × n` floats, and no other thread may write these columns.
#[allow(clippy::too_many_arguments)]
unsafe fn column_panel<W: PanelWeight>(
    x: &[f32], w: &[W], out: OutPtr, m: usize, k: usize, n: usize, c0: usize, c1: usize,
) {
    let mut i0 = 0;
    while i0 < m {
        let rows = (m - i0).min(8);
        let x_rows = &x[i0 * k..(i0 + rows) * k];
        let out_rows = unsafe { out.0.add(i0 * n) };
        unsafe {
            match rows {
                1 => panel_dispatch::<1, W>(x_rows, w, out_rows, k, n, c0, c1),
                2 => panel_dispatch::<2, W>(x_rows, w, out_rows, k, n, c0, c1),
                3 => panel_dispatch::<3, W>(x_rows, w, out_rows, k, n, c0, c1),
                4 => panel_dispatch::<4, W>(x_rows, w, out_rows, k, n, c0, c1),
                5 => panel_dispatch::<5, W>(x_rows, w, out_rows, k, n, c0, c1),
                6 => panel_dispatch::<6, W>(x_rows, w, out_rows, k, n, c0, c1),
                7 => panel_dispatch::<7, W>(x_rows, w, out_rows, k, n, c0, c1),
                _ => panel_dispatch::<8, W>(x_rows, w, out_rows, k, n, c0, c1),
            }
        }
        i0 += rows;
    }
}

#[inline(always)]
unsafe fn panel_dispatch<const M: usize, W: PanelWeight>(
    x: &[f32], w: &[W], out: *mut f32, k: usize, n: usize, c0: usize, c1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return unsafe { panel_avx512::<M, W>(x, w, out, k, n, c0, c1) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        return unsafe { panel_avx2::<M, W>(x, w, out, k, n, c0, c1) };
    }
    unsafe { panel_portable::<M, W>(x, w, out, k, n, c0, c1) }
}

/// The portable loop compiled for 256-bit vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn panel_avx2<const M: usize, W: PanelWeight>(
    x: &[f32], w: &[W], out: *mut f32, k: usize, n: usize, c0: usize, c1: usize,
) {
    unsafe { panel_portable::<M, W>(x, w, out, k, n, c0, c1) }
}

/// One panel in 32-column strips, each strip's `M × 32` sums held in registers over all of `k`.
/// The first strip prefetches the panel's whole row segments (2 KiB each) a few rows ahead, so
/// the weight comes from memory in long sequential runs and the other strips find it in L2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn panel_avx512<const M: usize, W: PanelWeight>(
    x: &[f32], w: &[W], out: *mut f32, k: usize, n: usize, c0: usize, c1: usize,
) {
    use std::arch::x86_64::*;
    const AHEAD: usize = 12;
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let strips = (c1 - c0) / 32;
    // 64-byte lines of one row's segment: 16 f32 or 32 half-precision values each.
    let per_line = 64 / std::mem::size_of::<W>();
    let lines = (c1 - c0).div_ceil(per_line);
    // Rows of the panel per block: the block (rows × panel width) stays within a quarter of a
    // core's L2, so that the strips after the first, which prefetched it, find it there. Without
    // blocking a real-width panel (k = 2048..11008 rows) overflows L2 and every strip reads the
    // weights from memory again. The sums go through `out` between blocks, unchanged (f32), so
    // each output is still one sequential sum over k.
    let block = (L2_BLOCK_BYTES / ((c1 - c0).max(1) * std::mem::size_of::<W>())).max(16);
    let mut k0 = 0;
    while k0 < k {
        let k1 = (k0 + block).min(k);
        for strip in 0..strips {
            let j0 = c0 + 32 * strip;
            let mut lo = [_mm512_setzero_ps(); M];
            let mut hi = [_mm512_setzero_ps(); M];
            if k0 > 0 {
                for i in 0..M {
                    unsafe {
                        lo[i] = _mm512_loadu_ps(out.add(i * n + j0));
                        hi[i] = _mm512_loadu_ps(out.add(i * n + j0 + 16));
                    }
                }
            }
            for kk in k0..k1 {
                let row = unsafe { wp.add(kk * n + j0) };
                if strip == 0 && kk + AHEAD < k1 {
                    let ahead = unsafe { wp.add((kk + AHEAD) * n + c0) };
                    for line in 0..lines {
                        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.add(per_line * line) as *const i8) };
                    }
                }
                // 32 weights as two f32 vectors (half precision widened exactly).
                let (w_lo, w_hi) = unsafe { (load16(row), load16(row.add(16))) };
                for i in 0..M {
                    let xv = _mm512_set1_ps(unsafe { *xp.add(i * k + kk) });
                    lo[i] = _mm512_fmadd_ps(xv, w_lo, lo[i]);
                    hi[i] = _mm512_fmadd_ps(xv, w_hi, hi[i]);
                }
            }
            for i in 0..M {
                unsafe {
                    _mm512_storeu_ps(out.add(i * n + j0), lo[i]);
                    _mm512_storeu_ps(out.add(i * n + j0 + 16), hi[i]);
                }
            }
        }
        k0 = k1;
    }
    // Columns past the last whole strip (only in the last panel of a ragged width).
    for j in c0 + 32 * strips..c1 {
        for i in 0..M {
            let sum =
                (0..k).fold(0f32, |a, kk| unsafe { (*xp.add(i * k + kk)).mul_add((*wp.add(kk * n + j)).to_f32(), a) });
            unsafe { *out.add(i * n + j) = sum };
        }
    }
}

/// Same panel without explicit SIMD (the compiler vectorises it for the baseline target).
#[inline(always)]
unsafe fn panel_portable<const M: usize, W: PanelWeight>(
    x: &[f32], w: &[W], out: *mut f32, k: usize, n: usize, c0: usize, c1: usize,
) {
    let width = c1 - c0;
    let mut acc = [[0f32; PANEL]; M];
    for kk in 0..k {
        let row = &w[kk * n + c0..kk * n + c1];
        for i in 0..M {
            let xv = x[i * k + kk];
            for (a, wv) in acc[i][..width].iter_mut().zip(row) {
                *a += xv * wv.to_f32();
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(i * n + c0), width) };
    }
}

/// `out [m, n] = x [m, k] · wtᵀ` where `wt` is `[n, k]` row-major (each output's weights one
/// contiguous run of `k`): a dot product per output, the layout llama.cpp decodes with. Each
/// weight row is read once, sequentially (the hardware prefetchers' best case), by one thread;
/// `x` stays in cache. Each output is one fixed-order sum (16 lanes over `k`, then the lanes,
/// then the ragged tail), independent of `m`, of which rows share the batch and of the split.
pub fn matmul_dots<W: PanelWeight>(x: &[f32], wt: &[W], out: &mut [f32], m: usize, k: usize, n: usize) {
    assert!(x.len() == m * k && wt.len() == k * n && out.len() == m * n);
    // Outputs per task: a few tasks per thread so that the last one does not wait alone.
    let chunk = (n / (4 * rayon::current_num_threads())).clamp(2, 256) / 2 * 2;
    let tasks = n.div_ceil(chunk);
    let ptr = OutPtr(out.as_mut_ptr());
    let run = |task: usize| {
        let (j0, j1) = (task * chunk, ((task + 1) * chunk).min(n));
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(8);
            let x_rows = &x[i0 * k..(i0 + rows) * k];
            // SAFETY: outputs [j0, j1) of rows i0.. are written by this task only.
            unsafe {
                let out_rows = ptr.get().add(i0 * n);
                match rows {
                    1 => dots_dispatch::<1, W>(x_rows, wt, out_rows, k, n, j0, j1),
                    2 => dots_dispatch::<2, W>(x_rows, wt, out_rows, k, n, j0, j1),
                    3 => dots_dispatch::<3, W>(x_rows, wt, out_rows, k, n, j0, j1),
                    4 => dots_dispatch::<4, W>(x_rows, wt, out_rows, k, n, j0, j1),
                    5 => dots_dispatch::<5, W>(x_rows, wt, out_rows, k, n, j0, j1),
                    6 => dots_dispatch::<6, W>(x_rows, wt, out_rows, k, n, j0, j1),
                    7 => dots_dispatch::<7, W>(x_rows, wt, out_rows, k, n, j0, j1),
                    _ => dots_dispatch::<8, W>(x_rows, wt, out_rows, k, n, j0, j1),
                }
            }
            i0 += rows;
        }
    };
    if k * n >= 1 << 16 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        (0..tasks).for_each(run);
    }
}

#[inline(always)]
unsafe fn dots_dispatch<const M: usize, W: PanelWeight>(
    x: &[f32], wt: &[W], out: *mut f32, k: usize, n: usize, j0: usize, j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return unsafe { dots_avx512::<M, W>(x, wt, out, k, n, j0, j1) };
    }
    for j in j0..j1 {
        let row = &wt[j * k..(j + 1) * k];
        for i in 0..M {
            let xr = &x[i * k..(i + 1) * k];
            // The same order as the SIMD loop: 16 lanes, then the lanes in order, then the tail.
            let whole = k / 16 * 16;
            let mut lanes = [0f32; 16];
            for c in (0..whole).step_by(16) {
                for l in 0..16 {
                    lanes[l] = xr[c + l].mul_add(row[c + l].to_f32(), lanes[l]);
                }
            }
            let mut sum = lanes.iter().sum::<f32>();
            for c in whole..k {
                sum = xr[c].mul_add(row[c].to_f32(), sum);
            }
            unsafe { *out.add(i * n + j) = sum };
        }
    }
}

/// 16 weights of `W` at `p` as f32 lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load16<W: PanelWeight>(p: *const W) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    unsafe {
        match W::KIND {
            WeightKind::F32 => _mm512_loadu_ps(p as *const f32),
            WeightKind::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(p as *const __m256i),
            ))),
            WeightKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        }
    }
}

/// Outputs `[j0, j1)` of `M` rows, two weight rows at a time (each `x` load serves both).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma,f16c")]
unsafe fn dots_avx512<const M: usize, W: PanelWeight>(
    x: &[f32], wt: &[W], out: *mut f32, k: usize, n: usize, j0: usize, j1: usize,
) {
    use std::arch::x86_64::*;
    let (xp, wp) = (x.as_ptr(), wt.as_ptr());
    let whole = k / 16 * 16;
    let finish = |j: usize, acc: &[__m512; M]| {
        for (i, a) in acc.iter().enumerate() {
            let mut sum = _mm512_reduce_add_ps(*a);
            for c in whole..k {
                sum = unsafe { (*xp.add(i * k + c)).mul_add((*wp.add(j * k + c)).to_f32(), sum) };
            }
            unsafe { *out.add(i * n + j) = sum };
        }
    };
    // The next pair of rows is prefetched as this pair streams: each row is a few KiB, and the
    // hardware prefetchers stop at every 4 KiB page, so without this each row starts with a stall.
    let line = 64 / std::mem::size_of::<W>();
    let mut j = j0;
    while j + 2 <= j1 {
        let (r0, r1) = unsafe { (wp.add(j * k), wp.add((j + 1) * k)) };
        let prefetch = j + 4 <= j1;
        let mut a0 = [_mm512_setzero_ps(); M];
        let mut a1 = [_mm512_setzero_ps(); M];
        for c in (0..whole).step_by(16) {
            if prefetch && c % line == 0 {
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(r0.add(2 * k + c) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(r1.add(2 * k + c) as *const i8);
                }
            }
            let (w0, w1) = unsafe { (load16(r0.add(c)), load16(r1.add(c))) };
            for i in 0..M {
                let xv = unsafe { _mm512_loadu_ps(xp.add(i * k + c)) };
                a0[i] = _mm512_fmadd_ps(xv, w0, a0[i]);
                a1[i] = _mm512_fmadd_ps(xv, w1, a1[i]);
            }
        }
        finish(j, &a0);
        finish(j + 1, &a1);
        j += 2;
    }
    if j < j1 {
        let r0 = unsafe { wp.add(j * k) };
        let mut a0 = [_mm512_setzero_ps(); M];
        for c in (0..whole).step_by(16) {
            let w0 = unsafe { load16(r0.add(c)) };
            for (i, a) in a0.iter_mut().enumerate() {
                let xv = unsafe { _mm512_loadu_ps(xp.add(i * k + c)) };
                *a = _mm512_fmadd_ps(xv, w0, *a);
            }
        }
        finish(j, &a0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|kk| x[i * k + kk] as f64 * w[kk * n + j] as f64).sum();
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_a_double_precision_product_for_every_row_count_and_ragged_widths() {
        for (m, k, n) in [(1, 7, 32), (3, 64, 100), (8, 33, 64), (9, 16, 96), (16, 40, 37)] {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let mut out = vec![0f32; m * n];
            matmul_rows(&x, &w, &mut out, m, k, n);
            for (got, want) in out.iter().zip(reference(&x, &w, m, k, n)) {
                assert!((*got as f64 - want).abs() < 1e-4 + 2e-6 * want.abs(), "m={m} k={k} n={n}: {got} vs {want}");
            }
        }
    }

    /// Half-precision weights give the f32 product of their exact (widened) values, through the
    /// SIMD loads and the ragged tail alike.
    #[test]
    fn half_weights_equal_the_product_of_their_widened_values() {
        for (m, k, n) in [(1, 7, 32), (3, 64, 100), (8, 33, 64), (16, 40, 37), (2, 300, 4096)] {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let w_f16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let widened = |w: Vec<f32>| reference(&x, &w, m, k, n);
            let (mut out_bf16, mut out_f16) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_rows(&x, &w_bf16, &mut out_bf16, m, k, n);
            matmul_rows(&x, &w_f16, &mut out_f16, m, k, n);
            for (out, want) in [
                (out_bf16, widened(w_bf16.iter().map(|v| v.to_f32()).collect())),
                (out_f16, widened(w_f16.iter().map(|v| v.to_f32()).collect())),
            ] {
                for (got, want) in out.iter().zip(want) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-4 + 2e-6 * want.abs(),
                        "m={m} k={k} n={n}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The dot-product kernel over `[n, k]` rows, for every row count, ragged `k` (not a
    /// multiple of 16) and odd `n`, in f32 and both half types (their widened values).
    #[test]
    fn dot_kernel_matches_a_double_precision_product_of_the_transpose() {
        for (m, k, n) in [(1, 7, 33), (3, 64, 100), (8, 33, 64), (9, 16, 96), (16, 40, 37), (2, 2048, 515)] {
            let x = values(m * k, 1);
            let wt = values(n * k, 2); // [n, k]
            let w: Vec<f32> = (0..k * n).map(|e| wt[(e % n) * k + e / n]).collect(); // [k, n]
            let mut out = vec![0f32; m * n];
            matmul_dots(&x, &wt, &mut out, m, k, n);
            for (got, want) in out.iter().zip(reference(&x, &w, m, k, n)) {
                assert!(
                    (*got as f64 - want).abs() < 1e-4 + 2e-6 * want.abs(),
                    "f32 m={m} k={k} n={n}: {got} vs {want}"
                );
            }
            let wt_bf16: Vec<bf16> = wt.iter().map(|&v| bf16::from_f32(v)).collect();
            let wt_f16: Vec<f16> = wt.iter().map(|&v| f16::from_f32(v)).collect();
            let widened = |wt: Vec<f32>| {
                let w: Vec<f32> = (0..k * n).map(|e| wt[(e % n) * k + e / n]).collect();
                reference(&x, &w, m, k, n)
            };
            let (mut out_bf16, mut out_f16) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul_dots(&x, &wt_bf16, &mut out_bf16, m, k, n);
            matmul_dots(&x, &wt_f16, &mut out_f16, m, k, n);
            for (out, want) in [
                (out_bf16, widened(wt_bf16.iter().map(|v| v.to_f32()).collect())),
                (out_f16, widened(wt_f16.iter().map(|v| v.to_f32()).collect())),
            ] {
                for (got, want) in out.iter().zip(want) {
                    assert!(
                        (*got as f64 - want).abs() < 1e-4 + 2e-6 * want.abs(),
                        "half m={m} k={k} n={n}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch_in_the_dot_kernel_too() {
        let (k, n) = (300, 4097);
        let x = values(5 * k, 3);
        let wt = values(k * n, 4);
        let mut batch = vec![0f32; 5 * n];
        matmul_dots(&x, &wt, &mut batch, 5, k, n);
        let mut alone = vec![0f32; n];
        matmul_dots(&x[2 * k..3 * k], &wt, &mut alone, 1, k, n);
        assert_eq!(&batch[2 * n..3 * n], &alone[..]);
    }

    #[test]
    fn a_row_gives_the_same_bits_alone_or_in_a_batch() {
        let (k, n) = (300, 4096); // large enough to be split among threads
        let x = values(5 * k, 3);
        let w = values(k * n, 4);
        let mut batch = vec![0f32; 5 * n];
        matmul_rows(&x, &w, &mut batch, 5, k, n);
        let mut alone = vec![0f32; n];
        matmul_rows(&x[2 * k..3 * k], &w, &mut alone, 1, k, n);
        assert_eq!(&batch[2 * n..3 * n], &alone[..]);
    }

    #[test]
    fn flex_tensors_take_the_kernel_and_agree_with_burns_matmul() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let x = Tensor::<B, 2>::from_data(TensorData::new(values(4 * 48, 5), [4, 48]), &device);
        let w = Tensor::<B, 2>::from_data(TensorData::new(values(48 * 70, 6), [48, 70]), &device);
        let bias = Tensor::<B, 1>::from_data(TensorData::new(values(70, 7), [70]), &device);
        let fast = skinny_linear(&x, &w, Some(&bias)).expect("Flex f32 takes the kernel");
        let slow = x.clone().matmul(w.clone()) + bias.clone().unsqueeze();
        let diff = (fast - slow).abs().max().into_scalar();
        assert!(diff < 1e-5, "max difference {diff}");
        // A transposed view (how the loader keeps PyTorch's `[out, in]`) takes the dot kernel.
        let wt = Tensor::<B, 2>::from_data(TensorData::new(values(70 * 48, 6), [70, 48]), &device).transpose();
        let fast = skinny_linear(&x, &wt, Some(&bias)).expect("a transposed view takes the dot kernel");
        let diff = (fast - (x.clone().matmul(wt.clone()) + bias.clone().unsqueeze())).abs().max().into_scalar();
        assert!(diff < 1e-5, "transposed: max difference {diff}");
        // Another view (a column slice), or too many rows, is left to Burn.
        let sliced = w.clone().slice([0..48, 0..40]);
        assert!(skinny_linear(&x, &sliced, None).is_none());
        let tall = Tensor::<B, 2>::from_data(TensorData::new(values(17 * 48, 8), [17, 48]), &device);
        assert!(skinny_linear(&tall, &w, None).is_none());
    }
}
