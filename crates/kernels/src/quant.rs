//! Weight-only quantization of linear layers: 8-bit and 4-bit blocks of 32 weights with one f16
//! scale each, the layer that holds them ([`QuantLinear`]), and [`AnyLinear`], a linear layer
//! whose weight is float or quantized.
//!
//! Why blocks of 32 with an f16 scale: it is llama.cpp's Q8_0 / Q4_0 granularity (one scale per
//! 32 weights keeps an outlier's damage local) and costs 0.5 bit per weight. Formats:
//!
//! * `q8` (as Q8_0): `d = max|w| / 127`, codes `round(w / d)` (ties to even) in `[-127, 127]`; `w ≈ q·d`,
//!   error at most `d / 2`. 8.5 bits per weight.
//! * `q4` (as Q4_0): `d = m / -8` where `m` is the block's value of largest magnitude (its sign
//!   kept, so that value lands exactly on code 0), codes `min(15, ⌊w/d + 8.5⌋)`; `w ≈ (q − 8)·d`,
//!   error at most `|d| / 2`. 4.5 bits per weight.
//! * `nf4` (the 4-bit variant; QLoRA's NormalFloat): `s = max|w|`, codes the nearest of the 16
//!   NF4 levels (quantiles of a normal distribution, `[-1, 1]`) to `w / s`; `w ≈ NF4[q]·s`.
//!   Chosen over a scale-plus-minimum variant (Q4_1) because trained weights are close to normal,
//!   so the levels sit where the weights are (lower error than Q4_0 at the same 4.5 bits, where
//!   Q4_1 pays 5 bits), because it is the data type of QLoRA (the 4-bit base of LoRA training),
//!   and because on AVX-512 its table lookup is one `vpermps`, as cheap as Q4_0's subtraction.
//!
//! Layout of a quantized `[out, in]` weight (PyTorch's orientation; `in` a multiple of 32):
//! `values` `[out, in·bits/8]` bytes, each row its blocks in order; an 8-bit block is its 32
//! codes as `i8`, a 4-bit block is 16 bytes whose low nibbles are codes 0..16 and high nibbles
//! codes 16..32 (llama.cpp's order); `scales` `[out, in/32]` f16. In a module the bytes are held
//! as little-endian `i32` words (every backend has `i32`), `[out, in·bits/32]`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// Weights per block (and per scale).
pub const BLOCK: usize = 32;

/// The 16 levels of QLoRA's 4-bit NormalFloat (bitsandbytes' `NF4` code book), written with
/// the digits bitsandbytes publishes and rounded to f32 as its tensors hold them.
#[allow(clippy::excessive_precision)]
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// How a weight is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// Symmetric int8 blocks (llama.cpp's Q8_0).
    Q8,
    /// Symmetric 4-bit blocks (llama.cpp's Q4_0).
    Q4,
    /// 4-bit NormalFloat blocks (QLoRA's NF4, with one f16 absmax per 32 weights).
    Nf4,
}

impl QuantFormat {
    pub const ALL: [QuantFormat; 3] = [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Nf4];

    /// Bits per code.
    pub fn bits(self) -> usize {
        match self {
            QuantFormat::Q8 => 8,
            QuantFormat::Q4 | QuantFormat::Nf4 => 4,
        }
    }

    /// Bytes of codes per block.
    pub fn block_bytes(self) -> usize {
        BLOCK * self.bits() / 8
    }

    /// Storage per weight, codes and scales together (8.5 or 4.5 bits).
    pub fn bits_per_weight(self) -> f64 {
        self.bits() as f64 + 16.0 / BLOCK as f64
    }

    /// The name used on the command line, in configs and in saved files.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8 => "q8",
            QuantFormat::Q4 => "q4",
            QuantFormat::Nf4 => "nf4",
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "q8" | "q8_0" | "int8" => Ok(QuantFormat::Q8),
            "q4" | "q4_0" => Ok(QuantFormat::Q4),
            "nf4" => Ok(QuantFormat::Nf4),
            other => Err(format!("unknown quantization `{other}` (expected q8, q4 or nf4)")),
        }
    }
}

/// Why a weight cannot be quantized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("{cols} input features is not a multiple of the quantization block ({BLOCK})")]
    Width { cols: usize },
    #[error("weight [{row}, {col}] is {value}: a non-finite weight cannot be quantized")]
    NonFinite { row: usize, col: usize, value: f32 },
    #[error("quantized tensors do not fit: {0}")]
    Layout(String),
}

