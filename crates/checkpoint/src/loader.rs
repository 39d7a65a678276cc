//! Building Burn layers from stored tensors, by Hugging Face name.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use llava_kernels::quant::BLOCK;
use llava_kernels::{AnyLinear, QuantFormat, QuantLinear, QuantMatrix};

use crate::{Result, WeightStore, WeightsError};

/// Names of a quantized linear layer's tensors, beside (instead of) its `weight`:
/// `{layer}.weight_{format}` (the code bytes, U8 `[out, in·bits/8]`) and `{layer}.weight_scale`
/// (F16 `[out, in/32]`); the bias keeps its name. The format is in the name, so a file says
/// what it holds tensor by tensor.
pub fn quantized_weight_name(format: QuantFormat) -> String {
    format!("weight_{format}")
}

/// Linear layers with at most this many input features are loaded row-major (`[in, out]`), the
/// others as a transposed view of the stored `[out, in]` (see [`Loader::linear`]).
pub const ROW_MAJOR_MAX_IN: usize = 128;

/// A 2-D tensor's elements transposed (`[r, c]` → `[c, r]`), whatever their type.
fn transposed(data: TensorData) -> TensorData {
    let [r, c] = [data.shape[0], data.shape[1]];
    let size = data.dtype.size();
    let bytes = data.as_bytes();
    let mut out = vec![0u8; bytes.len()];
    for i in 0..r {
        for j in 0..c {
            let (from, to) = ((i * c + j) * size, (j * r + i) * size);
            out[to..to + size].copy_from_slice(&bytes[from..from + size]);
        }
    }
    TensorData::from_bytes_vec(out, [c, r], data.dtype)
}

/// A view of a [`WeightStore`] under a name prefix, on a device, in a dtype.
///
/// Tensors keep the dtype they are stored in (an f16 or bf16 checkpoint stays half precision in
/// memory) unless [`Loader::with_dtype`] asks for another, or the backend cannot hold that dtype
/// (NdArray has no f16/bf16): then f32. Conversion is tensor by tensor, never a whole
/// checkpoint at once.
pub struct Loader<'a, B: Backend> {
    store: &'a WeightStore,
    prefix: String,
    device: B::Device,
    dtype: Option<DType>,
}

