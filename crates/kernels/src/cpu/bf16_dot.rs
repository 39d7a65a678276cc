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

/// The rows of `x` rounded to bf16 once per product, each padded with zeros to a whole number of
/// 32-wide steps (the last step reads them, against zero weights).
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
                        // rounded x (padded) and rows j0.. of w within their lengths and
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
/// at stride `x_stride` (readable up to `len` rounded up to 32, finite there), weight rows at
/// `w_stride` (readable up to `len`). A 4 × 6 tile always: at the edges the missing rows and
/// columns repeat the first one and their sums are dropped. The whole 32-wide steps run in
/// `dot_steps!`; the last partial one runs there too, on the weights' tails copied into
/// zero-padded buffers (zero weights ignore whatever follows `len` in `x`).
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
        let mut acc = [_mm512_setzero_ps(); 24];
        let steps = len / 32;
        if steps > 0 {
            dot_steps!(acc, [xr(0), xr(1), xr(2), xr(3)], [wr(0), wr(1), wr(2), wr(3), wr(4), wr(5)], steps * 64);
        }
        let (off, tail) = (steps * 32, len % 32);
        if tail > 0 {
            let mut tails = [[0u16; 32]; 6];
            for (c, t) in tails.iter_mut().enumerate() {
                std::ptr::copy_nonoverlapping(wr(c).add(off), t.as_mut_ptr(), tail);
            }
            let x_tail = |r: usize| xr(r).add(off);
            let w_tail = |c: usize| tails[c].as_ptr();
            dot_steps!(
                acc,
                [x_tail(0), x_tail(1), x_tail(2), x_tail(3)],
                [w_tail(0), w_tail(1), w_tail(2), w_tail(3), w_tail(4), w_tail(5)],
                64
            );
        }
        for r in 0..mr {
            for c in 0..nr {
                let sum = _mm512_reduce_add_ps(acc[r * 6 + c]);
                let o = out.add(r * out_stride + c);
                *o = if accumulate { *o + sum } else { sum };
            }
        }
    }
}

/// `bytes / 64` steps of the 4 × 6 tile: for each, the 32 bf16 values at byte offset `off` of
/// the 6 weight rows and the 4 rows of x, 24 `vdpbf16ps` into `acc` (row-major, 6 per row of x).
/// Inline assembly: written with intrinsics, LLVM kept a third of the accumulators on the stack
/// (24 accumulators in zmm0-23, the weights in zmm24-29, the row of x in zmm30). `bytes` > 0.
#[cfg(target_arch = "x86_64")]
macro_rules! dot_steps {
    ($acc:ident, [$x0:expr, $x1:expr, $x2:expr, $x3:expr], [$w0:expr, $w1:expr, $w2:expr, $w3:expr, $w4:expr, $w5:expr], $bytes:expr) => {
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
            w0 = in(reg) $w0,
            w1 = in(reg) $w1,
            w2 = in(reg) $w2,
            w3 = in(reg) $w3,
            w4 = in(reg) $w4,
            w5 = in(reg) $w5,
            x0 = in(reg) $x0,
            x1 = in(reg) $x1,
            x2 = in(reg) $x2,
            x3 = in(reg) $x3,
            off = inout(reg) 0usize => _,
            end = in(reg) ($bytes) as usize,
            inout("zmm0") $acc[0],
            inout("zmm1") $acc[1],
            inout("zmm2") $acc[2],
            inout("zmm3") $acc[3],
            inout("zmm4") $acc[4],
            inout("zmm5") $acc[5],
            inout("zmm6") $acc[6],
            inout("zmm7") $acc[7],
            inout("zmm8") $acc[8],
            inout("zmm9") $acc[9],
            inout("zmm10") $acc[10],
            inout("zmm11") $acc[11],
            inout("zmm12") $acc[12],
            inout("zmm13") $acc[13],
            inout("zmm14") $acc[14],
            inout("zmm15") $acc[15],
            inout("zmm16") $acc[16],
            inout("zmm17") $acc[17],
            inout("zmm18") $acc[18],
            inout("zmm19") $acc[19],
            inout("zmm20") $acc[20],
            inout("zmm21") $acc[21],
            inout("zmm22") $acc[22],
            inout("zmm23") $acc[23],
            out("zmm24") _,
            out("zmm25") _,
            out("zmm26") _,
            out("zmm27") _,
            out("zmm28") _,
            out("zmm29") _,
            out("zmm30") _,
            options(nostack, readonly),
        )
    };
}
#[cfg(target_arch = "x86_64")]
use dot_steps;

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
    /// within f32 summation error; shapes cover ragged tiles, `k` chunks and partial last steps.
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
