//! Linear layers whose weight is held in f16 or bf16 and whose input is f32, on Flex and, for a
//! frozen weight, under `Autodiff<Flex>`: prefill and training products of a half-precision
//! checkpoint without an f32 copy of it.
//!
//! Why: a 7B checkpoint is 13.5 GB in bf16 and 27 GB widened to f32, more than a 24 GB machine
//! holds. gemm multiplies f32 (its f16 kernels have no bf16 and no mixed f32 × f16 form), so
//! the weight is converted one block at a time into a small f32 buffer per thread and that block
//! multiplied at once: `[k, 256]` columns forwards, `[256, n]` rows for the backward's `dX`. A
//! block is a few MiB, converted once per product and reused by every row of `x`, so the
//! conversion is a small part of the work for the row counts that come here (more than 16; the
//! decode-time rows take `skinny`, which converts as it streams). Sums are f32 throughout: the
//! result is the f32 product of the half weights' exact values. The exception: bf16 weights on
//! a CPU with AVX-512 BF16 multiply in bf16 (`bf16_dot`, the activations rounded to bf16 as in
//! the reference's bf16 model), at twice the f32 rate or more, and so does the backward's `dX`
//! (`dY` rounded to bf16).

use crate::cpu::bf16_dot;
use crate::cpu::dense::gemm_into;
use crate::cpu::flex::{
    MatrixLayout, autodiff_primitive, flex_any, flex_f32, flex_tensor, from_autodiff, from_f32, is_autodiff_flex,
    matrix_layout, values,
};
use crate::cpu::skinny::OutPtr;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Columns of the weight converted per block in the forward product (`k × 256` f32: 4 MiB for
/// k = 4096, within a core's share of L2 + L3 on the machines we target).
const COLUMNS: usize = 256;
/// Rows of the weight converted per block in the backward product.
const ROWS: usize = 256;

/// `x · w (+ bias)` for f32 `x` `[m, k]` and an f16/bf16 `w` `[k, n]` (contiguous), on Flex or,
/// with `w` untracked, `Autodiff<Flex>`; `None` otherwise (the caller then casts the weight).
pub(crate) fn linear<B: Backend>(
    x: &Tensor<B, 2>, w: &Tensor<B, 2>, bias: Option<&Tensor<B, 1>>,
) -> Option<Tensor<B, 2>> {
    let ([m, k], [wk, n]) = (x.dims(), w.dims());
    if wk != k || m == 0 || n == 0 || k == 0 || x.dtype() != DType::F32 || !is_half(w.dtype()) {
        return None;
    }
    let y: Tensor<B, 2> = if is_autodiff_flex::<B>() {
        let (xa, wa) = (autodiff_primitive(x.clone()), autodiff_primitive(w.clone()));
        if wa.is_tracked() {
            return None; // a trained half weight: its gradient is Burn's business
        }
        let weight = HalfMatrix::of(&wa.primitive, k, n)?;
        let x_values = xa.primitive.to_contiguous();
        let out = flex_tensor(forward(values(&x_values), m, k, n, &weight), [m, n]);
        let y = match HalfBackward.prepare::<NoCheckpointing>([xa.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(([m, k, n], wa.primitive.clone()), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        from_autodiff::<B, 2>(y)
    } else {
        let wf = flex_any(w)?;
        let weight = HalfMatrix::of(&wf, k, n)?;
        let x_values = flex_f32(x)?.to_contiguous();
        from_f32(forward(values(&x_values), m, k, n, &weight), [m, n])?
    };
    Some(match bias {
        Some(bias) => y + bias.clone().cast(DType::F32).unsqueeze::<2>(),
        None => y,
    })
}

fn is_half(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// A half-precision `[rows, cols]` matrix in its storage: row-major, or the transposed view of
/// a row-major `[cols, rows]` (how the loader keeps PyTorch's `[out, in]` linear weights).
struct HalfMatrix<'a> {
    values: HalfSlice<'a>,
    rows: usize,
    cols: usize,
    layout: MatrixLayout,
}

enum HalfSlice<'a> {
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl HalfSlice<'_> {
    /// Storage elements `range`, widened into `dst`.
    fn widen(&self, range: std::ops::Range<usize>, dst: &mut [f32]) {
        match self {
            HalfSlice::BF16(v) => widen_bf16(&v[range], dst),
            HalfSlice::F16(v) => widen_f16(&v[range], dst),
        }
    }
}

impl<'a> HalfMatrix<'a> {
    fn of(t: &'a FlexTensor, rows: usize, cols: usize) -> Option<Self> {
        let layout = matrix_layout(t)?;
        let len = rows * cols;
        let values = match t.dtype() {
            DType::BF16 => HalfSlice::BF16(&t.storage::<bf16>()[..len]),
            DType::F16 => HalfSlice::F16(&t.storage::<f16>()[..len]),
            _ => return None,
        };
        Some(Self { values, rows, cols, layout })
    }

    /// Columns `columns` of every row, widened into `dst`, as a `[rows, width]` operand:
    /// returns its (row stride, column stride) in `dst`.
    fn column_block(&self, columns: std::ops::Range<usize>, dst: &mut Vec<f32>) -> (usize, usize) {
        let (k, n, width) = (self.rows, self.cols, columns.len());
        dst.clear();
        dst.resize(k * width, 0.0);
        match self.layout {
            MatrixLayout::RowMajor => {
                for (r, out) in dst.chunks_exact_mut(width).enumerate() {
                    self.values.widen(r * n + columns.start..r * n + columns.end, out);
                }
                (width, 1)
            }
            // The columns are storage rows, contiguous: one run, the block transposed.
            MatrixLayout::Transposed => {
                self.values.widen(columns.start * k..columns.end * k, dst);
                (1, k)
            }
        }
    }

    /// Rows `rows` widened into `dst` as the transposed operand `[cols, height]` (for
    /// `dX = dY · Wᵀ`): returns its (row stride, column stride) in `dst`.
    fn row_block_transposed(&self, rows: std::ops::Range<usize>, dst: &mut Vec<f32>) -> (usize, usize) {
        let (k, n, height) = (self.rows, self.cols, rows.len());
        dst.clear();
        dst.resize(height * n, 0.0);
        match self.layout {
            // Rows are contiguous: one run `[height, n]`, whose transpose steps by 1 along a row.
            MatrixLayout::RowMajor => {
                self.values.widen(rows.start * n..rows.end * n, dst);
                (1, n)
            }
            MatrixLayout::Transposed => {
                for (j, out) in dst.chunks_exact_mut(height).enumerate() {
                    self.values.widen(j * k + rows.start..j * k + rows.end, out);
                }
                (height, 1)
            }
        }
    }
}

/// bf16 → f32 is exact: the bits shifted into the high half (the compiler vectorises this).
fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

fn widen_f16(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature is present; both slices have the same length here.
        return unsafe { widen_f16_avx512(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_f16_avx512(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let whole = n / 16 * 16;
    for i in (0..whole).step_by(16) {
        unsafe {
            let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
    }
    for i in whole..n {
        dst[i] = src[i].to_f32();
    }
}

/// `x [m, k] · w [k, n]`: bf16 weights on a CPU with AVX-512 BF16 take `bf16_dot` (bf16
/// products, as the reference's bf16 model); everything else is the f32 product of the widened
/// weight, one column block of `w` per task.
fn forward(x: &[f32], m: usize, k: usize, n: usize, w: &HalfMatrix) -> Vec<f32> {
    if let HalfSlice::BF16(values) = &w.values
        && bf16_dot::available()
    {
        let product = match w.layout {
            MatrixLayout::Transposed => bf16_dot::product(x, m, k, values, n),
            // Narrow layers (≤ 128 inputs) are stored row-major: their transpose is small.
            MatrixLayout::RowMajor => {
                let mut rows = vec![bf16::ZERO; n * k];
                for (i, row) in values[..k * n].chunks_exact(n).enumerate() {
                    for (j, v) in row.iter().enumerate() {
                        rows[j * k + i] = *v;
                    }
                }
                bf16_dot::product(x, m, k, &rows, n)
            }
        };
        if let Some(out) = product {
            return out;
        }
    }
    let mut out = Vec::<f32>::with_capacity(m * n);
    let ptr = OutPtr(out.as_mut_ptr());
    (0..n.div_ceil(COLUMNS)).into_par_iter().for_each_init(Vec::new, |block, b| {
        let columns = b * COLUMNS..((b + 1) * COLUMNS).min(n);
        let width = columns.len();
        let (rs, cs) = w.column_block(columns.clone(), block);
        // SAFETY: this task alone writes columns `columns` of every row of `out`, which holds
        // m × n floats; the block is a `[k, width]` operand with strides (rs, cs).
        unsafe {
            gemm_into(
                m,
                k,
                width,
                ptr.get().add(columns.start),
                n,
                (x.as_ptr(), k, 1),
                (block.as_ptr(), rs, cs),
                gemm::Parallelism::None,
            )
        };
    });
    // SAFETY: the column blocks cover every column of every row.
    unsafe { out.set_len(m * n) };
    out
}

/// `dX [m, k] = dY [m, n] · wᵀ`: bf16 weights on a CPU with AVX-512 BF16 in bf16 (`dY` rounded to
/// bf16, as the reference's bf16 backward), else one row block of `w` per task widened to f32.
fn backward_input(dy: &[f32], m: usize, k: usize, n: usize, w: &HalfMatrix) -> Vec<f32> {
    if let HalfSlice::BF16(values) = &w.values
        && let Some(dx) = backward_input_bf16(dy, m, k, n, values, w.layout)
    {
        return dx;
    }
    let mut dx = Vec::<f32>::with_capacity(m * k);
    let ptr = OutPtr(dx.as_mut_ptr());
    (0..k.div_ceil(ROWS)).into_par_iter().for_each_init(Vec::new, |block, b| {
        let rows = b * ROWS..((b + 1) * ROWS).min(k);
        let height = rows.len();
        let (rs, cs) = w.row_block_transposed(rows.clone(), block);
        // SAFETY: this task alone writes columns `rows` of every row of `dx` (m × k floats); the
        // block is the `[n, height]` operand w[rows, :]ᵀ with strides (rs, cs).
        unsafe {
            gemm_into(
                m,
                n,
                height,
                ptr.get().add(rows.start),
                k,
                (dy.as_ptr(), n, 1),
                (block.as_ptr(), rs, cs),
                gemm::Parallelism::None,
            )
        };
    });
    // SAFETY: the row blocks cover every column of dX.
    unsafe { dx.set_len(m * k) };
    dx
}

/// Weight rows (of the logical `[k, n]` weight) gathered per task for the bf16 backward: 64 × n
/// bf16, 704 KiB for n = 5632, within a core's L2.
const BACKWARD_ROWS: usize = 64;

/// The bf16 `dX = dY · wᵀ`: output column `c` of `dX` is the dot product of a row of `dY` with
/// row `c` of the logical weight, contiguous in a row-major weight and a column of the
/// loader's `[n, k]` storage, gathered per task into a `[64, n]` panel. `None` without the
/// instructions.
fn backward_input_bf16(
    dy: &[f32], m: usize, k: usize, n: usize, values: &[bf16], layout: MatrixLayout,
) -> Option<Vec<f32>> {
    let rows = bf16_dot::RoundedRows::new(dy, m, n)?;
    let bits = bf16_dot::bf16_bits(&values[..k * n]);
    let mut dx = Vec::<f32>::with_capacity(m * k);
    let ptr = OutPtr(dx.as_mut_ptr());
    (0..k.div_ceil(BACKWARD_ROWS)).into_par_iter().for_each_init(Vec::new, |panel: &mut Vec<u16>, b| {
        let (c0, c1) = (b * BACKWARD_ROWS, ((b + 1) * BACKWARD_ROWS).min(k));
        let width = c1 - c0;
        let block: &[u16] = match layout {
            MatrixLayout::RowMajor => &bits[c0 * n..c1 * n],
            MatrixLayout::Transposed => {
                panel.resize(width * n, 0);
                for (j, stored) in bits.chunks_exact(k).enumerate() {
                    for (c, v) in stored[c0..c1].iter().enumerate() {
                        panel[c * n + j] = *v;
                    }
                }
                panel
            }
        };
        // SAFETY: this task alone writes columns [c0, c1) of every row of `dx` (m × k).
        unsafe { rows.times_rows(block, width, ptr.get().add(c0), k) };
    });
    // SAFETY: the tasks' columns cover every column of every row.
    unsafe { dx.set_len(m * k) };
    Some(dx)
}

#[derive(Debug)]
struct HalfBackward;

impl Backward<Flex, 1> for HalfBackward {
    /// `[m, k, n]` and the (frozen) weight, an `Arc` of the model's own storage.
    type State = ([usize; 3], FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let ([m, k, n], w) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let [x_node] = ops.parents;
        if let Some(node) = x_node {
            let weight = HalfMatrix::of(&w, k, n).expect("checked in the forward pass");
            grads.register::<Flex>(node.id, flex_tensor(backward_input(values(&grad), m, k, n, &weight), [m, k]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    type AD = burn::backend::Autodiff<Flex>;

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what}: {x} vs {y}");
        }
    }

    /// The product with a half weight equals the f32 product with that weight's exact values
    /// (cast up), forwards and for dX, for both half dtypes, ragged blocks included.
    #[test]
    fn equals_the_f32_product_of_the_widened_weight_with_its_input_gradient() {
        let device = Default::default();
        AD::seed(&device, 11);
        for dtype in [DType::BF16, DType::F16] {
            for (m, k, n) in [(17, 5, 9), (40, 300, 520)] {
                let x = Tensor::<AD, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
                let w = Tensor::<AD, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
                // Row-major, and the loader's transposed view of an `[n, k]` storage.
                let stored_transposed =
                    Tensor::from_data(w.clone().transpose().to_data(), (&device, dtype)).transpose();
                for (w, transposed) in [(w.clone(), false), (stored_transposed, true)] {
                    let bias = Tensor::<AD, 1>::random([n], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
                    let probe = Tensor::<AD, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &device);
                    let run = |ours: bool| {
                        let x = x.clone().require_grad();
                        let y = if ours {
                            linear(&x, &w, Some(&bias)).expect("a frozen half weight takes the kernel")
                        } else {
                            // bf16 products (x rounded to bf16) where the CPU has them; the
                            // gradient is the same (the rounding passes it straight through).
                            let bf16_products = dtype == DType::BF16 && bf16_dot::available();
                            let x_used = if bf16_products {
                                let values = x.to_data().to_vec::<f32>().unwrap();
                                let rounded = values.iter().map(|v| bf16::from_f32(*v).to_f32()).collect::<Vec<_>>();
                                let rounded = Tensor::<AD, 2>::from_data(TensorData::new(rounded, [m, k]), &device);
                                x.clone() + (rounded - x.clone()).detach()
                            } else {
                                x.clone()
                            };
                            x_used.matmul(w.clone().cast(DType::F32)) + bias.clone().cast(DType::F32).unsqueeze()
                        };
                        let grads = (y.clone() * probe.clone()).sum().backward();
                        let v = |t: TensorData| t.to_vec::<f32>().unwrap();
                        (v(y.into_data()), v(x.grad(&grads).unwrap().into_data()))
                    };
                    let (ours, mut burn) = (run(true), run(false));
                    if dtype == DType::BF16 && bf16_dot::available() {
                        // The bf16 backward rounds dY (here the probe) to bf16.
                        let probe = probe.to_data().to_vec::<f32>().unwrap();
                        let rounded = probe.iter().map(|v| bf16::from_f32(*v).to_f32()).collect::<Vec<_>>();
                        let dy = Tensor::<AD, 2>::from_data(TensorData::new(rounded, [m, n]), &device);
                        burn.1 = dy.matmul(w.clone().cast(DType::F32).transpose()).to_data().to_vec::<f32>().unwrap();
                    }
                    close(&ours.0, &burn.0, &format!("{dtype:?} y {m}x{k}x{n}"));
                    close(&ours.1, &burn.1, &format!("{dtype:?} dX {m}x{k}x{n}"));
                    // Plain Flex (inference): the same values.
                    let plain = |t: TensorData| Tensor::<Flex, 2>::from_data(t.clone(), (&device, t.dtype));
                    let b1 = Tensor::<Flex, 1>::from_data(bias.to_data(), (&device, dtype));
                    let plain_w = match transposed {
                        true => plain(w.clone().transpose().to_data()).transpose(),
                        false => plain(w.to_data()),
                    };
                    let y = linear(&plain(x.to_data()), &plain_w, Some(&b1)).expect("Flex half weight");
                    close(&y.into_data().to_vec::<f32>().unwrap(), &burn.0, "inference y");
                }
            }
        }
    }

    /// A half weight that is being trained is not taken (its gradient would be lost).
    #[test]
    fn a_tracked_half_weight_is_left_to_burn() {
        let device = Default::default();
        let x = Tensor::<AD, 2>::ones([20, 4], &device);
        let w = Tensor::<AD, 2>::ones([4, 3], &device).cast(DType::BF16).require_grad();
        assert!(linear(&x, &w, None).is_none());
    }
}
