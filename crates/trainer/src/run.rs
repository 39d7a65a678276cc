//! A whole training run from a [`RunConfig`]: load the towers from Hugging Face directories, stream
//! samples through the prefetching loader, step, log, checkpoint, and save the result.
//!
//! Run directory (`runs/{name}`): `config.toml` (resolved), `metrics.jsonl`, `loss.png`,
//! `checkpoints/checkpoint-N/`, and at the end `mm_projector.safetensors` plus `model/` (llava-hf
//! layout for an MLP projector, original LLaVA layout for a linear one).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, ElementConversion};
use llava::{Llava, LlavaConfig, LlavaError, SelectFeature};
use llava_checkpoint::{Exporter, Loader, SaveDtype, WeightStore};
use llava_data::Tokenizer;
use llava_data::conversation::conv_template;
use llava_data::dataset::{
    LlavaDataset, OnError, Prefetcher, Record, Sample, SampleConfig, modality_length_grouped_indices, shuffled_indices,
};
use llava_data::image::{AspectMode, ProcessorConfig};
use llava_data::preprocess::PreprocessOptions;
use llava_llm::{LlamaConfig, LlamaModel};
use llava_projector::ProjectorKind;
use llava_vision_encoder::{ClipVisionConfig, ClipVisionModel};

use crate::config::{RunConfig, TextPretrainConfig};
use crate::metrics::{MetricsWriter, Progress, StepMetrics, plot_loss_curve, read_metrics, resume_metrics};
use crate::replicas::{self, CollectiveLease, Replica};
use crate::{Batch, BatchLoss, OptimConfig, Stage, Trainer, batch_loss, checkpoint};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Llava(#[from] llava::LlavaError),
    #[error(transparent)]
    Dataset(#[from] llava_data::dataset::DatasetError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Weights(#[from] llava_checkpoint::WeightsError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the loss became {loss} at step {step}; the last checkpoint is kept in {dir}")]
    NonFinite { loss: f64, step: usize, dir: PathBuf },
    #[error(transparent)]
    DoesNotFit(#[from] llava::plan::DoesNotFit),
    #[error(
        "{path}: the run was started with another recipe; resume with --allow-config-change to continue with this one, or start a new run. Differences (saved → now):\n{}",
        differences.join("\n")
    )]
    ConfigChanged { path: PathBuf, differences: Vec<String> },
    #[error("{path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error(
        "the data-parallel run stopped at step {step}: {}; {}",
        failures.join("; "),
        match last_checkpoint {
            Some(dir) => format!("the last checkpoint, {}, is intact (continue with --resume)", dir.display()),
            None => "no checkpoint had been written yet".to_string(),
        }
    )]
    ReplicaFailed { step: usize, failures: Vec<String>, last_checkpoint: Option<PathBuf> },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// Run-time options that are not part of the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Defaults to `runs/{name}`.
    pub run_dir: Option<PathBuf>,
    /// Continue from the newest checkpoint in the run directory that verifies.
    pub resume: bool,
    /// On resume, accept a recipe that differs from the one the run was started with (the
    /// differences are logged); without it such a resume is refused, listing them.
    pub allow_config_change: bool,
    /// Stop after this many optimizer steps (the schedule still spans the whole run).
    pub max_steps: Option<usize>,
    /// Refuse to start, before anything is loaded or written, when the run's memory plan
    /// ([`plan_run`]) does not fit this capacity (`None`: no check).
    pub capacity: Option<llava::plan::Capacity>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub skipped_samples: usize,
    /// The last validation loss, when the run has validation data.
    pub final_val_loss: Option<f64>,
}

/// The dtype a run holds its weights in: the compute dtype (bf16 under `training.bf16` where the
/// backend has it, else f32). Frozen towers stay in it (held once, as the reference holds them);
/// the trainer keeps f32 masters of the trainable parameters.
pub fn weights_dtype<B: AutodiffBackend>(cfg: &RunConfig, device: &B::Device) -> DType {
    if cfg.training.bf16 && B::supports_dtype(device, DType::BF16) { DType::BF16 } else { DType::F32 }
}

/// The model a run trains, from the towers' configs (no weight is read).
pub fn model_config(cfg: &RunConfig) -> Result<LlavaConfig, LlavaError> {
    let vision = ClipVisionConfig::from_hf_dir(&cfg.model.vision_tower)?;
    let text = LlamaConfig::from_hf_dir(&cfg.model.llm)?;
    let kind = ProjectorKind::parse(&cfg.model.projector_type)
        .ok_or_else(|| LlavaError::config("model.projector_type", format!("unknown `{}`", cfg.model.projector_type)))?;
    let aspect: AspectMode =
        cfg.data.image_aspect_ratio.parse().map_err(|e| LlavaError::config("data.image_aspect_ratio", e))?;
    let config = LlavaConfig {
        vision,
        text,
        projector: kind,
        select_layer: cfg.model.select_layer,
        select_feature: SelectFeature::Patch,
        image_aspect: aspect,
        max_length: cfg.training.model_max_length,
    };
    config.validate().map_err(|reason| LlavaError::config(&cfg.model.vision_tower, reason))?;
    Ok(config)
}

