//! `bench-backends`: which CPU backend runs these models fastest. Forward (prefill) and one
//! forward+backward pass of the small LLaVA shape (bench/small-llava.json), on each CPU backend
//! compiled in: Flex always, NdArray with `--features ndarray`.

use std::path::PathBuf;
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

pub fn small_llava() -> Result<SmallLlava> {
    let path = crate::demo::repo_root().join("bench/small-llava.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)?;
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

fn time<R>(iters: usize, mut f: impl FnMut() -> R) -> f64 {
    f(); // warm-up
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    start.elapsed().as_secs_f64() / iters as f64
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

pub fn bench_backends(args: BenchBackendsArgs) -> Result<()> {
    let shape = small_llava()?;
    let tokens = shape.batch * (shape.text_tokens + shape.config.image_tokens());
    #[allow(unused_mut)] // NdArray is pushed only with the `ndarray` feature.
    let mut rows = vec![("flex", bench_on::<Autodiff<burn::backend::Flex>>("flex", &Default::default(), &shape, args.iters))];
    #[cfg(feature = "ndarray")]
    rows.push(("ndarray", bench_on::<Autodiff<burn::backend::NdArray>>("ndarray", &Default::default(), &shape, args.iters)));
    println!("small LLaVA (bench/small-llava.json), batch {}, {} tokens per step, {} threads", shape.batch, tokens, rayon_threads());
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
pub fn bench_pipeline(args: BenchPipelineArgs) -> Result<()> {
    use std::sync::Arc;

    use llava_data::conversation::conv_template;
    use llava_data::dataset::{LlavaDataset, OnError, Prefetcher, SampleConfig};
    use llava_data::image::ProcessorConfig;
    use llava_data::preprocess::PreprocessOptions;

    let root = crate::demo::repo_root();
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
    println!("input pipeline ({} template, {} LCS-558K samples with images, {} workers)", args.template, n, args.workers);
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
        Ok(o) => println!("reference pipeline failed: {}", String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")),
        Err(e) => println!("reference pipeline not run ({}: {e}); see scripts/bench/pipeline_ref.py", python.display()),
    }
    Ok(())
}
