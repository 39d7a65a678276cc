//! Finding and loading LLaVA checkpoints from a local directory, in three layouts:
//!
//! 1. **llava-hf** (`config.json` with `model_type: llava`): keys `language_model.model.*`,
//!    `language_model.lm_head.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`,
//!    or the newer `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
//!    `lm_head.*`.
//! 2. **original LLaVA** (`LlavaLlamaForCausalLM`, `mm_vision_tower`, …): the LLM under `model.*`,
//!    the projector under `model.mm_projector.*`, and the CLIP tower in its own directory named by
//!    `mm_vision_tower` (a path, relative to the model directory or absolute, or a hub name looked
//!    up in the local Hugging Face cache; nothing is downloaded).
//! 3. **separate parts**: a CLIP directory, an LLM directory and a projector file.
//!
//! Every tensor of the checkpoint must be consumed: leftovers are an error that lists them.

use llava_kernels::QuantFormat;
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use llava_checkpoint::{Loader, WeightStore};
use llava_data::Tokenizer;
use llava_data::image::{AspectMode, ProcessorConfig};
use llava_llm::{LlamaConfig, LlamaModel, LoraConfig};
use llava_projector::{Projector, ProjectorConfig, ProjectorKind, ProjectorNaming};
use llava_vision_encoder::{ClipVisionConfig, ClipVisionModel};
use serde::{Deserialize, Serialize};

use crate::LlavaError;
use crate::hf_config::{LlavaHfConfig, OriginalLlavaConfig};
use crate::model::{Llava, SelectFeature};

/// Everything needed to build a [`Llava`] and feed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    pub vision: ClipVisionConfig,
    pub text: LlamaConfig,
    pub projector: ProjectorKind,
    /// Python-style index into the vision tower's hidden states (`-2` in every LLaVA).
    pub select_layer: i64,
    pub select_feature: SelectFeature,
    pub image_aspect: AspectMode,
    /// Longest spliced sequence (`tokenizer_model_max_length`).
    pub max_length: usize,
}

impl LlavaConfig {
    pub fn projector_config(&self) -> ProjectorConfig {
        ProjectorConfig {
            kind: self.projector,
            vision_hidden: self.vision.hidden_size,
            text_hidden: self.text.hidden_size,
        }
    }

    /// Image tokens per image after feature selection.
    pub fn image_tokens(&self) -> usize {
        self.vision.num_patches() + usize::from(self.select_feature == SelectFeature::ClsPatch)
    }

    pub fn validate(&self) -> Result<(), String> {
        self.vision.validate()?;
        self.text.validate()?;
        if self.vision.hidden_state_index(self.select_layer).is_none() {
            return Err(format!(
                "select_layer {} is out of range for a {}-layer vision tower",
                self.select_layer, self.vision.num_hidden_layers
            ));
        }
        Ok(())
    }

    /// A randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llava<B> {
        Llava {
            vision: self.vision.init(device),
            projector: self.projector_config().init(device),
            llm: self.text.init(device),
            select_layer: self.select_layer,
            select_feature: self.select_feature,
        }
    }
}

/// Where the pieces of a checkpoint are.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// CLIP directory to use instead of the one `mm_vision_tower` names (original layout).
    pub vision_tower: Option<PathBuf>,
    /// Hugging Face hub cache (default: `$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`).
    pub hf_cache: Option<PathBuf>,
    /// Override of the image aspect mode the checkpoint's config implies.
    pub image_aspect: Option<AspectMode>,
    /// The dtype every weight is held in; `None` keeps each tensor's stored dtype (an f16 or
    /// bf16 checkpoint stays half precision; f32 where the backend has no half types).
    pub dtype: Option<DType>,
    /// Quantize the LLM's linear layers as they load (weight-only; the LM head in q8, embeddings,
    /// norms, projector and, unless `quantize_vision`, the vision tower in their float dtype).
    /// Layers saved quantized load quantized whatever this says.
    pub quantize: Option<QuantFormat>,
    /// Quantize the vision tower's encoder layers too, in `quantize`'s format (the reference's
    /// `--load-4bit` quantizes every linear layer, the tower's included; its patch embedding,
    /// position embeddings and LayerNorms stay float here as there).
    pub quantize_vision: bool,
    /// A LoRA folder's base LLM directory, instead of its `base_model_name_or_path`.
    pub lora_base: Option<PathBuf>,
}

