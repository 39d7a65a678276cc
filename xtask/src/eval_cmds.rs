//! `chat`, `sqa-predict` and `sqa-eval`: the paper's two uses of a trained model.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::Args;
use llava::generate::{GenerationConfig, SamplingConfig, generate as run_generation};
use llava::science::{AnswerRecord, ImageSource, Question, ScienceRunner, answer_id, resume_answers};
use llava_data::conversation::{Conversation, conv_template, template_for_model_name};
use llava_data::dataset::Record;
use llava_data::scienceqa::{load_problems, load_split};
use llava_data::sqa_score::{AnswerLine, Fallback, SqaResult, format_table, score_answers, score_results};
use llava_data::{DEFAULT_IMAGE_TOKEN, tokenizer_image_token};

use crate::model_cmds::{ModelArgs, eos_ids};

/// The conversation template: `--template`, else chosen from the model directory's name as the
/// reference CLI does.
fn pick_template(name: Option<&str>, model: Option<&Path>) -> Result<(String, Conversation)> {
    let chosen = match name {
        Some(n) => n.to_string(),
        None => {
            let model_name = model.and_then(|m| m.file_name()).map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            template_for_model_name(&model_name).to_string()
        }
    };
    let conv = conv_template(&chosen).with_context(|| format!("unknown conversation template `{chosen}`"))?;
    Ok((chosen, conv))
}

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

fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let records: Vec<Record> = serde_json::from_str(&text).with_context(|| format!("{}: not a LLaVA question file (JSON array of records)", path.display()))?;
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let human = r.conversations.first().map(|t| t.value.clone());
            let human = human.with_context(|| format!("{}: record {i} (id {}) has no conversation", path.display(), r.id_string()))?;
            Ok(Question { id: r.id_string(), image: r.image, human })
        })
        .collect()
}

pub fn sqa_predict(args: SqaPredictArgs) -> Result<()> {
    llava::with_backend!(args.model.backend, sqa_predict_on(&args))
}

fn sqa_predict_on<B: Backend>(device: &B::Device, args: &SqaPredictArgs) -> Result<()> {
    if args.num_chunks == 0 || args.chunk_idx >= args.num_chunks {
        bail!("--chunk-idx {} is not one of --num-chunks {} chunks (0-based)", args.chunk_idx, args.num_chunks);
    }
    let questions = llava::science::chunk(read_questions(&args.questions)?, args.num_chunks, args.chunk_idx);
    let done: std::collections::HashSet<String> = resume_answers(&args.out)?.into_iter().map(|a| a.question_id).collect();
    let todo: Vec<Question> = questions.into_iter().filter(|q| !done.contains(&q.id)).collect();
    if !done.is_empty() {
        tracing::info!("{}: {} answers already written, {} to go", args.out.display(), done.len(), todo.len());
    }
    let loaded = args.model.load::<B>(device)?;
    let tokenizer = loaded.tokenizer.as_ref().context("the model directory has no tokenizer")?;
    let (template_name, template) = pick_template(args.template.as_deref(), args.model.model.as_deref())?;
    let model_id = args.model.model.as_deref().and_then(|m| m.file_name()).map_or("llava".into(), |n| n.to_string_lossy().to_string());
    tracing::info!("{} questions, template {template_name}, batch {}", todo.len(), args.batch_size);
    let runner = ScienceRunner {
        model: &loaded.model,
        tokenizer,
        processor: &loaded.processor,
        aspect: loaded.config.image_aspect,
        template: &template,
        image_folder: args.image_folder.clone(),
        images: if args.blank_images { ImageSource::Blank } else { ImageSource::File },
        single_pred_prompt: args.single_pred_prompt,
        generation: GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            sampling: SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
            eos_ids: eos_ids(&loaded),
            use_cache: true,
        },
    };
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&args.out).with_context(|| format!("opening {}", args.out.display()))?;
    // Answer ids are random (shortuuid in the reference), not tied to the sampling seed.
    let mut rng = rand::rng();
    let start = Instant::now();
    let mut answered = 0usize;
    for batch in todo.chunks(args.batch_size.max(1)) {
        let answers = runner.answer(batch).with_context(|| format!("answering question {}", batch[0].id))?;
        for (q, (prompt, text)) in batch.iter().zip(answers) {
            let record = AnswerRecord {
                question_id: q.id.clone(),
                prompt,
                text,
                answer_id: answer_id(&mut rng),
                model_id: model_id.clone(),
                metadata: serde_json::json!({}),
            };
            writeln!(out, "{}", serde_json::to_string(&record)?)?;
        }
        out.flush()?;
        answered += batch.len();
        let rate = answered as f64 / start.elapsed().as_secs_f64().max(1e-9);
        tracing::info!("{answered}/{} answered ({rate:.1} questions/s)", todo.len());
    }
    tracing::info!("answers in {}", args.out.display());
    Ok(())
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
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
            let results = serde_json::from_value(value.get("results").cloned().with_context(|| format!("{}: no `results` field", path.display()))?)
                .with_context(|| format!("{}: `results` must map pid to an index", path.display()))?;
            score_results(&problems, &pids, &results)
        }
        (Some(path), None) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let mut answers = HashMap::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let a: AnswerLine = serde_json::from_str(line).with_context(|| format!("{}: line {}", path.display(), i + 1))?;
                answers.insert(a.question_id.clone(), a);
            }
            score_answers(&problems, &pids, &answers, args.fallback, args.seed)
        }
        (None, None) => bail!("give --answers or --results"),
    };
    let img = result.img_acc.map(|a| format!(", IMG-Accuracy: {a:.2}%")).unwrap_or_default();
    eprintln!("Total: {}, Correct: {}, Accuracy: {:.2}%{img}", result.count, result.correct, result.acc);
    println!("{}", format_table(&result));
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&result)?).with_context(|| format!("writing {}", out.display()))?;
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
    llava::with_backend!(args.model.backend, chat_on(&args))
}

