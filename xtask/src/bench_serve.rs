//! `bench-serve`: load on `cargo xtask serve` from concurrent clients over loopback, with
//! continuous batching and with batching off (one request at a time, as the reference's model
//! worker serves), measured in the same run: requests/s, output tokens/s, time to first token.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::Args;
use llava_serve::client;

use crate::stats::{median, percentile};

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// The model to serve (default: the random demo checkpoint, written to runs/demo-model when
    /// missing: random weights run every reply to its limit, where the trained demo model stops
    /// after a few tokens).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Concurrent clients, one load level each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub clients: Vec<usize>,
    /// Requests each client sends, one after another (bounds the run).
    #[arg(long, default_value_t = 4)]
    pub requests_per_client: usize,
    /// --max-batch of the batching server.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Reply lengths, cycled over the requests (mixed lengths, as real traffic).
    #[arg(long, value_delimiter = ',', default_value = "16,32,48,64")]
    pub max_tokens: Vec<usize>,
    /// Every other request carries the image (the rest are text-only), unless the model has no
    /// vision tower.
    #[arg(long)]
    pub text_only: bool,
    /// Repetitions of the whole measurement; medians are reported with every run's ratio.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Conversation template.
    #[arg(long, default_value = "llava_v1")]
    pub template: String,
    /// Write the results as JSON lines here too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Questions of different lengths (mixed prompt lengths).
const QUESTIONS: [&str; 6] = [
    "What is unusual about this image?",
    "Describe the image in detail.",
    "Hi",
    "What colour is the taxi, and what is the man on its back doing with the ironing board and the clothes he is holding?",
    "List every object you can see, from left to right, and say for each one what it is made of and what it is used for in a city like this.",
    "Is it safe?",
];

/// One load level's measurement.
#[derive(Debug, Clone, serde::Serialize)]
struct Level {
    batching: bool,
    clients: usize,
    requests: usize,
    seconds: f64,
    requests_per_second: f64,
    output_tokens_per_second: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    failed: usize,
}

struct ServerProcess {
    child: Child,
    addr: String,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(model: &Path, max_batch: usize, template: &str) -> Result<ServerProcess> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["serve", "--model", &model.to_string_lossy(), "--port", "0", "--template", template])
        .args(["--max-batch", &max_batch.to_string(), "--max-queue", "4096"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the server")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("piped")), &mut line)?;
    let Some(addr) = line.trim().strip_prefix("http://") else { bail!("the server printed no address: {line:?}") };
    Ok(ServerProcess { addr: addr.to_string(), child })
}

pub fn bench_serve(args: BenchServeArgs, root: &Path) -> Result<()> {
    anyhow::ensure!(args.requests_per_client >= 1 && args.runs >= 1, "--requests-per-client and --runs must be ≥ 1");
    anyhow::ensure!(!args.max_tokens.is_empty() && !args.clients.is_empty(), "--max-tokens and --clients need values");
    let paths = llava_demo::DemoPaths::new(root);
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let out = paths.runs().join("demo-model");
            if !out.join("config.json").is_file() {
                llava_demo::write_demo_model(&out, &paths.tokenizer(), 42)?;
            }
            out
        }
    };
    let image = root.join("datasets/demo-images/extreme_ironing.jpg");
    let image_url = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD
            .encode(std::fs::read(&image).with_context(|| image.display().to_string())?)
    );
    eprintln!("bench-serve: {} (batching: --max-batch {}; off: --max-batch 1)", model.display(), args.max_batch);
    let mut all: Vec<Vec<Level>> = Vec::new();
    for run in 0..args.runs {
        let mut levels = Vec::new();
        for batching in [true, false] {
            let server = start_server(&model, if batching { args.max_batch } else { 1 }, &args.template)?;
            // Warm-up: one request of each kind.
            for with_image in [!args.text_only, false] {
                let r =
                    client::chat(&server.addr, &request(&args, 0, with_image, &image_url), Duration::from_secs(600))?;
                anyhow::ensure!(r.status == 200, "warm-up request failed: {}", r.body);
            }
            for &clients in &args.clients {
                let level = measure(&server.addr, &args, clients, batching, &image_url);
                eprintln!(
                    "run {run} {:>8} {clients:>3} clients: {:.2} req/s, {:.1} tok/s, ttft p50 {:.3}s p99 {:.3}s{}",
                    if batching { "batching" } else { "off" },
                    level.requests_per_second,
                    level.output_tokens_per_second,
                    level.ttft_p50,
                    level.ttft_p99,
                    if level.failed > 0 { format!(", {} FAILED", level.failed) } else { String::new() }
                );
                levels.push(level);
            }
        }
        all.push(levels);
    }
    report(&args, &all)
}