/// The `--dtype` a user asks weights in: `auto` (each tensor as stored), `f32`, `f16` or `bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WeightsDtype(pub Option<DType>);

impl std::str::FromStr for WeightsDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "stored" => Ok(Self(None)),
            "f32" | "float32" | "fp32" => Ok(Self(Some(DType::F32))),
            "f16" | "float16" | "fp16" | "half" => Ok(Self(Some(DType::F16))),
            "bf16" | "bfloat16" => Ok(Self(Some(DType::BF16))),
            other => Err(format!("unknown dtype `{other}` (expected auto, f32, f16 or bf16)")),
        }
    }
}

/// Which layout a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    LlavaHf,
    Original,
    /// A plain LLaMA directory: text-only generation.
    TextOnly,
}

/// A loaded model with what is needed to use it.
pub struct LoadedLlava<B: Backend> {
    pub model: Llava<B>,
    pub config: LlavaConfig,
    pub processor: ProcessorConfig,
    /// `None` when the directory has no tokenizer files.
    pub tokenizer: Option<Tokenizer>,
    pub layout: Layout,
    /// False for a plain LLM directory (the vision tower is a random placeholder, never used).
    pub has_vision: bool,
}

impl<B: Backend> LoadedLlava<B> {
    /// The ids that end generation: the model config's EOS ids and the tokenizer's.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.config.text.eos_ids();
        ids.extend(self.tokenizer.as_ref().and_then(|t| t.eos_id()));
        ids
    }

    /// A raw prompt's ids (BOS first, -200 at `<image>`, as the reference's
    /// `tokenizer_image_token`) and the image's pixels `[1, 3, H, W]`, checked against each
    /// other: an image needs exactly one `<image>` in the prompt, and `<image>` needs an image.
    pub fn prompt_inputs(
        &self, prompt: &str, image: Option<&Path>,
    ) -> Result<(Vec<i64>, Option<Tensor<B, 4>>), LlavaError> {
        let tokenizer = self.tokenizer.as_ref().ok_or(LlavaError::NoTokenizer)?;
        let markers = prompt.matches(llava_data::DEFAULT_IMAGE_TOKEN).count();
        if image.is_some() && !self.has_vision {
            return Err(LlavaError::NoVisionTower { layout: format!("{:?}", self.layout) });
        }
        if markers != usize::from(image.is_some()) {
            return Err(LlavaError::ImageCount { markers, images: usize::from(image.is_some()) });
        }
        let device = self.model.llm.embed_tokens.weight.device();
        let pixels = image
            .map(|path| crate::image_tensor::<B>(path, &self.processor, self.config.image_aspect, &device))
            .transpose()?;
        let ids = llava_data::tokenizer_image_token(tokenizer, prompt);
        self.check_context(&ids)?;
        Ok((ids, pixels))
    }

    /// The length of a prompt once its images are spliced in, refused when it does not fit the
    /// model's context (`max_position_embeddings`): past it, RoPE positions the model never saw
    /// give meaningless output, which is worse than an error.
    pub fn check_context(&self, ids: &[i64]) -> Result<usize, LlavaError> {
        self.config.prompt_length(ids)
    }
}

