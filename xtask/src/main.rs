//! `cargo xtask <command>`: the front door to the LLaVA workspace.
//!
//! Standard output carries only a command's result; logs and progress go to standard error.

mod bench;
mod bench_lora;
mod bench_real;
mod bench_serve;
mod data_cmds;
mod demo;
mod eval_cmds;
mod model_cmds;
mod plan_cmds;
mod serve_cmds;
mod stats;
mod train_cmds;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "LLaVA in Rust: inference, training and evaluation commands")]
struct Cli {
    /// The project checkout (demo data, recipes, `runs/`); default: found from the working directory.
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// The most pixels an image may decode to (default: PIL's decompression-bomb limit,
    /// 178,956,970); raise it for very large scans, as `Image.MAX_IMAGE_PIXELS` would be raised.
    #[arg(long, global = true, value_name = "PIXELS")]
    max_image_pixels: Option<u64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one forward pass and write logits, vision features, image features and pixels.
    Forward(model_cmds::ForwardArgs),
    /// Greedy or sampled generation with the KV cache; prints only the new text.
    Generate(model_cmds::GenerateArgs),
    /// Quantize a model's LLM (q8, q4 or nf4; its vision tower too with --quantize-vision) and save it, to load quantized without the float checkpoint.
    Quantize(model_cmds::QuantizeArgs),
    /// Fold a LoRA folder's adapters into its base and save the merged LLaVA model.
    MergeLora(model_cmds::MergeLoraArgs),
    /// Write a tiny random LLaVA checkpoint (llava-hf layout, LLaMA tokenizer).
    DemoModel(demo::DemoModelArgs),
    /// The bundled demo: write the demo checkpoint and run forward + generate on a demo photo.
    Demo,
    /// Benchmark the input pipeline against the reference's Python pipeline (samples/s).
    BenchPipeline(bench::BenchPipelineArgs),
    /// The memory plan of a generate, chat, sqa-predict, stage1 or stage2 run (same arguments),
    /// before anything is loaded: weights, optimizer state, activations, KV cache, peak, capacity.
    Plan(plan_cmds::PlanArgs),
    /// Stage 1 (feature alignment): train the projector, vision and LLM frozen.
    Stage1(train_cmds::StageArgs),
    /// Stage 2 (end-to-end): train projector and LLM, vision frozen.
    Stage2(train_cmds::StageArgs),
    /// Serve the model: OpenAI-compatible chat completions with continuous batching, metrics and
    /// the web chat page at `/`.
    Serve(serve_cmds::ServeArgs),
    /// Interactive multi-turn chat about an image (reads standard input; /image, /reset, /exit).
    Chat(eval_cmds::ChatArgs),
    /// ScienceQA prediction (model_vqa_science): one JSON line per question, batched, resumable.
    SqaPredict(eval_cmds::SqaPredictArgs),
    /// Perplexity of a model (float or `--quantize`d) on a LLaVA JSON file: exp of the mean negative log-likelihood of its supervised tokens.
    Perplexity(eval_cmds::PerplexityArgs),
    /// ScienceQA scoring: the reference's answer parsing and the paper's category table.
    SqaEval(eval_cmds::SqaEvalArgs),
    /// Predict and score the demo's held-out questions with the stage-2 model, with real and blank images.
    DemoSqa(demo::DemoSqaArgs),
    /// Regenerate the demo's synthetic shapes dataset (datasets/demo-shapes).
    DemoData(demo::DemoDataArgs),
    /// Write random CLIP-architecture and LLaMA-architecture towers as Hugging Face directories.
    DemoTowers(demo::DemoTowersArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(data_cmds::TokenizeArgs),
    /// CLIP-preprocess one image into `pixel_values` [3, H, W].
    PreprocessImage(data_cmds::PreprocessImageArgs),
    /// Write `input_ids`, `labels` (and `pixel_values`) of one dataset sample, as the reference's preprocess.
    InspectSample(data_cmds::InspectSampleArgs),
    /// Convert ScienceQA problems to LLaVA JSON in one of the reference formats or `llava15`.
    SqaConvert(data_cmds::SqaConvertArgs),
    /// Benchmark a stage-1 and a stage-2 training step against PyTorch (small LLaVA shape, CPU).
    BenchTrain(bench::BenchTrainArgs),
    /// Benchmark prefill and decode against transformers' generate (small LLaVA shape, CPU).
    BenchGenerate(bench::BenchGenerateArgs),
    /// Compare the CPU backends on the small LLaVA shape (NdArray needs `--features ndarray`).
    BenchBackends(bench::BenchBackendsArgs),
    /// Load on `serve` from 1–64 concurrent clients, with continuous batching and with batching
    /// off (one request at a time): requests/s, output tokens/s, time to first token.
    BenchServe(bench_serve::BenchServeArgs),
    /// One LoRA training step of a LLaMA folder, ours against PyTorch + PEFT in the same run.
    BenchLora(bench_lora::BenchLoraArgs),
    /// Generation at real shapes (checkpoint folders, e.g. from scripts/real_shapes.py) against
    /// PyTorch loading the same folders: load, peak RSS, prefill/decode tok/s, bandwidth use.
    BenchReal(bench_real::BenchRealArgs),
    /// One configuration of bench-real in a process of its own (prints one JSON line).
    #[command(hide = true)]
    BenchRealOne(bench_real::BenchRealOneArgs),
}

/// The checkout the demo and the benchmarks read from and write `runs/` into: `--root`, else
/// `$LLAVA_ROOT`, else the nearest folder at or above the working directory that holds the demo's
/// recipes, else the checkout this binary was built from (the xtask convention).
fn checkout_root(given: Option<PathBuf>) -> PathBuf {
    let holds_recipes = |d: &Path| d.join("configs/demo-stage1.toml").is_file();
    given
        .or_else(|| std::env::var_os("LLAVA_ROOT").map(PathBuf::from))
        .or_else(|| {
            std::env::current_dir()
                .ok()
                .and_then(|cwd| cwd.ancestors().find(|d| holds_recipes(d)).map(Path::to_path_buf))
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf())
}

/// A failed allocation ends with an error message instead of an abort.
#[global_allocator]
static ALLOCATOR: llava::oom::ReportingAllocator = llava::oom::ReportingAllocator;

fn main() -> Result<()> {
    llava::tune_allocator();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let root = checkout_root(cli.root);
    if let Some(pixels) = cli.max_image_pixels {
        llava_data::image::set_max_image_pixels(pixels);
    }
    match cli.command {
        Command::Forward(args) => model_cmds::forward(args),
        Command::Serve(args) => serve_cmds::serve(args),
        Command::Generate(args) => model_cmds::generate(args),
        Command::Quantize(args) => model_cmds::quantize(args),
        Command::MergeLora(args) => model_cmds::merge_lora(args),
        Command::DemoModel(args) => demo::demo_model(args, &root),
        Command::Demo => demo::demo(&root),
        Command::BenchBackends(args) => bench::bench_backends(args, &root),
        Command::BenchTrain(args) => bench::bench_train(args, &root),
        Command::BenchGenerate(args) => bench::bench_generate(args, &root),
        Command::BenchPipeline(args) => bench::bench_pipeline(args, &root),
        Command::BenchLora(args) => bench_lora::bench_lora(args, &root),
        Command::BenchServe(args) => bench_serve::bench_serve(args, &root),
        Command::BenchReal(args) => bench_real::bench_real(args, &root),
        Command::BenchRealOne(args) => bench_real::bench_real_one(args),
        Command::Plan(args) => plan_cmds::plan(args, &root),
        Command::Stage1(args) => train_cmds::stage(args, llava_trainer::Stage::One, &root),
        Command::Stage2(args) => train_cmds::stage(args, llava_trainer::Stage::Two, &root),
        Command::Chat(args) => eval_cmds::chat(args),
        Command::SqaPredict(args) => eval_cmds::sqa_predict(args),
        Command::Perplexity(args) => eval_cmds::perplexity(args),
        Command::SqaEval(args) => eval_cmds::sqa_eval(args).map(|_| ()),
        Command::DemoSqa(args) => demo::demo_sqa(args, &root),
        Command::DemoData(args) => demo::demo_data(args, &root),
        Command::DemoTowers(args) => demo::demo_towers(args, &root),
        Command::Tokenize(args) => data_cmds::tokenize(args),
        Command::PreprocessImage(args) => data_cmds::preprocess_image(args),
        Command::InspectSample(args) => data_cmds::inspect_sample(args),
        Command::SqaConvert(args) => data_cmds::sqa_convert(args),
    }
}
