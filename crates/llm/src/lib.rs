//! The LLaMA / Vicuna decoder: RMSNorm, rotary position embeddings (Hugging Face's `rotate_half`
//! convention), SwiGLU MLPs and grouped-query attention, with a KV cache for generation.
//! Depends on `llava-checkpoint` (loading) and `llava-kernels` (layer operations) only; knows
//! nothing of images, tokenizers or training.
//!
//! The model works on embeddings, not only on token ids, because LLaVA splices image features
//! between token embeddings before the decoder runs: [`LlamaModel::embed`] gives the token
//! embeddings, [`LlamaModel::forward_embeds`] runs the decoder stack on any embeddings, and
//! [`LlamaModel::logits`] applies the LM head.
//!
//! ```no_run
//! use burn::backend::Flex;
//! use llava_llm::{KvCache, LlamaConfig, LlamaModel};
//! use llava_checkpoint::{Loader, WeightStore};
//!
//! let dir = std::path::Path::new("vicuna-7b-v1.5");
//! let config = LlamaConfig::from_hf_dir(dir)?;
//! let store = WeightStore::open(dir)?; // sharded pytorch_model-*.bin or safetensors
//! let device = Default::default();
//! // f16/bf16 checkpoints stay in half precision; `.with_dtype(Some(DType::F32))` widens them.
//! let model = LlamaModel::<Flex>::load_hf(&config, &Loader::new(&store, &device))?;
//! let ids = burn::tensor::Tensor::<Flex, 2, burn::tensor::Int>::from_ints([[1, 15043]], &device);
//! let mut cache = KvCache::new(config.num_hidden_layers);
//! let logits = model.forward_ids(ids, Some(&mut cache)); // [1, 2, vocab]
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Distribution, Int, Tensor, TensorData};
use llava_checkpoint::{Exporter, Loader, WeightsError};
use llava_kernels::attention;
use llava_kernels::{AnyLinear, QuantFormat};

pub mod lora;
use llava_kernels::{add, silu_mul};
pub use lora::{LoraAdapter, LoraConfig, LoraLinear};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
}

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

/// Keys and values of past positions, per layer, in buffers `[batch, capacity, kv_heads,
/// head_dim]` of which the first [`KvCache::len`] positions are filled. A step writes its new
/// keys and values after them (in place on the CPU backend) and attends to a view of the filled
/// part, instead of concatenating the whole cache anew; a full buffer doubles.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerCache<B>>>,
    /// Positions the buffers are first made with (at least the prompt's).
    reserve: usize,
}

