//! Data commands: `tokenize`, `preprocess-image`, `inspect-sample`, `sqa-convert`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use llava_data::Tokenizer;
use llava_data::conversation::{TEMPLATE_NAMES, conv_template};
use llava_data::dataset::{LlavaDataset, OnError, SampleConfig};
use llava_data::image::{AspectMode, ProcessorConfig, load_and_preprocess};
use llava_data::preprocess::PreprocessOptions;
use safetensors::tensor::{Dtype, TensorView};

/// Writes named tensors (f32 or i64) to a safetensors file.
pub enum Out {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

pub fn write_safetensors(path: &Path, tensors: Vec<(&str, Out)>) -> Result<()> {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| match t {
            Out::F32(shape, v) => {
                (name.to_string(), Dtype::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            Out::I64(shape, v) => {
                (name.to_string(), Dtype::I64, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// A tokenizer.json, a tokenizer.model, or a directory holding either.
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long, allow_hyphen_values = true)]
    pub text: String,
    /// Prepend BOS.
    #[arg(long)]
    pub bos: bool,
}

pub fn tokenize(args: TokenizeArgs) -> Result<()> {
    let tok = Tokenizer::from_path(&args.tokenizer)?;
    println!("{}", serde_json::to_string(&tok.encode(&args.text, args.bos))?);
    Ok(())
}

#[derive(Args, Debug)]
pub struct PreprocessImageArgs {
    #[arg(long)]
    pub image: PathBuf,
    /// preprocessor_config.json or its directory.
    #[arg(long)]
    pub processor: PathBuf,
    #[arg(long, default_value = "crop")]
    pub mode: AspectMode,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn preprocess_image(args: PreprocessImageArgs) -> Result<()> {
    let config = ProcessorConfig::from_path(&args.processor)?;
    let px = load_and_preprocess(&args.image, &config, args.mode)?;
    write_safetensors(&args.out, vec![("pixel_values", Out::F32(config.output_shape().to_vec(), px))])
}

#[derive(Args, Debug)]
pub struct InspectSampleArgs {
    /// A LLaVA JSON file.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub image_folder: PathBuf,
    /// A conversation template name of the reference (`plain`, `v1`, `llava_llama_2`, …).
    #[arg(long)]
    pub template: String,
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long)]
    pub index: usize,
    #[arg(long)]
    pub out: PathBuf,
    /// preprocessor_config.json or its directory (default: CLIP at 224 px).
    #[arg(long)]
    pub processor: Option<PathBuf>,
    #[arg(long, default_value = "crop")]
    pub mode: AspectMode,
    #[arg(long, default_value_t = 2048)]
    pub model_max_length: usize,
}

pub fn inspect_sample(args: InspectSampleArgs) -> Result<()> {
    let template = conv_template(&args.template)
        .with_context(|| format!("unknown template `{}` (one of: {})", args.template, TEMPLATE_NAMES.join(", ")))?;
    let tok = Tokenizer::from_path(&args.tokenizer)?;
    let processor = match &args.processor {
        Some(p) => ProcessorConfig::from_path(p)?,
        None => ProcessorConfig::clip(224),
    };
    let ds = LlavaDataset::open(&args.data, &args.image_folder, OnError::Stop)?;
    if args.index >= ds.len() {
        bail!("--index {} is out of range: {} has {} records", args.index, args.data.display(), ds.len());
    }
    let config = SampleConfig {
        template,
        processor,
        aspect: args.mode,
        options: PreprocessOptions { model_max_length: args.model_max_length, ..Default::default() },
    };
    let s = ds.sample(args.index, &tok, &config)?;
    let n = s.input_ids.len();
    let mut out = vec![("input_ids", Out::I64(vec![n], s.input_ids)), ("labels", Out::I64(vec![n], s.labels))];
    if let Some(px) = s.pixel_values {
        out.push(("pixel_values", Out::F32(config.processor.output_shape().to_vec(), px)));
    }
    write_safetensors(&args.out, out)?;
    tracing::info!("sample {} (id {}): {n} tokens → {}", args.index, s.id, args.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct SqaConvertArgs {
    #[arg(long)]
    pub problems: PathBuf,
    #[arg(long)]
    pub splits: PathBuf,
    #[arg(long)]
    pub split: String,
    /// A reference format (QCM-LEA, CQM-A, QCM-LEPA, …) or `llava15`.
    #[arg(long, default_value = "QCM-LEA")]
    pub format: String,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn sqa_convert(args: SqaConvertArgs) -> Result<()> {
    use llava_eval::scienceqa::{convert_split, load_problems, load_split};
    let problems = load_problems(&args.problems)?;
    let pids = load_split(&args.splits, &args.split)?;
    let samples = convert_split(&problems, &pids, &args.format)?;
    let text = serde_json::to_string_pretty(&samples)?;
    llava_io::write_atomically(&args.out, |w| w.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(
        "{} samples of split {} in format {} → {}",
        samples.len(),
        args.split,
        args.format,
        args.out.display()
    );
    Ok(())
}
