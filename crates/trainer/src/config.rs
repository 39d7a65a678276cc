//! Run configuration: TOML recipes in `configs/` (the paper's and LLaVA-1.5's hyperparameters),
//! every field overridable with `section.field=value`, the resolved config saved with each run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llava_data::dataset::OnError;
use serde::{Deserialize, Serialize};

use crate::replicas::Devices;
use crate::{OptimConfig, Stage};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("override `{0}`: {1}")]
    Override(String, String),
}

/// Where the model parts come from (local paths; nothing is downloaded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPaths {
    /// CLIP directory (openai/clip-vit-large-patch14[-336] layout).
    pub vision_tower: PathBuf,
    /// LLaMA/Vicuna directory.
    pub llm: PathBuf,
    /// `linear` or `mlp2x_gelu`.
    pub projector_type: String,
    /// Stage 2: the stage-1 projector (`mm_projector.safetensors` / `.bin`).
    #[serde(default)]
    pub pretrained_projector: Option<PathBuf>,
    #[serde(default = "default_select_layer")]
    pub select_layer: i64,
}

fn default_select_layer() -> i64 {
    -2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub data_path: PathBuf,
    pub image_folder: PathBuf,
    /// Conversation template (`plain` for stage 1 of v1.0/1.5, `v1`, `v0`, …).
    pub template: String,
    /// `square` (crop) or `pad`.
    #[serde(default = "default_aspect")]
    pub image_aspect_ratio: String,
    #[serde(default)]
    pub group_by_modality_length: bool,
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Held-out samples (same format) for the validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_data_path: Option<PathBuf>,
    /// Records may name images by absolute path (data laid out that way); otherwise an image path
    /// must stay inside `image_folder`, and a record whose path leaves it is skipped, named.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_absolute_image_paths: bool,
    /// A record that cannot be used (bad JSON fields, an unreadable image, an image path outside
    /// the folder, text that does not template): `skip` (named in a warning and counted, the
    /// default) or `stop` (the run ends with the error naming the file, index and id).
    #[serde(default, skip_serializing_if = "is_skip")]
    pub on_bad_record: OnError,
}

fn is_skip(on_error: &OnError) -> bool {
    *on_error == OnError::Skip
}

fn default_aspect() -> String {
    "square".into()
}

fn default_workers() -> usize {
    2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub epochs: f64,
    pub per_device_batch_size: usize,
    /// Samples per optimizer step; gradient accumulation = global / (per-device × devices).
    pub global_batch_size: usize,
    pub learning_rate: f64,
    /// The projector's own peak learning rate (the reference's `mm_projector_lr`; its LoRA
    /// recipe uses 2e-5); absent: `learning_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mm_projector_lr: Option<f64>,
    #[serde(default = "default_warmup")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub weight_decay: f32,
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f32,
    #[serde(default = "default_max_length")]
    pub model_max_length: usize,
    /// Mixed precision as the reference's `--bf16`: bf16 forward and backward, f32 master
    /// weights and optimizer state. Backends without bf16 arithmetic (wgpu) run in f32 with a
    /// warning; on the CPU backend bf16 works but is slower than f32 (no bf16 matrix kernels).
    #[serde(default = "default_bf16")]
    pub bf16: bool,
    #[serde(default)]
    pub gradient_checkpointing: bool,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Validation loss every this many optimizer steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub eval_steps: usize,
    /// Data-parallel replicas: a count (`2`) or device names (`["cuda:0", "cuda:1"]`); each
    /// takes `per_device_batch_size` samples per micro-step and the gradients are averaged
    /// before clipping ([`crate::replicas`]). A resume needs the same devices.
    #[serde(default, skip_serializing_if = "Devices::is_single")]
    pub devices: Devices,
}

fn default_warmup() -> f64 {
    0.03
}
fn default_max_grad_norm() -> f32 {
    1.0
}
fn default_max_length() -> usize {
    2048
}
fn default_bf16() -> bool {
    true
}
fn default_seed() -> u64 {
    42
}

