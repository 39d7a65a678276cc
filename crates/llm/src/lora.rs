//! LoRA (Hu et al., 2021) as PEFT applies it to the LLaMA decoder, and its adapter files.
//!
//! A LoRA adapter adds a trainable low-rank update to a frozen linear layer:
//! `y = base(x) + lora_B(lora_A(dropout(x))) · α / r` (PEFT's `lora.Linear.forward`; `α / √r`
//! with `use_rslora`). `lora_A` starts uniform in ±1/√in (PEFT's `kaiming_uniform_(a=√5)`) and
//! `lora_B` at zero, so a fresh adapter changes nothing. The base layer may be float or
//! quantized (QLoRA: the frozen base in 4 bits, the adapter in f32).
//!
//! Files are PEFT's: `adapter_config.json` ([`LoraConfig`], PEFT's field names) and
//! `adapter_model.safetensors` with `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}
//! .lora_{A|B}.weight` (`A`: `[r, in]`, `B`: `[out, r]`, PyTorch's layout), so PEFT and the
//! LLaVA reference load what we write and we load what they write.
//!
//! # Shapes
//! * `lora_a`: `[in, r]`, `lora_b`: `[r, out]` (Burn's `[in, out]` convention, as `Linear`).
//! * [`LoraLinear::forward`]: `[batch, seq, in]` → `[batch, seq, out]`.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use llava_checkpoint::{Exporter, WeightStore};
use llava_kernels::AnyLinear;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{LlamaModel, LlmError};

/// The decoder's linear layers, the reference's `find_all_linear_names` for LLaMA (every
/// `nn.Linear` of the LLM but the LM head; the projector and vision tower are not in the LLM).
pub const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The prefix of PEFT's saved names for a `LlamaForCausalLM`-like model (also the reference's
/// `LlavaLlamaForCausalLM`, whose decoder is `model` too).
pub const PEFT_PREFIX: &str = "base_model.model.model.";

/// PEFT's `LoraConfig` (`adapter_config.json`), the fields this implementation reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    pub lora_alpha: f64,
    /// Dropout on the adapter's input, training only.
    pub lora_dropout: f64,
    /// Short names of the adapted layers (`q_proj`, …).
    pub target_modules: Vec<String>,
    /// Only `none` (biases stay frozen), as the reference's recipes.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Scaling `α / √r` instead of `α / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Where the base model is (a local path here).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Modules trained whole beside the adapters and saved in the adapter file: `embed_tokens`
    /// and/or `lm_head` (what a model with new or untrained vocabulary needs; the reference's
    /// recipes use none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub modules_to_save: Vec<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// The modules [`LoraConfig::modules_to_save`] may name.
pub const SAVABLE_MODULES: [&str; 2] = ["embed_tokens", "lm_head"];

fn bias_none() -> String {
    "none".into()
}

impl LoraConfig {
    /// The reference's `finetune_lora.sh`: r 128, α 256, dropout 0.05, every linear layer.
    pub fn reference() -> Self {
        Self {
            r: 128,
            lora_alpha: 256.0,
            lora_dropout: 0.05,
            target_modules: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
            bias: bias_none(),
            use_rslora: false,
            base_model_name_or_path: None,
            modules_to_save: Vec::new(),
        }
    }

    /// The factor of the low-rank update.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }

