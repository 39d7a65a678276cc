//! A whole training run from a [`RunConfig`]: load the towers from Hugging Face directories, stream
//! samples through the prefetching loader, step, log, checkpoint, and save the result.
//!
//! Run directory (`runs/{name}`): `config.toml` (resolved), `metrics.jsonl`, `loss.png`,
//! `checkpoints/checkpoint-N/`, and at the end `mm_projector.safetensors` plus `model/` (llava-hf
//! layout for an MLP projector, original LLaVA layout for a linear one).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use llava::{Llava, LlavaConfig, LlavaError, SelectFeature};
use llava_data::Tokenizer;
use llava_data::conversation::conv_template;
use llava_data::dataset::{LlavaDataset, OnError, Prefetcher, SampleConfig, modality_length_grouped_indices, shuffled_indices};
use llava_data::image::{AspectMode, ProcessorConfig};
use llava_data::preprocess::PreprocessOptions;
use llava_llm::{LlamaConfig, LlamaModel};
use llava_projector::ProjectorKind;
use llava_vision_encoder::{ClipVisionConfig, ClipVisionModel};
use llava_weights::WeightStore;

use crate::config::RunConfig;
use crate::metrics::{MetricsWriter, StepMetrics, plot_loss_curve, read_metrics};
use crate::{Batch, Stage, Trainer, checkpoint};

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
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the loss became {loss} at step {step}; the last checkpoint is kept in {dir}")]
    NonFinite { loss: f64, step: usize, dir: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// Run-time options that are not part of the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Defaults to `runs/{name}`.
    pub run_dir: Option<PathBuf>,
    /// Continue from the newest checkpoint in the run directory.
    pub resume: bool,
    /// Stop after this many optimizer steps (the schedule still spans the whole run).
    pub max_steps: Option<usize>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub skipped_samples: usize,
}

/// Builds the model of a run: CLIP and LLaMA from their directories, the projector fresh (stage 1)
/// or from the stage-1 file (stage 2).
pub fn build_model<B: AutodiffBackend>(cfg: &RunConfig, device: &B::Device) -> Result<(Llava<B>, LlavaConfig, ProcessorConfig, Tokenizer), LlavaError> {
    let vision = ClipVisionConfig::from_hf_dir(&cfg.model.vision_tower)?;
    let text = LlamaConfig::from_hf_dir(&cfg.model.llm)?;
    let kind = ProjectorKind::parse(&cfg.model.projector_type)
        .ok_or_else(|| LlavaError::config("model.projector_type", format!("unknown `{}`", cfg.model.projector_type)))?;
    let aspect = match cfg.data.image_aspect_ratio.as_str() {
        "pad" => AspectMode::Pad,
        "square" | "crop" => AspectMode::Crop,
        other => return Err(LlavaError::config("data.image_aspect_ratio", format!("unknown `{other}`"))),
    };
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
    let clip_store = WeightStore::open(&cfg.model.vision_tower)?;
    let llm_store = WeightStore::open(&cfg.model.llm)?;
    let vision_model = ClipVisionModel::load_hf(&config.vision, &clip_store, device)?;
    let llm = LlamaModel::load_hf(&config.text, &llm_store, device)?;
    clip_store.ensure_all_used()?;
    llm_store.ensure_all_used()?;
    let projector = match (&cfg.stage, &cfg.model.pretrained_projector) {
        (_, Some(path)) => llava::load::load_projector_file(path, &config.projector_config(), device)?,
        (Stage::Two, None) => return Err(LlavaError::config("model.pretrained_projector", "stage 2 needs the stage-1 projector")),
        (Stage::One, None) => config.projector_config().init(device),
    };
    let processor = match cfg.model.vision_tower.join("preprocessor_config.json") {
        p if p.is_file() => ProcessorConfig::from_path(&p)?,
        _ => ProcessorConfig::clip(config.vision.image_size),
    };
    let tokenizer = Tokenizer::from_path(&cfg.model.llm)?;
    let model = Llava { vision: vision_model, projector, llm, select_layer: config.select_layer, select_feature: config.select_feature };
    Ok((model, config, processor, tokenizer))
}

