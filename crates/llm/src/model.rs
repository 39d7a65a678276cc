//! The decoder: attention (GQA), SwiGLU MLP, decoder layers, and `LlamaForCausalLM` (embeddings,
//! the stack, the LM head), with loading and export under Hugging Face names.

use burn::module::Module;
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};
use llava_checkpoint::{Exporter, Loader};
use llava_kernels::{AnyLinear, QuantFormat, add, attention, silu_mul};

use crate::{KvCache, LlamaConfig, LlmError, LoraLinear, Rotary};

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
