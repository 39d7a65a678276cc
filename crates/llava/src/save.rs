//! Writing a model as a directory other tools load.
//!
//! * An MLP (`mlp2x_gelu`) projector → the **llava-hf** layout (`LlavaForConditionalGeneration`),
//!   which Hugging Face transformers and this crate's loader read.
//! * A `linear` projector (the paper's) has no llava-hf equivalent (its projector is always two
//!   layers), so it is written in the **original LLaVA** layout: `LlavaLlamaForCausalLM` keys and
//!   config, with the CLIP tower beside it in `vision_tower/`, referenced by a relative path.
//!
//! Tensors keep the dtype they are held in (f32 masters as f32, half-precision towers as they
//! are), and frozen towers whose source checkpoint is named in [`FrozenSources`] are written
//! through from it unchanged; the folder is written whole or not at all.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use llava_checkpoint::{Exporter, SaveDtype, WeightStore};
use llava_projector::{ProjectorKind, ProjectorNaming};

use crate::LlavaError;
use crate::hf_config::{LlavaHfConfig, OriginalLlavaConfig};
use crate::load::LlavaConfig;
use crate::model::Llava;

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), LlavaError> {
    let text = serde_json::to_string_pretty(value).expect("json");
    llava_io::write_atomically(path, |w| w.write_all(text.as_bytes())).map_err(|e| LlavaError::config(path, e))
}

/// Copies the tokenizer files found in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<(), LlavaError> {
    for name in
        ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"]
    {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).map_err(|e| LlavaError::config(&src, e))?;
        }
    }
    Ok(())
}

/// The projector weights alone, as the reference's `mm_projector.bin` but in safetensors
/// (`model.mm_projector.*` keys), which stage 2 and the original LLaVA code load.
pub fn save_projector<B: Backend>(model: &Llava<B>, path: &Path) -> Result<(), LlavaError> {
    let mut e = Exporter::new();
    e.scope("model.mm_projector", |e| model.projector.export(ProjectorNaming::Original, e));
    e.save(path, SaveDtype::Keep, &[("format", "pt")])?;
    Ok(())
}

/// Checkpoints (Hugging Face directories) the frozen towers were loaded from. Their tensors are
/// written through unchanged, so the saved model holds the input's exact values and dtype even
/// when the run held the tower in another dtype (a bf16 run over an f32 checkpoint).
#[derive(Debug, Clone, Default)]
pub struct FrozenSources {
    /// A CLIP directory (`vision_model.*`, or a bare vision checkpoint).
    pub vision: Option<PathBuf>,
    /// A LLaMA directory (`model.*`, `lm_head.*`).
    pub llm: Option<PathBuf>,
}

impl FrozenSources {
    fn vision_store(&self) -> Result<Option<(Arc<WeightStore>, &'static str)>, LlavaError> {
        let Some(dir) = &self.vision else { return Ok(None) };
        let store = Arc::new(WeightStore::open(dir)?);
        let prefix = if store.has_prefix("vision_model.") { "vision_model" } else { "" };
        Ok(Some((store, prefix)))
    }

    fn llm_store(&self) -> Result<Option<Arc<WeightStore>>, LlavaError> {
        Ok(match &self.llm {
            Some(dir) => Some(Arc::new(WeightStore::open(dir)?)),
            None => None,
        })
    }
}

/// Writes the whole model into `dir` (see the module docs for the layout chosen). The folder is
/// complete or absent ([`llava_io::AtomicDir`]: written beside it, a `manifest.json` of every
/// file's SHA-256 last, then renamed into place, replacing an older `dir` whole).
pub fn save_model<B: Backend>(
    model: &Llava<B>, config: &LlavaConfig, dir: &Path, tokenizer_dir: &Path, frozen: &FrozenSources,
) -> Result<(), LlavaError> {
    let out = llava_io::AtomicDir::create(dir).map_err(|e| LlavaError::config(dir, e))?;
    copy_tokenizer_files(tokenizer_dir, out.path())?;
    match model.projector.kind {
        ProjectorKind::MlpGelu { depth: 2 } => save_llava_hf(model, config, out.path(), tokenizer_dir, frozen)?,
        _ => save_original(model, config, out.path(), frozen)?,
    }
    out.commit().map_err(|e| LlavaError::config(dir, e))?;
    Ok(())
}

