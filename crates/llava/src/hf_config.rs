//! The two `config.json` layouts of LLaVA checkpoints as typed structs, read and written here
//! only: llava-hf's [`LlavaHfConfig`] (transformers' `LlavaConfig`, `model_type: "llava"`) and the
//! reference's [`OriginalLlavaConfig`] (`LlavaLlamaForCausalLM`: LLaMA's fields plus `mm_*`).
//!
//! Each keeps the fields this implementation does not use as read (`other`), so a config read
//! and written back loses nothing; a field of the wrong type is an error naming it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::SelectFeature;
use crate::load::LlavaConfig;
use llava_data::image::AspectMode;

/// Deserializes `json` into `T`, an error naming the field at fault.
fn parse<T: for<'de> Deserialize<'de>>(json: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(json.clone()).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) }
    })
}

/// llava-hf's `config.json` (e.g. llava-hf/llava-1.5-7b-hf). The towers' configs stay JSON here:
/// `ClipVisionConfig::from_hf_json` and `LlamaConfig::from_hf_json` read them with their own
/// defaults and checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaHfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: String,
    #[serde(default)]
    pub vision_config: Value,
    #[serde(default)]
    pub text_config: Value,
    /// The projector's activation (only `gelu` exists in LLaVA-1.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projector_hidden_act: Option<String>,
    /// One layer index (LLaVA-NeXT's lists of layers are not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_feature_layer: Option<i64>,
    /// `default` (drop the class token) or `full` (keep it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_feature_select_strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_token_index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_seq_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multimodal_projector_bias: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// Every other field, as read.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl LlavaHfConfig {
    pub fn from_json(json: &Value) -> Result<Self, String> {
        parse(json)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a config serializes")
    }

    /// The projector's activation (`gelu` when absent).
    pub fn projector_act(&self) -> &str {
        self.projector_hidden_act.as_deref().unwrap_or("gelu")
    }

    /// The vision tower's layer LLaVA reads (`-2` when absent).
    pub fn select_layer(&self) -> i64 {
        self.vision_feature_layer.unwrap_or(-2)
    }

    /// Which vision tokens the LLM sees.
    pub fn select_feature(&self) -> Result<SelectFeature, String> {
        match self.vision_feature_select_strategy.as_deref().unwrap_or("default") {
            "default" => Ok(SelectFeature::Patch),
            "full" => Ok(SelectFeature::ClsPatch),
            other => Err(format!("unknown vision_feature_select_strategy `{other}`")),
        }
    }

    /// The text config's `max_position_embeddings` (4096 when absent, LLaVA-1.5's).
    pub fn max_length(&self) -> usize {
        self.text_config.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize
    }

    /// The config of `config` as llava-hf writes it, with `<image>` as token `image_token` and
    /// the text config's vocabulary `vocab_size`.
    pub fn from_llava(config: &LlavaConfig, image_token: usize, vocab_size: usize) -> Self {
        let mut text = config.text.clone();
        text.vocab_size = vocab_size;
        Self {
            architectures: vec!["LlavaForConditionalGeneration".into()],
            model_type: "llava".into(),
            vision_config: llava_vision_encoder::hf_config_json(&config.vision),
            text_config: text.to_hf_json(),
            projector_hidden_act: Some("gelu".into()),
            vision_feature_layer: Some(config.select_layer),
            vision_feature_select_strategy: Some(
                match config.select_feature {
                    SelectFeature::Patch => "default",
                    SelectFeature::ClsPatch => "full",
                }
                .into(),
            ),
            image_token_index: Some(image_token as u64),
            image_seq_length: Some(config.image_tokens()),
            multimodal_projector_bias: Some(true),
            tie_word_embeddings: Some(config.text.tie_word_embeddings),
            torch_dtype: Some("float32".into()),
            other: Map::new(),
        }
    }
}

/// The reference's `config.json` (`LlavaLlamaForCausalLM`, e.g. liuhaotian/llava-v1.5-7b):
/// LLaMA's config (in `llm`, read by `LlamaConfig::from_hf_json`) plus the multimodal fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OriginalLlavaConfig {
    /// The CLIP tower: a hub name or a path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_vision_tower: Option<String>,
    /// `linear` when absent (the paper's projector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_projector_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_hidden_size: Option<usize>,
    /// `-1` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_vision_select_layer: Option<i64>,
    /// `patch` (when absent) or `cls_patch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_vision_select_feature: Option<String>,
    /// `square` (center crop, when absent) or `pad`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_aspect_ratio: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_use_im_start_end: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_use_im_patch_token: Option<bool>,
    /// 2048 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_model_max_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_padding_side: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_mm_proj: Option<bool>,
    /// LLaMA's fields and every other one, as read.
    #[serde(flatten)]
    pub llm: Map<String, Value>,
}