/// Stage 1 only, optional: before aligning images, train the LLM alone on the text of some LLaVA
/// JSON files (every turn, `<image>` removed), so that it already speaks the captions' language.
/// The demo uses it because its LLM starts from random weights; real runs start from Vicuna and
/// leave it out. The result is saved as a LLaMA directory `{run_dir}/llm` for stage 2.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextPretrainConfig {
    pub data_paths: Vec<PathBuf>,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
}

/// LoRA / QLoRA (the reference's `--lora_enable`, `--lora_r`, `--lora_alpha`, `--lora_dropout`,
/// `--lora_bias`, and for QLoRA `--bits 4` with `--quant_type nf4`): adapters on every linear layer
/// of the LLM but the LM head, the LLM's base weights frozen (held in `bits`), the projector
/// fully trained. Defaults are the reference's `finetune_lora.sh`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSettings {
    #[serde(default)]
    pub enable: bool,
    #[serde(default = "default_lora_r")]
    pub r: usize,
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    #[serde(default = "default_lora_dropout")]
    pub dropout: f64,
    /// Only `none`.
    #[serde(default = "default_lora_bias")]
    pub bias: String,
    /// The frozen LLM's weights: 16 (the run's float dtype), 8 (q8) or 4 (`quant_type`).
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// 4-bit format: `nf4` (QLoRA's NormalFloat, the reference's default) or `q4`.
    #[serde(default = "default_quant_type")]
    pub quant_type: String,
    /// Modules trained whole beside the adapters (PEFT's `modules_to_save`): `embed_tokens`,
    /// `lm_head`. The reference's recipes use none; an LLM whose vocabulary is untrained (the
    /// demo's) needs both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules_to_save: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            enable: false,
            r: default_lora_r(),
            alpha: default_lora_alpha(),
            dropout: default_lora_dropout(),
            bias: default_lora_bias(),
            bits: default_bits(),
            quant_type: default_quant_type(),
            modules_to_save: Vec::new(),
        }
    }
}

fn default_lora_r() -> usize {
    128
}
fn default_lora_alpha() -> f64 {
    256.0
}
fn default_lora_dropout() -> f64 {
    0.05
}
fn default_lora_bias() -> String {
    "none".into()
}
fn default_bits() -> u32 {
    16
}
fn default_quant_type() -> String {
    "nf4".into()
}

impl LoraSettings {
    /// PEFT's config for these settings (every decoder linear layer).
    pub fn peft_config(&self) -> llava_llm::LoraConfig {
        llava_llm::LoraConfig {
            r: self.r,
            lora_alpha: self.alpha,
            lora_dropout: self.dropout,
            bias: self.bias.clone(),
            modules_to_save: self.modules_to_save.clone(),
            ..llava_llm::LoraConfig::reference()
        }
    }

