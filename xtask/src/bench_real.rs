//! `bench-real`: generation at the shapes users run (a checkpoint folder of real shape, e.g. from
//! `scripts/real_shapes.py`), against PyTorch + transformers loading the same folder, in one run:
//! load time (and the time to read the files once), peak RSS, prefill and decode tokens/s at each
//! batch size, and the machine's memory read bandwidth before and after, with decode's fraction
//! of the bandwidth limit (bytes of weights per decoded token × tokens/s ÷ bandwidth).
//!
//! Every configuration runs in a process of its own (this binary's hidden `bench-real-one`, or
//! the Python script), so that each peak RSS is that run's alone.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::stats::median;
use anyhow::{Context, Result, bail};
use clap::Args;
use llava::backend::Cpu;
use llava::generate::{GenerationConfig, generate};
use llava::load::{LoadOptions, WeightsDtype, load_dir};
use serde::{Deserialize, Serialize};

use crate::bench::peak_rss_mb;

#[derive(Args, Debug)]
pub struct BenchRealArgs {
    /// Checkpoint folders (llava-hf, original LLaVA or plain LLaMA) of the shapes to measure.
    #[arg(long = "model", required = true, value_delimiter = ',')]
    pub models: Vec<PathBuf>,
    /// Prompt length in tokens (text only).
    #[arg(long, default_value_t = 59)]
    pub prompt_tokens: usize,
    /// Greedy tokens generated per row (EOS ignored).
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Batch sizes (left-padded batches of equal prompts).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batches: Vec<usize>,
    /// Timed repetitions per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Python with torch and transformers (the reference side); a missing one skips it.
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// torch dtypes of the reference runs; our runs' ratios are against the first.
    #[arg(long, value_delimiter = ',', default_value = "bfloat16,float32")]
    pub torch_dtypes: Vec<String>,
    /// Our runs: `float` (as stored) and quantized LLMs (q8, q4, nf4), each a process of its own.
    #[arg(long, value_delimiter = ',', default_value = "float")]
    pub quantize: Vec<String>,
    /// The weights' dtypes of our runs (each with each `--quantize` format): `auto` (as stored),
    /// `bf16` (PyTorch's torch_dtype=bfloat16: bf16 products where the CPU has them), `f16`, `f32`.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    pub dtypes: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BenchRealOneArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "auto")]
    pub dtype: WeightsDtype,
    #[arg(long)]
    pub prompt_tokens: usize,
    #[arg(long)]
    pub new_tokens: usize,
    #[arg(long, value_delimiter = ',')]
    pub batches: Vec<usize>,
    #[arg(long)]
    pub iters: usize,
    #[arg(long)]
    pub quantize: Option<llava_kernels::QuantFormat>,
}

/// What one run (ours or the reference) reports, as JSON on its standard output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub load_s: f64,
    pub peak_rss_mb: f64,
    /// Bytes of weights the decoder reads per decoded token.
    #[serde(default)]
    pub weight_bytes: f64,
    /// Per batch size: (batch, prefill tok/s, decode tok/s).
    pub rows: Vec<(usize, f64, f64)>,
}

/// The prompts: `batch` rows of `tokens` ids (BOS, then a fixed pseudo-text), as the Python side.
pub fn prompt_ids(batch: usize, tokens: usize) -> Vec<Vec<i64>> {
    (0..batch)
        .map(|_| std::iter::once(1).chain((1..tokens).map(|i| (3 + (i * 7919) % 31_000) as i64)).collect())
        .collect()
}

