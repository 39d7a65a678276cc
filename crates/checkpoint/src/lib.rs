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
//! This crate is checkpoint I/O only: it must not depend on a backend (no Flex, no autodiff, no
//! gemm) nor on the model crates. Besides `llava-io` (atomic writes) it knows one crate of this
//! workspace, `llava-kernels` without its `flex` feature, for the type of the quantized linear
//! layer ([`Loader::any_linear`], [`Exporter::any_linear`]): the layers the models hold are
//! built here, Burn's and that one alike; the compute kernels stay in `llava-kernels`.
//!
//! ```no_run
//! use burn::nn::Linear;
//! use burn::tensor::backend::Backend;
//! use llava_checkpoint::{Loader, WeightStore};
//!
//! fn q_proj<B: Backend>(device: &B::Device) -> llava_checkpoint::Result<Linear<B>> {
//!     let store = WeightStore::open("path/to/checkpoint-dir".as_ref())?;
//!     let loader = Loader::<B>::new(&store, device);
//!     loader.pp("model.layers.0.self_attn").linear("q_proj", 4096, 4096, false)
//! }
//! ```

mod export;
mod loader;
mod pickle;
mod store;

pub use export::{Exporter, SaveDtype};
pub use loader::{Loader, quantized_weight_name};
pub use store::{NO_MMAP_ENV, StoredDtype, TensorInfo, WeightStore};

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
    #[error(
        "{path}: no checkpoint found (looked for model.safetensors(.index.json), pytorch_model.bin(.index.json), *.safetensors, *.bin)"
    )]
    NotFound { path: PathBuf },
    #[error("tensor `{name}` is missing from the checkpoint{hint}")]
    Missing { name: String, hint: String },
    #[error("tensor `{name}`: the config expects shape {expected:?} but the checkpoint holds {found:?} (in {path})")]
    Shape { name: String, expected: Vec<usize>, found: Vec<usize>, path: PathBuf },
    #[error("tensor `{name}` in {path} has unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String, path: PathBuf },
    #[error("quantizing `{name}`: {source}")]
    Quantize { name: String, source: llava_kernels::quant::QuantError },
    #[error("unused tensors in the checkpoint (nothing in the model consumes them): {names}")]
    Unused { names: String },
}

pub type Result<T> = std::result::Result<T, WeightsError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WeightsError {
    let path = path.into();
    move |source| WeightsError::Io { path, source }
}