    /// The format the frozen LLM is held in (`None`: float).
    pub fn quantize(&self) -> Result<Option<llava::QuantFormat>, String> {
        if !["nf4", "q4"].contains(&self.quant_type.as_str()) {
            return Err(format!("lora.quant_type = {:?}: expected nf4 or q4", self.quant_type));
        }
        match (self.bits, self.quant_type.as_str()) {
            (16 | 32, _) => Ok(None),
            (8, _) => Ok(Some(llava::QuantFormat::Q8)),
            (4, "nf4") => Ok(Some(llava::QuantFormat::Nf4)),
            (4, "q4") => Ok(Some(llava::QuantFormat::Q4)),
            (4, other) => Err(format!("lora.quant_type = {other:?}: expected nf4 or q4")),
            (bits, _) => Err(format!("lora.bits = {bits}: expected 16, 8 or 4")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    pub save_steps: usize,
    pub keep: usize,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run directory is `runs/{name}`.
    pub name: String,
    pub stage: Stage,
    pub model: ModelPaths,
    pub data: DataConfig,
    pub training: TrainingConfig,
    pub checkpoint: CheckpointConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_pretrain: Option<TextPretrainConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
}

impl RunConfig {
    /// Data-parallel replicas of the run (`training.devices`).
    pub fn world_size(&self) -> Result<usize, String> {
        Ok(self.training.devices.parse()?.len())
    }

    /// Reads a TOML file and applies `key=value` overrides (`training.learning_rate=1e-3`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::File { path: path.into(), reason: e.to_string() })?;
        let mut value: toml::Value =
            toml::from_str(&text).map_err(|e| ConfigError::File { path: path.into(), reason: e.to_string() })?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: Self = value.clone().try_into().map_err(|e: toml::de::Error| ConfigError::File {
            path: path.into(),
            reason: explain_unknown_field(&e.to_string(), &value, overrides),
        })?;
        cfg.validate().map_err(|reason| ConfigError::File { path: path.into(), reason })?;
        Ok(cfg)
    }

    /// Values a run cannot use: zero batch sizes or lengths, and learning rates, epochs, warmup,
    /// weight decay or clipping norms that are negative or not finite.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.training;
        for (field, value) in [
            ("training.per_device_batch_size", t.per_device_batch_size),
            ("training.global_batch_size", t.global_batch_size),
            ("training.model_max_length", t.model_max_length),
        ] {
            if value == 0 {
                return Err(format!("{field} must be at least 1"));
            }
        }
        for (field, value) in [
            ("training.epochs", t.epochs),
            ("training.learning_rate", t.learning_rate),
            ("training.weight_decay", t.weight_decay as f64),
            ("training.max_grad_norm", t.max_grad_norm as f64),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(format!("{field} = {value} must be a finite number ≥ 0"));
            }
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return Err(format!("training.warmup_ratio = {} must be in [0, 1]", t.warmup_ratio));
        }
        if let Some(lr) = t.mm_projector_lr
            && !(lr.is_finite() && lr >= 0.0)
        {
            return Err(format!("training.mm_projector_lr = {lr} must be a finite number ≥ 0"));
        }
        let replicas = self.world_size()?;
        if t.global_batch_size < t.per_device_batch_size * replicas {
            return Err(format!(
                "training.global_batch_size = {} is less than one micro-batch of {} on each of the {replicas} replicas",
                t.global_batch_size, t.per_device_batch_size
            ));
        }
        if let Some(lora) = &self.lora {
            let quantize = lora.quantize()?;
            if lora.enable {
                lora.peft_config().validate().map_err(|e| format!("lora: {e}"))?;
                if self.text_pretrain.is_some() {
                    return Err("lora.enable with text_pretrain: LoRA adapts a pretrained LLM".into());
                }
            } else if quantize.is_some() {
                return Err(format!(
                    "lora.bits = {}: a quantized LLM trains only through LoRA (lora.enable)",
                    lora.bits
                ));
            }
        }
        Ok(())
    }

    /// Every relative path of the recipe (towers, projector, data, validation data, text
    /// pretraining data) taken relative to `base` instead of the working directory: the demo's
    /// recipes name paths inside the checkout, and its caller says where the checkout is.
    pub fn rebase(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        join(&mut self.model.vision_tower);
        join(&mut self.model.llm);
        self.model.pretrained_projector.iter_mut().for_each(join);
        join(&mut self.data.data_path);
        join(&mut self.data.image_folder);
        self.data.val_data_path.iter_mut().for_each(join);
        if let Some(t) = self.text_pretrain.as_mut() {
            t.data_paths.iter_mut().for_each(join);
        }
    }

    /// The LoRA settings when LoRA is on.
    pub fn lora_enabled(&self) -> Option<&LoraSettings> {
        self.lora.as_ref().filter(|l| l.enable)
    }

    /// The resolved config as TOML (saved in the run directory).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Micro-batches per optimizer step on `devices` devices.
    pub fn gradient_accumulation_steps(&self, devices: usize) -> usize {
        (self.training.global_batch_size / (self.training.per_device_batch_size * devices.max(1))).max(1)
    }

    /// Optimizer settings for a run of `samples` training samples on `devices` devices.
    pub fn optim(&self, samples: usize, devices: usize) -> OptimConfig {
        let t = &self.training;
        let steps_per_epoch = samples.div_ceil(t.global_batch_size);
        OptimConfig {
            learning_rate: t.learning_rate,
            projector_learning_rate: t.mm_projector_lr,
            warmup_ratio: t.warmup_ratio,
            weight_decay: t.weight_decay,
            max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
            gradient_accumulation_steps: self.gradient_accumulation_steps(devices),
            total_steps: ((steps_per_epoch as f64) * t.epochs).ceil().max(1.0) as usize,
            max_length: t.model_max_length,
            ..OptimConfig::default()
        }
    }
}

