//! `bench-lora`: one LoRA training step (forward, backward, AdamW) of a plain LLaMA folder's
//! decoder, ours against PyTorch + PEFT (`scripts/bench/lora_ref.py`) measured in the same run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::stats::median;
use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{DType, Int, Tensor, TensorData};
use clap::Args;
use llava::QuantFormat;
use llava::backend::Cpu;
use llava_checkpoint::{Loader, WeightStore};
use llava_llm::{LlamaConfig, LlamaModel, LoraConfig};
use llava_trainer::adamw::{AdamWParams, FusedAdamW};
use llava_trainer::loss::causal_lm_loss;

type B = Autodiff<Cpu>;

#[derive(Args, Debug)]
pub struct BenchLoraArgs {
    /// A plain LLaMA folder (e.g. TinyLlama-1.1B's shape from scripts/real_shapes.py).
    #[arg(long)]
    pub model: PathBuf,
    /// Tokens of the one training sequence (every position supervised).
    #[arg(long, default_value_t = 256)]
    pub tokens: usize,
    /// LoRA rank (α = 2r, the reference's ratio), on every decoder linear layer.
    #[arg(long, default_value_t = 128)]
    pub r: usize,
    /// Timed steps after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// 4: QLoRA, the frozen base's linear layers in NF4 (ours: activations f32; the reference:
    /// bitsandbytes' `Linear4bit`, compute f32 and bf16); 16: a float base (LoRA).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::TypedValueParser::try_map(clap::builder::PossibleValuesParser::new(["4", "16"]), |s| s.parse::<u8>()))]
    pub bits: u8,
    /// Python with torch, transformers and peft; a missing one skips the reference.
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
}

pub fn bench_lora(args: BenchLoraArgs, root: &Path) -> Result<()> {
    anyhow::ensure!(args.steps >= 1, "--steps must be at least 1 (timed steps after the warm-up)");
    anyhow::ensure!(args.tokens >= 2, "--tokens must be at least 2 (a next-token loss needs two)");
    let device = Default::default();
    let config = LlamaConfig::from_hf_dir(&args.model)?;
    let store = WeightStore::open(&args.model)?;
    // f32 weights and activations: the CPU's training dtype (bf16 is slower here, README).
    let loader = Loader::new(&store, &device).with_dtype(Some(DType::F32));
    let base = match args.bits {
        4 => LlamaModel::<B>::load_quantized(
            &config,
            &loader.pp("model"),
            &loader.pp("lm_head"),
            Some(QuantFormat::Nf4),
        )?,
        _ => LlamaModel::<B>::load_hf(&config, &loader)?,
    };
    let lora = LoraConfig { r: args.r, lora_alpha: 2.0 * args.r as f64, lora_dropout: 0.05, ..LoraConfig::reference() };
    let mut model = base.with_lora(&lora, 0)?.freeze_base();
    let mut optim = FusedAdamW::new(AdamWParams { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.0 })
        .init::<B, LlamaModel<B>>();
    let ids: Vec<i64> = (0..args.tokens as i64).map(|i| 1 + (i * 7919) % (config.vocab_size as i64 - 1)).collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, args.tokens]), &device);
    let mut times = Vec::new();
    for step in 0..=args.steps {
        let start = Instant::now();
        let (loss, _) = causal_lm_loss(model.forward_ids(ids.clone(), None), ids.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(2e-4, model, grads);
        let seconds = start.elapsed().as_secs_f64();
        if step > 0 {
            times.push(seconds);
        }
        tracing::info!("ours: step {step}: {seconds:.2}s");
    }
    let ours = median(times.clone());
    let trainable = llava_llm::lora::lora_parameters(&config, &lora);
    println!(
        "ours (Flex, f32{}): LoRA r {} ({:.1}M adapter parameters), 1 × {} tokens: median step {ours:.2}s, steps {:?}",
        if args.bits == 4 { ", nf4 base" } else { "" },
        args.r,
        trainable as f64 / 1e6,
        args.tokens,
        times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>()
    );
    let script = root.join("scripts/bench/lora_ref.py");
    let out = Command::new(&args.python)
        .arg(&script)
        .args(["--model", &args.model.display().to_string()])
        .args(["--tokens", &args.tokens.to_string(), "--r", &args.r.to_string(), "--steps", &args.steps.to_string()])
        .args(["--bits", &args.bits.to_string()])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            for line in text.lines() {
                let json: serde_json::Value = serde_json::from_str(line).context("reference output")?;
                let theirs = json["median_s"].as_f64().context("median_s")?;
                let ratios: Vec<String> = json["steps_s"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_f64())
                    .map(|t| format!("{:.2}", t / ours))
                    .collect();
                println!(
                    "PyTorch + PEFT ({}): median step {theirs:.2}s, steps {} -> speed ratio ours/theirs {:.2}x (per-step ratios {ratios:?})",
                    json["dtype"].as_str().unwrap_or("?"),
                    json["steps_s"],
                    theirs / ours
                );
            }
        }
        Ok(out) => println!("reference failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")),
        Err(e) => println!("reference skipped ({}: {e})", args.python.display()),
    }
    Ok(())
}