/// Writes the LLM alone as a Hugging Face `LlamaForCausalLM` folder (`model.*`, `lm_head.*`,
/// `config.json`, the tokenizer files found in `tokenizer_dir`): what a text-only model (a plain
/// LLaMA / Vicuna directory) is saved as. Complete or absent, as [`save_model`].
pub fn save_llm<B: Backend>(
    model: &Llava<B>, config: &LlavaConfig, dir: &Path, tokenizer_dir: &Path,
) -> Result<(), LlavaError> {
    let out = llava_io::AtomicDir::create(dir).map_err(|e| LlavaError::config(dir, e))?;
    copy_tokenizer_files(tokenizer_dir, out.path())?;
    let mut e = Exporter::new();
    model.llm.export(&mut e, "model", "lm_head");
    e.save(&out.path().join("model.safetensors"), SaveDtype::Keep, &[("format", "pt")])?;
    let mut json = config.text.to_hf_json();
    if let Some(obj) = json.as_object_mut() {
        obj.insert("architectures".into(), serde_json::json!(["LlamaForCausalLM"]));
    }
    write_json(&out.path().join("config.json"), &with_quantization_config(json, model))?;
    out.commit().map_err(|e| LlavaError::config(dir, e))?;
    Ok(())
}

/// The LLM's tensors under `model_scope` / `lm_head_scope`, passed through from `frozen.llm`.
fn export_llm<B: Backend>(
    model: &Llava<B>, model_scope: &str, lm_head_scope: &str, frozen: &FrozenSources,
) -> Result<Exporter, LlavaError> {
    // A frozen LLM is only declared (names and shapes, checked against its source), never copied.
    let store = frozen.llm_store()?;
    let mut e = if store.is_some() { Exporter::declaring() } else { Exporter::new() };
    model.llm.export(&mut e, model_scope, lm_head_scope);
    if let Some(store) = store {
        e.pass_through(model_scope, &store, "model")?;
        e.pass_through(lm_head_scope, &store, "lm_head")?;
    }
    Ok(e)
}

/// The vision tower's tensors under `scope`, passed through from `frozen.vision`.
fn export_vision<B: Backend>(model: &Llava<B>, scope: &str, frozen: &FrozenSources) -> Result<Exporter, LlavaError> {
    let source = frozen.vision_store()?;
    let mut e = if source.is_some() { Exporter::declaring() } else { Exporter::new() };
    e.scope(scope, |e| model.vision.export(e));
    if let Some((store, prefix)) = source {
        e.pass_through(scope, &store, prefix)?;
    }
    Ok(e)
}

fn save_llava_hf<B: Backend>(
    model: &Llava<B>, config: &LlavaConfig, dir: &Path, tokenizer_dir: &Path, frozen: &FrozenSources,
) -> Result<(), LlavaError> {
    // Hugging Face's Llava embeds `input_ids` before replacing image tokens, so the `<image>`
    // token needs an id inside the vocabulary: as llava-hf's conversion does, `<image>` becomes
    // the next added token and the embedding matrices grow (to a multiple of 64) with mean rows.
    let tokenizer = llava_data::Tokenizer::from_path(tokenizer_dir)?;
    let image_token = match tokenizer.token_to_id("<image>") {
        Some(id) => id as usize,
        None => {
            let id = tokenizer.vocab_size();
            let added = dir.join("added_tokens.json");
            let mut map: serde_json::Map<String, serde_json::Value> =
                std::fs::read_to_string(&added).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
            map.insert("<image>".into(), id.into());
            write_json(&added, &serde_json::Value::Object(map))?;
            id
        }
    };
    let vocab = config.text.vocab_size.max((image_token + 1).div_ceil(64) * 64);
    if vocab > config.text.vocab_size && model.llm.quantization().is_some() {
        return Err(LlavaError::config(
            dir,
            "a quantized LLM whose vocabulary has no `<image>` token cannot be written in the llava-hf layout \
             (its LM head would need new rows); save the float model first, then quantize that",
        ));
    }
    // The towers' exporters may only declare their tensors (pass-through); the projector's
    // values go into an exporter of their own.
    let mut e = Exporter::new();
    e.extend(export_vision(model, "vision_tower.vision_model", frozen)?);
    e.scope("multi_modal_projector", |e| model.projector.export(ProjectorNaming::LlavaHf, e));
    e.extend(export_llm(model, "language_model.model", "language_model.lm_head", frozen)?);
    e.pad_rows_with_mean("language_model.model.embed_tokens.weight", vocab)?;
    e.pad_rows_with_mean("language_model.lm_head.weight", vocab)?;
    e.save(&dir.join("model.safetensors"), SaveDtype::Keep, &[("format", "pt")])?;
    let json = LlavaHfConfig::from_llava(config, image_token, vocab).to_json();
    let json = with_quantization_config(json, model);
    write_json(&dir.join("config.json"), &json)?;
    write_processor(&config.vision.image_size, dir)
}