/// One of our configurations, in this process: load, then per batch size the median prefill
/// (time to the first new token) and decode (the rest) of `iters` runs after a warm-up.
pub fn bench_real_one(args: BenchRealOneArgs) -> Result<()> {
    let device = Default::default();
    let start = Instant::now();
    let options = LoadOptions { dtype: args.dtype.0, quantize: args.quantize, ..Default::default() };
    let loaded =
        load_dir::<Cpu>(&args.model, &options, &device).with_context(|| format!("loading {}", args.model.display()))?;
    let load_s = start.elapsed().as_secs_f64();
    let weight_bytes = decoder_weight_bytes(&loaded.model.llm);
    let mut rows = Vec::new();
    for &batch in &args.batches {
        let prompts = prompt_ids(batch, args.prompt_tokens);
        let config = GenerationConfig { max_new_tokens: args.new_tokens, eos_ids: vec![], ..Default::default() };
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        for i in 0..=args.iters {
            let begin = Instant::now();
            let mut first: Option<f64> = None;
            let out = generate(&loaded.model, &prompts, None, &config, |_, _| {
                first.get_or_insert_with(|| begin.elapsed().as_secs_f64());
                true
            });
            let total = begin.elapsed().as_secs_f64();
            anyhow::ensure!(out.iter().all(|r| r.len() == args.new_tokens), "a row stopped early");
            if i > 0 {
                let first = first.unwrap_or(total);
                prefill.push((batch * args.prompt_tokens) as f64 / first);
                decode.push((batch * (args.new_tokens - 1)) as f64 / (total - first));
            }
        }
        rows.push((batch, median(prefill), median(decode)));
    }
    let report = RunReport { load_s, peak_rss_mb: peak_rss_mb().unwrap_or(0.0), weight_bytes, rows };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Bytes of the decoder's weights that one decoded token reads: every linear layer (float or
/// quantized, codes and scales), the norms and the LM head; of the embedding table one row only.
fn decoder_weight_bytes<B: burn::tensor::backend::Backend>(llm: &llava_llm::LlamaModel<B>) -> f64 {
    let bytes_of = |t: burn::tensor::Tensor<B, 2>| t.shape().num_elements() * t.dtype().size();
    let norm = |n: &burn::nn::RmsNorm<B>| bytes_of(n.gamma.val().unsqueeze());
    let mut bytes = norm(&llm.norm);
    for l in &llm.layers {
        let (a, m) = (&l.self_attn, &l.mlp);
        for linear in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
            bytes += linear.base.weight_bytes();
        }
        bytes += norm(&l.input_layernorm) + norm(&l.post_attention_layernorm);
    }
    bytes += match &llm.lm_head {
        Some(head) => head.weight_bytes(),
        // Tied: the head reads the whole embedding table.
        None => bytes_of(llm.embed_tokens.weight.val()),
    };
    bytes as f64
}

/// The machine's memory read bandwidth (GB/s), measured by the kernels crate's probe.
pub fn read_bandwidth_gbs() -> f64 {
    llava_kernels::probe::memory_read_bandwidth_gbs()
}

/// Seconds to read every file of `dir` (weights and all) once, as it is cached now.
fn read_files_s(dir: &Path) -> Result<(f64, f64)> {
    let mut bytes = 0f64;
    let begin = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    let read_err = |path: &Path| format!("reading the checkpoint folder {}", path.display());
    for entry in std::fs::read_dir(dir).with_context(|| read_err(dir))? {
        let path = entry.with_context(|| read_err(dir))?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path.is_file() && (ext == "safetensors" || ext == "bin") {
            let mut f = std::fs::File::open(&path).with_context(|| read_err(&path))?;
            loop {
                let n = f.read(&mut buf).with_context(|| read_err(&path))?;
                if n == 0 {
                    break;
                }
                bytes += n as f64;
            }
        }
    }
    Ok((begin.elapsed().as_secs_f64(), bytes))
}

fn run_json(cmd: &mut Command) -> Result<RunReport> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).context("no JSON report")?;
    Ok(serde_json::from_str(line)?)
}

