//! `x · w` for bf16 weights on CPUs with AVX-512 BF16 (`vdpbf16ps`): the prefill and training
//! products of a bf16 model, in bf16 as PyTorch's are.
//!
//! Why: a product with `k` inputs costs `2k` flops per output whatever the weights' width, and
//! the f32 path (`half_weight`) widens the bf16 weights and multiplies in f32 at the FMA units'
//! rate, 16 products per instruction. `vdpbf16ps` does 32 per instruction (pairs of bf16
//! products summed into f32 lanes), so a bf16 model's prefill can run at twice the f32 rate,
//! where PyTorch's bf16 runs (oneDNN uses the same instruction). Both operands must be bf16:
//! the activations are rounded to bf16 (round to nearest even, as PyTorch's `.to(bfloat16)`),
//! the sums are f32 throughout, and the output stays f32. That is the precision of a bf16
//! model in the reference (which also rounds each output to bf16; we do not).
//!
//! The loader keeps PyTorch's `[out, in]` weights as stored, so each output column's weights
//! are one contiguous run of `k` values, as is each row of `x`: the kernel takes dot products
//! of rows (no packing of the weight, which would cost as much as the product at prefill's row
//! counts). A register tile of 4 rows of `x` × 6 weight rows holds 24 accumulators of 16 lanes;
//! every 32-wide step loads 4 + 6 operands for 24 `vdpbf16ps`. The lanes are summed once per
//! tile and `k` chunk. Threads split the output columns; within a task the chunk of weight rows
//! stays in L1 while blocks of `x` (in L2) pass over it. The tile's loop is inline assembly:
//! written with intrinsics, LLVM kept a third of the 24 accumulators on the stack (a load and a
//! store per product) and the tile ran at a third of its speed (105 against 359 GFLOP/s on one
//! Zen 5 core, operands in L1; the whole product reaches 550-590 GFLOP/s on two cores, of the
//! instruction's 880 peak).
//!
//! Only x86-64 with `avx512f`, `avx512bw` and `avx512bf16` (AMD Zen 4/5, Intel Cooper Lake and
//! Sapphire Rapids on), detected at run time; elsewhere the callers keep the f32 path.

use half::bf16;
use rayon::prelude::*;

/// Rows of `x` per register tile.
const MR: usize = 4;
/// Weight rows (output columns) per register tile.
const NR: usize = 6;
/// `k` per chunk: the tile's 6 weight rows take 6 × 2 × 2048 bytes = 24 KiB of L1.
const KC: usize = 2048;
/// Rows of `x` per block: 128 × 2048 × 2 bytes = 512 KiB, in a core's L2 while the task's weight
/// rows pass over it.
const MC: usize = 128;
/// Output columns per parallel task (8 tiles wide).
const NC: usize = 48;

/// Whether this CPU has the instructions (checked once; cheap afterwards).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out [m, n] = bf16(x) [m, k] · wᵀ`, where `w` holds `n` rows of `k` bf16 values (PyTorch's
/// `[out, in]` storage) and `x` is `[m, k]` f32, row-major. `None` when the CPU lacks the
/// instructions (see [`available`]).
pub(crate) fn product(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Option<Vec<f32>> {
    if !available() {
        return None;
    }
    assert!(x.len() >= m * k && w.len() >= n * k, "bf16 product: operands shorter than [{m}, {k}] and [{n}, {k}]");
    if m == 0 || n == 0 {
        return Some(vec![0f32; m * n]);
    }
    let x = RoundedRows::new(x, m, k)?;
    let w_bits = bf16_bits(w);
    // Written through raw pointers, every element once by the first `k` chunk's tiles (zeroing
    // it first was a tenth of a batch-8 prefill: fresh pages cleared, then cleared again).
    let mut out = Vec::<f32>::with_capacity(m * n);
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..n.div_ceil(NC)).into_par_iter().for_each(|task| {
        let columns = task * NC..((task + 1) * NC).min(n);
        // SAFETY: the task's weight rows lie in `w`; it alone writes these columns of `out`.
        unsafe {
            x.times_rows(
                &w_bits[columns.start * k..columns.end * k],
                columns.len(),
                out_ptr.get().add(columns.start),
                n,
            )
        };
    });
    // SAFETY: the tasks' columns cover the output, each element written by its first chunk.
    unsafe { out.set_len(m * n) };
    Some(out)
}

/// The rows of `x` rounded to bf16 once per product, each padded to a whole number of 32-wide
/// steps (the padding is never read: tails are masked loads).
pub(crate) struct RoundedRows {
    bits: Vec<u16>,
    stride: usize,
    m: usize,
    k: usize,
}