    /// Values this implementation cannot run, named.
    pub fn validate(&self) -> Result<(), String> {
        if self.r == 0 {
            return Err("r must be at least 1".into());
        }
        if !self.lora_alpha.is_finite() {
            return Err(format!("lora_alpha = {} is not a finite number", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!("lora_dropout = {} must be in [0, 1)", self.lora_dropout));
        }
        if self.bias != "none" {
            return Err(format!("bias = {:?}: only \"none\" is supported (the reference's setting)", self.bias));
        }
        if self.target_modules.is_empty() {
            return Err("target_modules is empty".into());
        }
        for m in &self.modules_to_save {
            if !SAVABLE_MODULES.contains(&m.as_str()) {
                return Err(format!("modules_to_save: `{m}` is not supported (expected some of {SAVABLE_MODULES:?})"));
            }
        }
        for m in &self.target_modules {
            if !ALL_LINEAR.contains(&m.as_str()) {
                return Err(format!(
                    "target_modules: `{m}` is not a decoder linear layer (expected some of {ALL_LINEAR:?})"
                ));
            }
        }
        Ok(())
    }

    /// Reads PEFT's `adapter_config.json` contents, refusing the options this implementation
    /// does not run (DoRA, per-layer ranks, layer subsets, regex targets, biases).
    pub fn from_peft_json(json: &serde_json::Value) -> Result<Self, String> {
        let peft_type = json.get("peft_type").and_then(|v| v.as_str()).unwrap_or("LORA");
        if peft_type != "LORA" {
            return Err(format!("peft_type = {peft_type:?}: only LORA adapters are supported"));
        }
        let unsupported = |field: &str, default_ok: &dyn Fn(&serde_json::Value) -> bool| match json.get(field) {
            Some(v) if !default_ok(v) => Err(format!("{field} = {v} is not supported")),
            _ => Ok(()),
        };
        unsupported("lora_bias", &|v| v == &serde_json::Value::Bool(false))?;
        unsupported("use_dora", &|v| v == &serde_json::Value::Bool(false))?;
        unsupported("fan_in_fan_out", &|v| v == &serde_json::Value::Bool(false))?;
        unsupported("layers_to_transform", &|v| v.is_null())?;
        unsupported("rank_pattern", &|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))?;
        unsupported("alpha_pattern", &|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))?;
        if json.get("target_modules").is_some_and(|v| v.is_string()) {
            return Err("target_modules is a regular expression; a list of layer names is supported".into());
        }
        let config: Self = serde_json::from_value(json.clone()).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, LlmError> {
        let path = dir.join("adapter_config.json");
        let err = |reason: String| LlmError::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        Self::from_peft_json(&json).map_err(err)
    }

    /// PEFT's `adapter_config.json` for this config (an inference-mode causal-LM LoRA).
    pub fn to_peft_json(&self) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "layers_to_transform": null,
            "layers_pattern": null,
            "modules_to_save": if self.modules_to_save.is_empty() { serde_json::Value::Null } else { self.modules_to_save.clone().into() },
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        })
    }
}

/// Parameters of the adapters `lora` adds to a decoder of `config`: `r · (in + out)` per
/// adapted layer.
pub fn lora_parameters(config: &crate::LlamaConfig, lora: &LoraConfig) -> u64 {
    let (d, inter) = (config.hidden_size as u64, config.intermediate_size as u64);
    let q = (config.num_attention_heads * config.head_dim()) as u64;
    let kv = (config.num_kv_heads() * config.head_dim()) as u64;
    let per_layer: u64 = ALL_LINEAR
        .iter()
        .zip([d + q, d + kv, d + kv, q + d, d + inter, d + inter, inter + d])
        .filter(|(name, _)| lora.target_modules.iter().any(|t| t == *name))
        .map(|(_, width)| width)
        .sum();
    per_layer * lora.r as u64 * config.num_hidden_layers as u64
}

/// One layer's low-rank update.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// `[r, out]`.
    pub lora_b: Param<Tensor<B, 2>>,
    pub scaling: f64,
    pub dropout: Dropout,
}

impl<B: Backend> LoraAdapter<B> {
    /// PEFT's initialisation: `lora_A` uniform in ±1/√in from a generator seeded with `seed`
    /// (the same values on every backend), `lora_B` zero; f32.
    pub fn init(d_in: usize, d_out: usize, config: &LoraConfig, seed: u64, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f32).sqrt();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Drawn in PEFT's `[r, in]` order, so row k of A is one rank's input weights.
        let a: Vec<f32> = (0..config.r * d_in).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Tensor::<B, 2>::from_data(TensorData::new(a, [config.r, d_in]), device).transpose();
        Self::from_parts(a, Tensor::zeros([config.r, d_out], device), config)
    }

    /// From `lora_a` `[in, r]` and `lora_b` `[r, out]`.
    pub fn from_parts(lora_a: Tensor<B, 2>, lora_b: Tensor<B, 2>, config: &LoraConfig) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            scaling: config.scaling(),
            dropout: DropoutConfig::new(config.lora_dropout).init(),
        }
    }

    /// The update of `x [batch, seq, in]`, `[batch, seq, out]`, in `x`'s dtype (dropout applies
    /// under autodiff only, as Burn's `Dropout`).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let (a, lb) = (self.lora_a.val(), self.lora_b.val());
        let out = lb.dims()[1];
        // As PEFT: the input cast to the adapter's dtype, the update cast back to the input's.
        let dtype = x.dtype();
        let x = self.dropout.forward(x).cast(a.dtype()).reshape([b * s, d]);
        (x.matmul(a).matmul(lb) * self.scaling).reshape([b, s, out]).cast(dtype)
    }

    /// `A · B · scaling`, `[in, out]`, f32.
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.lora_a.val().cast(DType::F32).matmul(self.lora_b.val().cast(DType::F32)) * self.scaling
    }

    /// `[in, r, out]`.
    pub fn dims(&self) -> [usize; 3] {
        let [d_in, r] = self.lora_a.dims();
        [d_in, r, self.lora_b.dims()[1]]
    }
}