impl<B: Backend> Clone for Loader<'_, B> {
    fn clone(&self) -> Self {
        Self { store: self.store, prefix: self.prefix.clone(), device: self.device.clone(), dtype: self.dtype }
    }
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(store: &'a WeightStore, device: &B::Device) -> Self {
        Self { store, prefix: String::new(), device: device.clone(), dtype: None }
    }

    /// Every tensor in `dtype` (`None`: each in its stored dtype).
    pub fn with_dtype(mut self, dtype: Option<DType>) -> Self {
        self.dtype = dtype;
        self
    }

    /// The dtype asked for (`None`: as stored).
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// A loader for the sub-module `name` (names are joined with dots).
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        Self { store: self.store, prefix: self.path(name.as_ref()), device: self.device.clone(), dtype: self.dtype }
    }

    /// The dtype tensor `path` will have in memory.
    fn target(&self, path: &str) -> DType {
        let held = self.store.info(path).and_then(|i| i.dtype.held()).unwrap_or(DType::F32);
        let wanted = self.dtype.unwrap_or(held);
        if B::supports_dtype(&self.device, wanted) { wanted } else { DType::F32 }
    }

    /// Reads tensor `path` of exactly `shape` in the loader's dtype.
    fn data(&self, path: &str, shape: &[usize]) -> Result<TensorData> {
        self.store.read(path, shape, Some(self.target(path)))
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    pub fn store(&self) -> &'a WeightStore {
        self.store
    }

    /// The full tensor name of `name` under this loader's prefix.
    pub fn path(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => name.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{}", self.prefix, name),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.path(name))
    }

    /// Reads a tensor of exactly `shape`.
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let data = self.data(&self.path(name), &shape)?;
        let dtype = data.dtype;
        Ok(Tensor::from_data(data, (&self.device, dtype)))
    }

    pub fn param<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::from_tensor(self.tensor(name, shape)?))
    }

    /// A PyTorch `nn.Linear` (`weight` stored `[out, in]`), as Burn's `[in, out]` layout.
    pub fn linear(&self, name: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let sub = self.pp(name);
        // Kept as stored, `[out, in]`, and viewed as Burn's `[in, out]` (a transpose is a view):
        // no copy at load, and each output's weights stay one contiguous run, the layout the
        // CPU decode kernel reads fastest. The kernels take either layout. A narrow input (at
        // most `ROW_MAJOR_MAX_IN` features, tiny test and demo models) is the exception: there a
        // per-output dot product is too short to pay for summing its SIMD lanes, and the
        // row-major panels (sums kept in registers) are several times faster, so the few bytes
        // are transposed here.
        let w = self.data(&sub.path("weight"), &[d_out, d_in])?;
        let dtype = w.dtype;
        let mut linear = LinearConfig::new(d_in, d_out).with_bias(bias).init(&self.device);
        linear.weight = Param::from_tensor(if d_in <= ROW_MAJOR_MAX_IN {
            Tensor::<B, 2>::from_data(transposed(w), (&self.device, dtype))
        } else {
            Tensor::<B, 2>::from_data(w, (&self.device, dtype)).transpose()
        });
        if bias {
            linear.bias = Some(sub.param("bias", [d_out])?);
        }
        Ok(linear)
    }

    /// A linear layer that may be quantized: one saved quantized (any format, see
    /// [`quantized_weight_name`]) loads as it is; a float one loads as [`Loader::linear`], or is
    /// quantized in `quantize` as it is read (straight from its stored bytes: no float tensor of
    /// the layer is made). Blocks run along the input features, so a layer whose input width is
    /// not a multiple of the block stays float (llama.cpp also keeps such tensors in a fallback
    /// type).
    pub fn any_linear(
        &self, name: &str, d_in: usize, d_out: usize, bias: bool, quantize: Option<QuantFormat>,
    ) -> Result<AnyLinear<B>> {
        let layer = if name.is_empty() { self.clone() } else { self.pp(name) };
        let quantized = |tensor: &str| {
            let tensor = tensor.to_string();
            move |source| WeightsError::Quantize { name: tensor, source }
        };
        if let Some(format) = QuantFormat::ALL.into_iter().find(|f| layer.contains(&quantized_weight_name(*f))) {
            let codes_name = layer.path(&quantized_weight_name(format));
            let codes = self.store.read_words(&codes_name, &[d_out, d_in * format.bits() / 8])?;
            let scales = self.store.read(&layer.path("weight_scale"), &[d_out, d_in / BLOCK], Some(DType::F16))?;
            let bias = if bias { Some(layer.tensor::<1>("bias", [d_out])?) } else { None };
            let q = QuantLinear::from_data(format, codes, scales, [d_out, d_in], bias, &self.device)
                .map_err(quantized(&codes_name))?;
            // The model's float dtype: the one asked for, else the one most of the file's float
            // bytes are in (the embeddings' and norms').
            let held = self.dtype.or_else(|| self.store.dominant_dtype(""));
            return Ok(AnyLinear::Quantized(q.with_bf16_products(held == Some(DType::BF16))));
        }
        match quantize {
            Some(format) if d_in.is_multiple_of(BLOCK) => {
                let weight = layer.path("weight");
                let data = self.store.read(&weight, &[d_out, d_in], None)?;
                let matrix = QuantMatrix::quantize_data(format, &data).map_err(quantized(&weight))?;
                // A model held in bf16 multiplies in bf16, as its float layers do.
                let bf16 = self.dtype.unwrap_or(data.dtype) == DType::BF16;
                drop(data);
                let bias = if bias { Some(layer.tensor::<1>("bias", [d_out])?) } else { None };
                Ok(AnyLinear::Quantized(QuantLinear::new(&matrix, bias, &self.device).with_bf16_products(bf16)))
            }
            Some(format) => {
                tracing::debug!(
                    "`{}`: {d_in} input features is not a multiple of {BLOCK}, kept float, not {format}",
                    layer.path("weight")
                );
                Ok(AnyLinear::Float(self.linear(name, d_in, d_out, bias)?))
            }
            None => Ok(AnyLinear::Float(self.linear(name, d_in, d_out, bias)?)),
        }
    }

    pub fn layer_norm(&self, name: &str, dim: usize, eps: f64) -> Result<LayerNorm<B>> {
        let sub = self.pp(name);
        let mut norm = LayerNormConfig::new(dim).with_epsilon(eps).init(&self.device);
        norm.gamma = sub.param("weight", [dim])?;
        norm.beta = Some(sub.param("bias", [dim])?);
        Ok(norm)
    }

    pub fn rms_norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm<B>> {
        let mut norm = RmsNormConfig::new(dim).with_epsilon(eps).init(&self.device);
        norm.gamma = self.pp(name).param("weight", [dim])?;
        Ok(norm)
    }

    pub fn embedding(&self, name: &str, n: usize, dim: usize) -> Result<Embedding<B>> {
        let mut emb = EmbeddingConfig::new(n, dim).init(&self.device);
        emb.weight = self.pp(name).param("weight", [n, dim])?;
        Ok(emb)
    }

    /// A bias-free square-stride convolution, as CLIP's patch embedding.
    pub fn patch_conv(&self, name: &str, channels: usize, dim: usize, patch: usize) -> Result<Conv2d<B>> {
        let mut conv = Conv2dConfig::new([channels, dim], [patch, patch])
            .with_stride([patch, patch])
            .with_bias(false)
            .init(&self.device);
        conv.weight = self.pp(name).param("weight", [dim, channels, patch, patch])?;
        Ok(conv)
    }
}