/// The reference CLI (`llava/serve/cli.py`): the image goes with the first user turn; every turn
/// is generated from the whole templated history; the reply streams; EOS or the template's stop
/// string ends it. Commands: `/image PATH`, `/reset`, `/exit`.
fn chat_on<B: Backend>(device: &B::Device, args: &ChatArgs) -> Result<()> {
    let loaded = args.model.load::<B>(device)?;
    let tokenizer = loaded.tokenizer.as_ref().context("the model directory has no tokenizer")?;
    let (template_name, template) = pick_template(args.template.as_deref(), args.model.model.as_deref())?;
    tracing::info!("template {template_name}; commands: /image PATH, /reset, /exit");
    let interactive = std::io::stdin().is_terminal();
    let stop = template.stop_str().map(str::to_string);
    let mut conv = template.clone();
    let mut image = args.image.clone();
    let mut pixels = None;
    let mut image_sent = false;
    let mut seed = args.seed;
    let [user, assistant] = conv.roles.clone();
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
        if line == "/exit" {
            break;
        }
        if line == "/reset" {
            conv = template.clone();
            image_sent = false;
            pixels = None;
            eprintln!("(history cleared)");
            continue;
        }
        if let Some(path) = line.strip_prefix("/image ") {
            let path = PathBuf::from(path.trim());
            if !path.is_file() {
                eprintln!("(no such image: {})", path.display());
                continue;
            }
            // A new image starts a new conversation: the prompt holds one image.
            image = Some(path);
            conv = template.clone();
            image_sent = false;
            pixels = None;
            eprintln!("(image set; history cleared)");
            continue;
        }
        let mut message = line.to_string();
        if let Some(path) = image.as_ref().filter(|_| !image_sent) {
            if !loaded.has_vision {
                bail!("--image given, but the {:?} checkpoint is a text-only model", loaded.layout);
            }
            pixels = Some(llava::image_tensor::<B>(path, &loaded.processor, loaded.config.image_aspect, device)?);
            message = format!("{DEFAULT_IMAGE_TOKEN}\n{message}");
            image_sent = true;
        }
        conv.append_message(&user, Some(&message));
        conv.append_message(&assistant, None);
        let ids = tokenizer_image_token(tokenizer, &conv.get_prompt());
        let config = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            sampling: SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed },
            eos_ids: eos_ids(&loaded),
            use_cache: true,
        };
        seed = seed.wrapping_add(1);
        if interactive {
            eprint!("{assistant}: ");
        }
        let mut stream = tokenizer.stream(true);
        let mut text = String::new();
        let mut printed = 0usize;
        let mut out = stdout.lock();
        run_generation(&loaded.model, &[ids], pixels.clone(), &config, |_, token| {
            text += &stream.push(token);
            // Hold back what could be the start of the stop string; print the rest.
            let (visible, stopped) = match stop.as_deref().and_then(|s| text.find(s).map(|i| (i, s))) {
                Some((i, _)) => (i, true),
                None => {
                    let hold = stop.as_deref().map_or(0, |s| (1..s.len()).rev().find(|&k| text.ends_with(&s[..k])).unwrap_or(0));
                    (text.len() - hold, false)
                }
            };
            let visible = (printed..=visible).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(printed);
            let _ = out.write_all(text[printed..visible].as_bytes()).and_then(|_| out.flush());
            printed = visible;
            !stopped
        });
        let reply = match stop.as_deref().and_then(|s| text.find(s)) {
            Some(i) => text[..i].to_string(),
            None => text.clone(),
        };
        if printed < reply.len() {
            let _ = out.write_all(reply[printed..].as_bytes());
        }
        writeln!(out)?;
        out.flush()?;
        conv.messages.pop();
        conv.append_message(&assistant, Some(reply.trim()));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct DemoSqaArgs {
    /// The stage-2 model (default: the demo's).
    #[arg(long, default_value = "runs/demo-stage2/model")]
    pub model: PathBuf,
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value = "cpu")]
    pub backend: llava::backend::BackendKind,
}