impl RoundedRows {
    /// `x [m, k]` f32 rounded to bf16 (to nearest, ties to even); `None` without the
    /// instructions (see [`available`]).
    pub(crate) fn new(x: &[f32], m: usize, k: usize) -> Option<Self> {
        if !available() {
            return None;
        }
        let stride = k.next_multiple_of(32);
        let mut bits = vec![0u16; m * stride];
        #[cfg(target_arch = "x86_64")]
        bits.par_chunks_mut(stride.max(1)).zip(x.par_chunks(k.max(1))).for_each(|(dst, src)| {
            // SAFETY: `available()` checked the features; lengths as written.
            unsafe { round_to_bf16(&src[..k], &mut dst[..k]) }
        });
        Some(Self { bits, stride, m, k })
    }

    /// `out[i, j] = Σ_t x[i, t] · w[j, t]` for the `width` weight rows `w` (`[width, k]` bf16
    /// bits), on this thread: `out` points at column 0 of this block in a row-major output of
    /// row stride `out_stride`.
    ///
    /// # Safety
    /// `w` holds `width × k` values; `out` is valid for writes of `m` rows of `width` columns at
    /// stride `out_stride`, and no other thread touches them meanwhile.
    pub(crate) unsafe fn times_rows(&self, w: &[u16], width: usize, out: *mut f32, out_stride: usize) {
        let (m, k, stride) = (self.m, self.k, self.stride);
        assert!(w.len() >= width * k, "bf16 rows: {} values for [{width}, {k}]", w.len());
        #[cfg(target_arch = "x86_64")]
        for k0 in (0..k).step_by(KC) {
            let len = KC.min(k - k0);
            for m0 in (0..m).step_by(MC) {
                let rows = m0..(m0 + MC).min(m);
                for j0 in (0..width).step_by(NR) {
                    let nr = NR.min(width - j0);
                    for i0 in rows.clone().step_by(MR) {
                        let mr = MR.min(rows.end - i0);
                        // SAFETY: `new` checked the features; the tile reads rows i0.. of the
                        // rounded x and rows j0.. of w within their lengths (masked tails) and
                        // writes out[i0.., j0..] within the caller's block.
                        unsafe {
                            tile(
                                mr,
                                nr,
                                self.bits.as_ptr().add(i0 * stride + k0),
                                stride,
                                w.as_ptr().add(j0 * k + k0),
                                k,
                                len,
                                out.add(i0 * out_stride + j0),
                                out_stride,
                                k0 > 0,
                            )
                        };
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (m, k, stride, w, width, out, out_stride);
    }
}

/// The output shared by the tasks (each writes its own columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// The bit patterns of bf16 values.
pub(crate) fn bf16_bits(w: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is a `repr(transparent)` u16.
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) }
}

/// `src` rounded to bf16 bits into `dst` (as many as both hold), where [`available`].
pub(crate) fn round_into(src: &[f32], dst: &mut [u16]) {
    assert!(available(), "bf16 rounding without AVX-512 BF16");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the features are present (asserted).
    unsafe {
        round_to_bf16(src, dst)
    }
}

/// f32 → bf16 bits, round to nearest even (NaN stays NaN).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 16 * 16;
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 ≤ n for both slices.
        unsafe {
            let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(h));
        }
    }
    for i in whole..n {
        dst[i] = half::bf16::from_f32(src[i]).to_bits();
    }
}