/// A quantized `[rows, cols]` matrix in host memory (`rows` = output features).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    pub format: QuantFormat,
    pub rows: usize,
    pub cols: usize,
    /// `rows × cols·bits/8` bytes (see the module's layout).
    pub values: Vec<u8>,
    /// `rows × cols/32` scales.
    pub scales: Vec<f16>,
}

impl QuantMatrix {
    /// Quantizes a row-major `[rows, cols]` matrix, `row(r, dst)` writing row `r` as f32 into
    /// `dst` (so a half-precision or transposed source is converted one row at a time).
    pub fn quantize_rows(
        format: QuantFormat, rows: usize, cols: usize, row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::Width { cols });
        }
        let (row_bytes, row_scales) = (cols / BLOCK * format.block_bytes(), cols / BLOCK);
        let mut values = vec![0u8; rows * row_bytes];
        let mut scales = vec![f16::ZERO; rows * row_scales];
        values
            .par_chunks_mut(row_bytes.max(1))
            .zip(scales.par_chunks_mut(row_scales.max(1)))
            .enumerate()
            .try_for_each_init(
                || vec![0f32; cols],
                |src, (r, (codes, scales))| {
                    row(r, src);
                    if let Some(col) = src.iter().position(|v| !v.is_finite()) {
                        return Err(QuantError::NonFinite { row: r, col, value: src[col] });
                    }
                    for ((block, codes), scale) in
                        src.chunks_exact(BLOCK).zip(codes.chunks_exact_mut(format.block_bytes())).zip(scales)
                    {
                        *scale = quantize_block(format, block, codes);
                    }
                    Ok(())
                },
            )?;
        Ok(Self { format, rows, cols, values, scales })
    }

    /// Quantizes a row-major `[rows, cols]` f32 matrix.
    pub fn quantize(format: QuantFormat, rows: usize, cols: usize, weights: &[f32]) -> Result<Self, QuantError> {
        assert_eq!(weights.len(), rows * cols, "weights must hold rows × cols values");
        Self::quantize_rows(format, rows, cols, |r, dst| dst.copy_from_slice(&weights[r * cols..(r + 1) * cols]))
    }

    /// Quantizes a row-major `[rows, cols]` matrix held in `data` (f32, f16, bf16 or f64): the
    /// bytes a checkpoint stores a PyTorch `[out, in]` weight in, read without a tensor.
    pub fn quantize_data(format: QuantFormat, data: &TensorData) -> Result<Self, QuantError> {
        let [rows, cols] = <[usize; 2]>::try_from(data.shape.to_vec())
            .map_err(|shape| QuantError::Layout(format!("a matrix, not shape {shape:?}")))?;
        let layout = |e: burn::tensor::DataError| QuantError::Layout(format!("{e:?}"));
        match data.dtype {
            // `half`'s slice conversion picks F16C / AVX-512 at run time (a scalar conversion
            // per weight was most of a 7B model's quantization time).
            DType::F16 => {
                let v = data.as_slice::<f16>().map_err(layout)?;
                Self::quantize_rows(format, rows, cols, |r, dst| v[r * cols..(r + 1) * cols].convert_to_f32_slice(dst))
            }
            DType::BF16 => {
                let v = data.as_slice::<half::bf16>().map_err(layout)?;
                Self::quantize_rows(format, rows, cols, |r, dst| v[r * cols..(r + 1) * cols].convert_to_f32_slice(dst))
            }
            DType::F32 => Self::quantize(format, rows, cols, data.as_slice::<f32>().map_err(layout)?),
            _ => {
                let v = data.clone().convert::<f32>().into_vec::<f32>().map_err(layout)?;
                Self::quantize(format, rows, cols, &v)
            }
        }
    }

    /// Row `r`'s weights as f32 into `dst` (`cols` values).
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let (row_bytes, row_scales) = (self.cols / BLOCK * self.format.block_bytes(), self.cols / BLOCK);
        let codes = &self.values[r * row_bytes..(r + 1) * row_bytes];
        let scales = &self.scales[r * row_scales..(r + 1) * row_scales];
        for ((dst, codes), scale) in
            dst.chunks_exact_mut(BLOCK).zip(codes.chunks_exact(self.format.block_bytes())).zip(scales)
        {
            dequantize_block(self.format, codes, scale.to_f32(), dst);
        }
    }

    /// The whole matrix as row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, dst);
        }
        out
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.values.len() + 2 * self.scales.len()
    }
}

