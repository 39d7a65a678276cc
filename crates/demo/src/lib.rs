//! The bundled demo: a tiny LLaVA trained in both stages on a synthetic dataset in about two
//! minutes on a CPU, through the same code path as a real run (towers written as Hugging Face
//! directories and loaded as CLIP/Vicuna would be, data as LLaVA JSON and ScienceQA problems),
//! then evaluated on held-out ScienceQA-style questions with real and with blank pictures.
//!
//! - [`shapes`]: the synthetic dataset (pictures of shapes, captions, conversations,
//!   ScienceQA-style problems and splits), deterministic from a seed.
//! - [`demo_config`], [`write_demo_model`], [`write_demo_towers`]: the tiny architecture and its
//!   random weights as checkpoint directories.
//! - [`run_stage`], [`demo_sqa`], [`describe_prompt`]: the demo's steps.
//!
//! Every function takes its paths as arguments: [`DemoPaths`] names a checkout of this project
//! (its `configs/`, `datasets/` and `runs/`), wherever the program runs from. Depends on the
//! model, trainer and eval crates; nothing depends on it but the command line.

pub mod shapes;

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use llava::backend::Cpu;
use llava::model::SelectFeature;
use llava::{LlavaConfig, LlavaError, LoadOptions};
use llava_checkpoint::{Exporter, SaveDtype, WeightsError};
use llava_data::image::AspectMode;
use llava_eval::EvalError;
use llava_eval::predict::{ImageSource, PredictOptions, ScienceRunner, predict_to_file, read_questions};
use llava_eval::scienceqa::{load_problems, load_split};
use llava_eval::score::{Fallback, SqaResult, read_answers, score_answers};
use llava_llm::LlamaConfig;
use llava_projector::ProjectorKind;
use llava_trainer::Stage;
use llava_trainer::config::{ConfigError, RunConfig};
use llava_trainer::run::{RunOptions, RunSummary, TrainError, run_on};
use llava_vision_encoder::ClipVisionConfig;

/// What can go wrong in the demo; each variant names its file or step.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Llava(#[from] LlavaError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{0}")]
    Missing(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io { path: path.to_path_buf(), source }
}

/// Where the demo's files are: a checkout of this project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoPaths {
    /// The checkout's root (holding `configs/`, `datasets/`; `runs/` is written there).
    pub root: PathBuf,
}

impl DemoPaths {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The synthetic dataset (`datasets/demo-shapes`).
    pub fn data(&self) -> PathBuf {
        self.root.join("datasets/demo-shapes")
    }

    /// The bundled LLaMA tokenizer (`datasets/tokenizers/llama`).
    pub fn tokenizer(&self) -> PathBuf {
        self.root.join("datasets/tokenizers/llama")
    }

    /// The demo's recipe for a stage (`configs/demo-stage{1,2}.toml`).
    pub fn recipe(&self, stage: Stage) -> PathBuf {
        self.root.join(format!("configs/demo-stage{}.toml", stage_number(stage)))
    }

    /// Where runs are written (`runs/`).
    pub fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// The stage-2 model the demo evaluates (`runs/demo-stage2/model`).
    pub fn stage2_model(&self) -> PathBuf {
        self.runs().join("demo-stage2/model")
    }
}

fn stage_number(stage: Stage) -> u8 {
    if stage == Stage::One { 1 } else { 2 }
}

/// A small LLaVA: CLIP-architecture tower (56 px, patch 14 → 16 image tokens) and a
/// LLaMA-architecture decoder with the real 32,000-token LLaMA vocabulary.
pub fn demo_config() -> LlavaConfig {
    LlavaConfig {
        vision: ClipVisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            image_size: 56,
            patch_size: 14,
            ..Default::default()
        },
        text: LlamaConfig {
            vocab_size: 32000,
            hidden_size: 64,
            intermediate_size: 172,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 512,
            rms_norm_eps: 1e-5,
            pad_token_id: Some(0),
            ..Default::default()
        },
        projector: ProjectorKind::MlpGelu { depth: 2 },
        select_layer: -2,
        select_feature: SelectFeature::Patch,
        image_aspect: AspectMode::Crop,
        max_length: 512,
    }
}

/// Writes a random demo LLaVA (llava-hf layout, f32 safetensors) with the tokenizer files of
/// `tokenizer_dir`.
pub fn write_demo_model(out: &Path, tokenizer_dir: &Path, seed: u64) -> Result<(), DemoError> {
    let device = Default::default();
    Cpu::seed(&device, seed);
    let config = demo_config();
    let model = config.init::<Cpu>(&device);
    llava::save::save_model(&model, &config, out, tokenizer_dir, &Default::default())?;
    tracing::info!("wrote a random demo LLaVA checkpoint to {}", out.display());
    Ok(())
}