/// The demo's evaluation: `sqa-predict` on the held-out questions (v1 template, single-prediction
/// prompt, greedy), then `sqa-eval`; once with the real pictures, once with blank ones.
pub fn demo_sqa(args: DemoSqaArgs) -> Result<()> {
    std::env::set_current_dir(crate::demo::repo_root())?;
    if !args.model.join("config.json").is_file() {
        bail!("{}: no model; run `cargo xtask stage1` and `cargo xtask stage2` first", args.model.display());
    }
    let data = PathBuf::from(crate::train_cmds::DEMO_DATA);
    let out_dir = args.model.parent().unwrap_or(Path::new(".")).join("eval");
    std::fs::create_dir_all(&out_dir)?;
    let mut summary = Vec::new();
    for (label, blank) in [("images", false), ("blank images", true)] {
        let answers = out_dir.join(format!("answers-{}{}.jsonl", args.split, if blank { "-blank" } else { "" }));
        let _ = std::fs::remove_file(&answers);
        sqa_predict(SqaPredictArgs {
            model: ModelArgs::for_dir(&args.model, args.backend),
            questions: data.join(format!("scienceqa/llava_{}_CQM-A.json", args.split)),
            image_folder: data.join("images"),
            out: answers.clone(),
            single_pred_prompt: true,
            template: Some("vicuna_v1".into()),
            batch_size: args.batch_size,
            max_new_tokens: 8,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            blank_images: blank,
            num_chunks: 1,
            chunk_idx: 0,
        })?;
        eprintln!("ScienceQA-style {} split, {label}:", args.split);
        let result = sqa_eval(SqaEvalArgs {
            problems: data.join("scienceqa/problems.json"),
            splits: data.join("scienceqa/pid_splits.json"),
            answers: Some(answers.clone()),
            results: None,
            split: args.split.clone(),
            fallback: Fallback::Wrong,
            seed: 0,
            out: Some(out_dir.join(format!("result-{}{}.json", args.split, if blank { "-blank" } else { "" }))),
        })?;
        summary.push((label, result.acc, result.correct, result.count));
    }
    // Chance = the expected accuracy of a uniform guess, averaged over the split's questions.
    let problems = load_problems(&data.join("scienceqa/problems.json"))?;
    let pids = load_split(&data.join("scienceqa/pid_splits.json"), &args.split)?;
    let chance = 100.0 * pids.iter().map(|p| 1.0 / problems[p].choices.len() as f64).sum::<f64>() / pids.len().max(1) as f64;
    for (label, acc, correct, count) in summary {
        tracing::info!("held-out accuracy with {label}: {acc:.2}% ({correct}/{count}); chance {chance:.2}%");
    }
    Ok(())
}