/// Quantizes one block of 32 finite values into `codes`; returns its scale.
pub fn quantize_block(format: QuantFormat, block: &[f32], codes: &mut [u8]) -> f16 {
    debug_assert!(block.len() == BLOCK && codes.len() == format.block_bytes());
    match format {
        QuantFormat::Q8 => {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = f16::from_f32(amax / 127.0);
            let inv = if d.to_f32() == 0.0 { 0.0 } else { 1.0 / d.to_f32() };
            for (c, v) in codes.iter_mut().zip(block) {
                *c = (round_to_nearest(v * inv).clamp(-127.0, 127.0) as i8) as u8;
            }
            d
        }
        QuantFormat::Q4 => {
            // The value of largest magnitude, sign kept: it maps to code 0 exactly (−8·d).
            let max = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = f16::from_f32(max / -8.0);
            let inv = if d.to_f32() == 0.0 { 0.0 } else { 1.0 / d.to_f32() };
            // ⌊t + 8.5⌋ for t + 8.5 ≥ 0 is the truncation (as llama.cpp's `(int8_t)(x*id + 8.5f)`).
            let code = |v: f32| ((v * inv + 8.5).max(0.0) as u8).min(15);
            for j in 0..BLOCK / 2 {
                codes[j] = code(block[j]) | (code(block[j + BLOCK / 2]) << 4);
            }
            d
        }
        QuantFormat::Nf4 => {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = f16::from_f32(amax);
            let inv = if s.to_f32() == 0.0 { 0.0 } else { 1.0 / s.to_f32() };
            let code = |v: f32| nearest_nf4(v * inv);
            for j in 0..BLOCK / 2 {
                codes[j] = code(block[j]) | (code(block[j + BLOCK / 2]) << 4);
            }
            s
        }
    }
}

/// `t` rounded to the nearest integer, ties to even, for |t| < 2²²: adding and subtracting 1.5·2²³
/// leaves no fraction bits (a libm `roundf` call per weight was most of the quantization time
/// on CPUs without SSE4.1 in the baseline target).
#[inline(always)]
fn round_to_nearest(t: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (t + MAGIC) - MAGIC
}

/// Midpoints between consecutive NF4 levels: a value above midpoint `i` is nearer level `i + 1`.
const NF4_MIDPOINTS: [f32; 15] = {
    let mut m = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) * 0.5;
        i += 1;
    }
    m
};

/// The NF4 level nearest to `x` (ties to the lower level): the number of midpoints below `x`,
/// found by binary search (4 comparisons instead of up to 15).
fn nearest_nf4(x: f32) -> u8 {
    NF4_MIDPOINTS.partition_point(|&m| m < x) as u8
}

/// One block's 32 weights as f32: `code value × scale`, one f32 product each (the fast paths
/// compute exactly these values).
pub fn dequantize_block(format: QuantFormat, codes: &[u8], scale: f32, dst: &mut [f32]) {
    match format {
        QuantFormat::Q8 => {
            for (d, &c) in dst.iter_mut().zip(codes) {
                *d = (c as i8) as f32 * scale;
            }
        }
        QuantFormat::Q4 | QuantFormat::Nf4 => {
            let level = |c: u8| match format {
                QuantFormat::Q4 => c as f32 - 8.0,
                _ => NF4_LEVELS[c as usize],
            };
            for j in 0..BLOCK / 2 {
                dst[j] = level(codes[j] & 15) * scale;
                dst[j + BLOCK / 2] = level(codes[j] >> 4) * scale;
            }
        }
    }
}

/// A linear layer whose weight is quantized: `y = x · Wᵀ + b` with `W` `[out, in]` in blocks.
/// Not trainable (its tensors are constants to Burn's optimizers and records).
#[derive(Module, Debug)]
pub struct QuantLinear<B: Backend> {
    /// The code bytes as little-endian `i32` words, `[out, in·bits/32]`.
    pub values: Tensor<B, 2, Int>,
    /// `[out, in/32]`, f16 where the backend has it, else f32.
    pub scales: Tensor<B, 2>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    pub format: QuantFormat,
    /// Prefill and training products in bf16, as bitsandbytes with
    /// `bnb_4bit_compute_dtype=bfloat16`: the activations and the dequantized weight rounded to
    /// bf16, f32 sums. Set for a model held in bf16 ([`QuantLinear::with_bf16_products`]); the
    /// CPU kernel uses AVX-512 BF16 where the CPU has it and the f32 product elsewhere. Decoding
    /// (at most 16 rows) always multiplies the exact dequantized values in f32.
    #[module(skip)]
    pub bf16_products: bool,
}