/// Runs (or resumes) a training stage.
pub fn run<B: AutodiffBackend>(cfg: &RunConfig, options: &RunOptions, device: &B::Device) -> Result<RunSummary, TrainError> {
    let run_dir = options.run_dir.clone().unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
    let ckpt_dir = run_dir.join("checkpoints");
    std::fs::create_dir_all(&ckpt_dir).map_err(io(&ckpt_dir))?;
    std::fs::write(run_dir.join("config.toml"), cfg.to_toml()).map_err(io(&run_dir))?;
    B::seed(device, cfg.training.seed);
    if cfg.training.bf16 || cfg.training.gradient_checkpointing {
        tracing::warn!("training.bf16 / training.gradient_checkpointing are not implemented yet: this run computes in f32 without checkpointing");
    }

    let (model, llava_config, processor, tokenizer) = build_model::<B>(cfg, device)?;
    let template = conv_template(&cfg.data.template).ok_or_else(|| TrainError::Config(format!("data.template: unknown `{}`", cfg.data.template)))?;
    let dataset = Arc::new(LlavaDataset::open(&cfg.data.data_path, &cfg.data.image_folder, OnError::Skip)?);
    if dataset.is_empty() {
        return Err(TrainError::Config(format!("{}: no usable records", cfg.data.data_path.display())));
    }
    let sample_config = Arc::new(SampleConfig {
        template,
        processor: processor.clone(),
        aspect: llava_config.image_aspect,
        options: PreprocessOptions { model_max_length: cfg.training.model_max_length, ..Default::default() },
    });
    let optim = cfg.optim(dataset.len(), 1);
    let micro = cfg.training.per_device_batch_size;
    let accumulation = optim.gradient_accumulation_steps;
    let total_steps = optim.total_steps;
    let mut trainer = Trainer::new(model, cfg.stage, optim);

    // The sample order of the whole run, epoch after epoch, each shuffled with the seed.
    let epochs = cfg.training.epochs.ceil().max(1.0) as usize;
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

    let mut position = 0usize;
    if options.resume {
        if let Some((_, latest)) = checkpoint::list(&ckpt_dir)?.pop() {
            let extra = checkpoint::load(&mut trainer, &latest)?;
            position = extra["position"].as_u64().unwrap_or(0) as usize;
            tracing::info!("resumed from {} (step {}, sample {position})", latest.display(), trainer.step);
        }
    }
    // Metrics past the resumed step belong to the killed run's future: drop them.
    let metrics_path = run_dir.join("metrics.jsonl");
    let kept: Vec<StepMetrics> = read_metrics(&metrics_path).unwrap_or_default().into_iter().filter(|m| m.step < trainer.step).collect();
    let mut text = String::new();
    for m in &kept {
        text += &serde_json::to_string(m).expect("json");
        text.push('\n');
    }
    std::fs::write(&metrics_path, text).map_err(io(&metrics_path))?;
    let mut metrics = MetricsWriter::open(&metrics_path).map_err(io(&metrics_path))?;

    let stop_at = options.max_steps.map_or(total_steps, |m| m.min(total_steps));
    tracing::info!(
        "{}: stage {:?}, {} samples, {} steps of {} × {} micro-batches, lr {}",
        cfg.name, cfg.stage, dataset.len(), total_steps, accumulation, micro, cfg.training.learning_rate
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
    let start = Instant::now();
    let start_step = trainer.step;
    let [c, h, w] = processor.output_shape();
    while trainer.step < stop_at {
        let mut samples = Vec::with_capacity(micro);
        while samples.len() < micro {
            match loader.next() {
                Some(Ok(s)) => samples.push(s),
                Some(Err(e)) => {
                    tracing::warn!("skipping a sample: {e}");
                    skipped += 1;
                }
                None => break,
            }
            position += 1;
        }
        if samples.is_empty() {
            break;
        }
        let images: Vec<f32> = samples.iter().filter_map(|s| s.pixel_values.as_ref()).flatten().copied().collect();
        let n_images = images.len() / (c * h * w);
        let batch = Batch {
            input_ids: samples.iter().map(|s| s.input_ids.clone()).collect(),
            labels: samples.iter().map(|s| s.labels.clone()).collect(),
            pixels: (n_images > 0).then(|| Tensor::from_data(TensorData::new(images, [n_images, c, h, w]), device)),
        };
        let step_start = Instant::now();
        let Some(report) = trainer.micro_step(&batch) else { continue };
        if !report.loss.is_finite() {
            return Err(TrainError::NonFinite { loss: report.loss, step: trainer.step, dir: ckpt_dir });
        }
        if first_loss.is_nan() {
            first_loss = report.loss;
        }
        last_loss = report.loss;
        let tokens_per_s = report.tokens as f64 / step_start.elapsed().as_secs_f64().max(1e-9);
        metrics
            .write(&StepMetrics { step: trainer.step - 1, loss: report.loss, lr: report.lr, grad_norm: report.grad_norm, tokens_per_s, val_loss: None })
            .map_err(io(&metrics_path))?;
        let done = trainer.step - start_step;
        let eta = start.elapsed().as_secs_f64() / done as f64 * (stop_at - trainer.step) as f64;
        tracing::info!(
            "step {}/{stop_at} loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tokens/s ETA {:.0}s",
            trainer.step, report.loss, report.lr, report.grad_norm, tokens_per_s, eta
        );
        if trainer.step % cfg.checkpoint.save_steps.max(1) == 0 || trainer.step == stop_at {
            let saved = checkpoint::save(&trainer, &ckpt_dir, cfg.checkpoint.keep, serde_json::json!({ "position": position }))?;
            tracing::info!("checkpoint {}", saved.display());
        }
    }

    // Outputs: the projector alone, the whole model, the loss curve.
    llava::save::save_projector(&trainer.model, &run_dir.join("mm_projector.safetensors"))?;
    llava::save::save_model(&trainer.model, &llava_config, &run_dir.join("model"), &cfg.model.llm)?;
    let all = read_metrics(&metrics_path).map_err(io(&metrics_path))?;
    let points: Vec<(f64, f64)> = all.iter().map(|m| (m.step as f64, m.loss)).collect();
    plot_loss_curve(&run_dir.join("loss.png"), &points, &[], 800, 480)
        .map_err(|e| TrainError::Io { path: run_dir.join("loss.png"), source: std::io::Error::other(e) })?;
    if skipped > 0 {
        tracing::warn!("{skipped} samples were skipped (see the warnings above)");
    }
    Ok(RunSummary { run_dir, steps: trainer.step, first_loss, last_loss, skipped_samples: skipped + dataset.skipped.len() })
}