fn request(args: &BenchServeArgs, i: usize, with_image: bool, image_url: &str) -> serde_json::Value {
    let question = QUESTIONS[i % QUESTIONS.len()];
    let content = if with_image {
        serde_json::json!([{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}])
    } else {
        serde_json::json!(question)
    };
    serde_json::json!({
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": args.max_tokens[i % args.max_tokens.len()],
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

/// `clients` threads, each sending its requests one after another, all streamed.
fn measure(addr: &str, args: &BenchServeArgs, clients: usize, batching: bool, image_url: &str) -> Level {
    let start = Instant::now();
    let results: Vec<Option<client::Streamed>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    (0..args.requests_per_client)
                        .map(|k| {
                            let i = c * args.requests_per_client + k;
                            let with_image = !args.text_only && i.is_multiple_of(2);
                            client::stream_chat(
                                addr,
                                &request(args, i, with_image, image_url),
                                Duration::from_secs(1800),
                            )
                            .ok()
                            .filter(|r| r.status == 200 && r.done)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let ok: Vec<&client::Streamed> = results.iter().flatten().collect();
    let tokens: u64 = ok.iter().filter_map(|r| r.completion_tokens).sum();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.first_token.map(|t| t.as_secs_f64())).collect();
    Level {
        batching,
        clients,
        requests: results.len(),
        seconds,
        requests_per_second: ok.len() as f64 / seconds,
        output_tokens_per_second: tokens as f64 / seconds,
        ttft_p50: percentile(ttft.clone(), 50.0),
        ttft_p99: percentile(ttft, 99.0),
        failed: results.len() - ok.len(),
    }
}

/// The table: per load level the medians over runs, and every run's throughput ratio.
fn report(args: &BenchServeArgs, all: &[Vec<Level>]) -> Result<()> {
    if let Some(out) = &args.out {
        let lines: String =
            all.iter().flatten().map(|l| serde_json::to_string(l).expect("plain numbers") + "\n").collect();
        llava_io::write_atomically(out, |w| std::io::Write::write_all(w, lines.as_bytes()))?;
    }
    println!(
        "| clients | batching req/s | tok/s | TTFT p50 / p99 (s) | off req/s | tok/s | TTFT p50 / p99 (s) | throughput ratio (every run) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---|");
    for &clients in &args.clients {
        let pick = |batching: bool| -> Vec<&Level> {
            all.iter().flat_map(|run| run.iter().filter(|l| l.clients == clients && l.batching == batching)).collect()
        };
        let (on, off) = (pick(true), pick(false));
        let med = |levels: &[&Level], f: fn(&Level) -> f64| median(levels.iter().map(|l| f(l)).collect());
        let ratios: Vec<f64> =
            on.iter().zip(&off).map(|(a, b)| a.output_tokens_per_second / b.output_tokens_per_second).collect();
        println!(
            "| {clients} | {:.2} | {:.1} | {:.3} / {:.3} | {:.2} | {:.1} | {:.3} / {:.3} | **{:.2}×** ({}) |",
            med(&on, |l| l.requests_per_second),
            med(&on, |l| l.output_tokens_per_second),
            med(&on, |l| l.ttft_p50),
            med(&on, |l| l.ttft_p99),
            med(&off, |l| l.requests_per_second),
            med(&off, |l| l.output_tokens_per_second),
            med(&off, |l| l.ttft_p50),
            med(&off, |l| l.ttft_p99),
            median(ratios.clone()),
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "),
        );
    }
    let failed: usize = all.iter().flatten().map(|l| l.failed).sum();
    anyhow::ensure!(failed == 0, "{failed} request(s) failed during the benchmark");
    Ok(())
}
