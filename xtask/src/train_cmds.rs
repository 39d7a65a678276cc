//! `stage1`, `stage2` and `demo-towers`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use llava_data::shapes::{self, ShapesConfig};

use crate::demo::repo_root;
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::tensor::backend::Backend;
use clap::Args;
use llava::backend::{BackendKind, Cpu};
use llava_trainer::Stage;
use llava_trainer::config::RunConfig;
use llava_trainer::run::{RunOptions, run};
use llava_weights::{Exporter, SaveDtype};

#[derive(Args, Debug)]
pub struct StageArgs {
    /// A run recipe (TOML), e.g. configs/llava-v1.5-7b-stage1.toml. Without it, the bundled demo
    /// runs: configs/demo-stage1.toml / demo-stage2.toml on datasets/demo-shapes, from the
    /// repository root, with the demo towers written first (stage 1).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any field: `--set training.learning_rate=1e-4` (repeatable).
    #[arg(long = "set")]
    pub overrides: Vec<String>,
    /// Continue from the newest checkpoint of the run directory.
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Run directory (default runs/<name>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long, default_value_t = BackendKind::fastest())]
    pub backend: BackendKind,
}

pub fn stage(args: StageArgs, stage: Stage) -> Result<()> {
    let number = if stage == Stage::One { 1 } else { 2 };
    let config = match &args.config {
        Some(path) => path.clone(),
        None => {
            // The demo's paths are relative to the repository root.
            std::env::set_current_dir(repo_root())?;
            PathBuf::from(format!("configs/demo-stage{number}.toml"))
        }
    };
    let cfg = RunConfig::load(&config, &args.overrides)?;
    if args.config.is_none() {
        prepare_demo(&cfg)?;
    }
    if cfg.stage != stage {
        bail!("{} is a stage {:?} recipe; use `cargo xtask stage{}`", config.display(), cfg.stage, if cfg.stage == Stage::One { 1 } else { 2 });
    }
    let started = std::time::Instant::now();
    llava::with_backend!(args.backend, train_on(&cfg, &args))?;
    tracing::info!("stage {number} took {}", llava_trainer::metrics::format_duration(started.elapsed().as_secs_f64()));
    Ok(())
}

/// The demo's inputs: the shapes dataset (generated if absent) and, for stage 1, the random towers
/// as Hugging Face directories; stage 2 needs stage 1's outputs.
fn prepare_demo(cfg: &RunConfig) -> Result<()> {
    let data = PathBuf::from(DEMO_DATA);
    if !data.join("captions.json").is_file() {
        tracing::info!("generating the demo dataset in {DEMO_DATA}");
        write_demo_data(&data, ShapesConfig::default().seed)?;
    }
    match (&cfg.stage, &cfg.model.pretrained_projector) {
        (Stage::One, _) => write_demo_towers(&cfg.model.vision_tower, &cfg.model.llm, 42),
        (Stage::Two, Some(projector)) if !projector.is_file() => {
            bail!("the demo's stage 2 starts from stage 1's outputs ({} is missing): run `cargo xtask stage1` first", projector.display())
        }
        (Stage::Two, _) => Ok(()),
    }
}

/// Where the demo dataset lives, relative to the repository root.
pub const DEMO_DATA: &str = "datasets/demo-shapes";

#[derive(Args, Debug)]
pub struct DemoDataArgs {
    #[arg(long, default_value = DEMO_DATA)]
    pub out: PathBuf,
    #[arg(long, default_value_t = ShapesConfig::default().seed)]
    pub seed: u64,
}

/// (Re)generates the demo's synthetic shapes dataset, deterministically from the seed.
pub fn demo_data(args: DemoDataArgs) -> Result<()> {
    write_demo_data(&args.out, args.seed)
}

fn write_demo_data(out: &Path, seed: u64) -> Result<()> {
    let dataset = shapes::build(&ShapesConfig { seed, ..Default::default() });
    shapes::write(&dataset, out).with_context(|| format!("writing {}", out.display()))?;
    tracing::info!("wrote {} images and {} JSON files to {}", dataset.images.len(), dataset.json.len(), out.display());
    Ok(())
}

fn train_on<B: Backend>(device: &B::Device, cfg: &RunConfig, args: &StageArgs) -> Result<()> {
    let options = RunOptions { run_dir: args.run_dir.clone(), resume: args.resume, max_steps: args.max_steps };
    // Gradient checkpointing is Burn's autodiff strategy: memory-bound operations (element-wise,
    // activations) are recomputed in the backward pass instead of kept from the forward pass.
    let summary = if cfg.training.gradient_checkpointing {
        run::<Autodiff<B, BalancedCheckpointing>>(cfg, &options, device)?
    } else {
        run::<Autodiff<B>>(cfg, &options, device)?
    };
    tracing::info!(
        "{}: {} steps, loss {:.4} → {:.4}{}; outputs in {}",
        cfg.name,
        summary.steps,
        summary.first_loss,
        summary.last_loss,
        summary.final_val_loss.map(|v| format!(", validation loss {v:.4}")).unwrap_or_default(),
        summary.run_dir.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct DemoTowersArgs {
    /// Output directory: writes `clip/` (CLIPVisionModel) and `llm/` (LlamaForCausalLM + tokenizer).
    #[arg(long, default_value = "runs/demo-towers")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// The demo's towers, randomly initialised, as Hugging Face directories that the trainer loads
/// exactly like openai/clip-vit-large-patch14 and a Vicuna directory.
pub fn demo_towers(args: DemoTowersArgs) -> Result<()> {
    write_demo_towers(&args.out.join("clip"), &args.out.join("llm"), args.seed)
}

fn write_demo_towers(clip: &Path, llm: &Path, seed: u64) -> Result<()> {
    let device = Default::default();
    Cpu::seed(&device, seed);
    let config = crate::demo::demo_config();
    let model = config.init::<Cpu>(&device);
    std::fs::create_dir_all(clip)?;
    std::fs::create_dir_all(llm)?;
    let mut e = Exporter::new();
    e.scope("vision_model", |e| model.vision.export(e));
    e.save(&clip.join("model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    std::fs::write(clip.join("config.json"), serde_json::to_string_pretty(&llava_vision_encoder::hf_config_json(&config.vision))?)?;
    let mut e = Exporter::new();
    model.llm.export(&mut e, "model", "lm_head");
    e.save(&llm.join("model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    std::fs::write(llm.join("config.json"), serde_json::to_string_pretty(&config.text.to_hf_json())?)?;
    llava::save::copy_tokenizer_files(&crate::demo::repo_root().join("datasets/tokenizers/llama"), llm)?;
    tracing::info!("wrote the demo towers to {} and {}", clip.display(), llm.display());
    Ok(())
}