/// The demo's towers, randomly initialised, as Hugging Face directories that the trainer loads
/// exactly like openai/clip-vit-large-patch14 and a Vicuna directory: `clip` (CLIPVisionModel)
/// and `llm` (LlamaForCausalLM with the tokenizer files of `tokenizer_dir`).
pub fn write_demo_towers(clip: &Path, llm: &Path, tokenizer_dir: &Path, seed: u64) -> Result<(), DemoError> {
    write_towers(&demo_config(), clip, llm, tokenizer_dir, seed)
}

/// Random towers of any `config`'s shape (the demo's, or larger ones for memory and speed
/// measurements), written as [`write_demo_towers`] writes the demo's.
pub fn write_towers(
    config: &LlavaConfig, clip: &Path, llm: &Path, tokenizer_dir: &Path, seed: u64,
) -> Result<(), DemoError> {
    let device = Default::default();
    Cpu::seed(&device, seed);
    let model = config.init::<Cpu>(&device);
    // Each tower folder is complete or absent (a kill while writing leaves no half tower).
    let clip_out = llava_io::AtomicDir::create(clip).map_err(io(clip))?;
    let mut e = Exporter::new();
    e.scope("vision_model", |e| model.vision.export(e));
    e.save(&clip_out.path().join("model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    let clip_config = clip_out.path().join("config.json");
    std::fs::write(
        &clip_config,
        serde_json::to_string_pretty(&llava_vision_encoder::hf_config_json(&config.vision)).expect("json"),
    )
    .map_err(io(&clip_config))?;
    clip_out.commit().map_err(io(clip))?;
    let llm_out = llava_io::AtomicDir::create(llm).map_err(io(llm))?;
    let mut e = Exporter::new();
    model.llm.export(&mut e, "model", "lm_head");
    e.save(&llm_out.path().join("model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    let llm_config = llm_out.path().join("config.json");
    std::fs::write(&llm_config, serde_json::to_string_pretty(&config.text.to_hf_json()).expect("json"))
        .map_err(io(&llm_config))?;
    llava::save::copy_tokenizer_files(tokenizer_dir, llm_out.path())?;
    llm_out.commit().map_err(io(llm))?;
    tracing::info!("wrote the demo towers to {} and {}", clip.display(), llm.display());
    Ok(())
}

/// (Re)generates the synthetic shapes dataset in `out`, deterministically from the seed.
pub fn write_demo_data(out: &Path, seed: u64) -> Result<(), DemoError> {
    let dataset = shapes::build(&shapes::ShapesConfig { seed, ..Default::default() });
    // Complete or absent: a kill while writing leaves no half dataset for the next run to use.
    let folder = llava_io::AtomicDir::create(out).map_err(io(out))?;
    shapes::write(&dataset, folder.path()).map_err(io(out))?;
    folder.commit().map_err(io(out))?;
    tracing::info!("wrote {} images and {} JSON files to {}", dataset.images.len(), dataset.json.len(), out.display());
    Ok(())
}

/// The demo's recipe for `stage` with `overrides` applied and its paths taken inside the
/// checkout; the inputs it needs are made first (the dataset if absent; for stage 1 the random
/// towers), and stage 2 checks that stage 1's outputs exist.
pub fn stage_config(paths: &DemoPaths, stage: Stage, overrides: &[String]) -> Result<RunConfig, DemoError> {
    let mut cfg = RunConfig::load(&paths.recipe(stage), overrides)?;
    cfg.rebase(&paths.root);
    let data = paths.data();
    if !data.join("captions.json").is_file() {
        tracing::info!("generating the demo dataset in {}", data.display());
        write_demo_data(&data, shapes::ShapesConfig::default().seed)?;
    }
    match (&cfg.stage, &cfg.model.pretrained_projector) {
        (Stage::One, _) => write_demo_towers(&cfg.model.vision_tower, &cfg.model.llm, &paths.tokenizer(), 42)?,
        (Stage::Two, Some(projector)) if !projector.is_file() => {
            return Err(DemoError::Missing(format!(
                "the demo's stage 2 starts from stage 1's outputs ({} is missing): run `cargo xtask stage1` first",
                projector.display()
            )));
        }
        (Stage::Two, _) => {}
    }
    Ok(cfg)
}

/// One stage of the demo on backend `B` (run directory `runs/<name>` of the checkout unless
/// `options` names one).
pub fn run_stage<B: Backend>(
    paths: &DemoPaths, stage: Stage, overrides: &[String], options: &RunOptions, device: &B::Device,
) -> Result<RunSummary, DemoError> {
    let cfg = stage_config(paths, stage, overrides)?;
    let options = RunOptions {
        run_dir: Some(options.run_dir.clone().unwrap_or_else(|| paths.runs().join(&cfg.name))),
        ..options.clone()
    };
    Ok(run_on::<B>(&cfg, &options, device)?)
}

/// The held-out accuracy of one evaluation pass.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoAccuracy {
    /// `images` or `blank images`.
    pub label: &'static str,
    pub result: SqaResult,
}

/// The demo's evaluation of `model_dir`: `model_vqa_science` on the `split` questions (v1
/// template, single-prediction prompt, greedy), then the reference's scoring; once with the real
/// pictures, once with blank ones. Answers and result files go to `eval/` beside the model
/// (named with the quantization when `load` quantizes: `-q8`, `-q8-vision` with the tower).
/// Returns both results and the chance level (a uniform guess's expected accuracy, in %).
pub fn demo_sqa<B: Backend>(
    paths: &DemoPaths, model_dir: &Path, split: &str, batch_size: usize, load: &LoadOptions, device: &B::Device,
) -> Result<(Vec<DemoAccuracy>, f64), DemoError> {
    if !model_dir.join("config.json").is_file() {
        return Err(DemoError::Missing(format!(
            "{}: no model; run `cargo xtask stage1` and `cargo xtask stage2` first",
            model_dir.display()
        )));
    }
    let data = paths.data();
    let out_dir = model_dir.parent().unwrap_or(Path::new(".")).join("eval");
    std::fs::create_dir_all(&out_dir).map_err(io(&out_dir))?;
    let loaded = llava::load::load_dir::<B>(model_dir, load, device)?;
    let quantized = match (load.quantize, load.vision_quantize()) {
        (Some(q), Some(_)) => format!("-{q}-vision"),
        (Some(q), None) => format!("-{q}"),
        (None, _) => String::new(),
    };
    let (_, template) = llava::chat::choose_template(Some("vicuna_v1"), None)?;
    let problems = load_problems(&data.join("scienceqa/problems.json")).map_err(EvalError::from)?;
    let pids = load_split(&data.join("scienceqa/pid_splits.json"), split).map_err(EvalError::from)?;
    let questions = read_questions(&data.join(format!("scienceqa/llava_{split}_CQM-A.json")))?;
    let mut results = Vec::new();
    for (label, blank) in [("images", false), ("blank images", true)] {
        let suffix = format!("{quantized}{}", if blank { "-blank" } else { "" });
        let answers = out_dir.join(format!("answers-{split}{suffix}.jsonl"));
        let _ = std::fs::remove_file(&answers);
        let mut runner = ScienceRunner::new(&loaded, &template, data.join("images"), 8)?;
        runner.images = if blank { ImageSource::Blank } else { ImageSource::File };
        runner.single_pred_prompt = true;
        let options = PredictOptions { batch_size, num_chunks: 1, chunk_idx: 0, model_id: "demo-stage2".into() };
        predict_to_file(&runner, questions.clone(), &answers, &options, |done, all| {
            tracing::info!("{label}: {done}/{all} answered")
        })?;
        let result = score_answers(&problems, &pids, &read_answers(&answers)?, Fallback::Wrong, 0);
        let result_file = out_dir.join(format!("result-{split}{suffix}.json"));
        llava_io::write_atomically(&result_file, |w| {
            w.write_all(serde_json::to_string_pretty(&result).expect("json").as_bytes())
        })
        .map_err(io(&result_file))?;
        results.push(DemoAccuracy { label, result });
    }
    let chance =
        100.0 * pids.iter().map(|p| 1.0 / problems[p].choices.len() as f64).sum::<f64>() / pids.len().max(1) as f64;
    Ok((results, chance))
}

/// The demo's closing question: the first held-out test picture and the prompt that asks the
/// stage-2 model to describe it (vicuna_v1 template).
pub fn describe_prompt(paths: &DemoPaths) -> Result<(PathBuf, String), DemoError> {
    let questions = paths.data().join("scienceqa/llava_test_CQM-A.json");
    let first = read_questions(&questions)?
        .into_iter()
        .find_map(|q| q.image)
        .ok_or_else(|| DemoError::Missing(format!("{}: no question with an image", questions.display())))?;
    let prompt = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, \
                  and polite answers to the user's questions. USER: <image>\nDescribe the image briefly. ASSISTANT:";
    Ok((paths.data().join("images").join(first), prompt.to_string()))
}
