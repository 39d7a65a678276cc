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
//! `config.rs` holds [`ClipVisionConfig`] (Hugging Face's names) and `model.rs` the tower's
//! modules with their loading and export.
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

mod config;
mod model;

pub use config::{ClipVisionConfig, VisionActivation, hf_config_json};
pub use model::{ClipAttention, ClipEmbeddings, ClipEncoderLayer, ClipMlp, ClipVisionModel};

use llava_checkpoint::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tensor};
    use llava_checkpoint::{Exporter, Loader, SaveDtype, WeightStore};
    use llava_kernels::{AnyLinear, QuantFormat};

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