/// A linear layer of the decoder: float or quantized, with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    pub base: AnyLinear<B>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> From<AnyLinear<B>> for LoraLinear<B> {
    fn from(base: AnyLinear<B>) -> Self {
        Self { base, lora: None }
    }
}

impl<B: Backend> From<Linear<B>> for LoraLinear<B> {
    fn from(linear: Linear<B>) -> Self {
        AnyLinear::Float(linear).into()
    }
}

impl<B: Backend> LoraLinear<B> {
    /// `[b, s, in]` → `[b, s, out]`: the base layer's output plus the adapter's update.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lora {
            None => self.base.forward(x),
            Some(lora) => self.base.forward(x.clone()) + lora.forward(x),
        }
    }

    /// Folds the adapter into a float base (`W + A·B·scaling`, computed in f32, stored in the
    /// base weight's dtype, as PEFT's `merge`); `None` when the base is quantized.
    pub fn merged(self) -> Option<Self> {
        let Some(lora) = self.lora else { return Some(self) };
        let AnyLinear::Float(mut linear) = self.base else { return None };
        let delta = lora.delta_weight();
        linear.weight = linear.weight.map(|w| {
            let (dtype, device) = (w.dtype(), w.device());
            (w.cast(DType::F32) + delta.to_device(&device)).cast(dtype)
        });
        Some(AnyLinear::Float(linear).into())
    }
}