#[derive(Debug, Clone)]
struct LayerCache<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers hold `positions` (prompt and new tokens) before they first grow.
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        Self { layers: vec![None; num_layers], reserve: positions }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions the buffers hold before they grow.
    pub fn capacity(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(self.reserve, |l| l.keys.dims()[1])
    }

    /// Keeps only the batch rows `rows` (in that order) and drops the first `drop_front`
    /// positions of every row: sequences leave a running batch, and the padding that only they
    /// needed goes with them. The buffers keep their room for new positions.
    ///
    /// # Panics
    /// When a row index is out of range or `drop_front` exceeds [`KvCache::len`] (a caller's bug).
    pub fn retain(&mut self, rows: &[usize], drop_front: usize) {
        for layer in self.layers.iter_mut().flatten() {
            let [b, capacity, h, d] = layer.keys.dims();
            assert!(drop_front <= layer.len && rows.iter().all(|&r| r < b), "retain: rows {rows:?} of {b}");
            if drop_front == 0 && rows.iter().copied().eq(0..b) {
                continue;
            }
            let device = layer.keys.device();
            let index = Tensor::<B, 1, Int>::from_data(
                TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]),
                &device,
            );
            let len = layer.len - drop_front;
            let keep = |buffer: &Tensor<B, 4>| {
                let filled = buffer.clone().slice([0..b, drop_front..layer.len]).select(0, index.clone());
                let room = llava_kernels::kv::zeros([rows.len(), capacity - drop_front, h, d], &device, buffer.dtype());
                llava_kernels::kv::assign_positions(room, 0, filled)
            };
            (layer.keys, layer.values) = (keep(&layer.keys), keep(&layer.values));
            layer.len = len;
        }
    }

    /// Stacks the rows of `self` and then `other` into one cache, aligned at their last position:
    /// the shorter one is padded at the front (with zeros the caller's attention mask must hide),
    /// and the buffers get room for `room` more positions. A cache without rows yet is `other`.
    ///
    /// # Panics
    /// When the two caches have different numbers of layers (a caller's bug).
    pub fn stack(self, other: Self, room: usize) -> Self {
        assert_eq!(self.layers.len(), other.layers.len(), "stack: caches of different models");
        let len = self.len().max(other.len());
        let layers = self
            .layers
            .into_iter()
            .zip(other.layers)
            .map(|pair| match pair {
                (Some(a), Some(b)) => {
                    let [_, _, h, d] = a.keys.dims();
                    let device = a.keys.device();
                    let rows = a.keys.dims()[0] + b.keys.dims()[0];
                    let aligned = |layer: &LayerCache<B>, buffer: &Tensor<B, 4>| {
                        let n = buffer.dims()[0];
                        let filled = buffer.clone().slice([0..n, 0..layer.len]);
                        match len - layer.len {
                            0 => filled,
                            pad => Tensor::cat(
                                vec![llava_kernels::kv::zeros([n, pad, h, d], &device, buffer.dtype()), filled],
                                1,
                            ),
                        }
                    };
                    let both = |x: &Tensor<B, 4>, y: &Tensor<B, 4>| {
                        let stacked = Tensor::cat(vec![aligned(&a, x), aligned(&b, y)], 0);
                        let buffer = llava_kernels::kv::zeros([rows, len + room, h, d], &device, x.dtype());
                        llava_kernels::kv::assign_positions(buffer, 0, stacked)
                    };
                    Some(LayerCache { keys: both(&a.keys, &b.keys), values: both(&a.values, &b.values), len })
                }
                (a, b) => a.or(b),
            })
            .collect();
        Self { layers, reserve: self.reserve.max(other.reserve) }
    }

    /// Appends layer `i`'s new keys and values `[batch, new, kv_heads, head_dim]` and returns
    /// all of its keys and values so far (views of the buffers).
    fn append(&mut self, i: usize, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s, h, d] = keys.dims();
        let (device, dtype) = (keys.device(), keys.dtype());
        let buffer = |positions: usize| llava_kernels::kv::zeros([b, positions, h, d], &device, dtype);
        // Taken out of the cache, so that the buffers have no other holder and are written in place.
        let LayerCache { keys: mut k_buf, values: mut v_buf, len } = self.layers[i].take().unwrap_or_else(|| {
            LayerCache { keys: buffer(self.reserve.max(s)), values: buffer(self.reserve.max(s)), len: 0 }
        });
        let capacity = k_buf.dims()[1];
        if len + s > capacity {
            // Double (amortised O(1) per position); the filled part moves to the new buffers.
            let grown = (2 * capacity).max(len + s);
            let grow =
                |old: Tensor<B, 4>| llava_kernels::kv::assign_positions(buffer(grown), 0, old.slice([0..b, 0..len]));
            (k_buf, v_buf) = (grow(k_buf), grow(v_buf));
        }
        let keys = llava_kernels::kv::assign_positions(k_buf, len, keys);
        let values = llava_kernels::kv::assign_positions(v_buf, len, values);
        let views = (keys.clone().slice([0..b, 0..len + s]), values.clone().slice([0..b, 0..len + s]));
        self.layers[i] = Some(LayerCache { keys, values, len: len + s });
        views
    }
}

/// Rotary embedding tables for given positions: `cos`, `sin` of shape `[batch, seq, 1, head_dim]`
/// (applied to q/k in the projections' `[batch, seq, heads, head_dim]` layout, where they are contiguous).
#[derive(Debug, Clone)]
pub struct Rotary<B: Backend> {
    cos: Tensor<B, 4>,
    /// `sin` with its first half negated: `rotate_half(x) * sin = swap_halves(x) * signed_sin`.
    signed_sin: Tensor<B, 4>,
}

