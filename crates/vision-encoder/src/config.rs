//! `ClipVisionConfig`: Hugging Face's `CLIPVisionConfig` with its names and defaults, read from
//! and written as its `config.json`, and a randomly initialised tower of it.

use std::path::Path;

use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LayerNormConfig, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use llava_kernels::AnyLinear;
use serde::{Deserialize, Serialize};

use crate::{ClipAttention, ClipEmbeddings, ClipEncoderLayer, ClipMlp, ClipVisionModel, VisionError};

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
pub(crate) fn hidden_state_index(layers: usize, select_layer: i64) -> Option<usize> {
    let n = layers as i64 + 1;
    let index = if select_layer < 0 { n + select_layer } else { select_layer };
    (0..n).contains(&index).then_some(index as usize)
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