impl<B: Backend> QuantLinear<B> {
    /// The layer holding `matrix` (its codes copied into the backend once).
    pub fn new(matrix: &QuantMatrix, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        let QuantMatrix { format, rows, cols, values, scales } = matrix;
        let words = cols * format.bits() / 32;
        let values: Vec<i32> = values.chunks_exact(4).map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
        let values = TensorData::new(values, [*rows, words]);
        Self::on_device(*format, values, TensorData::new(scales.clone(), [*rows, cols / BLOCK]), bias, device)
    }

    /// The layer of checked code words and f16 scales (f32 where the backend has no f16).
    fn on_device(
        format: QuantFormat, values: TensorData, scales: TensorData, bias: Option<Tensor<B, 1>>, device: &B::Device,
    ) -> Self {
        let scale_dtype = if B::supports_dtype(device, DType::F16) { DType::F16 } else { DType::F32 };
        let scales = Tensor::from_data(scales, (device, scale_dtype));
        let values = Tensor::from_data(values, (device, DType::I32));
        Self { values, scales, bias: bias.map(Param::from_tensor), format, bf16_products: false }
    }

    /// The layer with prefill and training products in bf16 or not (see [`Self::bf16_products`]).
    pub fn with_bf16_products(mut self, bf16: bool) -> Self {
        self.bf16_products = bf16;
        self
    }

    /// Quantizes a float linear layer (Burn's `[in, out]` weight, in any dtype and layout; its
    /// bias kept in its own dtype; a bf16 layer keeps multiplying in bf16). The weight's values are read out once, as f32 one row at a
    /// time on the host, so a half-precision layer never has an f32 copy.
    pub fn quantize(linear: &Linear<B>, format: QuantFormat) -> Result<Self, QuantError> {
        let weight = linear.weight.val();
        let device = weight.device();
        let bf16 = weight.dtype() == DType::BF16;
        // `[out, in]` in storage order: for a loaded (transposed-view) weight no data moves.
        let data = weight.transpose().into_data();
        let matrix = QuantMatrix::quantize_data(format, &data)?;
        Ok(Self::new(&matrix, linear.bias.as_ref().map(|b| b.val()), &device).with_bf16_products(bf16))
    }

