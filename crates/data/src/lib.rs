//! Everything between a dataset on disk and token ids / pixel tensors: tokenizers
//! (SentencePiece `tokenizer.model` and Hugging Face `tokenizer.json`), the reference's
//! `tokenizer_image_token`, and CLIP image preprocessing.
//!
//! This crate knows nothing about Burn or the model, nor about any evaluation or demo: it
//! produces plain `Vec`s (and must not depend on another crate of this workspace).

pub mod conversation;
pub mod dataset;
pub mod image;
pub mod jpeg;
pub mod preprocess;
mod quiet;
pub mod sentencepiece;
pub mod tokenizer;

pub use tokenizer::{StreamDecoder, Tokenizer, TokenizerError, tokenizer_image_token};

/// Label value ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;
/// Sentinel id placed in `input_ids` where an image's features are spliced in.
pub const IMAGE_TOKEN_INDEX: i64 = -200;
/// The placeholder string for an image in prompts and data.
pub const DEFAULT_IMAGE_TOKEN: &str = "<image>";