/// A recipe's fields that do not change what a run computes (threads of the input pipeline, how
/// many checkpoints are kept): a resume may change them freely.
const NOT_RESULTS: [&str; 2] = ["data.workers", "checkpoint.keep"];

/// The fields whose values differ between two recipes, as `key: old → new` (`(absent)` for a
/// field one side lacks), sorted by key; fields that do not change results (`data.workers`,
/// `checkpoint.keep`) are not counted.
pub fn differences(old: &toml::Value, new: &toml::Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(old, "", &mut a);
    flatten(new, "", &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let absent = "(absent)".to_string();
    keys.into_iter()
        .filter(|k| !NOT_RESULTS.contains(&k.as_str()))
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&absent), b.get(k).unwrap_or(&absent));
            (x != y).then(|| format!("{k}: {x} → {y}"))
        })
        .collect()
}

fn flatten(value: &toml::Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(v, &key, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// serde's "unknown field `x`, expected one of …" made useful: the field's full path in the
/// recipe, the `--set` it came from, and the closest known name.
fn explain_unknown_field(message: &str, value: &toml::Value, overrides: &[String]) -> String {
    let Some((field, rest)) = message.split_once("unknown field `").and_then(|(_, r)| r.split_once('`')) else {
        return message.to_string();
    };
    let known: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let path = find_key(value, field, "").unwrap_or_else(|| field.to_string());
    let from = overrides
        .iter()
        .find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == path))
        .map(|o| format!(" (from the override `{o}`)"))
        .unwrap_or_default();
    let hint = closest(field, &known).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
    format!("unknown field `{path}`{from}{hint} (known here: {})", known.join(", "))
}

/// The dotted path of the first key named `name` in a TOML tree.
fn find_key(value: &toml::Value, name: &str, prefix: &str) -> Option<String> {
    let table = value.as_table()?;
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        if k == name {
            return Some(key);
        }
        if let Some(found) = find_key(v, name, &key) {
            return Some(found);
        }
    }
    None
}

/// The known name nearest to `name` by edit distance, when it is near enough to be a typo (at
/// most a third of the name's length, and at least 1).
pub fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    known.iter().map(|k| (edit_distance(name, k), *k)).filter(|(d, _)| *d <= limit).min().map(|(_, k)| k)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Sets `a.b.c = value` in a TOML tree; the value is parsed as TOML (number, bool, string…),
/// and falls back to a plain string.
/// Recipe sections every field of which has a default: `--set lora.enable=true` works on a
/// recipe without a `[lora]` section.
const OPTIONAL_SECTIONS: [&str; 1] = ["lora"];

pub fn apply_override(root: &mut toml::Value, assignment: &str) -> Result<(), ConfigError> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| ConfigError::Override(assignment.into(), "expected section.field=value".into()))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        let table = node.as_table_mut().ok_or_else(|| {
            ConfigError::Override(assignment.into(), format!("`{}` is not a section", parts[..i].join(".")))
        })?;
        if i + 1 == parts.len() {
            if !table.contains_key(*part) && i == 0 {
                let known: Vec<&str> = table.keys().map(String::as_str).collect();
                let hint = closest(part, &known).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
                return Err(ConfigError::Override(
                    assignment.into(),
                    format!("unknown section or field `{part}`{hint}"),
                ));
            }
            table.insert(part.to_string(), value);
            return Ok(());
        }
        // Sections whose fields all have defaults may be absent from the recipe.
        if i == 0 && !table.contains_key(*part) && OPTIONAL_SECTIONS.contains(part) {
            table.insert(part.to_string(), toml::Value::Table(Default::default()));
        }
        if !table.contains_key(*part) {
            let known: Vec<&str> = table.keys().map(String::as_str).collect();
            let hint = closest(part, &known).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
            return Err(ConfigError::Override(
                assignment.into(),
                format!("unknown section `{}`{hint}", parts[..=i].join(".")),
            ));
        }
        node = table.get_mut(*part).expect("checked above");
    }
    Ok(())
}