/// The memory plan of `cfg` on `device` ([`crate::plan`]), checked against `capacity` when one is
/// given, and what the user could change to fit (each with its peak).
pub fn plan_run<B: AutodiffBackend>(
    cfg: &RunConfig, device: &B::Device, capacity: Option<llava::plan::Capacity>,
) -> Result<(llava::plan::MemoryPlan, Vec<(String, u64)>), TrainError> {
    plan_for::<B>(cfg, &model_config(cfg)?, &RunData::open(cfg)?, device, capacity)
}

/// The run's datasets, opened once: planned over, then trained on.
struct RunData {
    train: LlavaDataset,
    validation: Option<LlavaDataset>,
}

impl RunData {
    fn open(cfg: &RunConfig) -> Result<Self, TrainError> {
        let (absolute, on_error) = (cfg.data.allow_absolute_image_paths, cfg.data.on_bad_record);
        let train = LlavaDataset::open_with(&cfg.data.data_path, &cfg.data.image_folder, on_error, absolute)?;
        let validation = match &cfg.data.val_data_path {
            Some(path) => Some(LlavaDataset::open_with(path, &cfg.data.image_folder, on_error, absolute)?),
            None => None,
        };
        Ok(Self { train, validation })
    }
}

/// [`plan_run`] with the model's configuration and the datasets already read.
fn plan_for<B: AutodiffBackend>(
    cfg: &RunConfig, config: &LlavaConfig, data: &RunData, device: &B::Device, capacity: Option<llava::plan::Capacity>,
) -> Result<(llava::plan::MemoryPlan, Vec<(String, u64)>), TrainError> {
    let validation = data.validation.as_ref().map_or(0, LlavaDataset::len);
    let stored = llava::load::PartDtypes {
        vision: WeightStore::open(&cfg.model.vision_tower)?.dominant_dtype(""),
        projector: None,
        llm: WeightStore::open(&cfg.model.llm)?.dominant_dtype(""),
    };
    let widened = llava_kernels::half_products_widen::<B>();
    let mut shape =
        crate::plan::TrainingShape::from_recipe(cfg, weights_dtype::<B>(cfg, device), validation, stored, widened)
            .map_err(TrainError::Config)?;
    shape.sequence = longest_sequence(cfg, config, &data.train)?;
    shape.quantized_backward_recomputes = llava_kernels::quantized_backward_recomputes::<B>();
    let plan = crate::plan::training_plan(config, &shape, B::name(device), capacity);
    let alternatives = crate::plan::alternatives(config, &shape, B::supports_dtype(device, DType::BF16));
    Ok((plan, alternatives))
}

/// How the run turns records into samples: the recipe's template and length, the model's aspect mode.
fn sample_config(
    cfg: &RunConfig, config: &LlavaConfig, processor: ProcessorConfig,
) -> Result<SampleConfig, TrainError> {
    let template = conv_template(&cfg.data.template)
        .ok_or_else(|| TrainError::Config(format!("data.template: unknown `{}`", cfg.data.template)))?;
    Ok(SampleConfig {
        template,
        processor,
        aspect: config.image_aspect,
        options: PreprocessOptions { model_max_length: cfg.training.model_max_length, ..Default::default() },
    })
}

/// The longest spliced sequence the run's data gives (its longest texts tokenized and templated,
/// plus the image's tokens), at most `training.model_max_length`: what a micro-batch is padded to.
fn longest_sequence(cfg: &RunConfig, config: &LlavaConfig, dataset: &LlavaDataset) -> Result<usize, TrainError> {
    let tokenizer = Tokenizer::from_path(&cfg.model.llm).map_err(LlavaError::from)?;
    // No image is read, so the processor does not matter here.
    let sample_config = sample_config(cfg, config, ProcessorConfig::clip(config.vision.image_size))?;
    let (with_image, without) = dataset.longest_text_tokens(&tokenizer, &sample_config, 256);
    let longest = (with_image + config.image_tokens()).max(without);
    Ok(longest.min(cfg.training.model_max_length).max(1))
}

