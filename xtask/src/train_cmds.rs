//! `stage1`, `stage2` and `demo-towers`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use clap::Args;
use llava::backend::{BackendKind, Cpu};
use llava_trainer::Stage;
use llava_trainer::config::RunConfig;
use llava_trainer::run::{RunOptions, run};
use llava_weights::{Exporter, SaveDtype};

#[derive(Args, Debug)]
pub struct StageArgs {
    /// A run recipe (TOML), e.g. configs/llava-v1.5-7b-stage1.toml.
    #[arg(long)]
    pub config: PathBuf,
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
    let cfg = RunConfig::load(&args.config, &args.overrides)?;
    if cfg.stage != stage {
        bail!("{} is a stage {:?} recipe; use `cargo xtask stage{}`", args.config.display(), cfg.stage, if cfg.stage == Stage::One { 1 } else { 2 });
    }
    llava::with_backend!(args.backend, train_on(&cfg, &args))
}

fn train_on<B: Backend>(device: &B::Device, cfg: &RunConfig, args: &StageArgs) -> Result<()> {
    let options = RunOptions { run_dir: args.run_dir.clone(), resume: args.resume, max_steps: args.max_steps };
    let summary = run::<Autodiff<B>>(cfg, &options, device)?;
    tracing::info!(
        "{}: {} steps, loss {:.4} → {:.4}; outputs in {}",
        cfg.name, summary.steps, summary.first_loss, summary.last_loss, summary.run_dir.display()
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
    let device = Default::default();
    Cpu::seed(&device, args.seed);
    let config = crate::demo::demo_config();
    let model = config.init::<Cpu>(&device);
    let clip = args.out.join("clip");
    let llm = args.out.join("llm");
    std::fs::create_dir_all(&clip)?;
    std::fs::create_dir_all(&llm)?;
    let mut e = Exporter::new();
    e.scope("vision_model", |e| model.vision.export(e));
    e.save(&clip.join("model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    std::fs::write(clip.join("config.json"), serde_json::to_string_pretty(&llava_vision_encoder::hf_config_json(&config.vision))?)?;
    let mut e = Exporter::new();
    model.llm.export(&mut e, "model", "lm_head");
    e.save(&llm.join("model.safetensors"), SaveDtype::F32, &[("format", "pt")])?;
    std::fs::write(llm.join("config.json"), serde_json::to_string_pretty(&config.text.to_hf_json())?)?;
    llava::save::copy_tokenizer_files(&crate::demo::repo_root().join("datasets/tokenizers/llama"), &llm)?;
    tracing::info!("wrote demo towers to {}", args.out.display());
    Ok(())
}