pub fn bench_real(args: BenchRealArgs, root: &Path) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let batches = args.batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
    let exe = std::env::current_exe()?;
    let script = root.join("scripts/bench/real_ref.py");
    let before = read_bandwidth_gbs();
    println!(
        "generation at real shapes: {}-token prompt, {} greedy tokens, {threads} threads, median of {}",
        args.prompt_tokens, args.new_tokens, args.iters
    );
    println!("memory read bandwidth before: {before:.1} GB/s");
    for model in &args.models {
        let (read_s, bytes) = read_files_s(model)?;
        println!("\n{} ({:.2} GB of weight files, read once in {read_s:.2} s)", model.display(), bytes / 1e9);
        let mut runs: Vec<(String, Result<RunReport>)> = Vec::new();
        // Every weight format in every dtype (a quantized model's norms, embeddings and, in bf16,
        // its prefill products follow the dtype).
        let ours: Vec<(String, Vec<&str>)> = args
            .quantize
            .iter()
            .flat_map(|quantize| args.dtypes.iter().map(move |dtype| (quantize.as_str(), dtype.as_str())))
            .map(|(quantize, dtype)| {
                let mut name = "ours".to_string();
                let mut extra = Vec::new();
                if quantize != "float" {
                    name += &format!(" {quantize}");
                    extra.extend(["--quantize", quantize]);
                }
                match dtype {
                    "auto" if quantize == "float" => name += " (as stored)",
                    "auto" => {}
                    other => {
                        name += &format!(" {other}");
                        extra.extend(["--dtype", other]);
                    }
                }
                (name, extra)
            })
            .collect();
        for (name, extra) in &ours {
            let mut cmd = Command::new(&exe);
            cmd.args(["bench-real-one", "--model"])
                .arg(model)
                .args(["--prompt-tokens", &args.prompt_tokens.to_string()])
                .args(["--new-tokens", &args.new_tokens.to_string()])
                .args(["--batches", &batches, "--iters", &args.iters.to_string()])
                .args(extra);
            runs.push((name.clone(), run_json(&mut cmd)));
        }
        for dtype in &args.torch_dtypes {
            let reference = if args.python.is_file() {
                run_json(
                    Command::new(&args.python)
                        .arg(&script)
                        .arg(model)
                        .args([dtype.as_str(), &batches, &args.prompt_tokens.to_string()])
                        .args([&args.new_tokens.to_string(), &args.iters.to_string(), &threads.to_string()]),
                )
            } else {
                Err(anyhow::anyhow!("{}: not found", args.python.display()))
            };
            runs.push((format!("torch {dtype}"), reference));
        }
        print_table(&runs, ours.len(), before);
    }
    let after = read_bandwidth_gbs();
    println!("\nmemory read bandwidth after: {after:.1} GB/s");
    println!(
        "decode bandwidth use = weight bytes per token × batch-1 decode tok/s ÷ the lower of the two bandwidths ({:.1} GB/s)",
        before.min(after)
    );
    Ok(())
}

/// The first `ours` runs are ours; their ratios are against the first reference run after them
/// (PyTorch bf16 by default), at the same batch size.
fn print_table(runs: &[(String, Result<RunReport>)], ours: usize, bandwidth: f64) {
    println!(
        "{:<20} {:>8} {:>10} {:>6} {:>12} {:>11} {:>9} {:>9}",
        "run", "load s", "peak MiB", "batch", "prefill t/s", "decode t/s", "prefill×", "decode×"
    );
    let reference = runs.get(ours).and_then(|(_, r)| r.as_ref().ok());
    for (index, (name, run)) in runs.iter().enumerate() {
        match run {
            Ok(r) => {
                for (i, &(batch, prefill, decode)) in r.rows.iter().enumerate() {
                    // Ratios: this run of ours over the reference, same batch (above 1: we are faster).
                    let theirs =
                        reference.filter(|_| index < ours).and_then(|t| t.rows.iter().find(|row| row.0 == batch));
                    let (px, dx) = match theirs {
                        Some(t) => (prefill / t.1, decode / t.2),
                        None => (f64::NAN, f64::NAN),
                    };
                    let (load, rss) = if i == 0 {
                        (format!("{:.2}", r.load_s), format!("{:.0}", r.peak_rss_mb))
                    } else {
                        (String::new(), String::new())
                    };
                    println!(
                        "{:<20} {:>8} {:>10} {:>6} {:>12.1} {:>11.2} {:>9} {:>9}",
                        if i == 0 { name.as_str() } else { "" },
                        load,
                        rss,
                        batch,
                        prefill,
                        decode,
                        if px.is_nan() { "-".into() } else { format!("{px:.2}") },
                        if dx.is_nan() { "-".into() } else { format!("{dx:.2}") },
                    );
                }
                if let (Some(&(1, _, decode)), true) = (r.rows.first(), r.weight_bytes > 0.0) {
                    let gbs = r.weight_bytes * decode / 1e9;
                    println!(
                        "{:<20} {:.3} GB of weights per token: bandwidth limit {:.1} tok/s; batch-1 decode reads {gbs:.1} GB/s, {:.0} % of it",
                        "",
                        r.weight_bytes / 1e9,
                        bandwidth * 1e9 / r.weight_bytes,
                        100.0 * gbs / bandwidth
                    );
                }
            }
            Err(e) => println!("{name:<20} not run: {e}"),
        }
    }
    println!("prefill× / decode× = our run ÷ the first reference run at the same batch (above 1: we are faster)");
}
