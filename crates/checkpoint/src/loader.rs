//! Building Burn layers from stored tensors, by Hugging Face name.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::{Result, WeightStore};

/// A view of a [`WeightStore`] under a name prefix, on a device.
pub struct Loader<'a, B: Backend> {
    store: &'a WeightStore,
    prefix: String,
    device: B::Device,
}

impl<B: Backend> Clone for Loader<'_, B> {
    fn clone(&self) -> Self {
        Self { store: self.store, prefix: self.prefix.clone(), device: self.device.clone() }
    }
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(store: &'a WeightStore, device: &B::Device) -> Self {
        Self { store, prefix: String::new(), device: device.clone() }
    }

    /// A loader for the sub-module `name` (names are joined with dots).
    pub fn pp(&self, name: impl AsRef<str>) -> Self {
        Self { store: self.store, prefix: self.path(name.as_ref()), device: self.device.clone() }
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
        let values = self.store.read_f32(&self.path(name), &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), &self.device))
    }

    pub fn param<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<B, D>>> {
        Ok(Param::from_tensor(self.tensor(name, shape)?))
    }

    /// A PyTorch `nn.Linear` (`weight` stored `[out, in]`), as Burn's `[in, out]` layout.
    pub fn linear(&self, name: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear<B>> {
        let sub = self.pp(name);
        let w = self.store.read_f32(&sub.path("weight"), &[d_out, d_in])?;
        let mut transposed = vec![0f32; w.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                transposed[i * d_out + o] = w[o * d_in + i];
            }
        }
        let mut linear = LinearConfig::new(d_in, d_out).with_bias(bias).init(&self.device);
        linear.weight = Param::from_tensor(Tensor::from_data(TensorData::new(transposed, [d_in, d_out]), &self.device));
        if bias {
            linear.bias = Some(sub.param("bias", [d_out])?);
        }
        Ok(linear)
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
