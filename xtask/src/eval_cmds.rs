//! `chat`, `sqa-predict` and `sqa-eval`: the paper's two uses of a trained model.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::Args;
use llava::chat::{ChatSession, choose_template};
use llava::generate::SamplingConfig;
use llava::plan::GenerationShape;
use llava_eval::predict::{ImageSource, PredictOptions, ScienceRunner, predict_to_file, read_questions};
use llava_eval::scienceqa::{load_problems, load_split};
use llava_eval::score::{Fallback, SqaResult, format_table, read_answers, read_results, score_answers, score_results};

use crate::model_cmds::ModelArgs;

#[derive(Args, Debug)]
pub struct SqaPredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LLaVA-format question file (e.g. llava_test_CQM-A.json).
    #[arg(long)]
    pub questions: PathBuf,
    #[arg(long)]
    pub image_folder: PathBuf,
    /// Answers, one JSON line per question; an existing file is resumed.
    #[arg(long)]
    pub out: PathBuf,
    /// Append "Answer with the option's letter from the given choices directly." (LLaVA-1.5).
    #[arg(long)]
    pub single_pred_prompt: bool,
    /// Conversation template (default: chosen from the model's name, as the reference).
    #[arg(long)]
    pub template: Option<String>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// 0 = greedy (LLaVA-1.5's evaluation).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace every image with a blank one (what the model answers without seeing).
    #[arg(long)]
    pub blank_images: bool,
    /// Split the questions into this many chunks (the reference's `--num-chunks`) ...
    #[arg(long, default_value_t = 1)]
    pub num_chunks: usize,
    /// ... and answer only this one (0-based, `--chunk-idx`); concatenate the chunks' answer files.
    #[arg(long, default_value_t = 0)]
    pub chunk_idx: usize,
}

pub fn sqa_predict(args: SqaPredictArgs) -> Result<()> {
    SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed: args.seed }
        .validate()
        .map_err(anyhow::Error::msg)?;
    llava::with_backend!(args.model.backend, sqa_predict_on(&args))
}

fn sqa_predict_on<B: Backend>(device: &B::Device, args: &SqaPredictArgs) -> Result<()> {
    // Checked before the model loads (the library checks again, in its own words).
    if args.num_chunks == 0 || args.chunk_idx >= args.num_chunks {
        bail!("--chunk-idx {} is not one of --num-chunks {} chunks (0-based)", args.chunk_idx, args.num_chunks);
    }
    let questions = read_questions(&args.questions)?;
    let (loaded, plan) = args.model.load_planned::<B>(device, &|_| args.shape(&questions), Some("--batch-size"))?;
    let (template_name, template) = choose_template(args.template.as_deref(), args.model.model.as_deref())?;
    let model_id = args
        .model
        .model
        .as_deref()
        .and_then(|m| m.file_name())
        .map_or("llava".into(), |n| n.to_string_lossy().to_string());
    tracing::info!("{} questions, template {template_name}, batch {}", questions.len(), args.batch_size);
    let mut runner = ScienceRunner::new(&loaded, &template, args.image_folder.clone(), args.max_new_tokens)?;
    runner.images = if args.blank_images { ImageSource::Blank } else { ImageSource::File };
    runner.single_pred_prompt = args.single_pred_prompt;
    runner.generation.sampling = SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed: args.seed };
    let options = PredictOptions {
        batch_size: args.batch_size,
        num_chunks: args.num_chunks,
        chunk_idx: args.chunk_idx,
        model_id,
    };
    let start = Instant::now();
    predict_to_file(&runner, questions, &args.out, &options, |answered, all| {
        let rate = answered as f64 / start.elapsed().as_secs_f64().max(1e-9);
        tracing::info!("{answered}/{all} answered ({rate:.1} questions/s)");
    })?;
    tracing::info!("answers in {}", args.out.display());
    if let Some(line) = llava::plan::peak_report(&plan) {
        tracing::info!("{line}");
    }
    Ok(())
}