fn save_original<B: Backend>(
    model: &Llava<B>, config: &LlavaConfig, dir: &Path, frozen: &FrozenSources,
) -> Result<(), LlavaError> {
    let tower_dir = dir.join("vision_tower");
    std::fs::create_dir_all(&tower_dir).map_err(|e| LlavaError::config(&tower_dir, e))?;
    let tower = export_vision(model, "vision_model", frozen)?;
    tower.save(&tower_dir.join("model.safetensors"), SaveDtype::Keep, &[("format", "pt")])?;
    let tower_json = quantization_config(
        llava_vision_encoder::hf_config_json(&config.vision),
        model.vision.quantization(),
        "encoder linear layers",
    );
    write_json(&tower_dir.join("config.json"), &tower_json)?;
    write_processor(&config.vision.image_size, &tower_dir)?;

    let mut e = Exporter::new();
    e.extend(export_llm(model, "model", "lm_head", frozen)?);
    e.scope("model.mm_projector", |e| model.projector.export(ProjectorNaming::Original, e));
    e.save(&dir.join("model.safetensors"), SaveDtype::Keep, &[("format", "pt")])?;
    let json = original_config_json(config, "vision_tower");
    write_json(&dir.join("config.json"), &with_quantization_config(json, model))
}

/// The original layout's `config.json` (`LlavaLlamaForCausalLM`) with `mm_vision_tower` naming
/// `vision_tower` (a path, relative to the model directory or absolute).
fn original_config_json(config: &LlavaConfig, vision_tower: &str) -> serde_json::Value {
    OriginalLlavaConfig::from_llava(config, vision_tower).to_json()
}

/// Writes a LoRA run's result into `dir` as the reference writes it (`finetune_lora.sh`'s output
/// folder), complete or absent: PEFT's `adapter_config.json` (`base_model_name_or_path` =
/// `base_llm`) and `adapter_model.safetensors` (f32), the projector as
/// `non_lora_trainables.bin` (`torch.save`'s format, `base_model.model.model.mm_projector.*`:
/// what the reference writes and `torch.load`s), an original-layout `config.json` whose `mm_vision_tower` is `vision_tower`, and the base's tokenizer files. [`crate::load`]
/// reads the folder as a model (base + adapter, unmerged); `cargo xtask merge-lora` merges it.
pub fn save_lora<B: Backend>(
    model: &Llava<B>, config: &LlavaConfig, dir: &Path, base_llm: &Path, vision_tower: &Path,
) -> Result<(), LlavaError> {
    let mut lora_config =
        model.llm.lora_config().ok_or_else(|| LlavaError::config(dir, "the model has no LoRA adapter to save"))?;
    let out = llava_io::AtomicDir::create(dir).map_err(|e| LlavaError::config(dir, e))?;
    copy_tokenizer_files(base_llm, out.path())?;
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    lora_config.base_model_name_or_path = Some(absolute(base_llm).display().to_string());
    write_json(&out.path().join("adapter_config.json"), &lora_config.to_peft_json())?;
    let mut e = Exporter::new();
    model.llm.export_lora(&mut e, llava_llm::lora::PEFT_PREFIX);
    e.save(&out.path().join("adapter_model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    let mut e = Exporter::new();
    e.scope("base_model.model.model.mm_projector", |e| model.projector.export(ProjectorNaming::Original, e));
    e.save_torch(&out.path().join(NON_LORA_TRAINABLES), SaveDtype::Keep)?;
    let tower = absolute(vision_tower).display().to_string();
    write_json(&out.path().join("config.json"), &original_config_json(config, &tower))?;
    out.commit().map_err(|e| LlavaError::config(dir, e))?;
    Ok(())
}

/// The projector's file in a LoRA folder.
pub const NON_LORA_TRAINABLES: &str = "non_lora_trainables.bin";

/// Adds `quantization_config` for a model whose LLM (and vision tower) is quantized: what was
/// done, for people and for tools (transformers refuses the unknown `quant_method` rather than
/// loading codes as weights). Loading reads the format from each tensor's name, not from here.
fn with_quantization_config<B: Backend>(json: serde_json::Value, model: &Llava<B>) -> serde_json::Value {
    let mut modules = Vec::new();
    if model.llm.quantization().is_some() {
        modules.push("language model linear layers; lm_head in q8");
    }
    if model.vision.quantization().is_some() {
        modules.push("vision tower encoder linear layers");
    }
    quantization_config(json, model.llm.quantization().or(model.vision.quantization()), &modules.join("; "))
}

fn quantization_config(
    mut json: serde_json::Value, format: Option<llava_kernels::QuantFormat>, modules: &str,
) -> serde_json::Value {
    if let (Some(format), Some(obj)) = (format, json.as_object_mut()) {
        obj.insert(
            "quantization_config".into(),
            serde_json::json!({
                "quant_method": "llava-rs",
                "format": format.name(),
                "block_size": llava_kernels::quant::BLOCK,
                "scale_dtype": "float16",
                "modules": modules,
                "layout": "<layer>.weight_<format>: U8 [out, in*bits/8] codes; <layer>.weight_scale: F16 [out, in/32]",
            }),
        );
    }
    json
}

fn write_processor(size: &usize, dir: &Path) -> Result<(), LlavaError> {
    let json = serde_json::json!({
        "crop_size": {"height": size, "width": size},
        "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": llava_data::image::CLIP_MEAN, "image_std": llava_data::image::CLIP_STD,
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": size},
    });
    write_json(&dir.join("preprocessor_config.json"), &json)
}
