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
//! One file per part: `config.rs` ([`LlamaConfig`], Hugging Face's names), `model.rs` (attention,
//! MLP, decoder layers, [`LlamaModel`] with its loading and export), `cache.rs` ([`KvCache`]),
//! `rope.rs` ([`Rotary`]), `lora.rs` (PEFT-style adapters).
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

mod cache;
mod config;
pub mod lora;
mod model;
mod rope;

pub use cache::KvCache;
pub use config::LlamaConfig;
pub use llava_checkpoint::quantized_weight_name;
pub use lora::{LoraAdapter, LoraConfig, LoraLinear};
pub use model::{Attention, DecoderLayer, LlamaModel, Mlp, padded_causal_mask};
pub use rope::Rotary;

use llava_checkpoint::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, Tensor, TensorData};

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