/// Builds the model of a run: CLIP and LLaMA from their directories, the projector fresh (stage 1)
/// or from the stage-1 file (stage 2), weights in [`weights_dtype`].
pub fn build_model<B: AutodiffBackend>(
    cfg: &RunConfig, device: &B::Device,
) -> Result<(Llava<B>, LlavaConfig, ProcessorConfig, Tokenizer), LlavaError> {
    let config = model_config(cfg)?;
    let clip_store = WeightStore::open(&cfg.model.vision_tower)?;
    let llm_store = WeightStore::open(&cfg.model.llm)?;
    let dtype = Some(weights_dtype::<B>(cfg, device));
    let vision_model = ClipVisionModel::load_hf(&config.vision, &Loader::new(&clip_store, device).with_dtype(dtype))?;
    let root = Loader::new(&llm_store, device).with_dtype(dtype);
    let lora = cfg.lora_enabled();
    let quantize = lora.map(|l| l.quantize()).transpose().map_err(|e| LlavaError::config("lora", e))?.flatten();
    let mut llm = LlamaModel::load_quantized(&config.text, &root.pp("model"), &root.pp("lm_head"), quantize)?;
    if let Some(lora) = lora {
        llm = llm.with_lora(&lora.peft_config(), cfg.training.seed)?;
    }
    clip_store.ensure_all_used()?;
    llm_store.ensure_all_used()?;
    let projector = match (&cfg.stage, &cfg.model.pretrained_projector) {
        (_, Some(path)) => llava::load::load_projector_file(path, &config.projector_config(), device)?,
        (Stage::Two, None) => {
            return Err(LlavaError::config("model.pretrained_projector", "stage 2 needs the stage-1 projector"));
        }
        (Stage::One, None) => config.projector_config().init(device),
    };
    let processor = match cfg.model.vision_tower.join("preprocessor_config.json") {
        p if p.is_file() => ProcessorConfig::from_path(&p)?,
        _ => ProcessorConfig::clip(config.vision.image_size),
    };
    let tokenizer = Tokenizer::from_path(&cfg.model.llm)?;
    let model = Llava {
        vision: vision_model,
        projector,
        llm,
        select_layer: config.select_layer,
        select_feature: config.select_feature,
    };
    Ok((model, config, processor, tokenizer))
}

/// Stacks samples into a training micro-batch (images in sample order).
pub(crate) fn to_batch<B: Backend>(samples: &[Sample], shape: [usize; 3], device: &B::Device) -> Batch<B> {
    let images: Vec<f32> = samples.iter().filter_map(|s| s.pixel_values.as_ref()).flatten().copied().collect();
    Batch {
        input_ids: samples.iter().map(|s| s.input_ids.clone()).collect(),
        labels: samples.iter().map(|s| s.labels.clone()).collect(),
        pixels: llava::images_tensor(images, shape, device),
    }
}

/// Mean of the per-batch losses over `batches` (Hugging Face Trainer's `eval_loss`), computed on
/// the inner backend with no autodiff graph.
pub fn validation_loss<B: Backend>(model: &Llava<B>, batches: &[Batch<B>], max_length: usize) -> f64 {
    let mut sum = 0.0;
    let mut counted = 0usize;
    for batch in batches {
        let BatchLoss { loss, supervised, .. } = batch_loss(model, batch, max_length);
        if supervised > 0 {
            sum += loss.into_scalar().elem::<f64>();
            counted += 1;
        }
    }
    if counted == 0 { f64::NAN } else { sum / counted as f64 }
}

/// The text of a LLaVA JSON file for language-model pretraining: one sequence per record, each
/// turn followed by a newline with `<image>` removed (for caption data this is exactly the text
/// the `plain` template trains on: caption + `\n`).
fn record_texts(path: &Path) -> Result<Vec<String>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let records: Vec<Record> = serde_json::from_str(&text)
        .map_err(|e| TrainError::Config(format!("{}: not a LLaVA JSON array: {e}", path.display())))?;
    Ok(records
        .iter()
        .map(|r| {
            r.conversations
                .iter()
                .map(|t| t.value.replace("<image>", "").trim().to_string())
                .filter(|t| !t.is_empty())
                .map(|t| t + "\n")
                .collect()
        })
        .collect())
}

