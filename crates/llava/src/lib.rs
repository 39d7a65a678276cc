//! LLaVA composed: the CLIP vision tower, the projector and the LLaMA decoder, with the
//! reference's image splicing, checkpoint loading in three layouts, generation and chat sessions.
//! Depends on the three model crates, `llava-checkpoint` and `llava-data`; it knows nothing of
//! training or evaluation (those crates build on it).
//!
//! ```no_run
//! use llava::{backend::Cpu, load::{load_dir, LoadOptions}, generate::{generate, GenerationConfig}};
//! use llava_data::tokenizer_image_token;
//!
//! let device = Default::default();
//! let loaded = load_dir::<Cpu>("llava-1.5-7b-hf".as_ref(), &LoadOptions::default(), &device)?;
//! let tokenizer = loaded.tokenizer.as_ref().expect("the directory ships a tokenizer");
//! let pixels = llava::image_tensor::<Cpu>("photo.jpg".as_ref(), &loaded.processor, loaded.config.image_aspect, &device)?;
//! let prompt = tokenizer_image_token(tokenizer, "USER: <image>\nWhat is shown? ASSISTANT:");
//! let out = generate(&loaded.model, &[prompt], Some(pixels), &GenerationConfig::default(), |_, _| true);
//! println!("{}", tokenizer.decode(&out[0], true));
//! # Ok::<(), llava::LlavaError>(())
//! ```

pub mod backend;
pub mod chat;
pub mod generate;
pub mod hf_config;
pub mod load;
pub mod model;
pub mod oom;
pub mod plan;
pub mod save;

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use llava_data::image::{AspectMode, ProcessorConfig};

pub use hf_config::{LlavaHfConfig, OriginalLlavaConfig};
pub use llava_kernels::QuantFormat;
pub use load::{LlavaConfig, LoadOptions, LoadedLlava};
pub use model::{ImageFeatures, Llava, PaddingSide, SelectFeature, SplicedBatch};

#[derive(Debug, thiserror::Error)]
pub enum LlavaError {
    #[error(transparent)]
    Weights(#[from] llava_checkpoint::WeightsError),
    #[error(transparent)]
    Vision(#[from] llava_vision_encoder::VisionError),
    #[error(transparent)]
    Llm(#[from] llava_llm::LlmError),
    #[error(transparent)]
    Tokenizer(#[from] llava_data::TokenizerError),
    #[error(transparent)]
    Image(#[from] llava_data::image::ImageError),
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("the model directory has no tokenizer (tokenizer.model or tokenizer.json)")]
    NoTokenizer,
    #[error("an image was given, but the {layout} checkpoint is a text-only model")]
    NoVisionTower { layout: String },
    #[error("{}", image_count_message(*markers, *images))]
    ImageCount { markers: usize, images: usize },
    #[error(
        "the prompt is {tokens} tokens ({images} image(s) of {image_tokens} tokens each included), longer than the model's context of {context} (max_position_embeddings)"
    )]
    PromptTooLong { tokens: usize, images: usize, image_tokens: usize, context: usize },
    #[error("unknown conversation template `{0}`")]
    UnknownTemplate(String),
    #[error(
        "vision tower `{name}` not found: it is not a directory (relative to {model_dir} or absolute) and not in the Hugging Face cache {cache}; pass its directory with --vision-tower"
    )]
    VisionTowerNotFound { name: String, model_dir: PathBuf, cache: String },
}

fn image_count_message(markers: usize, images: usize) -> String {
    match images {
        0 => format!("the prompt has {markers} `<image>` place(s) but no image was given"),
        _ => format!(
            "{images} image(s) for {markers} `<image>` place(s) in the prompt: each image needs exactly one `<image>` marking where it goes"
        ),
    }
}

impl LlavaError {
    pub fn config(path: impl AsRef<Path>, reason: impl ToString) -> Self {
        Self::Config { path: path.as_ref().to_path_buf(), reason: reason.to_string() }
    }
}

/// Reads and preprocesses an image file into a `[1, 3, H, W]` tensor.
pub fn image_tensor<B: Backend>(
    path: &Path, processor: &ProcessorConfig, aspect: AspectMode, device: &B::Device,
) -> Result<Tensor<B, 4>, LlavaError> {
    let values = llava_data::image::load_and_preprocess(path, processor, aspect)?;
    let [c, h, w] = processor.output_shape();
    Ok(Tensor::from_data(TensorData::new(values, [1, c, h, w]), device))
}

/// Preprocessed images, each `[c, h, w]` flattened and laid end to end, as one `[n, c, h, w]`
/// tensor; `None` when there are none.
pub fn images_tensor<B: Backend>(values: Vec<f32>, [c, h, w]: [usize; 3], device: &B::Device) -> Option<Tensor<B, 4>> {
    let n = values.len() / (c * h * w);
    (n > 0).then(|| Tensor::from_data(TensorData::new(values, [n, c, h, w]), device))
}

/// Tunes glibc's allocator for tensor work; call once at the start of a program, before any
/// other thread exists (a no-op off glibc).
///
/// glibc returns every block above its mmap threshold to the kernel when it is freed, so each
/// training or decoding step page-faults its big tensors in afresh (~7 % of a CPU step in
/// `perf`); a high threshold keeps them in the heap for reuse, and a high trim threshold keeps
/// the heap top instead of giving it back after every large free (10–20 % faster CPU steps).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; the caller runs this before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