    /// The layer from saved tensors: `values` the code bytes as little-endian `i32` words
    /// `[out, in·bits/32]` and `scales` `[out, in/32]` in f16. Their bytes go to the backend as
    /// they are: a memory map of the file stays one (the codes are never copied on the CPU).
    pub fn from_data(
        format: QuantFormat, values: TensorData, scales: TensorData, [rows, cols]: [usize; 2],
        bias: Option<Tensor<B, 1>>, device: &B::Device,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::Width { cols });
        }
        let words = cols * format.bits() / 32;
        let found = |d: &TensorData| format!("{:?} {:?}", d.dtype, d.shape);
        if values.dtype != DType::I32 || values.shape.as_slice() != [rows, words] {
            return Err(QuantError::Layout(format!(
                "{format} [{rows}, {cols}] needs I32 code words [{rows}, {words}], found {}",
                found(&values)
            )));
        }
        if scales.dtype != DType::F16 || scales.shape.as_slice() != [rows, cols / BLOCK] {
            return Err(QuantError::Layout(format!(
                "{format} [{rows}, {cols}] needs F16 scales [{rows}, {}], found {}",
                cols / BLOCK,
                found(&scales)
            )));
        }
        let scale_values = scales.as_slice::<f16>().map_err(|e| QuantError::Layout(format!("{e:?}")))?;
        if let Some(i) = scale_values.iter().position(|s| !s.is_finite()) {
            return Err(QuantError::Layout(format!("scale {i} is {}", scale_values[i])));
        }
        Ok(Self::on_device(format, values, scales, bias, device))
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        let [rows, words] = self.values.dims();
        [rows, words * 32 / self.format.bits()]
    }

    /// The codes and scales back on the host (for saving).
    pub fn to_matrix(&self) -> QuantMatrix {
        let [rows, cols] = self.dims();
        let words = self.values.to_data().convert::<i32>().into_vec::<i32>().expect("i32 codes");
        let values = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let scales = self.scales.to_data().convert::<f16>().into_vec::<f16>().expect("f16 scales");
        QuantMatrix { format: self.format, rows, cols, values, scales }
    }

    /// The weight dequantized with Burn's operations, `[out, in]` in f32: the definition of
    /// the fast paths, and what the generic forward multiplies by.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [rows, cols] = self.dims();
        let bits = self.format.bits();
        let per_word = 32 / bits;
        let mask = ((1i64 << bits) - 1).elem::<B::IntElem>();
        let codes: Vec<Tensor<B, 2, Int>> = (0..per_word)
            .map(|s| {
                self.values.clone().bitwise_right_shift_scalar(((s * bits) as i64).elem()).bitwise_and_scalar(mask)
            })
            .collect();
        let codes = Tensor::stack::<3>(codes, 2); // [rows, words, per_word]
        let levels = match self.format {
            QuantFormat::Q8 => {
                let c = codes.reshape([rows, cols]).float().cast(DType::F32);
                c.clone() - c.greater_equal_elem(128.0).float().cast(DType::F32) * 256.0
            }
            QuantFormat::Q4 | QuantFormat::Nf4 => {
                // Nibble s of word w is byte 4w + s/2 of the row, its low (s even) or high half;
                // byte j of a 16-byte block holds codes j (low) and j + 16 (high).
                let blocks = cols / BLOCK;
                let codes = codes.reshape([rows, blocks, 4, 4, 2]).permute([0, 1, 4, 2, 3]).reshape([rows, cols]);
                match self.format {
                    QuantFormat::Q4 => codes.float().cast(DType::F32) - 8.0,
                    _ => {
                        let table = Tensor::<B, 1>::from_data(
                            TensorData::new(NF4_LEVELS.to_vec(), [16]),
                            (&self.values.device(), DType::F32),
                        );
                        table.select(0, codes.reshape([rows * cols])).reshape([rows, cols])
                    }
                }
            }
        };
        let scales =
            self.scales.clone().cast(DType::F32).reshape([rows, cols / BLOCK, 1]).expand([rows, cols / BLOCK, BLOCK]);
        levels * scales.reshape([rows, cols])
    }

    /// `x [m, in]` → `[m, out]` in `x`'s dtype.
    pub fn forward_rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        #[cfg(feature = "flex")]
        if let Some(y) = crate::cpu::quant::linear(&x, self) {
            return y;
        }
        crate::reference::quant_linear(x, self)
    }
}

/// A linear layer with a float weight (Burn's `Linear`, `[in, out]`) or a quantized one.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum AnyLinear<B: Backend> {
    Float(Linear<B>),
    Quantized(QuantLinear<B>),
}

impl<B: Backend> From<Linear<B>> for AnyLinear<B> {
    fn from(linear: Linear<B>) -> Self {
        AnyLinear::Float(linear)
    }
}