/// Trains the LLM alone on the text of `pt.data_paths` (next-token loss on every token) and
/// saves it as a LLaMA directory `out` (weights, config, tokenizer) that stage 2 loads.
fn pretrain_text<B: AutodiffBackend>(
    model: Llava<B>, pt: &TextPretrainConfig, text_config: &LlamaConfig, tokenizer: &Tokenizer, tokenizer_dir: &Path,
    seed: u64, out: &Path,
) -> Result<Llava<B>, TrainError> {
    let mut sequences = Vec::new();
    for path in &pt.data_paths {
        for text in record_texts(path)? {
            sequences.push(tokenizer.encode(&text, true).into_iter().map(i64::from).collect::<Vec<i64>>());
        }
    }
    if sequences.is_empty() {
        return Err(TrainError::Config("text_pretrain.data_paths: no text".into()));
    }
    let optim = OptimConfig { learning_rate: pt.learning_rate, total_steps: pt.steps, ..OptimConfig::default() };
    let mut trainer = Trainer::new(model, Stage::Two, optim);
    let order = shuffled_indices(sequences.len(), seed);
    let mut next = order.iter().cycle();
    tracing::info!(
        "text pretraining of the LLM: {} sequences, {} steps of {}",
        sequences.len(),
        pt.steps,
        pt.batch_size
    );
    let mut progress = Progress::new("text pretraining", 0, pt.steps);
    while trainer.step < pt.steps {
        let rows: Vec<Vec<i64>> = (0..pt.batch_size).map(|_| sequences[*next.next().expect("cycle")].clone()).collect();
        let batch = Batch::<B> { labels: rows.clone(), input_ids: rows, pixels: None };
        let start = Instant::now();
        let report = trainer.micro_step(&batch).expect("no accumulation");
        progress.update(
            trainer.step,
            report.loss,
            report.lr,
            report.tokens as f64 / start.elapsed().as_secs_f64().max(1e-9),
        );
    }
    progress.finish();
    // Complete or absent (with a manifest): a resume reuses it only when it verifies.
    let folder = llava_io::AtomicDir::create(out).map_err(io(out))?;
    let mut e = Exporter::new();
    trainer.model.llm.export(&mut e, "model", "lm_head");
    e.save(&folder.path().join("model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    let config_json = serde_json::to_string_pretty(&text_config.to_hf_json()).expect("json");
    std::fs::write(folder.path().join("config.json"), config_json).map_err(io(out))?;
    llava::save::copy_tokenizer_files(tokenizer_dir, folder.path())?;
    folder.commit().map_err(io(out))?;
    Ok(trainer.model)
}

/// Whether an output folder is complete (its manifest verifies); a fault is logged.
fn intact(dir: &Path) -> bool {
    llava_io::AtomicDir::recover(dir).ok();
    match llava_io::Manifest::verify(dir) {
        Ok(_) => true,
        Err(e) if dir.exists() => {
            tracing::warn!("{e}: it is written again");
            false
        }
        Err(_) => false,
    }
}

/// A resume's recipe against the one saved when the run started: refused when they differ,
/// unless `allow` (then the differences are logged and the new recipe is saved).
fn check_config_unchanged(saved: &Path, cfg: &RunConfig, allow: bool) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(saved) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(saved)(e)),
    };
    let old: toml::Value = toml::from_str(&text)
        .map_err(|e| TrainError::Resume { path: saved.to_path_buf(), reason: format!("not a recipe: {e}") })?;
    let new: toml::Value = toml::from_str(&cfg.to_toml()).expect("a recipe reads back");
    let differences = crate::config::differences(&old, &new);
    if differences.is_empty() {
        return Ok(());
    }
    if allow {
        tracing::warn!(
            "{}: resuming with a changed recipe (--allow-config-change): {}",
            saved.display(),
            differences.join("; ")
        );
        return Ok(());
    }
    Err(TrainError::ConfigChanged { path: saved.to_path_buf(), differences })
}

/// [`run`] on the inference backend `B`, with the autodiff strategy the recipe asks for:
/// gradient checkpointing (`training.gradient_checkpointing`) is Burn's
/// `Autodiff<B, BalancedCheckpointing>`, which recomputes memory-bound operations (element-wise,
/// activations) in the backward pass instead of keeping them from the forward pass.
pub fn run_on<B: Backend>(cfg: &RunConfig, options: &RunOptions, device: &B::Device) -> Result<RunSummary, TrainError> {
    use burn::backend::Autodiff;
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    if cfg.training.gradient_checkpointing {
        run::<Autodiff<B, BalancedCheckpointing>>(cfg, options, device)
    } else {
        run::<Autodiff<B>>(cfg, options, device)
    }
}