impl LlavaConfig {
    /// The length of a prompt (`-200` where an image goes) once its images are spliced in,
    /// refused when it does not fit the context (`max_position_embeddings`).
    pub fn prompt_length(&self, ids: &[i64]) -> Result<usize, LlavaError> {
        let images = ids.iter().filter(|&&t| t == llava_data::IMAGE_TOKEN_INDEX).count();
        let image_tokens = self.image_tokens();
        let tokens = ids.len() - images + images * image_tokens;
        let context = self.text.max_position_embeddings;
        if tokens > context {
            return Err(LlavaError::PromptTooLong { tokens, images, image_tokens, context });
        }
        Ok(tokens)
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, LlavaError> {
    let text = std::fs::read_to_string(path).map_err(|e| LlavaError::config(path, e))?;
    serde_json::from_str(&text).map_err(|e| LlavaError::config(path, e))
}

/// Detects the layout of a model directory from its `config.json`.
pub fn detect_layout(config: &serde_json::Value) -> Layout {
    let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let archs: Vec<&str> = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if config.get("mm_vision_tower").is_some()
        || archs.iter().any(|a| a.starts_with("LlavaLlama"))
        || model_type == "llava_llama"
    {
        Layout::Original
    } else if model_type == "llava" || config.get("vision_config").is_some() {
        Layout::LlavaHf
    } else {
        Layout::TextOnly
    }
}

/// Loads whatever `dir` holds.
pub fn load_dir<B: Backend>(
    dir: &Path, options: &LoadOptions, device: &B::Device,
) -> Result<LoadedLlava<B>, LlavaError> {
    let resolved = resolve_dir(dir, options)?;
    let tokenizer = load_tokenizer_if_present(dir)?;
    resolved.load(tokenizer, options, device)
}

impl LoadOptions {
    /// The format the vision tower's linear layers are quantized in as they load (`None`: float).
    pub fn vision_quantize(&self) -> Option<QuantFormat> {
        self.quantize.filter(|_| self.quantize_vision)
    }
}

/// What a model directory holds, read from its configs and checkpoint headers only (no weight
/// is read): enough for a memory plan, and what [`load_dir`] then loads.
pub struct ModelSource {
    pub layout: Layout,
    pub config: LlavaConfig,
    /// False for a plain LLM directory.
    pub has_vision: bool,
    store: WeightStore,
    /// The CLIP tower's own checkpoint (original layout, tower not embedded).
    tower_store: Option<WeightStore>,
    prefixes: Prefixes,
    naming: ProjectorNaming,
    processor_dir: PathBuf,
    /// A LoRA folder's adapters (PEFT config and file), added to the LLM as it loads.
    adapter: Option<(LoraConfig, WeightStore)>,
}

/// Where each part's tensors are named in its store.
struct Prefixes {
    vision: &'static str,
    projector: &'static str,
    llm: &'static str,
    head: &'static str,
}

/// The dtype each part is stored in (the dtype holding most of its bytes; `None` when the part
/// has no floating-point tensors in the checkpoint, e.g. a text-only directory's vision tower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartDtypes {
    pub vision: Option<DType>,
    pub projector: Option<DType>,
    pub llm: Option<DType>,
}

impl ModelSource {
    /// Each part's stored dtype, from the checkpoint headers.
    pub fn stored_dtypes(&self) -> PartDtypes {
        let vision = if !self.has_vision {
            None
        } else if let Some(tower) = &self.tower_store {
            tower.dominant_dtype("")
        } else {
            self.store.dominant_dtype(self.prefixes.vision)
        };
        PartDtypes {
            vision,
            projector: if self.has_vision { self.store.dominant_dtype(self.prefixes.projector) } else { None },
            llm: self.store.dominant_dtype(self.prefixes.llm),
        }
    }

    /// Whether the LLM's input embedding table is read as a memory map of its file when held in
    /// its stored dtype: generation then reads only the rows of its tokens, and the rest of the
    /// table never becomes resident (what a memory plan of the CPU counts).
    pub fn maps_input_embeddings(&self) -> bool {
        let prefix = self.prefixes.llm;
        self.store
            .names()
            .find(|n| n.starts_with(prefix) && n.ends_with("embed_tokens.weight"))
            .is_some_and(|n| self.store.maps(n))
    }

    /// The format of the LLM's linear layers when saved quantized (`None`: float weights).
    pub fn stored_quantization(&self) -> Option<QuantFormat> {
        // The decoder's layers (under the original layout's `model.`, the tower and projector
        // sit beside them).
        quantization_in(&self.store, &format!("{}.layers.", self.prefixes.llm))
    }

