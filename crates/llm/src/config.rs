//! `LlamaConfig`: Hugging Face's config with its names and defaults, read and written as its
//! `config.json`, and a randomly initialised model of it.

use std::path::Path;

use burn::module::Param;
use burn::nn::{EmbeddingConfig, LinearConfig, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Attention, DecoderLayer, LlamaModel, LlmError, Mlp};

/// Hugging Face `LlamaConfig`, with the same field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: String,
    pub bos_token_id: Option<u32>,
    /// A single id or a list (both occur in Hugging Face configs).
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<u32>,
    /// Only `null` / `{"rope_type": "default"}` are supported; anything else is refused at load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            bos_token_id: Some(1),
            eos_token_id: Some(serde_json::Value::from(2)),
            pad_token_id: None,
            rope_scaling: None,
        }
    }
}

impl LlamaConfig {
    pub fn from_hf_dir(dir: &Path) -> Result<Self, LlmError> {
        let path = dir.join("config.json");
        let err = |reason: String| LlmError::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        Self::from_hf_json(&json).map_err(err)
    }

    pub fn from_hf_json(json: &serde_json::Value) -> Result<Self, String> {
        let config: Self = serde_json::from_value(json.clone()).map_err(|e| format!("text config: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("head_dim", self.head_dim.unwrap_or(1)),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(format!("text config: {field} must be at least 1"));
            }
        }
        let finite = self.rms_norm_eps.is_finite() && self.rope_theta.is_finite();
        if !(finite && self.rms_norm_eps >= 0.0 && self.rope_theta > 0.0) {
            return Err(format!(
                "text config: rms_norm_eps {} must be finite and not negative, rope_theta {} finite and positive",
                self.rms_norm_eps, self.rope_theta
            ));
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act `{}` is not supported (LLaMA uses silu)", self.hidden_act));
        }
        if let Some(scaling) = &self.rope_scaling {
            let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str());
            if !scaling.is_null() && kind != Some("default") {
                return Err(format!("rope_scaling {scaling} is not supported"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The number of weights the model holds (as [`LlamaConfig::init`] or a loaded checkpoint
    /// holds them: the LM head counted unless tied). For memory plans: no weight is read.
    pub fn num_parameters(&self) -> u64 {
        let (d, inter) = (self.hidden_size as u64, self.intermediate_size as u64);
        let q = (self.num_attention_heads * self.head_dim()) as u64;
        let kv = (self.num_kv_heads() * self.head_dim()) as u64;
        let attention = d * q + 2 * d * kv + q * d + if self.attention_bias { q + 2 * kv + d } else { 0 };
        let mlp = 3 * d * inter + if self.mlp_bias { 2 * inter + d } else { 0 };
        let layer = attention + mlp + 2 * d;
        let embed = self.vocab_size as u64 * d;
        embed + self.num_hidden_layers as u64 * layer + d + if self.tie_word_embeddings { 0 } else { embed }
    }

    /// All end-of-sequence ids.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64().map(|n| n as u32)).collect(),
            _ => Vec::new(),
        }
    }

    /// The `config.json` Hugging Face's `LlamaForCausalLM` reads.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut json = serde_json::to_value(self).expect("config serialises");
        let obj = json.as_object_mut().expect("object");
        obj.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
        obj.insert("model_type".into(), "llama".into());
        obj.insert("num_key_value_heads".into(), self.num_kv_heads().into());
        obj.insert("head_dim".into(), self.head_dim().into());
        obj.insert("torch_dtype".into(), "float32".into());
        json
    }

    /// A randomly initialised model (normal std 0.02, RMSNorm weights 1, as Hugging Face).
    pub fn init<B: Backend>(&self, device: &B::Device) -> LlamaModel<B> {
        let d = self.hidden_size;
        let hd = self.head_dim();
        let normal = |i: usize, o: usize| Tensor::<B, 2>::random([i, o], Distribution::Normal(0.0, 0.02), device);
        let linear = |i: usize, o: usize, bias: bool| {
            let mut l = LinearConfig::new(i, o).with_bias(bias).init(device);
            l.weight = Param::from_tensor(normal(i, o));
            if bias {
                l.bias = Some(Param::from_tensor(Tensor::zeros([o], device)));
            }
            l
        };
        let norm = || RmsNormConfig::new(d).with_epsilon(self.rms_norm_eps).init(device);
        let mut embed_tokens = EmbeddingConfig::new(self.vocab_size, d).init(device);
        embed_tokens.weight = Param::from_tensor(normal(self.vocab_size, d));
        LlamaModel {
            embed_tokens,
            layers: (0..self.num_hidden_layers)
                .map(|_| DecoderLayer {
                    self_attn: Attention {
                        q_proj: linear(d, self.num_attention_heads * hd, self.attention_bias).into(),
                        k_proj: linear(d, self.num_kv_heads() * hd, self.attention_bias).into(),
                        v_proj: linear(d, self.num_kv_heads() * hd, self.attention_bias).into(),
                        o_proj: linear(self.num_attention_heads * hd, d, self.attention_bias).into(),
                        num_heads: self.num_attention_heads,
                        num_kv_heads: self.num_kv_heads(),
                        head_dim: hd,
                    },
                    mlp: Mlp {
                        gate_proj: linear(d, self.intermediate_size, self.mlp_bias).into(),
                        up_proj: linear(d, self.intermediate_size, self.mlp_bias).into(),
                        down_proj: linear(self.intermediate_size, d, self.mlp_bias).into(),
                    },
                    input_layernorm: norm(),
                    post_attention_layernorm: norm(),
                })
                .collect(),
            norm: norm(),
            lm_head: (!self.tie_word_embeddings).then(|| linear(d, self.vocab_size, false).into()),
            rope_theta: self.rope_theta,
            modules_to_save: Vec::new(),
        }
    }
}