/// `out[r, c] (+)= Σ_t x[r, t] · w[c, t]` for `t < len`, `r < mr ≤ 4`, `c < nr ≤ 6`: rows of `x`
/// at stride `x_stride` (readable up to `len` rounded up to 32), weight rows at `w_stride`
/// (readable up to `len`). A 4 × 6 tile always: at the edges the missing rows and columns repeat
/// the first one and their sums are dropped (one kernel, whose 24 accumulators are named so that
/// they stay in registers; as arrays LLVM kept a third of them on the stack).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile(
    mr: usize, nr: usize, x: *const u16, x_stride: usize, w: *const u16, w_stride: usize, len: usize, out: *mut f32,
    out_stride: usize, accumulate: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): the caller's bounds as documented; loads are unaligned.
    unsafe {
        let xr = |r: usize| x.add(if r < mr { r } else { 0 } * x_stride);
        let wr = |c: usize| w.add(if c < nr { c } else { 0 } * w_stride);
        let (x0, x1, x2, x3) = (xr(0), xr(1), xr(2), xr(3));
        let (w0, w1, w2, w3, w4, w5) = (wr(0), wr(1), wr(2), wr(3), wr(4), wr(5));
        let (mut a00, mut a01, mut a02, mut a03, mut a04, mut a05) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let (mut a10, mut a11, mut a12, mut a13, mut a14, mut a15) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let (mut a20, mut a21, mut a22, mut a23, mut a24, mut a25) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let (mut a30, mut a31, mut a32, mut a33, mut a34, mut a35) = (
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
            _mm512_setzero_ps(),
        );
        let steps = len / 32;
        if steps > 0 {
            // The main loop in assembly: 24 accumulators in zmm0-23, the 6 weight vectors in
            // zmm24-29, the row of x in zmm30 (the compiler spilled a third of the accumulators).
            std::arch::asm!(
                "2:",
                "vmovdqu16 zmm24, [{w0} + {off}]",
                "vmovdqu16 zmm25, [{w1} + {off}]",
                "vmovdqu16 zmm26, [{w2} + {off}]",
                "vmovdqu16 zmm27, [{w3} + {off}]",
                "vmovdqu16 zmm28, [{w4} + {off}]",
                "vmovdqu16 zmm29, [{w5} + {off}]",
                "vmovdqu16 zmm30, [{x0} + {off}]",
                "vdpbf16ps zmm0, zmm30, zmm24",
                "vdpbf16ps zmm1, zmm30, zmm25",
                "vdpbf16ps zmm2, zmm30, zmm26",
                "vdpbf16ps zmm3, zmm30, zmm27",
                "vdpbf16ps zmm4, zmm30, zmm28",
                "vdpbf16ps zmm5, zmm30, zmm29",
                "vmovdqu16 zmm30, [{x1} + {off}]",
                "vdpbf16ps zmm6, zmm30, zmm24",
                "vdpbf16ps zmm7, zmm30, zmm25",
                "vdpbf16ps zmm8, zmm30, zmm26",
                "vdpbf16ps zmm9, zmm30, zmm27",
                "vdpbf16ps zmm10, zmm30, zmm28",
                "vdpbf16ps zmm11, zmm30, zmm29",
                "vmovdqu16 zmm30, [{x2} + {off}]",
                "vdpbf16ps zmm12, zmm30, zmm24",
                "vdpbf16ps zmm13, zmm30, zmm25",
                "vdpbf16ps zmm14, zmm30, zmm26",
                "vdpbf16ps zmm15, zmm30, zmm27",
                "vdpbf16ps zmm16, zmm30, zmm28",
                "vdpbf16ps zmm17, zmm30, zmm29",
                "vmovdqu16 zmm30, [{x3} + {off}]",
                "vdpbf16ps zmm18, zmm30, zmm24",
                "vdpbf16ps zmm19, zmm30, zmm25",
                "vdpbf16ps zmm20, zmm30, zmm26",
                "vdpbf16ps zmm21, zmm30, zmm27",
                "vdpbf16ps zmm22, zmm30, zmm28",
                "vdpbf16ps zmm23, zmm30, zmm29",
                "add {off}, 64",
                "cmp {off}, {end}",
                "jb 2b",
                w0 = in(reg) w0,
                w1 = in(reg) w1,
                w2 = in(reg) w2,
                w3 = in(reg) w3,
                w4 = in(reg) w4,
                w5 = in(reg) w5,
                x0 = in(reg) x0,
                x1 = in(reg) x1,
                x2 = in(reg) x2,
                x3 = in(reg) x3,
                off = inout(reg) 0usize => _,
                end = in(reg) steps * 64,
                inout("zmm0") a00,
                inout("zmm1") a01,
                inout("zmm2") a02,
                inout("zmm3") a03,
                inout("zmm4") a04,
                inout("zmm5") a05,
                inout("zmm6") a10,
                inout("zmm7") a11,
                inout("zmm8") a12,
                inout("zmm9") a13,
                inout("zmm10") a14,
                inout("zmm11") a15,
                inout("zmm12") a20,
                inout("zmm13") a21,
                inout("zmm14") a22,
                inout("zmm15") a23,
                inout("zmm16") a24,
                inout("zmm17") a25,
                inout("zmm18") a30,
                inout("zmm19") a31,
                inout("zmm20") a32,
                inout("zmm21") a33,
                inout("zmm22") a34,
                inout("zmm23") a35,
                out("zmm24") _,
                out("zmm25") _,
                out("zmm26") _,
                out("zmm27") _,
                out("zmm28") _,
                out("zmm29") _,
                out("zmm30") _,
                options(nostack, readonly),
            );
        }
        let tail = len % 32;
        if tail > 0 {
            let off = steps * 32;
            let mask: __mmask32 = (1u32 << tail) - 1;
            let v0: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, w0.add(off) as *const i16));
            let v1: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, w1.add(off) as *const i16));
            let v2: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, w2.add(off) as *const i16));
            let v3: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, w3.add(off) as *const i16));
            let v4: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, w4.add(off) as *const i16));
            let v5: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, w5.add(off) as *const i16));
            let u: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, x0.add(off) as *const i16));
            a00 = _mm512_dpbf16_ps(a00, u, v0);
            a01 = _mm512_dpbf16_ps(a01, u, v1);
            a02 = _mm512_dpbf16_ps(a02, u, v2);
            a03 = _mm512_dpbf16_ps(a03, u, v3);
            a04 = _mm512_dpbf16_ps(a04, u, v4);
            a05 = _mm512_dpbf16_ps(a05, u, v5);
            let u: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, x1.add(off) as *const i16));
            a10 = _mm512_dpbf16_ps(a10, u, v0);
            a11 = _mm512_dpbf16_ps(a11, u, v1);
            a12 = _mm512_dpbf16_ps(a12, u, v2);
            a13 = _mm512_dpbf16_ps(a13, u, v3);
            a14 = _mm512_dpbf16_ps(a14, u, v4);
            a15 = _mm512_dpbf16_ps(a15, u, v5);
            let u: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, x2.add(off) as *const i16));
            a20 = _mm512_dpbf16_ps(a20, u, v0);
            a21 = _mm512_dpbf16_ps(a21, u, v1);
            a22 = _mm512_dpbf16_ps(a22, u, v2);
            a23 = _mm512_dpbf16_ps(a23, u, v3);
            a24 = _mm512_dpbf16_ps(a24, u, v4);
            a25 = _mm512_dpbf16_ps(a25, u, v5);
            let u: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, x3.add(off) as *const i16));
            a30 = _mm512_dpbf16_ps(a30, u, v0);
            a31 = _mm512_dpbf16_ps(a31, u, v1);
            a32 = _mm512_dpbf16_ps(a32, u, v2);
            a33 = _mm512_dpbf16_ps(a33, u, v3);
            a34 = _mm512_dpbf16_ps(a34, u, v4);
            a35 = _mm512_dpbf16_ps(a35, u, v5);
        }
        let sums = [
            [a00, a01, a02, a03, a04, a05],
            [a10, a11, a12, a13, a14, a15],
            [a20, a21, a22, a23, a24, a25],
            [a30, a31, a32, a33, a34, a35],
        ];
        for (r, row) in sums.iter().enumerate().take(mr) {
            for (c, a) in row.iter().enumerate().take(nr) {
                let sum = _mm512_reduce_add_ps(*a);
                let o = out.add(r * out_stride + c);
                *o = if accumulate { *o + sum } else { sum };
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// A deterministic spread of values (no rand dependency).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// Every output equals the f64 dot product of the bf16-rounded row of `x` and the weight row,
    /// within f32 summation error; shapes cover ragged tiles, `k` chunks and masked tails.
    #[test]
    fn equals_the_exact_product_of_the_bf16_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16 (the f32 path is tested in half_weight)");
            return;
        }
        for (m, k, n) in [(1, 32, 1), (5, 7, 3), (17, 100, 13), (131, 2048 + 33, 50), (9, 4096, 97)] {
            let x = values(m * k, 1 + m as u64);
            let w: Vec<bf16> = values(n * k, 7 + n as u64).into_iter().map(bf16::from_f32).collect();
            let out = product(&x, m, k, &w, n).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut magnitude) = (0f64, 0f64);
                    for t in 0..k {
                        let term = bf16::from_f32(x[i * k + t]).to_f64() * w[j * k + t].to_f64();
                        exact += term;
                        magnitude += term.abs();
                    }
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-6 * magnitude + 1e-30,
                        "[{m}, {k}] x [{n}, {k}] at ({i}, {j}): {got} vs {exact}"
                    );
                }
            }
        }
    }

    /// The rounding is PyTorch's: to nearest, ties to even.
    #[test]
    fn activations_round_to_nearest_even() {
        if !available() {
            return;
        }
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties to the even 1.
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even 1 + 2^-6.
        let x: Vec<f32> = (0..20).map(|i| [1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0][i % 2]).collect();
        let mut bits = vec![0u16; 20];
        // SAFETY: available() checked.
        unsafe { round_to_bf16(&x, &mut bits) };
        for (i, b) in bits.iter().enumerate() {
            let want = [1.0f32, 1.0 + 1.0 / 64.0][i % 2];
            assert_eq!(f32::from_bits((*b as u32) << 16), want, "element {i}");
            assert_eq!(*b, bf16::from_f32(x[i]).to_bits());
        }
    }
}