    /// The format of the vision tower's linear layers when saved quantized (`None`: float).
    pub fn stored_vision_quantization(&self) -> Option<QuantFormat> {
        match &self.tower_store {
            Some(tower) => quantization_in(tower, ""),
            None if self.has_vision => quantization_in(&self.store, &format!("{}.", self.prefixes.vision)),
            None => None,
        }
    }

    /// Loads the weights, held as `options` say (its `dtype`, `quantize` and `quantize_vision`).
    pub fn load<B: Backend>(
        self, tokenizer: Option<Tokenizer>, options: &LoadOptions, device: &B::Device,
    ) -> Result<LoadedLlava<B>, LlavaError> {
        let Self { layout, config, has_vision, store, tower_store, prefixes, naming, processor_dir, adapter } = self;
        let (dtype, vision_quantize) = (options.dtype, options.vision_quantize());
        let root = Loader::<B>::new(&store, device).with_dtype(dtype);
        let mut llm = LlamaModel::load_quantized(
            &config.text,
            &root.pp(prefixes.llm),
            &root.pp(prefixes.head),
            options.quantize,
        )?;
        if let Some((lora, adapter_store)) = adapter {
            llm = llm.load_lora(&lora, &adapter_store)?;
            adapter_store.ensure_all_used()?;
        }
        if !has_vision {
            store.ensure_all_used()?;
            // A minimal placeholder tower keeps one model type for both cases; it is never run.
            let model = Llava {
                vision: config.vision.init(device),
                projector: config.projector_config().init(device),
                llm,
                select_layer: config.select_layer,
                select_feature: config.select_feature,
            };
            let processor = ProcessorConfig::clip(config.vision.image_size);
            return Ok(LoadedLlava { model, config, processor, tokenizer, layout, has_vision });
        }
        let vision = match &tower_store {
            Some(tower) => {
                let tower_loader = Loader::new(tower, device).with_dtype(dtype);
                let model = ClipVisionModel::load_hf_quantized(&config.vision, &tower_loader, vision_quantize)?;
                tower.ensure_all_used()?;
                model
            }
            None => ClipVisionModel::load_quantized(&config.vision, &root.pp(prefixes.vision), vision_quantize)?,
        };
        let model = Llava {
            vision,
            projector: Projector::load(&config.projector_config(), naming, &root.pp(prefixes.projector))?,
            llm,
            select_layer: config.select_layer,
            select_feature: config.select_feature,
        };
        store.ensure_all_used()?;
        let processor = processor_for(&processor_dir, &config)?;
        Ok(LoadedLlava { model, config, processor, tokenizer, layout, has_vision })
    }
}

/// Reads `dir`'s configs and checkpoint headers: its layout, the model's configuration and where
/// every part's tensors are (see [`ModelSource`]).
///
/// A LoRA folder (`adapter_config.json`, as [`crate::save::save_lora`] and the reference's
/// `finetune_lora.sh` write it) resolves to its base LLM, its vision tower and projector, and
/// its adapters, added unmerged.
pub fn resolve_dir(dir: &Path, options: &LoadOptions) -> Result<ModelSource, LlavaError> {
    if dir.join("adapter_config.json").is_file() {
        return resolve_lora(dir, options);
    }
    let json = read_json(&dir.join("config.json"))?;
    match detect_layout(&json) {
        Layout::LlavaHf => resolve_llava_hf(dir, &json, options),
        Layout::Original => resolve_original(dir, &json, options, None),
        Layout::TextOnly => resolve_text_only(dir, &json),
    }
}

fn resolve_llava_hf(dir: &Path, json: &serde_json::Value, options: &LoadOptions) -> Result<ModelSource, LlavaError> {
    let config_path = dir.join("config.json");
    let bad = |reason: String| LlavaError::config(&config_path, reason);
    let hf = LlavaHfConfig::from_json(json).map_err(bad)?;
    let vision = ClipVisionConfig::from_hf_json(&hf.vision_config).map_err(bad)?;
    let text_json = if hf.text_config.is_null() { serde_json::json!({}) } else { hf.text_config.clone() };
    let text = LlamaConfig::from_hf_json(&text_json).map_err(bad)?;
    if hf.projector_act() != "gelu" {
        return Err(bad(format!("projector_hidden_act `{}` is not supported (gelu only)", hf.projector_act())));
    }
    let select_layer = hf.select_layer();
    let select_feature = hf.select_feature().map_err(bad)?;
    let store = WeightStore::open(dir)?;
    let prefixes = if store.has_prefix("model.language_model.") {
        Prefixes {
            llm: "model.language_model",
            head: "lm_head",
            vision: "model.vision_tower.vision_model",
            projector: "model.multi_modal_projector",
        }
    } else {
        Prefixes {
            llm: "language_model.model",
            head: "language_model.lm_head",
            vision: "vision_tower.vision_model",
            projector: "multi_modal_projector",
        }
    };
    let (projector, naming) = ProjectorConfig::detect(&store, prefixes.projector)
        .ok_or_else(|| bad(format!("no projector weights under `{}` in {}", prefixes.projector, dir.display())))?;
    let config = LlavaConfig {
        vision,
        text,
        projector,
        select_layer,
        select_feature,
        image_aspect: options.image_aspect.unwrap_or(AspectMode::Crop),
        max_length: hf.max_length(),
    };
    config.validate().map_err(bad)?;
    Ok(ModelSource {
        layout: Layout::LlavaHf,
        config,
        has_vision: true,
        store,
        tower_store: None,
        prefixes,
        naming,
        processor_dir: dir.to_path_buf(),
        adapter: None,
    })
}

/// The projector's names in a LoRA folder's `non_lora_trainables` file.
const LORA_PROJECTOR_PREFIX: &str = "base_model.model.model.mm_projector";

fn resolve_lora(dir: &Path, options: &LoadOptions) -> Result<ModelSource, LlavaError> {
    let lora = LoraConfig::from_dir(dir)?;
    let adapter_config = dir.join("adapter_config.json");
    let base =
        options.lora_base.clone().or_else(|| lora.base_model_name_or_path.as_ref().map(PathBuf::from)).ok_or_else(
            || LlavaError::config(&adapter_config, "base_model_name_or_path is missing: give the base LLM directory"),
        )?;
    let base = if base.is_relative() && !base.exists() { dir.join(base) } else { base };
    if !base.join("config.json").is_file() {
        return Err(LlavaError::config(
            &adapter_config,
            format!("the base model {} is not a local model directory (nothing is downloaded)", base.display()),
        ));
    }
    let projector_file = file_of(dir, "non_lora_trainables", "no projector")?;
    let adapter_file = file_of(dir, "adapter_model", "no adapters")?;
    let mut files = WeightStore::open(&base)?.files().to_vec();
    files.push(projector_file);
    let store = WeightStore::open_files(&files)?;
    let json = read_json(&dir.join("config.json"))?;
    let mut source = resolve_original(dir, &json, options, Some((store, LORA_PROJECTOR_PREFIX)))?;
    source.adapter = Some((lora, WeightStore::open(&adapter_file)?));
    Ok(source)
}

/// `dir/{stem}.safetensors`, else `dir/{stem}.bin`; neither is an error saying what is missing.
fn file_of(dir: &Path, stem: &str, meaning: &str) -> Result<PathBuf, LlavaError> {
    ["safetensors", "bin"]
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .find(|p| p.is_file())
        .ok_or_else(|| LlavaError::config(dir, format!("{stem}.safetensors (or .bin) is missing: {meaning}")))
}

/// `weights`: the store and projector prefix when they are not `dir`'s own checkpoint (a LoRA
/// folder: its base's files and its projector file).
fn resolve_original(
    dir: &Path, json: &serde_json::Value, options: &LoadOptions, weights: Option<(WeightStore, &'static str)>,
) -> Result<ModelSource, LlavaError> {
    let config_path = dir.join("config.json");
    let bad = |reason: String| LlavaError::config(&config_path, reason);
    let text = LlamaConfig::from_hf_json(json).map_err(bad)?;
    let original = OriginalLlavaConfig::from_json(json).map_err(bad)?;
    let tower_name = original.mm_vision_tower.as_deref().unwrap_or("");
    let tower_dir = match &options.vision_tower {
        Some(p) => p.clone(),
        None => resolve_vision_tower(dir, tower_name, options.hf_cache.as_deref())?,
    };
    let vision = ClipVisionConfig::from_hf_dir(&tower_dir)?;
    let projector = match original.mm_projector_type.as_deref() {
        None => ProjectorKind::Linear,
        Some(name) => ProjectorKind::parse(name).ok_or_else(|| bad(format!("unknown mm_projector_type `{name}`")))?,
    };
    if original.uses_im_start_end() {
        tracing::warn!(
            "{}: mm_use_im_start_end is set; <im_start>/<im_end> tokens are not inserted by this implementation",
            config_path.display()
        );
    }
    let select_feature = original.select_feature().map_err(bad)?;
    let aspect = original.image_aspect().map_err(bad)?;
    let config = LlavaConfig {
        vision,
        projector,
        select_layer: original.select_layer(),
        select_feature,
        image_aspect: options.image_aspect.unwrap_or(aspect),
        max_length: original.max_length(),
        text,
    };
    config.validate().map_err(bad)?;
    if let Some(hidden) = original.mm_hidden_size
        && hidden != config.vision.hidden_size
    {
        return Err(bad(format!(
            "mm_hidden_size {hidden} does not match the vision tower's hidden_size {} ({})",
            config.vision.hidden_size,
            tower_dir.display()
        )));
    }
    let (store, projector_prefix) = match weights {
        Some(weights) => weights,
        None => (WeightStore::open(dir)?, "model.mm_projector"),
    };
    let prefixes = Prefixes {
        llm: "model",
        head: "lm_head",
        vision: "model.vision_tower.vision_tower.vision_model",
        projector: projector_prefix,
    };
    let naming = ProjectorConfig::detect(&store, prefixes.projector)
        .map(|(_, naming)| naming)
        .ok_or_else(|| bad(format!("no projector weights under `{}` in {}", prefixes.projector, dir.display())))?;
    // Some checkpoints embed the (frozen) tower; otherwise it comes from its own directory.
    let tower_store = if store.has_prefix(prefixes.vision) { None } else { Some(WeightStore::open(&tower_dir)?) };
    Ok(ModelSource {
        layout: Layout::Original,
        config,
        has_vision: true,
        store,
        tower_store,
        prefixes,
        naming,
        processor_dir: tower_dir,
        adapter: None,
    })
}

fn resolve_text_only(dir: &Path, json: &serde_json::Value) -> Result<ModelSource, LlavaError> {
    let config_path = dir.join("config.json");
    let text = LlamaConfig::from_hf_json(json).map_err(|r| LlavaError::config(&config_path, r))?;
    let store = WeightStore::open(dir)?;
    let vision = ClipVisionConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        image_size: 14,
        patch_size: 14,
        ..Default::default()
    };
    let config = LlavaConfig {
        vision,
        projector: ProjectorKind::Linear,
        select_layer: -1,
        select_feature: SelectFeature::Patch,
        image_aspect: AspectMode::Crop,
        max_length: text.max_position_embeddings,
        text,
    };
    Ok(ModelSource {
        layout: Layout::TextOnly,
        config,
        has_vision: false,
        store,
        tower_store: None,
        prefixes: Prefixes { llm: "model", head: "lm_head", vision: "", projector: "" },
        naming: ProjectorNaming::Original,
        processor_dir: dir.to_path_buf(),
        adapter: None,
    })
}

/// The format of the linear layers saved quantized under `prefix` (`""`: anywhere) in `store`.
fn quantization_in(store: &WeightStore, prefix: &str) -> Option<QuantFormat> {
    let suffixes = QuantFormat::ALL.map(|format| (format, format!(".{}", llava_llm::quantized_weight_name(format))));
    store
        .names()
        .filter(|n| n.starts_with(prefix))
        .find_map(|n| suffixes.iter().find(|(_, suffix)| n.ends_with(suffix.as_str())).map(|(format, _)| *format))
}

/// A model given as separate parts, as the reference's stage-1 output is used: a CLIP
/// directory, an LLM directory (with its tokenizer) and a projector file (`mm_projector.bin` /
/// safetensors, keys with or without `model.mm_projector.`, or `multi_modal_projector.linear_N.*`),
/// with the settings a combined checkpoint's config would hold.
#[derive(Debug, Clone)]
pub struct ModelParts {
    pub clip_dir: PathBuf,
    pub llm_dir: PathBuf,
    pub projector_file: PathBuf,
    pub select_layer: i64,
    pub select_feature: SelectFeature,
    pub image_aspect: AspectMode,
}

impl ModelParts {
    /// The configuration and stored dtypes of the parts, from their configs and checkpoint
    /// headers only.
    pub fn describe(&self) -> Result<(LlavaConfig, PartDtypes), LlavaError> {
        let vision = ClipVisionConfig::from_hf_dir(&self.clip_dir)?;
        let text = LlamaConfig::from_hf_dir(&self.llm_dir)?;
        let proj_store = WeightStore::open(&self.projector_file)?;
        let (prefix, projector, _) = detect_projector_file(&proj_store, &self.projector_file)?;
        let config = LlavaConfig {
            vision,
            projector,
            select_layer: self.select_layer,
            select_feature: self.select_feature,
            image_aspect: self.image_aspect,
            max_length: text.max_position_embeddings,
            text,
        };
        config.validate().map_err(|r| LlavaError::config(&self.projector_file, r))?;
        let dtypes = PartDtypes {
            vision: WeightStore::open(&self.clip_dir)?.dominant_dtype(""),
            projector: proj_store.dominant_dtype(prefix),
            llm: WeightStore::open(&self.llm_dir)?.dominant_dtype(""),
        };
        Ok((config, dtypes))
    }