impl<B: Backend> Rotary<B> {
    /// Computed as Hugging Face does, in f32: `inv_freq = theta^(-2i/d)`, angles = pos × inv_freq,
    /// duplicated over both halves of the head.
    pub fn new(positions: Tensor<B, 2, Int>, head_dim: usize, theta: f64) -> Self {
        let device = positions.device();
        let [b, s] = positions.dims();
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
        let inv_freq = Tensor::<B, 1>::from_data(TensorData::new(inv_freq, [half]), &device).reshape([1, 1, half]);
        let angles = positions.float().reshape([b, s, 1]) * inv_freq; // [b, s, half]
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        Self {
            cos: Tensor::cat(vec![cos.clone(), cos], 2).reshape([b, s, 1, head_dim]),
            signed_sin: Tensor::cat(vec![sin.clone().neg(), sin], 2).reshape([b, s, 1, head_dim]),
        }
    }

    /// `x * cos + rotate_half(x) * sin` on `[batch, seq, heads, head_dim]`.
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        llava_kernels::rope(x, &self.cos, &self.signed_sin)
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: LoraLinear<B>,
    pub k_proj: LoraLinear<B>,
    pub v_proj: LoraLinear<B>,
    pub o_proj: LoraLinear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    fn forward(
        &self, x: Tensor<B, 3>, rotary: &Rotary<B>, mask: Option<Tensor<B, 4, Bool>>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let hd = self.head_dim;
        // Everything stays in the projections' `[b, s, heads, head_dim]` layout: the attention
        // operation reads heads with a stride (and shared K/V heads directly, for GQA).
        let q = rotary.apply(self.q_proj.forward(x.clone()).reshape([b, s, self.num_heads, hd]));
        let mut k = rotary.apply(self.k_proj.forward(x.clone()).reshape([b, s, self.num_kv_heads, hd]));
        let mut v = self.v_proj.forward(x).reshape([b, s, self.num_kv_heads, hd]);
        if let Some((cache, layer)) = cache {
            (k, v) = cache.append(layer, k, v);
        }
        // Without a mask: causal, aligned bottom-right, so also right for a cached decode step.
        let causal = mask.is_none();
        let out = attention(q, k, v, mask, causal);
        self.o_proj.forward(out.reshape([b, s, self.num_heads * hd]))
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: LoraLinear<B>,
    pub up_proj: LoraLinear<B>,
    pub down_proj: LoraLinear<B>,
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj.forward(silu_mul(self.gate_proj.forward(x.clone()), self.up_proj.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub self_attn: Attention<B>,
    pub mlp: Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

/// `LlamaRMSNorm` (statistics in f32 whatever the activations' dtype; one threaded pass with its
/// own backward on the CPU backend).
fn rms_norm<B: Backend>(norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    llava_kernels::rms_norm(x, norm.gamma.val(), norm.epsilon)
}

/// `LlamaForCausalLM`: the decoder stack plus the LM head.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<AnyLinear<B>>,
    pub rope_theta: f64,
    /// With LoRA: the modules trained whole beside the adapters (PEFT's `modules_to_save`:
    /// `embed_tokens`, `lm_head`); see [`LlamaModel::freeze_base`].
    #[module(skip)]
    pub modules_to_save: Vec<String>,
}

impl<B: Backend> LlamaModel<B> {
    /// Token embeddings, `[batch, seq]` → `[batch, seq, hidden]`.
    /// They come in [`LlamaModel::activation_dtype`]: f32 on the CPU whatever the weights'
    /// dtype, the weights' own elsewhere.
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.embed_tokens.forward(ids).cast(self.activation_dtype())
    }

    /// The dtype the decoder's activations run in for this model's weights.
    pub fn activation_dtype(&self) -> DType {
        llava_kernels::activation_dtype::<B>(self.embed_tokens.weight.dtype())
    }

    pub fn hidden_size(&self) -> usize {
        self.embed_tokens.weight.dims()[1]
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.weight.dims()[0]
    }

    /// Runs the decoder on embeddings and returns the final-normed hidden states.
    ///
    /// * `positions` `[batch, seq]`: rotary positions of the new tokens (left-padded batches
    ///   start each row's real tokens at 0).
    /// * `mask` `[batch, 1, seq, past + seq]`, `true` = may not attend. `None` means plain causal
    ///   attention (no padding, or right padding whose pad rows are never read).
    /// * `cache`: past keys/values; the new ones are appended.
    pub fn forward_embeds(
        &self, x: Tensor<B, 3>, positions: Tensor<B, 2, Int>, mask: Option<Tensor<B, 4, Bool>>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let head_dim = self.layers.first().map_or(2, |l| l.self_attn.head_dim);
        let rotary = Rotary::new(positions, head_dim, self.rope_theta);
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| (c, i));
            let a = layer.self_attn.forward(rms_norm(&layer.input_layernorm, h.clone()), &rotary, mask.clone(), slot);
            h = add(h, a);
            let m = layer.mlp.forward(rms_norm(&layer.post_attention_layernorm, h.clone()));
            h = add(h, m);
        }
        rms_norm(&self.norm, h)
    }

