//! Reading Hugging Face checkpoints into Burn modules, and writing them back.
//!
//! A [`WeightStore`] indexes every tensor of a checkpoint without reading its data: a single
//! `.safetensors` file, a sharded set with `model.safetensors.index.json`, a PyTorch `.bin`
//! (zip + pickle, as `torch.save` writes it) or a sharded set of those. Tensors are read on
//! demand and converted from f16/bf16/f32/f64 to f32.
//!
//! A [`Loader`] walks a module tree by name prefix (like candle's `VarBuilder`) and builds Burn
//! layers from the stored tensors, checking every shape against what the config expects. The
//! store remembers which tensors were used, so a caller can report the ones nothing consumed.
//!
//! An [`Exporter`] is the reverse: modules push their tensors under Hugging Face names, and the
//! result is written as one safetensors file, atomically.
//!
//! The crate also holds the layer helpers every model crate shares and their CPU fast paths,
//! generic over `B: Backend` and tested against Burn's own operations: [`linear_tokens`]
//! ([`skinny`] for few rows, [`dense`] otherwise), [`attention::attention`], the activations and
//! RoPE in [`fused`], and [`fastexp`]; on Flex (and, with their own backward, `Autodiff<Flex>`)
//! they run kernels of ours, on other backends Burn's operations.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use llava_weights::{Loader, WeightStore};
//!
//! let store = WeightStore::open("path/to/checkpoint-dir".as_ref())?;
//! let loader = Loader::<Flex>::new(&store, &Default::default());
//! let q_proj = loader.pp("model.layers.0.self_attn").linear("q_proj", 4096, 4096, false)?;
//! # Ok::<(), llava_weights::WeightsError>(())
//! ```

mod export;
mod loader;
mod pickle;
pub mod attention;
pub mod dense;
pub mod fastexp;
pub mod flex;
pub mod fused;
pub mod norm;
pub mod skinny;
mod store;

pub use export::{Exporter, SaveDtype};
pub use loader::Loader;
pub use store::{StoredDtype, TensorInfo, WeightStore};

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing a checkpoint. Each variant names the
/// file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid checkpoint: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: no checkpoint found (looked for model.safetensors(.index.json), pytorch_model.bin(.index.json), *.safetensors, *.bin)")]
    NotFound { path: PathBuf },
    #[error("tensor `{name}` is missing from the checkpoint{hint}")]
    Missing { name: String, hint: String },
    #[error("tensor `{name}`: the config expects shape {expected:?} but the checkpoint holds {found:?} (in {path})")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        path: PathBuf,
    },
    #[error("tensor `{name}` in {path} has unsupported dtype {dtype}")]
    Dtype {
        name: String,
        dtype: String,
        path: PathBuf,
    },
    #[error("unused tensors in the checkpoint (nothing in the model consumes them): {names}")]
    Unused { names: String },
}

pub type Result<T> = std::result::Result<T, WeightsError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WeightsError {
    let path = path.into();
    move |source| WeightsError::Io { path, source }
}

/// A linear layer on `[batch, tokens, in]` computed as one `[batch × tokens, in]` product.
///
/// Burn's `Linear` on a 3-D input runs one matrix product per batch row, and a CPU gemm packs the
/// whole weight matrix again for each of them: at decode time (one token per row) that packing is
/// most of the work, and in training the weight gradient becomes `batch` small products instead of
/// one. Flattening the tokens first gives the same values with one product.
pub fn linear_tokens<B: burn::tensor::backend::Backend>(
    linear: &burn::nn::Linear<B>,
    x: burn::tensor::Tensor<B, 3>,
) -> burn::tensor::Tensor<B, 3> {
    let [b, s, d] = x.dims();
    let x = x.reshape([b * s, d]);
    let (weight, bias) = (linear.weight.val(), linear.bias.as_ref().map(|b| b.val()));
    // On the CPU backend: a few rows (decoding) stream the weight once instead of packing it;
    // more call gemm directly (no zeroed, copied output; own backward under autodiff).
    let fast = skinny::skinny_linear(&x, &weight, bias.as_ref()).or_else(|| dense::linear(&x, &weight, bias.as_ref()));
    let y = fast.unwrap_or_else(|| linear.forward(x));
    let out = y.dims()[1];
    y.reshape([b, s, out])
}