    /// Loads the parts, held as `options` say (its `dtype`, `quantize` and `quantize_vision`;
    /// the options that find parts of a directory do not apply).
    pub fn load<B: Backend>(&self, options: &LoadOptions, device: &B::Device) -> Result<LoadedLlava<B>, LlavaError> {
        let (config, _) = self.describe()?;
        let proj_store = WeightStore::open(&self.projector_file)?;
        let (prefix, _, naming) = detect_projector_file(&proj_store, &self.projector_file)?;
        let clip_store = WeightStore::open(&self.clip_dir)?;
        let llm_store = WeightStore::open(&self.llm_dir)?;
        let loader = |store| Loader::new(store, device).with_dtype(options.dtype);
        let model = Llava {
            vision: ClipVisionModel::load_hf_quantized(
                &config.vision,
                &loader(&clip_store),
                options.vision_quantize(),
            )?,
            projector: Projector::load(&config.projector_config(), naming, &loader(&proj_store).pp(prefix))?,
            llm: {
                let root = loader(&llm_store);
                LlamaModel::load_quantized(&config.text, &root.pp("model"), &root.pp("lm_head"), options.quantize)?
            },
            select_layer: self.select_layer,
            select_feature: self.select_feature,
        };
        for s in [&clip_store, &llm_store, &proj_store] {
            s.ensure_all_used()?;
        }
        let processor = processor_for(&self.clip_dir, &config)?;
        let tokenizer = load_tokenizer_if_present(&self.llm_dir)?;
        Ok(LoadedLlava { model, config, processor, tokenizer, layout: Layout::Original, has_vision: true })
    }
}

/// Where the projector is inside a standalone projector file (`mm_projector.bin` /
/// `mm_projector.safetensors`: keys with or without `model.mm_projector.`, or llava-hf's
/// `multi_modal_projector.linear_N.*`), and its architecture.
fn detect_projector_file(
    store: &WeightStore, path: &Path,
) -> Result<(&'static str, ProjectorKind, ProjectorNaming), LlavaError> {
    [LORA_PROJECTOR_PREFIX, "model.mm_projector", "mm_projector", "multi_modal_projector", ""]
        .into_iter()
        .find_map(|p| ProjectorConfig::detect(store, p).map(|(kind, naming)| (p, kind, naming)))
        .ok_or_else(|| {
            LlavaError::config(
                path,
                "no projector weights (expected mm_projector.* or multi_modal_projector.linear_N.*)",
            )
        })
}

/// Loads a standalone projector file (`mm_projector.bin` or `.safetensors`, either naming) for
/// `config`; every tensor of the file must be consumed, and its architecture must be the
/// configured one.
pub fn load_projector_file<B: Backend>(
    path: &Path, config: &ProjectorConfig, device: &B::Device,
) -> Result<Projector<B>, LlavaError> {
    let store = WeightStore::open(path)?;
    let (prefix, kind, naming) = detect_projector_file(&store, path)?;
    if kind != config.kind {
        return Err(LlavaError::config(
            path,
            format!("holds a {} projector, the run is configured for {}", kind.name(), config.kind.name()),
        ));
    }
    let projector = Projector::load(config, naming, &Loader::new(&store, device).pp(prefix))?;
    store.ensure_all_used()?;
    Ok(projector)
}

/// The directory's tokenizer, if it has tokenizer files (a broken one is an error).
fn load_tokenizer_if_present(dir: &Path) -> Result<Option<Tokenizer>, LlavaError> {
    if dir.join("tokenizer.model").is_file() || dir.join("tokenizer.json").is_file() {
        Ok(Some(Tokenizer::from_path(dir)?))
    } else {
        Ok(None)
    }
}

/// `preprocessor_config.json` from `dir` if present, else CLIP's at the tower's image size.
fn processor_for(dir: &Path, config: &LlavaConfig) -> Result<ProcessorConfig, LlavaError> {
    let path = dir.join("preprocessor_config.json");
    let processor = if path.is_file() {
        ProcessorConfig::from_path(&path)?
    } else {
        ProcessorConfig::clip(config.vision.image_size)
    };
    if processor.crop_height != config.vision.image_size || processor.crop_width != config.vision.image_size {
        return Err(LlavaError::config(
            &path,
            format!(
                "crop size {}x{} does not match the vision tower's image_size {}",
                processor.crop_height, processor.crop_width, config.vision.image_size
            ),
        ));
    }
    Ok(processor)
}

/// Finds the CLIP directory `mm_vision_tower` names: a path (relative to the model directory or
/// absolute), or a hub id in the local Hugging Face cache.
pub fn resolve_vision_tower(model_dir: &Path, name: &str, hf_cache: Option<&Path>) -> Result<PathBuf, LlavaError> {
    if name.is_empty() {
        return Err(LlavaError::config(model_dir.join("config.json"), "mm_vision_tower is missing"));
    }
    for candidate in [model_dir.join(name), PathBuf::from(name)] {
        if candidate.join("config.json").is_file() {
            return Ok(candidate);
        }
    }
    let cache = hf_cache.map(Path::to_path_buf).or_else(default_hf_cache);
    if let (Some(cache), Some((org, repo))) = (&cache, name.split_once('/')) {
        let repo_dir = cache.join(format!("models--{org}--{repo}"));
        let snapshots = repo_dir.join("snapshots");
        // Prefer the revision `refs/main` points at, else any snapshot with a config.
        let main = std::fs::read_to_string(repo_dir.join("refs/main")).ok().map(|s| snapshots.join(s.trim()));
        let mut found: Vec<PathBuf> = main.into_iter().collect();
        if let Ok(entries) = std::fs::read_dir(&snapshots) {
            let mut others: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            others.sort();
            found.extend(others);
        }
        if let Some(dir) = found.into_iter().find(|d| d.join("config.json").is_file()) {
            return Ok(dir);
        }
    }
    Err(LlavaError::VisionTowerNotFound {
        name: name.to_string(),
        model_dir: model_dir.to_path_buf(),
        cache: cache.map(|c| c.display().to_string()).unwrap_or_else(|| "(no cache directory)".into()),
    })
}

fn default_hf_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}