    /// LM head: `[batch, seq, hidden]` → `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, d] = hidden.dims();
                let w = self.embed_tokens.weight.val(); // [vocab, d]
                let w = w.cast(hidden.dtype());
                let v = w.dims()[0];
                hidden.reshape([b * s, d]).matmul(w.transpose()).reshape([b, s, v])
            }
        }
    }

    /// Convenience: logits for token ids, continuing after whatever the cache holds.
    pub fn forward_ids(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let [b, s] = ids.dims();
        let past = cache.as_ref().map_or(0, |c| c.len());
        let device = ids.device();
        let positions =
            Tensor::<B, 1, Int>::arange(past as i64..(past + s) as i64, &device).reshape([1, s]).expand([b, s]);
        let hidden = self.forward_embeds(self.embed(ids), positions, None, cache);
        self.logits(hidden)
    }

    /// Loads `LlamaForCausalLM` weights with the standard names (`model.*`, `lm_head.*`) from
    /// the root of a checkpoint, in the loader's dtype (by default each tensor's stored one).
    pub fn load_hf(config: &LlamaConfig, root: &Loader<'_, B>) -> Result<Self, LlmError> {
        Self::load(config, &root.pp("model"), &root.pp("lm_head"))
    }

    /// Loads from arbitrary prefixes: `vb` holds `embed_tokens`, `layers`, `norm`; `lm_head` is
    /// the head's own prefix (e.g. `language_model.lm_head` in llava-hf checkpoints).
    pub fn load(config: &LlamaConfig, vb: &Loader<'_, B>, lm_head: &Loader<'_, B>) -> Result<Self, LlmError> {
        Self::load_quantized(config, vb, lm_head, None)
    }

    /// [`LlamaModel::load`], the linear layers quantized in `quantize` as they are read (layer by
    /// layer: no more than one float linear layer exists besides the quantized model; a layer
    /// whose input width is not a multiple of 32 stays float), the LM
    /// head in q8 whatever the format (its errors go straight into the logits; llama.cpp keeps
    /// it at 6-8 bits too). Layers saved quantized ([`LlamaModel::export`] of a quantized model)
    /// load as they are, with or without `quantize`.
    pub fn load_quantized(
        config: &LlamaConfig, vb: &Loader<'_, B>, lm_head: &Loader<'_, B>, quantize: Option<QuantFormat>,
    ) -> Result<Self, LlmError> {
        config.validate().map_err(|reason| LlmError::Config { path: "text config".into(), reason })?;
        let d = config.hidden_size;
        let hd = config.head_dim();
        let (nh, nkv) = (config.num_attention_heads, config.num_kv_heads());
        let eps = config.rms_norm_eps;
        let (ab, mb, im) = (config.attention_bias, config.mlp_bias, config.intermediate_size);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let m = l.pp("mlp");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: load_projection(&a, "q_proj", d, nh * hd, ab, quantize)?,
                    k_proj: load_projection(&a, "k_proj", d, nkv * hd, ab, quantize)?,
                    v_proj: load_projection(&a, "v_proj", d, nkv * hd, ab, quantize)?,
                    o_proj: load_projection(&a, "o_proj", nh * hd, d, ab, quantize)?,
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                },
                mlp: Mlp {
                    gate_proj: load_projection(&m, "gate_proj", d, im, mb, quantize)?,
                    up_proj: load_projection(&m, "up_proj", d, im, mb, quantize)?,
                    down_proj: load_projection(&m, "down_proj", im, d, mb, quantize)?,
                },
                input_layernorm: l.rms_norm("input_layernorm", d, eps)?,
                post_attention_layernorm: l.rms_norm("post_attention_layernorm", d, eps)?,
            });
        }
        let embed_tokens = vb.embedding("embed_tokens", config.vocab_size, d)?;
        let lm_head = if config.tie_word_embeddings {
            // A tied checkpoint may still carry a copy of the head; it is the same tensor.
            let head = lm_head.path("weight");
            lm_head.store().ignore_prefix(&head);
            None
        } else {
            let head_format = quantize.map(|_| QuantFormat::Q8);
            Some(lm_head.any_linear("", d, config.vocab_size, false, head_format)?)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm: vb.rms_norm("norm", d, eps)?,
            lm_head,
            rope_theta: config.rope_theta,
            modules_to_save: Vec::new(),
        })
    }

    /// The quantization of the decoder's linear layers (`None`: float; the first layer's
    /// `q_proj` tells, as every layer is loaded alike).
    pub fn quantization(&self) -> Option<QuantFormat> {
        match &self.layers.first()?.self_attn.q_proj.base {
            AnyLinear::Quantized(q) => Some(q.format),
            AnyLinear::Float(_) => None,
        }
    }

    /// Writes the weights as `LlamaForCausalLM` names under `model_scope` / `lm_head_scope`.
    pub fn export(&self, e: &mut Exporter, model_scope: &str, lm_head_scope: &str) {
        e.scope(model_scope, |e| {
            e.embedding("embed_tokens", &self.embed_tokens);
            for (i, l) in self.layers.iter().enumerate() {
                e.scope(format!("layers.{i}"), |e| {
                    e.scope("self_attn", |e| {
                        e.any_linear("q_proj", &l.self_attn.q_proj.base);
                        e.any_linear("k_proj", &l.self_attn.k_proj.base);
                        e.any_linear("v_proj", &l.self_attn.v_proj.base);
                        e.any_linear("o_proj", &l.self_attn.o_proj.base);
                    });
                    e.scope("mlp", |e| {
                        e.any_linear("gate_proj", &l.mlp.gate_proj.base);
                        e.any_linear("up_proj", &l.mlp.up_proj.base);
                        e.any_linear("down_proj", &l.mlp.down_proj.base);
                    });
                    e.rms_norm("input_layernorm", &l.input_layernorm);
                    e.rms_norm("post_attention_layernorm", &l.post_attention_layernorm);
                });
            }
            e.rms_norm("norm", &self.norm);
        });
        if let Some(head) = &self.lm_head {
            e.any_linear(lm_head_scope, head);
        }
    }
}

