//! The CLIP vision transformer (ViT) that LLaVA uses as its image encoder.
//! Depends on `llava-checkpoint` (loading) and `llava-kernels` (layer operations) only; knows
//! nothing of the projector, the LLM, the data pipeline or training.
//!
//! Any size from a Hugging Face config (ViT-L/14 at 224 or 336 px, or a tiny test model):
//! a patch-embedding convolution, a learned class token and position embeddings, a pre-LayerNorm,
//! and pre-norm encoder layers with `quick_gelu` (OpenAI CLIP) or exact `gelu` MLPs.
//!
//! LLaVA does not use the final output: it takes `hidden_states[select_layer]` (by default the
//! layer *before* the last, `-2`) and drops the class token. [`ClipVisionModel::hidden_state`]
//! computes exactly that and stops early, so the layers after the selected one are never run.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use llava_vision_encoder::{ClipVisionConfig, ClipVisionModel};
//! use llava_checkpoint::{Loader, WeightStore};
//!
//! let dir = std::path::Path::new("clip-vit-large-patch14");
//! let config = ClipVisionConfig::from_hf_dir(dir)?;
//! let store = WeightStore::open(dir)?;
//! let model = ClipVisionModel::<Flex>::load_hf(&config, &Loader::new(&store, &Default::default()))?;
//! let pixels = burn::tensor::Tensor::<Flex, 4>::zeros([1, 3, 224, 224], &Default::default());
//! let features = model.hidden_state(pixels, -2); // [1, 257, 1024]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use llava_checkpoint::{Exporter, Loader, WeightsError};
use llava_kernels::attention;
use llava_kernels::{AnyLinear, QuantFormat};
use llava_kernels::{add, quick_gelu};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
}

/// The MLP activation of the encoder layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VisionActivation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP.
    #[default]
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
}