impl SqaPredictArgs {
    /// A batch of the longest question (its tokens bounded by its bytes, plus the template's and
    /// the instruction's), one image each.
    pub fn shape(&self, questions: &[llava_eval::predict::Question]) -> GenerationShape {
        let longest = questions.iter().map(|q| q.human.len()).max().unwrap_or(0);
        GenerationShape {
            command: "sqa-predict",
            batch: self.batch_size.max(1).min(questions.len().max(1)),
            text_tokens: longest + 256,
            images: 1,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

impl ChatArgs {
    /// A conversation as long as the model's context (the chat's KV cache at its largest).
    pub fn shape(&self, config: &llava::LlavaConfig) -> GenerationShape {
        let images = usize::from(self.image.is_some());
        let context = config.max_length.max(config.image_tokens() * images + 1);
        GenerationShape {
            command: "chat",
            batch: 1,
            text_tokens: context.saturating_sub(config.image_tokens() * images + self.max_new_tokens).max(1),
            images,
            max_new_tokens: self.max_new_tokens,
        }
    }
}

#[derive(Args, Debug)]
pub struct SqaEvalArgs {
    /// ScienceQA problems.json.
    #[arg(long)]
    pub problems: PathBuf,
    /// ScienceQA pid_splits.json.
    #[arg(long)]
    pub splits: PathBuf,
    /// Answers from sqa-predict (JSON lines); or give --results.
    #[arg(long, required_unless_present = "results", conflicts_with = "results")]
    pub answers: Option<PathBuf>,
    /// Score an existing result file (`results`: pid -> chosen index) instead of answers.
    #[arg(long)]
    pub results: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    pub split: String,
    /// What an unparsable answer counts as: wrong (reference HEAD) or random (paper-era).
    #[arg(long, default_value = "wrong")]
    pub fallback: Fallback,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the result file (acc, correct, count, results, outputs, categories).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Scores and prints the paper's table; returns the result.
pub fn sqa_eval(args: SqaEvalArgs) -> Result<SqaResult> {
    let problems = load_problems(&args.problems)?;
    let pids = load_split(&args.splits, &args.split)?;
    let result = match (&args.answers, &args.results) {
        (_, Some(path)) => score_results(&problems, &pids, &read_results(path)?),
        (Some(path), None) => score_answers(&problems, &pids, &read_answers(path)?, args.fallback, args.seed),
        (None, None) => bail!("give --answers or --results"),
    };
    let img = result.img_acc.map(|a| format!(", IMG-Accuracy: {a:.2}%")).unwrap_or_default();
    eprintln!("Total: {}, Correct: {}, Accuracy: {:.2}%{img}", result.count, result.correct, result.acc);
    println!("{}", format_table(&result));
    if let Some(out) = &args.out {
        let text = serde_json::to_string_pretty(&result)?;
        llava_io::write_atomically(out, |w| w.write_all(text.as_bytes()))
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(result)
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Conversation template (default: chosen from the model's name, as the reference CLI).
    #[arg(long)]
    pub template: Option<String>,
    /// 0 = greedy; the reference CLI's default is 0.2.
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
}

pub fn chat(args: ChatArgs) -> Result<()> {
    SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed: args.seed }
        .validate()
        .map_err(anyhow::Error::msg)?;
    llava::with_backend!(args.model.backend, chat_on(&args))
}

/// The reference CLI (`llava/serve/cli.py`) on standard input, one user turn per line; the reply
/// streams to standard output. Commands: `/image PATH`, `/reset`, `/exit`.
fn chat_on<B: Backend>(device: &B::Device, args: &ChatArgs) -> Result<()> {
    let (loaded, _plan) = args.model.load_planned::<B>(device, &|c| args.shape(c), None)?;
    let (template_name, template) = choose_template(args.template.as_deref(), args.model.model.as_deref())?;
    tracing::info!("template {template_name}; commands: /image PATH, /reset, /exit");
    let sampling = SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed: args.seed };
    let mut session = ChatSession::new(&loaded, template, sampling, args.max_new_tokens)?;
    if let Some(image) = &args.image {
        session.set_image(image)?;
    }
    let interactive = std::io::stdin().is_terminal();
    let [user, assistant] = session.roles();
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    loop {
        if interactive {
            eprint!("{user}: ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.trim().is_empty() {
            continue;
        }
        match line {
            "/exit" => break,
            "/reset" => {
                session.reset();
                eprintln!("(history cleared)");
                continue;
            }
            _ => {}
        }
        if let Some(path) = line.strip_prefix("/image ") {
            match session.set_image(Path::new(path.trim())) {
                Ok(()) => eprintln!("(image set; history cleared)"),
                Err(e) => eprintln!("({e})"),
            }
            continue;
        }
        if interactive {
            eprint!("{assistant}: ");
        }
        let mut out = stdout.lock();
        session.send(line, |text| {
            let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
        })?;
        writeln!(out)?;
        out.flush()?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A LLaVA JSON file (e.g. held-out captions or conversations).
    #[arg(long)]
    pub data: PathBuf,
    /// The folder its records' images are in.
    #[arg(long)]
    pub image_folder: PathBuf,
    /// The conversation template the model was trained with (`plain` for stage-1 captions).
    #[arg(long, default_value = "v1")]
    pub template: String,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per sequence, images spliced in (longer ones are cut, as in training).
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Only the first N records.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// `perplexity`: exp of the mean negative log-likelihood of the supervised tokens, printed as a
/// JSON line (what quantizing costs: run it with and without `--quantize`).
pub fn perplexity(args: PerplexityArgs) -> Result<()> {
    llava::with_backend!(args.model.backend, perplexity_on(&args))
}

fn perplexity_on<B: Backend>(device: &B::Device, args: &PerplexityArgs) -> Result<()> {
    use llava_trainer::perplexity::{PerplexityOptions, dataset_perplexity};
    let loaded = args.model.load::<B>(device)?;
    let options = PerplexityOptions {
        template: args.template.clone(),
        batch_size: args.batch_size,
        max_length: args.max_length,
        limit: args.limit,
    };
    let start = Instant::now();
    let result = dataset_perplexity(&loaded, &args.data, &args.image_folder, &options, device)
        .with_context(|| format!("perplexity of {}", args.data.display()))?;
    tracing::info!(
        "perplexity {:.4} (mean NLL {:.5} nats over {} tokens of {} samples) in {:.1} s",
        result.value(),
        result.mean_nll(),
        result.tokens,
        result.samples,
        start.elapsed().as_secs_f64()
    );
    // What the model holds (a saved quantized model is quantized without the flag).
    let model = &loaded.model;
    let weights = match (model.llm.quantization(), model.vision.quantization()) {
        (None, None) => "float".to_string(),
        (Some(q), None) => q.to_string(),
        (llm, Some(vision)) => format!("{}, vision tower {vision}", llm.map_or("float".into(), |q| q.to_string())),
    };
    println!(
        "{}",
        serde_json::json!({
            "data": args.data.display().to_string(),
            "weights": weights,
            "perplexity": result.value(),
            "mean_nll": result.mean_nll(),
            "tokens": result.tokens,
            "samples": result.samples,
        })
    );
    Ok(())
}