pub use llava_checkpoint::quantized_weight_name;

/// A decoder projection (no adapter; [`LlamaModel::with_lora`] / [`LlamaModel::load_lora`] add one).
fn load_projection<B: Backend>(
    vb: &Loader<'_, B>, name: &str, d_in: usize, d_out: usize, bias: bool, quantize: Option<QuantFormat>,
) -> Result<LoraLinear<B>, LlmError> {
    Ok(vb.any_linear(name, d_in, d_out, bias, quantize)?.into())
}

/// Attention mask for a batch whose rows have padding: `valid[b][j]` tells whether key position
/// `j` (over past + new positions) is a real token. Returns `[batch, 1, new, past + new]` with
/// `true` where attention is forbidden: future keys, and padding keys. A padding query row may
/// attend to itself only, so no row is fully masked (its output is never used).
pub fn padded_causal_mask<B: Backend>(valid: &[Vec<bool>], new: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let b = valid.len();
    let total = valid.first().map_or(0, Vec::len);
    let past = total - new;
    let mut mask = Vec::with_capacity(b * new * total);
    for row in valid {
        for q in 0..new {
            let qpos = past + q;
            for (k, real) in row.iter().enumerate() {
                mask.push(k > qpos || (!real && k != qpos));
            }
        }
    }
    Tensor::from_data(TensorData::new(mask, [b, 1, new, total]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn zero_sized_configs_are_errors_naming_the_field_not_divisions_by_zero() {
        for (field, json) in [
            ("num_attention_heads", serde_json::json!({"num_attention_heads": 0})),
            ("num_key_value_heads", serde_json::json!({"num_key_value_heads": 0})),
            ("hidden_size", serde_json::json!({"hidden_size": 0})),
            ("vocab_size", serde_json::json!({"vocab_size": 0})),
            ("rope_theta", serde_json::json!({"rope_theta": -1.0})),
        ] {
            let err = LlamaConfig::from_hf_json(&json).unwrap_err();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    /// A 2-layer GQA decoder seeded with 4 (also the LoRA tests' base).
    pub(crate) fn tiny(device: &<Flex as burn::tensor::backend::BackendTypes>::Device) -> LlamaModel<Flex> {
        let config = LlamaConfig {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            ..Default::default()
        };
        Flex::seed(device, 4);
        config.init(device)
    }

    fn close(a: Tensor<Flex, 3>, b: Tensor<Flex, 3>, what: &str) {
        let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{what}: {x} vs {y}");
        }
    }

    /// Feeding a batch of sequences a few tokens at a time through the cache gives the logits of
    /// the whole sequences at once, whether the buffers grow on the way or were reserved.
    #[test]
    fn cached_steps_equal_the_full_forward_with_growing_or_reserved_buffers() {
        let device = Default::default();
        let model = tiny(&device);
        let ids: Vec<i64> = (0..3 * 11).map(|i| (i * 17 + 3) % 50).collect();
        let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids, [3, 11]), &device);
        let full = model.forward_ids(ids.clone(), None);
        for reserve in [0, 4, 11, 40] {
            let mut cache = KvCache::with_capacity(2, reserve);
            let mut pieces = Vec::new();
            for (start, end) in [(0, 3), (3, 4), (4, 5), (5, 9), (9, 10), (10, 11)] {
                pieces.push(model.forward_ids(ids.clone().slice([0..3, start..end]), Some(&mut cache)));
                assert_eq!(cache.len(), end);
                assert!(cache.capacity() >= end);
            }
            if reserve >= 11 {
                assert_eq!(cache.capacity(), reserve, "a reserved cache does not grow");
            }
            close(Tensor::cat(pieces, 1), full.clone(), &format!("reserve {reserve}"));
        }
    }

    /// With room reserved, decoding steps write into the same buffers (no copy of the cache).
    #[test]
    fn reserved_buffers_are_written_in_place() {
        let device = Default::default();
        let model = tiny(&device);
        let ids = |v: Vec<i64>| Tensor::<Flex, 2, Int>::from_data(TensorData::new(v.clone(), [1, v.len()]), &device);
        let storage = |cache: &KvCache<Flex>| {
            let layer = cache.layers[1].as_ref().unwrap();
            llava_kernels::kv::storage_address(&layer.keys).expect("Flex reports its storage")
        };
        let mut cache = KvCache::with_capacity(2, 8);
        model.forward_ids(ids(vec![1, 2, 3]), Some(&mut cache));
        let first = storage(&cache);
        for t in 4..8 {
            model.forward_ids(ids(vec![t]), Some(&mut cache));
            assert_eq!(storage(&cache), first, "step {t} copied the cache");
        }
    }

    /// A cloned cache is a snapshot: appending to one leaves the other as it was.
    #[test]
    fn a_cloned_cache_is_not_changed_by_appends_to_the_original() {
        let device = Default::default();
        let model = tiny(&device);
        let ids = |v: Vec<i64>| Tensor::<Flex, 2, Int>::from_data(TensorData::new(v.clone(), [1, v.len()]), &device);
        let mut cache = KvCache::with_capacity(2, 16);
        model.forward_ids(ids(vec![1, 2, 3]), Some(&mut cache));
        let mut snapshot = cache.clone();
        model.forward_ids(ids(vec![4]), Some(&mut cache));
        let from_snapshot = model.forward_ids(ids(vec![7]), Some(&mut snapshot));
        let expected = model.forward_ids(ids(vec![1, 2, 3, 7]), None).slice([0..1, 3..4]);
        close(from_snapshot, expected, "snapshot");
    }
}
