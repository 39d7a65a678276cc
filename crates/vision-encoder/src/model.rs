//! The tower: patch and position embeddings, pre-norm encoder layers (attention without a mask,
//! `quick_gelu` or `gelu` MLP), and `ClipVisionModel` with loading and export under Hugging Face
//! names.

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use llava_checkpoint::{Exporter, Loader};
use llava_kernels::{AnyLinear, QuantFormat, add, attention, quick_gelu};

use crate::config::hidden_state_index;
use crate::{ClipVisionConfig, VisionActivation, VisionError};

/// `LayerNorm` as PyTorch computes it (f32 inside, whatever the dtypes of input and weights).
/// (Burn's `LayerNorm` keeps its epsilon private, so the layers carry `layer_norm_eps` themselves.)
fn layer_norm<B: Backend, const D: usize>(norm: &LayerNorm<B>, x: Tensor<B, D>, epsilon: f64) -> Tensor<B, D> {
    llava_kernels::layer_norm(x, norm.gamma.val(), norm.beta.as_ref().map(|b| b.val()), epsilon)
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    pub patch_embedding: Conv2d<B>,
    pub class_embedding: Param<Tensor<B, 1>>,
    pub position_embedding: Param<Tensor<B, 2>>,
}

impl<B: Backend> ClipEmbeddings<B> {
    /// `[batch, 3, H, W]` → `[batch, 1 + patches, hidden]`.
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 3> {
        // As Hugging Face: the pixels take the weights' dtype (bf16 under mixed precision).
        let weights = self.patch_embedding.weight.dtype();
        let pixels = pixels.cast(weights);
        // The convolution runs in the weights' dtype; what follows in the activations' (f32 on
        // the CPU, where the kernels read half-precision weights directly).
        let activations = llava_kernels::activation_dtype::<B>(weights);
        let to_activations = |t: Tensor<B, 3>| t.cast(activations);
        let patches = self.patch_embedding.forward(pixels); // [b, d, gh, gw]
        let [b, d, gh, gw] = patches.dims();
        let patches = to_activations(patches.reshape([b, d, gh * gw]).swap_dims(1, 2)); // [b, n, d]
        let class = to_activations(self.class_embedding.val().reshape([1, 1, d])).expand([b, 1, d]);
        let tokens = Tensor::cat(vec![class, patches], 1);
        tokens + to_activations(self.position_embedding.val().unsqueeze::<3>())
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: AnyLinear<B>,
    pub k_proj: AnyLinear<B>,
    pub v_proj: AnyLinear<B>,
    pub out_proj: AnyLinear<B>,
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let heads = |t: Tensor<B, 3>| t.reshape([b, s, self.num_heads, d / self.num_heads]);
        let q = heads(self.q_proj.forward(x.clone()));
        let k = heads(self.k_proj.forward(x.clone()));
        let v = heads(self.v_proj.forward(x));
        // The vision tower attends bidirectionally: no mask, not causal.
        let out = attention(q, k, v, None, false);
        self.out_proj.forward(out.reshape([b, s, d]))
    }
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: AnyLinear<B>,
    pub fc2: AnyLinear<B>,
    pub quick_gelu: bool,
}

impl<B: Backend> ClipMlp<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu { quick_gelu(h) } else { gelu(h) };
        self.fc2.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
    pub layer_norm_eps: f64,
}

impl<B: Backend> ClipEncoderLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let a = self.self_attn.forward(layer_norm(&self.layer_norm1, x.clone(), self.layer_norm_eps));
        let x = add(x, a);
        let m = self.mlp.forward(layer_norm(&self.layer_norm2, x.clone(), self.layer_norm_eps));
        add(x, m)
    }
}

/// Hugging Face `CLIPVisionTransformer` (the `vision_model` of a `CLIPModel`).
#[derive(Module, Debug)]
pub struct ClipVisionModel<B: Backend> {
    pub embeddings: ClipEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub layers: Vec<ClipEncoderLayer<B>>,
    /// Loaded for completeness (it is part of the checkpoint) but unused by LLaVA.
    pub post_layernorm: LayerNorm<B>,
    pub layer_norm_eps: f64,
}

impl<B: Backend> ClipVisionModel<B> {
    /// `hidden_states[select_layer]` of Hugging Face's `output_hidden_states=True`, Python-style
    /// index (`-2` = output of the second-to-last layer; `0` = the pre-layernormed embeddings).
    /// Layers after the selected one are not run. Returns `[batch, 1 + patches, hidden]`.
    pub fn hidden_state(&self, pixels: Tensor<B, 4>, select_layer: i64) -> Tensor<B, 3> {
        let index = hidden_state_index(self.layers.len(), select_layer).unwrap_or_else(|| {
            panic!("select_layer {select_layer} is out of range for {} hidden states", self.layers.len() + 1)
        });
        let mut h = layer_norm(&self.pre_layrnorm, self.embeddings.forward(pixels), self.layer_norm_eps);
        for layer in &self.layers[..index] {
            h = layer.forward(h);
        }
        h
    }

    /// The pooled output of `CLIPVisionModel`: post-layernormed class token, `[batch, hidden]`.
    pub fn pooled(&self, pixels: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = self.hidden_state(pixels, -1);
        let [b, _, d] = h.dims();
        layer_norm(&self.post_layernorm, h.slice([0..b, 0..1, 0..d]), self.layer_norm_eps).reshape([b, d])
    }

