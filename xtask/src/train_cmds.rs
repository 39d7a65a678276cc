//! `stage1` and `stage2`: argument parsing around `llava_trainer::run` (a recipe) and
//! `llava_demo::run_stage` (the demo, with no recipe).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use burn::tensor::backend::Backend;
use clap::Args;
use llava::backend::BackendKind;
use llava_trainer::Stage;
use llava_trainer::config::RunConfig;
use llava_trainer::run::{RunOptions, RunSummary, run_on};

use crate::model_cmds::MemoryArgs;

#[derive(Args, Debug)]
pub struct StageArgs {
    /// A run recipe (TOML), e.g. configs/llava-v1.5-7b-stage1.toml. Without it, the bundled demo
    /// runs: configs/demo-stage1.toml / demo-stage2.toml on datasets/demo-shapes of the checkout,
    /// with the demo towers written first (stage 1).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any field: `--set training.learning_rate=1e-4` (repeatable).
    #[arg(long = "set")]
    pub overrides: Vec<String>,
    /// Continue from the newest checkpoint of the run directory that verifies (a corrupt or
    /// truncated newer one is passed over with a warning).
    #[arg(long)]
    pub resume: bool,
    /// With --resume: accept a recipe that differs from the run's saved `config.toml` (without
    /// it the resume is refused, listing the differences).
    #[arg(long, requires = "resume")]
    pub allow_config_change: bool,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Run directory (default `runs/NAME`; the demo's in the checkout).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    #[arg(long, default_value_t = BackendKind::fastest())]
    pub backend: BackendKind,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

impl StageArgs {
    /// The recipe this command runs: `--config`, or the demo's (its data and towers written
    /// first when missing).
    pub fn recipe(&self, stage: Stage, root: &Path) -> Result<RunConfig> {
        let cfg = match &self.config {
            Some(path) => RunConfig::load(path, &self.overrides)?,
            None => llava_demo::stage_config(&llava_demo::DemoPaths::new(root), stage, &self.overrides)?,
        };
        if cfg.stage != stage {
            bail!(
                "{} is a stage {:?} recipe; use `cargo xtask stage{}`",
                self.config.as_deref().unwrap_or(Path::new("the recipe")).display(),
                cfg.stage,
                if cfg.stage == Stage::One { 1 } else { 2 }
            );
        }
        Ok(cfg)
    }
}

pub fn stage(args: StageArgs, stage: Stage, root: &Path) -> Result<()> {
    let number = if stage == Stage::One { 1 } else { 2 };
    let options = RunOptions {
        run_dir: args.run_dir.clone(),
        resume: args.resume,
        allow_config_change: args.allow_config_change,
        max_steps: args.max_steps,
        capacity: args.memory.capacity(args.backend),
    };
    let started = std::time::Instant::now();
    let cfg = args.recipe(stage, root)?;
    check_devices(&cfg, args.backend)?;
    let summary = match &args.config {
        Some(_) => llava::with_backend!(args.backend, recipe_on(&cfg, &options))?,
        None => llava::with_backend!(args.backend, demo_on(root, stage, &args.overrides, &options))?,
    };
    tracing::info!(
        "{} steps, loss {:.4} → {:.4}{}; outputs in {}",
        summary.steps,
        summary.first_loss,
        summary.last_loss,
        summary.final_val_loss.map(|v| format!(", validation loss {v:.4}")).unwrap_or_default(),
        summary.run_dir.display()
    );
    tracing::info!("stage {number} took {}", llava_trainer::metrics::format_duration(started.elapsed().as_secs_f64()));
    Ok(())
}

fn recipe_on<B: Backend>(device: &B::Device, cfg: &RunConfig, options: &RunOptions) -> Result<RunSummary> {
    Ok(run_on::<B>(cfg, options, device)?)
}

fn demo_on<B: Backend>(
    device: &B::Device, root: &Path, stage: Stage, overrides: &[String], options: &RunOptions,
) -> Result<RunSummary> {
    Ok(llava_demo::run_stage::<B>(&llava_demo::DemoPaths::new(root), stage, overrides, options, device)?)
}

/// `training.devices` names must be devices of the backend the run uses (`cuda:1` with
/// `--backend cuda`); a count is always the backend's own.
fn check_devices(cfg: &RunConfig, backend: BackendKind) -> Result<()> {
    let devices = cfg.training.devices.parse().map_err(anyhow::Error::msg)?;
    for (kind, index) in devices {
        if let Some(kind) = kind
            && kind != backend.to_string()
        {
            bail!("training.devices: `{kind}:{index}` is not a device of the {backend} backend (--backend {backend})");
        }
    }
    Ok(())
}