impl<B: Backend> AnyLinear<B> {
    /// `[b, s, in]` → `[b, s, out]` (see [`crate::linear_tokens`]).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            AnyLinear::Float(linear) => crate::linear_tokens(linear, x),
            AnyLinear::Quantized(q) => {
                let [b, s, d] = x.dims();
                let y = q.forward_rows(x.reshape([b * s, d]));
                let out = y.dims()[1];
                y.reshape([b, s, out])
            }
        }
    }

    /// Quantizes a float layer in `format` (a quantized one is kept as it is).
    pub fn quantized(self, format: QuantFormat) -> Result<Self, QuantError> {
        match self {
            AnyLinear::Float(linear) => Ok(AnyLinear::Quantized(QuantLinear::quantize(&linear, format)?)),
            quantized => Ok(quantized),
        }
    }

    /// The float layer of the dequantized weight (f32, Burn's `[in, out]`) and the same bias; a
    /// float layer as it is. The model these make is what the quantized one computes (up to the
    /// order of float sums): the definition the kernels are tested against.
    pub fn dequantized(self) -> Self {
        match self {
            AnyLinear::Quantized(q) => {
                let [out, inp] = q.dims();
                let mut linear = burn::nn::LinearConfig::new(inp, out).with_bias(false).init(&q.values.device());
                linear.weight = Param::from_tensor(q.dequantize().transpose());
                linear.bias = q.bias.clone();
                AnyLinear::Float(linear)
            }
            float => float,
        }
    }

    /// The float layer, `None` when quantized.
    pub fn as_float(&self) -> Option<&Linear<B>> {
        match self {
            AnyLinear::Float(linear) => Some(linear),
            AnyLinear::Quantized(_) => None,
        }
    }

    /// The device the weights are on.
    pub fn device(&self) -> B::Device {
        match self {
            AnyLinear::Float(linear) => linear.weight.device(),
            AnyLinear::Quantized(q) => q.values.device(),
        }
    }

    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            AnyLinear::Float(linear) => linear.weight.dims(),
            AnyLinear::Quantized(q) => {
                let [out, inp] = q.dims();
                [inp, out]
            }
        }
    }

    /// Bytes the weight (and bias) hold.
    pub fn weight_bytes(&self) -> usize {
        let bias = |b: &Option<Param<Tensor<B, 1>>>| b.as_ref().map_or(0, |b| b.dims()[0] * b.dtype().size());
        match self {
            AnyLinear::Float(l) => l.weight.dims().iter().product::<usize>() * l.weight.dtype().size() + bias(&l.bias),
            AnyLinear::Quantized(q) => {
                q.values.dims().iter().product::<usize>() * 4
                    + q.scales.dims().iter().product::<usize>() * q.scales.dtype().size()
                    + bias(&q.bias)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Roughly normal: the sum of four uniforms, centred.
                let u = |x: u64| ((x >> 40) as f32) / (1u64 << 24) as f32;
                let v = u(s) + u(s.rotate_left(16)) + u(s.rotate_left(32)) + u(s.rotate_left(48)) - 2.0;
                v * 0.05
            })
            .collect()
    }

    /// Every weight comes back within its format's bound of its block's scale: half a step for
    /// q8 and q4, half the widest gap between NF4 levels for nf4; an all-zero block stays zero.
    #[test]
    fn a_blocks_round_trip_stays_within_its_bound() {
        let (rows, cols) = (7, 256);
        let mut w = lcg(3, rows * cols);
        w[5] = 0.9; // an outlier in one block
        w[cols..cols + BLOCK].iter_mut().for_each(|v| *v = 0.0);
        let widest_nf4_gap = NF4_LEVELS.windows(2).map(|p| p[1] - p[0]).fold(0f32, f32::max);
        for format in QuantFormat::ALL {
            let q = QuantMatrix::quantize(format, rows, cols, &w).unwrap();
            assert_eq!(q.values.len(), rows * cols * format.bits() / 8);
            let back = q.dequantize();
            for (i, (&a, &b)) in w.iter().zip(&back).enumerate() {
                let scale = q.scales[i / BLOCK].to_f32().abs();
                let bound = match format {
                    QuantFormat::Q8 => 0.5 * scale,
                    // Half a step, except past +7.5 steps on the side opposite the block's
                    // extreme value, where code 15 (+7 steps) is the last: at most one step.
                    QuantFormat::Q4 if a.abs() > 7.5 * scale => scale,
                    QuantFormat::Q4 => 0.5 * scale,
                    QuantFormat::Nf4 => 0.5 * widest_nf4_gap * scale,
                } * (1.0 + 1e-6)
                    + 1e-12;
                assert!((a - b).abs() <= bound, "{format} weight {i}: {a} -> {b}, bound {bound}");
            }
            assert!(back[cols..cols + BLOCK].iter().all(|&v| v == 0.0), "{format}: zero block");
            // The block's extreme value is represented exactly (up to the f16 scale).
            let extreme = back[5];
            assert!((extreme - 0.9).abs() <= 0.9 * 1e-3, "{format}: outlier {extreme}");
        }
    }

    #[test]
    fn widths_off_the_block_and_non_finite_weights_are_errors() {
        assert_eq!(QuantMatrix::quantize(QuantFormat::Q8, 1, 20, &[0.0; 20]), Err(QuantError::Width { cols: 20 }));
        let mut w = vec![0.0; 64];
        w[40] = f32::NAN;
        let err = QuantMatrix::quantize(QuantFormat::Q4, 2, 32, &w).unwrap_err();
        assert!(matches!(err, QuantError::NonFinite { row: 1, col: 8, .. }), "{err:?}");
    }

    #[test]
    fn format_names_parse_and_print() {
        for f in QuantFormat::ALL {
            assert_eq!(f.name().parse::<QuantFormat>(), Ok(f));
        }
        assert!("q3".parse::<QuantFormat>().unwrap_err().contains("expected q8, q4 or nf4"));
    }
}