/// Runs (or resumes) a training stage.
pub fn run<B: AutodiffBackend>(
    cfg: &RunConfig, options: &RunOptions, device: &B::Device,
) -> Result<RunSummary, TrainError> {
    let run_dir = options.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    // Data-parallel replicas: replica 0 runs here on the first device (it loads, logs and
    // writes), the others in threads of their own.
    let devices = cfg.training.devices.resolve::<B>(device).map_err(TrainError::Config)?;
    let device = &devices[0];
    let data = RunData::open(cfg)?;
    let (plan, alternatives) = plan_for::<B>(cfg, &model_config(cfg)?, &data, device, options.capacity.clone())?;
    tracing::info!("memory plan: peak {} ({})", llava::plan::human(plan.peak()), plan.run);
    plan.check(&alternatives)?;
    let ckpt_dir = run_dir.join("checkpoints");
    let config_path = run_dir.join("config.toml");
    if options.resume {
        check_config_unchanged(&config_path, cfg, options.allow_config_change)?;
    }
    if !options.resume {
        // Starting over: an earlier run's checkpoints would otherwise be mixed with this run's
        // (a later --resume could continue the other run).
        let earlier = checkpoint::list(&ckpt_dir)?;
        if !earlier.is_empty() {
            tracing::warn!(
                "{}: starting over without --resume, so the {} checkpoint(s) of an earlier run are removed",
                ckpt_dir.display(),
                earlier.len()
            );
            std::fs::remove_dir_all(&ckpt_dir).map_err(io(&ckpt_dir))?;
        }
    }
    std::fs::create_dir_all(&ckpt_dir).map_err(io(&ckpt_dir))?;
    let toml = cfg.to_toml();
    llava_io::write_atomically(&config_path, |w| w.write_all(toml.as_bytes())).map_err(io(&config_path))?;
    B::seed(device, cfg.training.seed);
    if cfg.training.gradient_checkpointing {
        tracing::info!(
            "gradient checkpointing: activations are recomputed in the backward pass (run with an Autodiff<_, BalancedCheckpointing> backend)"
        );
    }

    let (mut model, llava_config, processor, tokenizer) = build_model::<B>(cfg, device)?;
    llava::plan::log_resident("after loading");
    // Optional LLM text pretraining (stage 1 of the demo): done once, reused on resume.
    let pretrained_llm = run_dir.join("llm");
    match &cfg.text_pretrain {
        Some(_) if cfg.stage == Stage::Two => {
            return Err(TrainError::Config("text_pretrain: only stage 1 pretrains the LLM".into()));
        }
        Some(_) if options.resume && intact(&pretrained_llm) => {
            let store = WeightStore::open(&pretrained_llm)?;
            let root = Loader::new(&store, device).with_dtype(Some(weights_dtype::<B>(cfg, device)));
            model.llm = LlamaModel::load_hf(&llava_config.text, &root).map_err(LlavaError::from)?;
            tracing::info!("resumed with the text-pretrained LLM of {}", pretrained_llm.display());
        }
        Some(pt) => {
            model = pretrain_text(
                model,
                pt,
                &llava_config.text,
                &tokenizer,
                &cfg.model.llm,
                cfg.training.seed,
                &pretrained_llm,
            )?;
        }
        None => {}
    }
    let RunData { train, validation } = data;
    let dataset = Arc::new(train);
    if dataset.is_empty() {
        return Err(TrainError::Config(format!("{}: no usable records", cfg.data.data_path.display())));
    }
    let sample_config = Arc::new(sample_config(cfg, &llava_config, processor.clone())?);
    let image_shape = processor.output_shape();
    let micro = cfg.training.per_device_batch_size;
    // Validation batches, preprocessed once.
    let val_batches: Vec<Batch<B::InnerBackend>> = match validation {
        Some(val) => {
            let samples: Vec<Sample> = (0..val.len())
                .map(|i| val.sample(i, &tokenizer, &sample_config))
                .filter_map(|sample| match sample {
                    Ok(sample) => Some(Ok(sample)),
                    Err(e) if cfg.data.on_bad_record == OnError::Stop => Some(Err(e)),
                    Err(e) => {
                        tracing::warn!("skipping a validation sample: {e}");
                        None
                    }
                })
                .collect::<Result<_, _>>()?;
            samples.chunks(micro.max(1)).map(|c| to_batch(c, image_shape, device)).collect()
        }
        None => Vec::new(),
    };
    let replica_count = devices.len();
    let optim = cfg.optim(dataset.len(), replica_count);
    let accumulation = optim.gradient_accumulation_steps;
    let total_steps = optim.total_steps;
    let max_length = optim.max_length;
    let bf16 = cfg.training.bf16 && B::supports_dtype(device, DType::BF16);
    if cfg.training.bf16 {
        if bf16 {
            tracing::info!("bf16 mixed precision: f32 master weights, bf16 forward and backward");
        } else {
            tracing::warn!("training.bf16: this backend has no bf16 arithmetic, the run computes in f32");
        }
    }

    // The sample order of the whole run, epoch after epoch, each shuffled with the seed; enough
    // epochs for every optimizer step (batches run across epoch boundaries). Replicas take
    // consecutive micro-batches of it in turn (a disjoint shard each).
    let needed = total_steps * accumulation * micro.max(1) * replica_count;
    let epochs = (cfg.training.epochs.ceil().max(1.0) as usize).max(needed.div_ceil(dataset.len()));
    let order: Vec<usize> = (0..epochs as u64)
        .flat_map(|e| {
            let seed = cfg.training.seed.wrapping_add(e);
            if cfg.data.group_by_modality_length {
                modality_length_grouped_indices(&dataset.modality_lengths(), micro, accumulation, seed)
            } else {
                shuffled_indices(dataset.len(), seed)
            }
        })
        .collect();

    let resume_from = if options.resume {
        match checkpoint::latest_intact(&ckpt_dir)? {
            checkpoint::Intact { newest: Some((_, latest)), rejected } => {
                if !rejected.is_empty() {
                    tracing::warn!(
                        "{} newer checkpoint(s) did not verify (see above); resuming from {}",
                        rejected.len(),
                        latest.display()
                    );
                }
                Some(latest)
            }
            checkpoint::Intact { newest: None, rejected } if !rejected.is_empty() => {
                tracing::warn!("no checkpoint in {} verifies (see above): starting from step 0", ckpt_dir.display());
                None
            }
            checkpoint::Intact { newest: None, .. } => {
                tracing::info!("no checkpoint in {}: starting from step 0", ckpt_dir.display());
                None
            }
        }
    } else {
        None
    };
    // Every replica starts from the same model and, on resume, the same checkpoint: they hold
    // identical weights and optimizer state from then on.
    let distributed = replica_count > 1;
    let replica_model = distributed.then(|| model.clone());
    let make_trainer = |model: Llava<B>, rank: usize| -> Result<(Trainer<B>, serde_json::Value), TrainError> {
        let mut trainer = Trainer::new(model, cfg.stage, optim.clone())
            .with_seed(cfg.training.seed)
            .with_replica(Replica { rank, count: replica_count });
        if bf16 {
            trainer = trainer.with_compute_dtype(DType::BF16);
        }
        let extra = match &resume_from {
            Some(latest) => checkpoint::load(&mut trainer, latest)?,
            None => serde_json::Value::Null,
        };
        Ok((trainer, extra))
    };
    let (mut trainer, extra) = make_trainer(model, 0)?;
    llava::plan::log_resident("with the trainer");
    let mut position = 0usize;
    if let Some(latest) = &resume_from {
        let state = latest.join("state.json");
        position = extra["position"].as_u64().ok_or_else(|| TrainError::Resume {
            path: state.clone(),
            reason: "extra.position is missing or not a sample index".into(),
        })? as usize;
        if trainer.step > total_steps || position > order.len() {
            return Err(TrainError::Resume {
                path: state,
                reason: format!(
                    "step {} of {total_steps}, sample {position} of {}: past the end of this run",
                    trainer.step,
                    order.len()
                ),
            });
        }
        tracing::info!("resumed from {} (step {}, sample {position})", latest.display(), trainer.step);
    }
    let mut others = Vec::with_capacity(replica_count - 1);
    if let Some(model) = replica_model {
        for (rank, device) in devices.iter().enumerate().skip(1) {
            others.push((make_trainer(model.clone().fork(device), rank)?.0, device.clone()));
        }
        tracing::info!("{replica_count} data-parallel replicas on {:?}", devices);
        if devices.iter().all(|d| d == device) {
            tracing::warn!(
                "the {replica_count} replicas share one device (each holds its own model and optimizer state there; the memory plan above is for one)"
            );
        }
    }
    // Metrics from the resumed step on describe steps this run does again: dropped; every
    // complete line before it is kept.
    let metrics_path = run_dir.join("metrics.jsonl");
    resume_metrics(&metrics_path, trainer.step).map_err(io(&metrics_path))?;
    let mut metrics = MetricsWriter::open(&metrics_path).map_err(io(&metrics_path))?;

    let stop_at = options.max_steps.map_or(total_steps, |m| m.min(total_steps));
    tracing::info!(
        "{}: stage {:?}, {} samples, {} steps of {} × {} micro-batches, lr {}",
        cfg.name,
        cfg.stage,
        dataset.len(),
        total_steps,
        accumulation,
        micro,
        cfg.training.learning_rate
    );
    let mut loader = Prefetcher::new(
        dataset.clone(),
        Arc::new(tokenizer),
        sample_config,
        order[position.min(order.len())..].to_vec(),
        cfg.data.workers,
        4 * micro.max(1),
    );
    let (mut skipped, mut first_loss, mut last_loss) = (0usize, f64::NAN, f64::NAN);
    let mut progress = Progress::new(&cfg.name, trainer.step, stop_at);
    let _lease = distributed.then(|| {
        let lease = CollectiveLease::acquire();
        replicas::reset::<B::InnerBackend>();
        lease
    });
    let trained = std::thread::scope(|scope| -> Result<(), TrainError> {
        let workers: Vec<ReplicaWorker> = others
            .into_iter()
            .enumerate()
            .map(|(i, (trainer, device))| {
                let replica = Replica { rank: i + 1, count: replica_count };
                ReplicaWorker::spawn(scope, trainer, replica, device, image_shape)
            })
            .collect();
        if distributed {
            replicas::register::<B::InnerBackend>(Replica { rank: 0, count: replica_count }, device)
                .map_err(|e| TrainError::Config(e.to_string()))?;
        }
        while trainer.step < stop_at {
            // One micro-batch per replica, in the order's turn: replica r takes the r-th.
            let mut micro_batches: Vec<Vec<Sample>> = Vec::with_capacity(replica_count);
            for _ in 0..replica_count {
                let mut samples = Vec::with_capacity(micro);
                while samples.len() < micro {
                    match loader.next() {
                        Some(Ok(s)) => samples.push(s),
                        Some(Err(e)) if cfg.data.on_bad_record == OnError::Stop => {
                            progress.finish();
                            return Err(e.into());
                        }
                        Some(Err(e)) => {
                            tracing::warn!("skipping a sample: {e}");
                            skipped += 1;
                        }
                        None => break,
                    }
                    position += 1;
                }
                micro_batches.push(samples);
            }
            if micro_batches.iter().any(Vec::is_empty) {
                break;
            }
            let mine = micro_batches.remove(0);
            for (worker, samples) in workers.iter().zip(micro_batches) {
                worker.send(samples);
            }
            let step_start = Instant::now();
            let stepped = trainer.try_micro_step(&to_batch(&mine, image_shape, device));
            if stepped.is_err() {
                // Wake any replica still waiting in the collective.
                replicas::reset::<B::InnerBackend>();
            }
            let mut failures: Vec<String> = workers.iter().filter_map(ReplicaWorker::outcome).collect();
            let report = match stepped {
                Ok(report) if failures.is_empty() => report,
                outcome => {
                    progress.finish();
                    if let Err(e) = outcome {
                        failures.insert(0, e.to_string());
                    }
                    let last = checkpoint::latest_intact(&ckpt_dir).ok().and_then(|i| i.newest).map(|(_, p)| p);
                    return Err(TrainError::ReplicaFailed { step: trainer.step + 1, failures, last_checkpoint: last });
                }
            };
            let Some(report) = report else { continue };
            if !report.loss.is_finite() {
                progress.finish();
                return Err(TrainError::NonFinite { loss: report.loss, step: trainer.step, dir: ckpt_dir.clone() });
            }
            if first_loss.is_nan() {
                first_loss = report.loss;
            }
            last_loss = report.loss;
            let tokens_per_s = report.tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
            let evaluate = !val_batches.is_empty()
                && (trainer.step == stop_at
                    || (cfg.training.eval_steps > 0 && trainer.step % cfg.training.eval_steps == 0));
            let val_loss =
                evaluate.then(|| validation_loss(&trainer.compute_model().valid(), &val_batches, max_length));
            metrics
                .write(&StepMetrics {
                    step: trainer.step - 1,
                    loss: report.loss,
                    lr: report.lr,
                    grad_norm: report.grad_norm,
                    tokens_per_s,
                    val_loss,
                })
                .map_err(io(&metrics_path))?;
            progress.update(trainer.step, report.loss, report.lr, tokens_per_s);
            if let Some(v) = val_loss {
                progress.finish();
                tracing::info!("step {}: validation loss {v:.4}", trainer.step);
            }
            llava::plan::log_resident(&format!("after step {}", trainer.step));
            if trainer.step % cfg.checkpoint.save_steps.max(1) == 0 || trainer.step == stop_at {
                let saved = checkpoint::save(
                    &trainer,
                    &ckpt_dir,
                    cfg.checkpoint.keep,
                    serde_json::json!({ "position": position }),
                )?;
                tracing::debug!("checkpoint {}", saved.display());
                llava::plan::log_resident("after the checkpoint");
            }
        }
        Ok(())
    });
    if distributed {
        replicas::reset::<B::InnerBackend>();
    }
    trained?;
    progress.finish();

    // Outputs: the projector alone, the whole model, the loss curve.
    llava::save::save_projector(&trainer.model, &run_dir.join("mm_projector.safetensors"))?;
    // Frozen towers are written through from the checkpoints they were loaded from: exact
    // values and dtype whatever the run held them in.
    let frozen = llava::save::FrozenSources {
        vision: Some(cfg.model.vision_tower.clone()),
        llm: (cfg.stage == Stage::One)
            .then(|| if cfg.text_pretrain.is_some() { pretrained_llm.clone() } else { cfg.model.llm.clone() }),
    };
    if trainer.lora() {
        // The reference's LoRA output: the adapter (PEFT), the projector, the config; merged by
        // `cargo xtask merge-lora`, loaded unmerged as a model folder.
        let (out, base, tower) = (run_dir.join("model"), &cfg.model.llm, &cfg.model.vision_tower);
        llava::save::save_lora(&trainer.model, &llava_config, &out, base, tower)?;
    } else {
        llava::save::save_model(&trainer.model, &llava_config, &run_dir.join("model"), &cfg.model.llm, &frozen)?;
    }
    llava::plan::log_resident("after saving the model");
    let all = read_metrics(&metrics_path).map_err(io(&metrics_path))?;
    let points: Vec<(f64, f64)> = all.iter().map(|m| (m.step as f64, m.loss)).collect();
    let val_points: Vec<(f64, f64)> = all.iter().filter_map(|m| m.val_loss.map(|v| (m.step as f64, v))).collect();
    plot_loss_curve(&run_dir.join("loss.png"), &points, &val_points, 800, 480)
        .map_err(|e| TrainError::Io { path: run_dir.join("loss.png"), source: std::io::Error::other(e) })?;
    if skipped > 0 {
        tracing::warn!("{skipped} samples were skipped (see the warnings above)");
    }
    let final_val_loss = all.iter().rev().find_map(|m| m.val_loss);
    if let Some(line) = llava::plan::peak_report(&plan) {
        tracing::info!("{line}");
    }
    Ok(RunSummary {
        run_dir,
        steps: trainer.step,
        first_loss,
        last_loss,
        skipped_samples: skipped + dataset.skipped.len(),
        final_val_loss,
    })
}