/// Hugging Face `CLIPVisionConfig`, with the same field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: VisionActivation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: VisionActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// openai/clip-vit-large-patch14 (`image_size` 224) or -336.
    pub fn vit_large_patch14(image_size: usize) -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size,
            patch_size: 14,
            ..Self::default()
        }
    }

    /// Reads `config.json` of a CLIP directory: a full `CLIPConfig` (its `vision_config` is used)
    /// or a `CLIPVisionConfig`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, VisionError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| VisionError::Config { path: path.display().to_string(), reason: e.to_string() })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| VisionError::Config { path: path.display().to_string(), reason: e.to_string() })?;
        Self::from_hf_json(json.get("vision_config").unwrap_or(&json))
            .map_err(|reason| VisionError::Config { path: path.display().to_string(), reason })
    }

    /// Parses a `CLIPVisionConfig` JSON object (missing fields take Hugging Face's defaults).
    pub fn from_hf_json(json: &serde_json::Value) -> Result<Self, String> {
        let mut config: Self = serde_json::from_value(json.clone()).map_err(|e| format!("vision config: {e}"))?;
        // Some configs spell the activation "gelu_pytorch_tanh" etc.; only two are meaningful here.
        if let Some(act) = json.get("hidden_act").and_then(|a| a.as_str()) {
            config.hidden_act = match act {
                "quick_gelu" => VisionActivation::QuickGelu,
                "gelu" => VisionActivation::Gelu,
                other => return Err(format!("vision config: unsupported hidden_act `{other}`")),
            };
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ] {
            if value == 0 {
                return Err(format!("vision config: {field} must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!("image_size {} is not a multiple of patch_size {}", self.image_size, self.patch_size));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The number of weights the tower holds (as [`ClipVisionConfig::init`] or a loaded
    /// checkpoint holds them). For memory plans: no weight is read.
    pub fn num_parameters(&self) -> u64 {
        let (d, inter) = (self.hidden_size as u64, self.intermediate_size as u64);
        let patch = d * self.num_channels as u64 * (self.patch_size as u64).pow(2);
        let embeddings = patch + d + (self.num_patches() as u64 + 1) * d;
        let layer = 4 * (d * d + d) + (d * inter + inter) + (inter * d + d) + 2 * 2 * d;
        embeddings + 2 * 2 * d + self.num_hidden_layers as u64 * layer
    }

    /// Patches per image (without the class token).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Resolves a Python-style layer index into `hidden_states` (length `num_hidden_layers + 1`);
    /// `None` when it is out of range.
    pub fn hidden_state_index(&self, select_layer: i64) -> Option<usize> {
        hidden_state_index(self.num_hidden_layers, select_layer)
    }

    /// A randomly initialised model (weights as in Hugging Face's `_init_weights`, std 0.02).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipVisionModel<B> {
        let d = self.hidden_size;
        let ln = || LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device);
        let normal = |shape: Vec<usize>| Tensor::random(shape, Distribution::Normal(0.0, 0.02), device);
        let linear = |i: usize, o: usize| {
            let mut l = LinearConfig::new(i, o).init(device);
            l.weight = Param::from_tensor(normal(vec![i, o]));
            l.bias = Some(Param::from_tensor(Tensor::zeros([o], device)));
            AnyLinear::Float(l)
        };
        let mut patch_embedding = Conv2dConfig::new([self.num_channels, d], [self.patch_size, self.patch_size])
            .with_stride([self.patch_size, self.patch_size])
            .with_bias(false)
            .init(device);
        patch_embedding.weight =
            Param::from_tensor(normal(vec![d, self.num_channels, self.patch_size, self.patch_size]).reshape([
                d,
                self.num_channels,
                self.patch_size,
                self.patch_size,
            ]));
        ClipVisionModel {
            embeddings: ClipEmbeddings {
                patch_embedding,
                class_embedding: Param::from_tensor(normal(vec![d]).reshape([d])),
                position_embedding: Param::from_tensor(
                    normal(vec![self.num_patches() + 1, d]).reshape([self.num_patches() + 1, d]),
                ),
            },
            pre_layrnorm: ln(),
            layers: (0..self.num_hidden_layers)
                .map(|_| ClipEncoderLayer {
                    self_attn: ClipAttention {
                        q_proj: linear(d, d),
                        k_proj: linear(d, d),
                        v_proj: linear(d, d),
                        out_proj: linear(d, d),
                        num_heads: self.num_attention_heads,
                    },
                    layer_norm1: ln(),
                    mlp: ClipMlp {
                        fc1: linear(d, self.intermediate_size),
                        fc2: linear(self.intermediate_size, d),
                        quick_gelu: self.hidden_act == VisionActivation::QuickGelu,
                    },
                    layer_norm2: ln(),
                    layer_norm_eps: self.layer_norm_eps,
                })
                .collect(),
            post_layernorm: ln(),
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

/// Python-style index (`-2` = second to last) into the `layers + 1` hidden states.
fn hidden_state_index(layers: usize, select_layer: i64) -> Option<usize> {
    let n = layers as i64 + 1;
    let index = if select_layer < 0 { n + select_layer } else { select_layer };
    (0..n).contains(&index).then_some(index as usize)
}

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

/// Hugging Face's `config.json` for a `CLIPVisionModel` with this config (what the demo writes).
pub fn hf_config_json(config: &ClipVisionConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_channels": config.num_channels,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "hidden_act": match config.hidden_act { VisionActivation::QuickGelu => "quick_gelu", VisionActivation::Gelu => "gelu" },
        "layer_norm_eps": config.layer_norm_eps,
        "projection_dim": config.hidden_size,
        "torch_dtype": "float32",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use llava_checkpoint::{SaveDtype, WeightStore};

    /// `--quantize-vision`: every encoder-layer linear layer is held quantized, the tower
    /// computes what the float tower of the dequantized weights computes (the kernels are exact
    /// up to the order of float sums), stays near the float tower, and a saved quantized tower
    /// reloads quantized (without being asked) and saves to the same bytes.
    #[test]
    fn a_quantized_tower_is_the_float_tower_of_its_dequantized_weights_and_saves_as_it_is() {
        let device = Default::default();
        let config = ClipVisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 28,
            patch_size: 14,
            ..Default::default()
        };
        let float = config.init::<Flex>(&device);
        let dir = tempfile::tempdir().unwrap();
        let save = |model: &ClipVisionModel<Flex>, name: &str| {
            let mut e = Exporter::new();
            model.export(&mut e);
            let path = dir.path().join(name);
            e.save(&path, SaveDtype::Keep, &[]).unwrap();
            path
        };
        let float_file = save(&float, "float.safetensors");
        let store = WeightStore::open(&float_file).unwrap();
        let pixels = Tensor::<Flex, 4>::random([2, 3, 28, 28], Distribution::Normal(0.0, 1.0), &device);
        let values = |t: Tensor<Flex, 3>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        let reference = values(float.hidden_state(pixels.clone(), -2));
        for format in QuantFormat::ALL {
            let quantized =
                ClipVisionModel::load_quantized(&config, &Loader::new(&store, &device), Some(format)).unwrap();
            assert_eq!(quantized.quantization(), Some(format));
            for layer in &quantized.layers {
                let (a, m) = (&layer.self_attn, &layer.mlp);
                for linear in [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &m.fc1, &m.fc2] {
                    assert!(matches!(linear, AnyLinear::Quantized(q) if q.format == format), "{format}");
                }
            }
            let got = values(quantized.hidden_state(pixels.clone(), -2));
            let mut dequantized = quantized.clone();
            for layer in &mut dequantized.layers {
                let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
                for linear in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj, &mut m.fc1, &mut m.fc2] {
                    *linear = linear.clone().dequantized();
                }
            }
            let expected = values(dequantized.hidden_state(pixels.clone(), -2));
            for (g, e) in got.iter().zip(&expected) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{format}: {g} vs the dequantized tower's {e}");
            }
            // Quantization changed the features, by less than they spread.
            let worst = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let spread = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
            assert!(worst > 0.0 && worst < 0.25 * spread, "{format}: |Δ| {worst} against features up to {spread}");

            let saved = save(&quantized, "q.safetensors");
            let saved_store = WeightStore::open(&saved).unwrap();
            let reloaded = ClipVisionModel::<Flex>::load(&config, &Loader::new(&saved_store, &device)).unwrap();
            saved_store.ensure_all_used().unwrap();
            assert_eq!(reloaded.quantization(), Some(format));
            let again = save(&reloaded, "again.safetensors");
            assert_eq!(std::fs::read(&saved).unwrap(), std::fs::read(&again).unwrap(), "{format}");
        }
    }

    #[test]
    fn zero_sized_configs_are_errors_naming_the_field_not_divisions_by_zero() {
        for field in ["patch_size", "num_attention_heads", "hidden_size", "image_size"] {
            let json = serde_json::json!({ field: 0 });
            let err = ClipVisionConfig::from_hf_json(&json).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