impl<B: Backend> LlamaModel<B> {
    /// Every decoder linear layer with its name below the decoder (`layers.{i}.self_attn.q_proj`),
    /// layer by layer in [`ALL_LINEAR`] order.
    pub fn projections(&self) -> Vec<(String, &LoraLinear<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * ALL_LINEAR.len());
        for (i, l) in self.layers.iter().enumerate() {
            let (a, m) = (&l.self_attn, &l.mlp);
            for (name, p) in ALL_LINEAR.iter().zip([
                &a.q_proj,
                &a.k_proj,
                &a.v_proj,
                &a.o_proj,
                &m.gate_proj,
                &m.up_proj,
                &m.down_proj,
            ]) {
                out.push((format!("layers.{i}.{}.{name}", part_of(name)), p));
            }
        }
        out
    }

    /// [`LlamaModel::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut LoraLinear<B>)> {
        let mut out = Vec::with_capacity(self.layers.len() * ALL_LINEAR.len());
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for (name, p) in ALL_LINEAR.iter().zip([
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ]) {
                out.push((format!("layers.{i}.{}.{name}", part_of(name)), p));
            }
        }
        out
    }

    /// Adds a fresh adapter ([`LoraAdapter::init`]) to every layer `config.target_modules`
    /// names; layer `k` of the list above is seeded with `seed + k`.
    pub fn with_lora(mut self, config: &LoraConfig, seed: u64) -> Result<Self, LlmError> {
        config.validate().map_err(|reason| LlmError::Config { path: "LoRA config".into(), reason })?;
        for (k, (name, p)) in self.projections_mut().into_iter().enumerate() {
            if config.target_modules.iter().any(|t| name.ends_with(&format!(".{t}"))) {
                let [d_in, d_out] = p.base.dims();
                let device = p.base.device();
                p.lora = Some(LoraAdapter::init(d_in, d_out, config, seed.wrapping_add(k as u64), &device));
            }
        }
        self.modules_to_save = config.modules_to_save.clone();
        Ok(self)
    }

    /// Every parameter frozen (`require_grad = false`) but the adapters' and those of
    /// [`LlamaModel::modules_to_save`] (for LoRA training).
    pub fn freeze_base(self) -> Self {
        let adapters = self.lora_adapters();
        let mut model = self.no_grad();
        let trainable = adapters.into_iter().map(|a| a.map(|a| a.map(&mut RequireGrad))).collect();
        model.set_lora_adapters(trainable);
        if model.saves("embed_tokens") {
            model.embed_tokens = model.embed_tokens.map(&mut RequireGrad);
        }
        if model.saves("lm_head") {
            model.lm_head = model.lm_head.map(|h| h.map(&mut RequireGrad));
        }
        model
    }

    /// Whether `module` trains whole beside the adapters.
    pub fn saves(&self, module: &str) -> bool {
        self.modules_to_save.iter().any(|m| m == module)
    }

    /// Whether any layer carries an adapter.
    pub fn has_lora(&self) -> bool {
        self.projections().iter().any(|(_, p)| p.lora.is_some())
    }

    /// The LoRA config the adapters correspond to (rank, α = scaling · r, dropout, the adapted
    /// layers' names); `None` without adapters.
    pub fn lora_config(&self) -> Option<LoraConfig> {
        let projections = self.projections();
        let first = projections.iter().find_map(|(_, p)| p.lora.as_ref())?;
        let r = first.dims()[1];
        let target_modules = ALL_LINEAR
            .iter()
            .filter(|t| projections.iter().any(|(n, p)| p.lora.is_some() && n.ends_with(&format!(".{t}"))))
            .map(|t| t.to_string())
            .collect();
        Some(LoraConfig {
            r,
            lora_alpha: first.scaling * r as f64,
            lora_dropout: first.dropout.prob,
            target_modules,
            modules_to_save: self.modules_to_save.clone(),
            ..LoraConfig::reference()
        })
    }

    /// The adapters, in [`LlamaModel::projections`] order (`None` where a layer has none).
    pub fn lora_adapters(&self) -> Vec<Option<LoraAdapter<B>>> {
        self.projections().into_iter().map(|(_, p)| p.lora.clone()).collect()
    }

    /// Puts adapters back (as [`LlamaModel::lora_adapters`] returned them; layers past the
    /// end of `adapters` get none).
    pub fn set_lora_adapters(&mut self, adapters: Vec<Option<LoraAdapter<B>>>) {
        let mut adapters = adapters.into_iter();
        for (_, p) in self.projections_mut() {
            p.lora = adapters.next().flatten();
        }
    }

    /// The model with every adapter folded into its base layer (float bases only).
    pub fn merge_lora(mut self) -> Result<Self, LlmError> {
        for (name, p) in self.projections_mut() {
            let layer = std::mem::replace(p, LoraLinear { base: placeholder(&p.base), lora: None });
            *p = layer.merged().ok_or_else(|| LlmError::Config {
                path: name.clone(),
                reason: "a quantized layer cannot take a merged adapter; load the base model unquantized".into(),
            })?;
        }
        Ok(self)
    }

    /// Writes the adapters with PEFT's names (`{prefix}layers.{i}.self_attn.q_proj.lora_A.weight`
    /// `[r, in]`, `…lora_B.weight` `[out, r]`); `prefix` is usually [`PEFT_PREFIX`].
    /// The modules of [`LlamaModel::modules_to_save`] are written whole, under PEFT's names
    /// (`{prefix}embed_tokens.weight`; the head beside the decoder, `{prefix}../lm_head.weight`,
    /// i.e. `base_model.model.lm_head.weight` for [`PEFT_PREFIX`]).
    pub fn export_lora(&self, e: &mut Exporter, prefix: &str) {
        for (name, p) in self.projections() {
            if let Some(lora) = &p.lora {
                e.tensor(&format!("{prefix}{name}.lora_A.weight"), &lora.lora_a.val().transpose());
                e.tensor(&format!("{prefix}{name}.lora_B.weight"), &lora.lora_b.val().transpose());
            }
        }
        if self.saves("embed_tokens") {
            e.embedding(&format!("{prefix}embed_tokens"), &self.embed_tokens);
        }
        if let (true, Some(AnyLinear::Float(head))) = (self.saves("lm_head"), &self.lm_head) {
            e.linear(&format!("{}lm_head", head_prefix(prefix)), head);
        }
    }

    /// Adds the adapters of a PEFT adapter file (names as [`LlamaModel::export_lora`] writes
    /// them, under any prefix ending in `layers.`, with or without PEFT's `.default` adapter
    /// name), in f32, shape-checked against the base. Every target layer must have both
    /// matrices; tensors that are not LoRA matrices of this decoder are an error naming them.
    pub fn load_lora(mut self, config: &LoraConfig, store: &WeightStore) -> Result<Self, LlmError> {
        config.validate().map_err(|reason| LlmError::Config { path: "adapter_config.json".into(), reason })?;
        // `…layers.0.self_attn.q_proj.lora_A[.default].weight` by `layers.0.self_attn.q_proj.lora_A`.
        let by_key: std::collections::HashMap<String, String> = store
            .names()
            .filter_map(|n| {
                let key = n.strip_suffix(".weight")?;
                let key = key.strip_suffix(".default").unwrap_or(key);
                let key = &key[key.rfind("layers.")?..];
                Some((key.to_string(), n.to_string()))
            })
            .collect();
        let find = |layer: &str, which: &str| by_key.get(&format!("{layer}.lora_{which}")).cloned();
        let device = self.embed_tokens.weight.device();
        let mut loaded = 0;
        for (name, p) in self.projections_mut() {
            let targeted = config.target_modules.iter().any(|t| name.ends_with(&format!(".{t}")));
            let (a_name, b_name) = (find(&name, "A"), find(&name, "B"));
            let (a_name, b_name) = match (a_name, b_name) {
                (Some(a), Some(b)) => (a, b),
                (None, None) if !targeted => continue,
                (a, _) => {
                    let missing = if a.is_none() { "lora_A" } else { "lora_B" };
                    return Err(LlmError::Config {
                        path: store.files().first().map(|f| f.display().to_string()).unwrap_or_default(),
                        reason: format!("`{name}.{missing}.weight` is missing from the adapter"),
                    });
                }
            };
            let [d_in, d_out] = p.base.dims();
            let a = store.read(&a_name, &[config.r, d_in], Some(DType::F32))?;
            let b = store.read(&b_name, &[d_out, config.r], Some(DType::F32))?;
            let a = Tensor::<B, 2>::from_data(a, &device).transpose();
            let b = Tensor::<B, 2>::from_data(b, &device).transpose();
            p.lora = Some(LoraAdapter::from_parts(a, b, config));
            loaded += 1;
        }
        // Whole modules saved beside the adapters replace the base's.
        let whole = |module: &str| store.names().find(|n| n.ends_with(&format!("{module}.weight"))).map(str::to_string);
        if config.modules_to_save.iter().any(|m| m == "embed_tokens") {
            let name = whole("embed_tokens").ok_or_else(|| LlmError::Config {
                path: "adapter_model".into(),
                reason: "modules_to_save names embed_tokens, but the adapter file has no embed_tokens.weight".into(),
            })?;
            let [vocab, d] = self.embed_tokens.weight.dims();
            let dtype = self.embed_tokens.weight.dtype();
            let w = Tensor::<B, 2>::from_data(store.read(&name, &[vocab, d], Some(dtype))?, &device);
            self.embed_tokens.weight = Param::from_tensor(w);
        }
        if config.modules_to_save.iter().any(|m| m == "lm_head") && self.lm_head.is_some() {
            let name = whole("lm_head").ok_or_else(|| LlmError::Config {
                path: "adapter_model".into(),
                reason: "modules_to_save names lm_head, but the adapter file has no lm_head.weight".into(),
            })?;
            let [d, vocab] = self.lm_head.as_ref().expect("checked").dims();
            let w = store.read(&name, &[vocab, d], Some(DType::F32))?;
            let mut head = burn::nn::LinearConfig::new(d, vocab).with_bias(false).init(&device);
            head.weight = Param::from_tensor(Tensor::<B, 2>::from_data(w, &device).transpose());
            self.lm_head = Some(AnyLinear::Float(head));
        }
        self.modules_to_save = config.modules_to_save.clone();
        let unused: Vec<String> = store.unused().into_iter().filter(|n| n.contains("lora_")).collect();
        if let Some(first) = unused.first() {
            return Err(LlmError::Config {
                path: first.clone(),
                reason: format!("{} LoRA tensor(s) match no decoder layer of this model", unused.len()),
            });
        }
        tracing::debug!("{loaded} LoRA adapters loaded");
        Ok(self)
    }
}

