//! `bench-backends`: which CPU backend runs these models fastest. Forward (prefill) and one
//! forward+backward pass of the small LLaVA shape (bench/small-llava.json), on each CPU backend
//! compiled in: Flex always, NdArray with `--features ndarray`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use clap::Args;
use llava::model::SelectFeature;
use llava::{LlavaConfig, PaddingSide};
use llava_data::image::AspectMode;
use llava_llm::LlamaConfig;
use llava_projector::ProjectorKind;
use llava_vision_encoder::ClipVisionConfig;

#[derive(Args, Debug)]
pub struct BenchBackendsArgs {
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
}

/// The shared benchmark shape, read from bench/small-llava.json.
pub struct SmallLlava {
    pub config: LlavaConfig,
    pub batch: usize,
    pub text_tokens: usize,
}

pub fn small_llava(root: &Path) -> Result<SmallLlava> {
    let path = root.join("bench/small-llava.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)?;
    let vision = ClipVisionConfig::from_hf_json(&json["vision"]).map_err(anyhow::Error::msg)?;
    let text = LlamaConfig::from_hf_json(&json["text"]).map_err(anyhow::Error::msg)?;
    let projector = ProjectorKind::parse(json["projector"].as_str().unwrap_or("")).context("projector")?;
    let config = LlavaConfig {
        vision,
        text,
        projector,
        select_layer: json["vision_feature_layer"].as_i64().unwrap_or(-2),
        select_feature: SelectFeature::Patch,
        image_aspect: AspectMode::Crop,
        max_length: 2048,
    };
    anyhow::ensure!(config.image_tokens() == json["image_tokens"].as_u64().unwrap_or(0) as usize, "image token count");
    Ok(SmallLlava {
        config,
        batch: json["train_step"]["batch_size"].as_u64().unwrap_or(4) as usize,
        text_tokens: json["train_step"]["text_tokens_per_sample"].as_u64().unwrap_or(128) as usize,
    })
}

/// Prompts of `text_tokens` ids with one image after BOS.
pub fn bench_prompts(shape: &SmallLlava) -> Vec<Vec<i64>> {
    (0..shape.batch)
        .map(|b| {
            let mut ids = vec![1, llava_data::IMAGE_TOKEN_INDEX];
            ids.extend((0..shape.text_tokens - 1).map(|i| (3 + (i * 7919 + b * 104_729) % 31_000) as i64));
            ids
        })
        .collect()
}

/// Median seconds of `iters` calls after one warm-up (the Python reference side does the same):
/// robust to the VM's run-to-run noise, which a mean is not.
fn time<R>(iters: usize, mut f: impl FnMut() -> R) -> f64 {
    f(); // warm-up
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn bench_on<B: AutodiffBackend>(name: &str, device: &B::Device, shape: &SmallLlava, iters: usize) -> (f64, f64) {
    B::seed(device, 0);
    let model = shape.config.init::<B>(device);
    let prompts = bench_prompts(shape);
    let [c, s] = [3, shape.config.vision.image_size];
    let pixels = Tensor::<B, 4>::random([shape.batch, c, s, s], Distribution::Normal(0.0, 1.0), device);
    let inner = model.valid();
    let inner_pixels = pixels.clone().inner();
    let forward = time(iters, || {
        let f = inner.encode_images(inner_pixels.clone()).projected;
        let batch = inner.splice(&prompts, None, Some(f), None, PaddingSide::Right);
        let logits = inner.forward(&batch);
        <B::InnerBackend as Backend>::sync(device).ok();
        logits
    });
    let train = time(iters, || {
        let f = model.encode_images(pixels.clone()).projected;
        let batch = model.splice(&prompts, None, Some(f), None, PaddingSide::Right);
        let loss = model.forward(&batch).mean();
        let grads = loss.backward();
        B::sync(device).ok();
        grads
    });
    tracing::info!("{name}: forward {:.1} ms, forward+backward {:.1} ms", forward * 1e3, train * 1e3);
    (forward, train)
}

pub fn bench_backends(args: BenchBackendsArgs, root: &Path) -> Result<()> {
    let shape = small_llava(root)?;
    let tokens = shape.batch * (shape.text_tokens + shape.config.image_tokens());
    #[allow(unused_mut)] // NdArray is pushed only with the `ndarray` feature.
    let mut rows =
        vec![("flex", bench_on::<Autodiff<burn::backend::Flex>>("flex", &Default::default(), &shape, args.iters))];
    #[cfg(feature = "ndarray")]
    rows.push((
        "ndarray",
        bench_on::<Autodiff<burn::backend::NdArray>>("ndarray", &Default::default(), &shape, args.iters),
    ));
    println!(
        "small LLaVA (bench/small-llava.json), batch {}, {} tokens per step, {} threads",
        shape.batch,
        tokens,
        rayon_threads()
    );
    println!("{:<8} {:>12} {:>14} {:>12}", "backend", "forward ms", "fwd+bwd ms", "vs flex");
    let (base_f, base_t) = rows[0].1;
    for (name, (f, t)) in &rows {
        println!("{name:<8} {:>12.1} {:>14.1} {:>5.2}x/{:.2}x", f * 1e3, t * 1e3, base_f / f, base_t / t);
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Args, Debug)]
pub struct BenchPipelineArgs {
    /// Passes over the bundled LCS-558K sample (16 records with images).
    #[arg(long, default_value_t = 16)]
    pub epochs: usize,
    /// Worker threads (Rust) / worker processes (Python).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Conversation template.
    #[arg(long, default_value = "plain")]
    pub template: String,
    /// Python with torch, transformers 4.37.2 and llava-torch importable (see scripts/bench/pipeline_ref.py).
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// PYTHONPATH for the reference (llava-torch + transformers 4.37.2).
    #[arg(long, default_value = ".venv-ref")]
    pub pythonpath: PathBuf,
}

/// `bench-pipeline`: decode + preprocess + tokenize + mask, samples/s, ours vs the reference's
/// Python pipeline on the same files in the same run.
pub fn bench_pipeline(args: BenchPipelineArgs, root: &Path) -> Result<()> {
    use std::sync::Arc;

    use llava_data::conversation::conv_template;
    use llava_data::dataset::{LlavaDataset, OnError, Prefetcher, SampleConfig};
    use llava_data::image::ProcessorConfig;
    use llava_data::preprocess::PreprocessOptions;

    let data = root.join("datasets/lcs558k-sample/blip_laion_cc_sbu_16.json");
    let images = root.join("datasets/lcs558k-sample/images");
    let tokenizer_path = root.join("datasets/tokenizers/llama/tokenizer.model");
    let ds = Arc::new(LlavaDataset::open(&data, &images, OnError::Stop)?);
    let tok = Arc::new(llava_data::Tokenizer::from_path(&tokenizer_path)?);
    let config = Arc::new(SampleConfig {
        template: conv_template(&args.template).context("unknown template")?,
        processor: ProcessorConfig::clip(224),
        aspect: AspectMode::Crop,
        options: PreprocessOptions::default(),
    });
    let order: Vec<usize> = (0..args.epochs).flat_map(|_| 0..ds.len()).collect();
    let n = order.len();
    let start = Instant::now();
    let mut tokens = 0usize;
    for s in Prefetcher::new(ds.clone(), tok.clone(), config.clone(), order, args.workers, 4 * args.workers) {
        tokens += s?.input_ids.len();
    }
    let ours = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "input pipeline ({} template, {} LCS-558K samples with images, {} workers)",
        args.template, n, args.workers
    );
    println!("ours:      {ours:>8.1} samples/s ({tokens} tokens)");

    let python = if args.python.is_absolute() { args.python.clone() } else { root.join(&args.python) };
    let script = root.join("scripts/bench/pipeline_ref.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([data.as_os_str(), images.as_os_str(), tokenizer_path.as_os_str()])
        .arg(&args.template)
        .arg(args.epochs.to_string())
        .arg(args.workers.to_string())
        .env("PYTHONPATH", root.join(&args.pythonpath))
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let line = String::from_utf8_lossy(&o.stdout);
            let json: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or("{}"))?;
            let theirs = json["samples_per_s"].as_f64().context("reference output")?;
            println!("reference: {theirs:>8.1} samples/s (llava-torch LazySupervisedDataset + DataLoader)");
            println!("ratio:     {:>8.2}x", ours / theirs);
        }
        Ok(o) => {
            println!("reference pipeline failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or(""))
        }
        Err(e) => println!("reference pipeline not run ({}: {e}); see scripts/bench/pipeline_ref.py", python.display()),
    }
    Ok(())
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Runs `scripts/bench/small_llava_ref.py` and returns its JSON line (or why it did not run).
fn reference(root: &Path, python: &Path, args: &[String]) -> Result<serde_json::Value, String> {
    let python = if python.is_absolute() { python.to_path_buf() } else { root.join(python) };
    let out = std::process::Command::new(&python)
        .arg(root.join("scripts/bench/small_llava_ref.py"))
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("failed").to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).map_err(|e| e.to_string())
}