    /// Loads `vision_model.*` from a CLIP checkpoint (a full `CLIPModel`, whose text tower is
    /// ignored, or a `CLIPVisionModel`).
    /// `root` is a loader at the checkpoint's root (its dtype applies).
    pub fn load_hf(config: &ClipVisionConfig, root: &Loader<'_, B>) -> Result<Self, VisionError> {
        Self::load_hf_quantized(config, root, None)
    }

    /// [`ClipVisionModel::load_hf`], the encoder layers' linear layers quantized in `quantize`
    /// (as [`ClipVisionModel::load_quantized`]).
    pub fn load_hf_quantized(
        config: &ClipVisionConfig, root: &Loader<'_, B>, quantize: Option<QuantFormat>,
    ) -> Result<Self, VisionError> {
        let store = root.store();
        let prefix = if store.has_prefix("vision_model.") { "vision_model" } else { "" };
        store.ignore_prefix("text_model.");
        for name in ["logit_scale", "text_projection.weight", "visual_projection.weight"] {
            store.ignore_prefix(name);
        }
        Self::load_quantized(config, &root.pp(prefix), quantize)
    }

    /// Loads from any prefix, e.g. `vision_tower.vision_model` inside a llava-hf checkpoint.
    pub fn load(config: &ClipVisionConfig, vb: &Loader<'_, B>) -> Result<Self, VisionError> {
        Self::load_quantized(config, vb, None)
    }

    /// [`ClipVisionModel::load`], the encoder layers' linear layers (attention projections and
    /// MLP) quantized in `quantize` as they are read (weight-only, one layer's float bytes at a
    /// time); the patch embedding, position embeddings and LayerNorms stay float. Layers saved
    /// quantized load as they are, with or without `quantize`.
    pub fn load_quantized(
        config: &ClipVisionConfig, vb: &Loader<'_, B>, quantize: Option<QuantFormat>,
    ) -> Result<Self, VisionError> {
        config.validate().map_err(|reason| VisionError::Config { path: "vision config".into(), reason })?;
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let embeddings = ClipEmbeddings {
            patch_embedding: emb.patch_conv("patch_embedding", config.num_channels, d, config.patch_size)?,
            class_embedding: emb.param("class_embedding", [d])?,
            position_embedding: emb.pp("position_embedding").param("weight", [config.num_patches() + 1, d])?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: a.any_linear("q_proj", d, d, true, quantize)?,
                    k_proj: a.any_linear("k_proj", d, d, true, quantize)?,
                    v_proj: a.any_linear("v_proj", d, d, true, quantize)?,
                    out_proj: a.any_linear("out_proj", d, d, true, quantize)?,
                    num_heads: config.num_attention_heads,
                },
                layer_norm1: l.layer_norm("layer_norm1", d, eps)?,
                mlp: ClipMlp {
                    fc1: l.pp("mlp").any_linear("fc1", d, config.intermediate_size, true, quantize)?,
                    fc2: l.pp("mlp").any_linear("fc2", config.intermediate_size, d, true, quantize)?,
                    quick_gelu: config.hidden_act == VisionActivation::QuickGelu,
                },
                layer_norm2: l.layer_norm("layer_norm2", d, eps)?,
                layer_norm_eps: eps,
            });
        }
        Ok(Self {
            embeddings,
            // "pre_layrnorm" is Hugging Face's spelling.
            pre_layrnorm: vb.layer_norm("pre_layrnorm", d, eps)?,
            layers,
            post_layernorm: vb.layer_norm("post_layernorm", d, eps)?,
            layer_norm_eps: eps,
        })
    }

    /// The quantization of the encoder layers' linear layers (`None`: float; the first layer's
    /// `q_proj` tells, as every layer is loaded alike).
    pub fn quantization(&self) -> Option<QuantFormat> {
        match &self.layers.first()?.self_attn.q_proj {
            AnyLinear::Quantized(q) => Some(q.format),
            AnyLinear::Float(_) => None,
        }
    }

    /// Writes the weights under Hugging Face names (relative to the exporter's current scope).
    pub fn export(&self, e: &mut Exporter) {
        e.scope("embeddings", |e| {
            e.conv2d("patch_embedding", &self.embeddings.patch_embedding);
            e.param("class_embedding", &self.embeddings.class_embedding);
            e.scope("position_embedding", |e| e.param("weight", &self.embeddings.position_embedding));
        });
        e.layer_norm("pre_layrnorm", &self.pre_layrnorm);
        for (i, l) in self.layers.iter().enumerate() {
            e.scope(format!("encoder.layers.{i}"), |e| {
                e.scope("self_attn", |e| {
                    e.any_linear("q_proj", &l.self_attn.q_proj);
                    e.any_linear("k_proj", &l.self_attn.k_proj);
                    e.any_linear("v_proj", &l.self_attn.v_proj);
                    e.any_linear("out_proj", &l.self_attn.out_proj);
                });
                e.layer_norm("layer_norm1", &l.layer_norm1);
                e.scope("mlp", |e| {
                    e.any_linear("fc1", &l.mlp.fc1);
                    e.any_linear("fc2", &l.mlp.fc2);
                });
                e.layer_norm("layer_norm2", &l.layer_norm2);
            });
        }
        e.layer_norm("post_layernorm", &self.post_layernorm);
    }
}