/// A replica other than the first: its own thread, fed one micro-batch at a time, answering
/// each with its outcome. A replica that fails (an error, or a panic such as a device lost)
/// resets the collective, so the replicas waiting for it in an all-reduce get an error instead
/// of waiting for ever, and reports what happened.
struct ReplicaWorker {
    rank: usize,
    work: std::sync::mpsc::Sender<Vec<Sample>>,
    done: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl ReplicaWorker {
    fn spawn<'scope, B: AutodiffBackend>(
        scope: &'scope std::thread::Scope<'scope, '_>, mut trainer: Trainer<B>, replica: Replica, device: B::Device,
        shape: [usize; 3],
    ) -> Self {
        let (work, inbox) = std::sync::mpsc::channel::<Vec<Sample>>();
        let (outcome, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name(format!("replica-{}", replica.rank));
        let spawned = thread.spawn_scoped(scope, move || {
            if let Err(e) = replicas::register::<B::InnerBackend>(replica, &device) {
                replicas::reset::<B::InnerBackend>();
                let _ = outcome.send(Err(e.to_string()));
                return;
            }
            let rank = replica.rank.to_string();
            for samples in inbox {
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    // Fault injection for the tests: a replica that dies mid-run.
                    if let Some(point) = llava_io::fault::armed(&["replica", &rank, "step"]) {
                        panic!("{}: replica died at {point}", llava_io::fault::KILL_AT);
                    }
                    let batch = to_batch(&samples, shape, &device);
                    trainer.try_micro_step(&batch).map(|_| ()).map_err(|e| e.to_string())
                }));
                let stepped =
                    stepped.unwrap_or_else(|panic| Err(format!("replica {rank} panicked: {}", panic_text(&panic))));
                let failed = stepped.is_err();
                if failed {
                    replicas::reset::<B::InnerBackend>();
                }
                if outcome.send(stepped).is_err() || failed {
                    return;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("replica {}: its thread could not start: {e}", replica.rank);
        }
        ReplicaWorker { rank: replica.rank, work, done }
    }

    /// Hands the replica its micro-batch (a replica that is gone shows in [`Self::outcome`]).
    fn send(&self, samples: Vec<Sample>) {
        let _ = self.work.send(samples);
    }

    /// Waits for the replica's micro-step: `None` when it went well, else what went wrong.
    fn outcome(&self) -> Option<String> {
        match self.done.recv() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("replica {}: {e}", self.rank)),
            Err(_) => Some(format!("replica {}: its thread ended", self.rank)),
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}