/// Runs this benchmark's measurement in a fresh process (`--only …`), so that each one's peak
/// memory is its own, and returns its JSON line.
fn ours_in_process(root: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?).arg("--root").arg(root).args(args).output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or(""))?)
}

#[derive(Args, Debug)]
pub struct BenchTrainArgs {
    /// Timed steps per stage (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Python with torch and transformers (the reference side).
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// Internal: measure only this stage in this process and print JSON.
    #[arg(long, hide = true)]
    pub only: Option<u8>,
}

/// One stage-1 or stage-2 step (forward, backward, AdamW) of the small LLaVA shape on Flex.
fn train_step_seconds(root: &Path, stage: llava_trainer::Stage, iters: usize) -> Result<f64> {
    use llava_trainer::{Batch, OptimConfig, Trainer};
    type B = Autodiff<burn::backend::Flex>;
    let device = Default::default();
    let shape = small_llava(root)?;
    B::seed(&device, 0);
    let model = shape.config.init::<B>(&device);
    let prompts = bench_prompts(&shape);
    // Labels: the text tokens (BOS and the image are masked, as in the reference).
    let labels: Vec<Vec<i64>> =
        prompts.iter().map(|p| p.iter().enumerate().map(|(i, &t)| if i < 2 { -100 } else { t }).collect()).collect();
    let s = shape.config.vision.image_size;
    let pixels = Tensor::<B, 4>::random([shape.batch, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
    let optim =
        OptimConfig { learning_rate: 2e-5, warmup_ratio: 0.0, total_steps: 1_000_000, ..OptimConfig::default() };
    let mut trainer = Trainer::new(model, stage, optim);
    let batch = Batch { input_ids: prompts, labels, pixels: Some(pixels) };
    Ok(time(iters, || {
        trainer.micro_step(&batch).expect("one micro-batch per step");
    }))
}

/// `bench-train`: a stage-1 and a stage-2 training step, ours vs PyTorch, same shape and threads.
pub fn bench_train(args: BenchTrainArgs, root: &Path) -> Result<()> {
    use llava_trainer::Stage;
    if let Some(stage) = args.only {
        let seconds = train_step_seconds(root, if stage == 1 { Stage::One } else { Stage::Two }, args.iters)?;
        println!("{}", serde_json::json!({"step_s": seconds, "peak_rss_mb": peak_rss_mb()}));
        return Ok(());
    }
    let shape = small_llava(root)?;
    let threads = rayon_threads();
    println!(
        "training step, small LLaVA (bench/small-llava.json): batch {}, {} tokens per sample ({} image), AdamW, {threads} threads",
        shape.batch,
        shape.text_tokens + shape.config.image_tokens(),
        shape.config.image_tokens()
    );
    println!(
        "{:<8} {:>10} {:>10} {:>9} {:>12} {:>12}",
        "stage", "ours ms", "torch ms", "speed", "ours MiB", "torch MiB"
    );
    for stage in [1u8, 2] {
        let ours =
            ours_in_process(root, &["bench-train", "--only", &stage.to_string(), "--iters", &args.iters.to_string()])?;
        let theirs = reference(
            root,
            &args.python,
            &["train".into(), stage.to_string(), args.iters.to_string(), threads.to_string()],
        );
        let ours_s = ours["step_s"].as_f64().unwrap_or(f64::NAN);
        match theirs {
            Ok(t) => {
                let theirs_s = t["step_s"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "{:<8} {:>10.1} {:>10.1} {:>8.2}x {:>12.0} {:>12.0}",
                    format!("stage {stage}"),
                    ours_s * 1e3,
                    theirs_s * 1e3,
                    theirs_s / ours_s,
                    ours["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
                    t["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
                );
            }
            Err(why) => println!("stage {stage}: ours {:.1} ms; reference not run ({why})", ours_s * 1e3),
        }
    }
    println!("speed = torch time / our time (above 1: we are faster); memory = peak resident set of each process");
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchGenerateArgs {
    /// Timed runs per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// Internal: measure only this batch size in this process and print JSON.
    #[arg(long, hide = true)]
    pub only: Option<usize>,
}

/// Prefill (1 new token) and full greedy generation times on Flex, random weights, EOS ignored.
fn generate_seconds(root: &Path, batch: usize, iters: usize) -> Result<(f64, f64, usize, usize)> {
    use llava::generate::{GenerationConfig, generate};
    type B = burn::backend::Flex;
    let device = Default::default();
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("bench/small-llava.json"))?)?;
    let new_tokens = json["decode"]["new_tokens"].as_u64().unwrap_or(64) as usize;
    let prompt_text = json["decode"]["prompt_text_tokens"].as_u64().unwrap_or(32) as usize;
    let mut shape = small_llava(root)?;
    shape.batch = batch;
    shape.text_tokens = prompt_text;
    B::seed(&device, 0);
    let model = shape.config.init::<B>(&device);
    let prompts = bench_prompts(&shape);
    let s = shape.config.vision.image_size;
    let pixels = Tensor::<B, 4>::random([batch, 3, s, s], Distribution::Normal(0.0, 1.0), &device);
    let run = |n: usize| {
        let config = GenerationConfig { max_new_tokens: n, eos_ids: vec![], ..Default::default() };
        let out = generate(&model, &prompts, Some(pixels.clone()), &config, |_, _| true);
        assert!(out.iter().all(|r| r.len() == n));
    };
    let prefill = time(iters, || run(1));
    let total = time(iters, || run(new_tokens));
    Ok((prefill, total, new_tokens, 1 + shape.config.image_tokens() + prompt_text - 1))
}

/// `bench-generate`: prefill and decode tokens/s at batch 1 and 8, ours vs transformers' generate.
pub fn bench_generate(args: BenchGenerateArgs, root: &Path) -> Result<()> {
    if let Some(batch) = args.only {
        let (prefill, total, new_tokens, prompt) = generate_seconds(root, batch, args.iters)?;
        println!(
            "{}",
            serde_json::json!({"prefill_s": prefill, "total_s": total, "new_tokens": new_tokens, "prompt_tokens": prompt, "peak_rss_mb": peak_rss_mb()})
        );
        return Ok(());
    }
    let threads = rayon_threads();
    println!("greedy generation, small LLaVA (bench/small-llava.json), {threads} threads, random weights, EOS ignored");
    println!(
        "{:<6} {:>18} {:>18} {:>7} {:>18} {:>18} {:>7}",
        "batch",
        "ours prefill tok/s",
        "torch prefill tok/s",
        "ratio",
        "ours decode tok/s",
        "torch decode tok/s",
        "ratio"
    );
    for batch in [1usize, 8] {
        let ours = ours_in_process(
            root,
            &["bench-generate", "--only", &batch.to_string(), "--iters", &args.iters.to_string()],
        )?;
        let rates = |v: &serde_json::Value| {
            let prefill = v["prefill_s"].as_f64().unwrap_or(f64::NAN);
            let total = v["total_s"].as_f64().unwrap_or(f64::NAN);
            let n = v["new_tokens"].as_f64().unwrap_or(f64::NAN);
            let prompt = v["prompt_tokens"].as_f64().unwrap_or(f64::NAN);
            (batch as f64 * prompt / prefill, batch as f64 * (n - 1.0) / (total - prefill))
        };
        let (op, od) = rates(&ours);
        match reference(
            root,
            &args.python,
            &["generate".into(), batch.to_string(), args.iters.to_string(), threads.to_string()],
        ) {
            Ok(t) => {
                let (tp, td) = rates(&t);
                println!("{batch:<6} {op:>18.0} {tp:>18.0} {:>6.2}x {od:>18.1} {td:>18.1} {:>6.2}x", op / tp, od / td);
            }
            Err(why) => println!("{batch:<6} {op:>18.0} {:>18} {:>7} {od:>18.1}   reference not run ({why})", "-", "-"),
        }
    }
    println!(
        "prefill tok/s = batch × prompt tokens / time to the first new token; decode tok/s = batch × (new − 1) / the rest"
    );
    Ok(())
}