impl OriginalLlavaConfig {
    pub fn from_json(json: &Value) -> Result<Self, String> {
        parse(json)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a config serializes")
    }

    pub fn select_feature(&self) -> Result<SelectFeature, String> {
        match self.mm_vision_select_feature.as_deref().unwrap_or("patch") {
            "patch" => Ok(SelectFeature::Patch),
            "cls_patch" => Ok(SelectFeature::ClsPatch),
            other => Err(format!("unknown mm_vision_select_feature `{other}`")),
        }
    }

    pub fn image_aspect(&self) -> Result<AspectMode, String> {
        self.image_aspect_ratio.as_deref().unwrap_or("square").parse().map_err(|e| format!("image_aspect_ratio: {e}"))
    }

    pub fn select_layer(&self) -> i64 {
        self.mm_vision_select_layer.unwrap_or(-1)
    }

    pub fn max_length(&self) -> usize {
        self.tokenizer_model_max_length.unwrap_or(2048)
    }

    pub fn uses_im_start_end(&self) -> bool {
        self.mm_use_im_start_end == Some(true)
    }

    /// The config of `config` as the reference writes it, its tower at `vision_tower` (a path,
    /// relative to the model directory or absolute).
    pub fn from_llava(config: &LlavaConfig, vision_tower: &str) -> Self {
        let mut llm = match config.text.to_hf_json() {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        llm.insert("architectures".into(), serde_json::json!(["LlavaLlamaForCausalLM"]));
        llm.insert("model_type".into(), "llava_llama".into());
        Self {
            mm_vision_tower: Some(vision_tower.into()),
            mm_projector_type: Some(config.projector.name()),
            mm_hidden_size: Some(config.vision.hidden_size),
            mm_vision_select_layer: Some(config.select_layer),
            mm_vision_select_feature: Some(
                match config.select_feature {
                    SelectFeature::Patch => "patch",
                    SelectFeature::ClsPatch => "cls_patch",
                }
                .into(),
            ),
            image_aspect_ratio: Some(
                match config.image_aspect {
                    AspectMode::Pad => "pad",
                    _ => "square",
                }
                .into(),
            ),
            mm_use_im_start_end: Some(false),
            mm_use_im_patch_token: Some(false),
            tokenizer_model_max_length: Some(config.max_length),
            tokenizer_padding_side: Some("right".into()),
            use_mm_proj: Some(true),
            llm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields of the wrong type are errors naming the field; what is not modelled survives a
    /// read and a write.
    #[test]
    fn bad_fields_are_named_and_unknown_ones_are_kept() {
        let err = LlavaHfConfig::from_json(&serde_json::json!({"vision_feature_layer": [-2, -5]})).unwrap_err();
        assert!(err.contains("vision_feature_layer"), "{err}");
        let err = OriginalLlavaConfig::from_json(&serde_json::json!({"mm_use_im_start_end": "yes"})).unwrap_err();
        assert!(err.contains("mm_use_im_start_end"), "{err}");
        let json = serde_json::json!({"model_type": "llava", "quantization_config": {"format": "q4"}, "vocab_size": 7});
        let config = LlavaHfConfig::from_json(&json).unwrap();
        assert_eq!((config.select_layer(), config.select_feature().unwrap()), (-2, SelectFeature::Patch));
        assert_eq!(config.to_json()["quantization_config"]["format"], "q4");
        let json =
            serde_json::json!({"hidden_size": 64, "mm_vision_tower": "openai/clip", "image_aspect_ratio": "pad"});
        let config = OriginalLlavaConfig::from_json(&json).unwrap();
        assert_eq!(config.image_aspect().unwrap(), AspectMode::Pad);
        assert_eq!((config.select_layer(), config.max_length()), (-1, 2048));
        // A null is an absent field (older configs write some).
        let nulls = OriginalLlavaConfig::from_json(&serde_json::json!({"mm_vision_select_feature": null})).unwrap();
        assert_eq!(nulls.select_feature().unwrap(), SelectFeature::Patch);
        let written = config.to_json();
        assert_eq!(
            (written["hidden_size"].clone(), written["mm_vision_tower"].clone()),
            (64.into(), "openai/clip".into())
        );
    }
}