/// Marks parameters trainable.
struct RequireGrad;

impl<B: Backend> burn::module::ModuleMapper<B> for RequireGrad {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| t.set_require_grad(true))
    }
}

/// `base_model.model.model.` → `base_model.model.` (the head is beside the decoder).
fn head_prefix(prefix: &str) -> String {
    match prefix.strip_suffix("model.") {
        Some(outer) if !prefix.is_empty() => outer.to_string(),
        _ => prefix.to_string(),
    }
}

/// `self_attn` or `mlp`.
fn part_of(name: &str) -> &'static str {
    if ALL_LINEAR[..4].contains(&name) { "self_attn" } else { "mlp" }
}

/// A zero-sized stand-in while a layer is moved out and back (never run).
fn placeholder<B: Backend>(like: &AnyLinear<B>) -> AnyLinear<B> {
    AnyLinear::Float(burn::nn::LinearConfig::new(1, 1).with_bias(false).init(&like.device()))
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::Int;

    use super::*;
    use crate::tests::tiny;

    type Device = <Flex as burn::tensor::backend::BackendTypes>::Device;

    fn config() -> LoraConfig {
        LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.0, ..LoraConfig::reference() }
    }

    fn ids(device: &Device) -> Tensor<Flex, 2, Int> {
        let v: Vec<i64> = (0..2 * 7).map(|i| (i * 13 + 5) % 50).collect();
        Tensor::from_data(TensorData::new(v, [2, 7]), device)
    }

    fn values(t: Tensor<Flex, 3>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// Every lora_B set to small random values, so the adapters change the output.
    fn perturbed(model: LlamaModel<Flex>, device: &Device) -> LlamaModel<Flex> {
        let mut model = model.with_lora(&config(), 7).unwrap();
        for (k, (_, p)) in model.projections_mut().into_iter().enumerate() {
            let lora = p.lora.as_mut().unwrap();
            let [r, out] = lora.lora_b.dims();
            Flex::seed(device, 100 + k as u64);
            lora.lora_b =
                Param::from_tensor(Tensor::random([r, out], burn::tensor::Distribution::Normal(0.0, 0.05), device));
        }
        model
    }

    /// PEFT initialises lora_B at zero: a fresh adapter leaves the logits exactly as they were.
    #[test]
    fn fresh_adapters_leave_the_logits_bit_identical() {
        let device = Default::default();
        let base = tiny(&device);
        let before = values(base.forward_ids(ids(&device), None));
        let adapted = base.with_lora(&config(), 1).unwrap();
        assert_eq!(adapted.projections().iter().filter(|(_, p)| p.lora.is_some()).count(), 14);
        assert_eq!(values(adapted.forward_ids(ids(&device), None)), before);
        // lora_A follows PEFT's bound 1/√in and is not all zero.
        for (name, p) in adapted.projections() {
            let a = p.lora.as_ref().unwrap().lora_a.val().into_data().to_vec::<f32>().unwrap();
            let bound = 1.0 / (p.base.dims()[0] as f32).sqrt();
            assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| *v != 0.0), "{name}");
        }
    }

    #[test]
    fn merged_adapters_give_the_unmerged_logits() {
        let device = Default::default();
        let base_model = tiny(&device);
        let model = perturbed(base_model.clone(), &device);
        let unmerged = values(model.forward_ids(ids(&device), None));
        let base = values(base_model.forward_ids(ids(&device), None));
        assert!(unmerged.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-3), "the adapters change the output");
        let merged = model.merge_lora().unwrap();
        assert!(!merged.has_lora());
        for (a, b) in values(merged.forward_ids(ids(&device), None)).iter().zip(&unmerged) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn saved_adapters_load_back_with_the_same_logits_and_config() {
        let device = Default::default();
        // One base, cloned: the backend's generator is shared with the tests running beside.
        let base = tiny(&device);
        let model = perturbed(base.clone(), &device);
        let expected = values(model.forward_ids(ids(&device), None));
        let dir = tempfile::tempdir().unwrap();
        let mut e = Exporter::new();
        model.export_lora(&mut e, PEFT_PREFIX);
        let file = dir.path().join("adapter_model.safetensors");
        e.save(&file, llava_checkpoint::SaveDtype::F32, &[]).unwrap();
        let config_json = model.lora_config().unwrap().to_peft_json();
        let read = LoraConfig::from_peft_json(&config_json).unwrap();
        assert_eq!(read, config());
        let store = WeightStore::open(&file).unwrap();
        let loaded = base.load_lora(&read, &store).unwrap();
        // The same values; the products may sum in another order (a transposed view).
        for (a, b) in values(loaded.forward_ids(ids(&device), None)).iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// `modules_to_save`: the embeddings and LM head travel in the adapter file under PEFT's names, replacing the base's when it loads.
    #[test]
    fn modules_to_save_train_and_travel_with_the_adapter() {
        let device = Default::default();
        let config = LoraConfig { modules_to_save: vec!["embed_tokens".into(), "lm_head".into()], ..config() };
        let base = tiny(&device);
        let mut model = base.clone().with_lora(&config, 7).unwrap();
        Flex::seed(&device, 11);
        model.embed_tokens.weight =
            Param::from_tensor(Tensor::random([50, 32], burn::tensor::Distribution::Normal(0.0, 1.0), &device));
        // (That they train, and nothing else of the base, is the trainer's test.)
        let expected = values(model.forward_ids(ids(&device), None));
        let mut e = Exporter::new();
        model.export_lora(&mut e, PEFT_PREFIX);
        let names: Vec<&str> = e.names().collect();
        assert!(names.contains(&"base_model.model.model.embed_tokens.weight"), "{names:?}");
        assert!(names.contains(&"base_model.model.lm_head.weight"), "{names:?}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adapter_model.safetensors");
        e.save(&file, llava_checkpoint::SaveDtype::F32, &[]).unwrap();
        let read = LoraConfig::from_peft_json(&model.lora_config().unwrap().to_peft_json()).unwrap();
        assert_eq!(read.modules_to_save, config.modules_to_save);
        let store = WeightStore::open(&file).unwrap();
        let loaded = base.load_lora(&read, &store).unwrap();
        for (a, b) in values(loaded.forward_ids(ids(&device), None)).iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let bad = LoraConfig { modules_to_save: vec!["norm".into()], ..config };
        assert!(bad.validate().unwrap_err().contains("norm"));
    }

    #[test]
    fn unsupported_or_incomplete_adapters_are_named_errors() {
        let mut json = config().to_peft_json();
        json["use_dora"] = true.into();
        assert!(LoraConfig::from_peft_json(&json).unwrap_err().contains("use_dora"));
        let mut json = config().to_peft_json();
        json["target_modules"] = "q_proj|v_proj".into();
        assert!(LoraConfig::from_peft_json(&json).unwrap_err().contains("regular expression"));
        let mut json = config().to_peft_json();
        json["target_modules"] = serde_json::json!(["lm_head"]);
        assert!(LoraConfig::from_peft_json(&json).unwrap_err().contains("lm_head"));

        // An adapter file missing one layer's lora_B.
        let device = Default::default();
        let model = perturbed(tiny(&device), &device);
        let mut e = Exporter::new();
        model.export_lora(&mut e, PEFT_PREFIX);
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full.safetensors");
        e.save(&full, llava_checkpoint::SaveDtype::F32, &[]).unwrap();
        let store = WeightStore::open(&full).unwrap();
        let mut partial = Exporter::new();
        for name in store.names().filter(|n| !n.contains("layers.1.mlp.up_proj.lora_B")) {
            partial.data(name, store.read(name, &store.info(name).unwrap().shape.clone(), None).unwrap());
        }
        let file = dir.path().join("partial.safetensors");
        partial.save(&file, llava_checkpoint::SaveDtype::F32, &[]).unwrap();
        let err = tiny(&device).load_lora(&config(), &WeightStore::open(&file).unwrap()).unwrap_err().to_string();
        assert!(err.contains("layers.1.mlp.up_proj.lora_B"), "{err}");
    }
}
