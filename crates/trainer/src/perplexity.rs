//! Perplexity of a model on a LLaVA JSON dataset: `exp` of the mean negative log-likelihood of
//! the tokens the reference's labels supervise (the answers; with the `plain` template, the
//! captions), images spliced in as in training.
//!
//! Why here: it is the training loss, summed over a whole dataset instead of averaged per batch,
//! so it reuses the trainer's batching, splicing and loss (the same numbers as the validation
//! loss, no second implementation). It is the measure of what quantizing a model costs: the
//! same held-out data under the float, q8 and q4 weights.

use std::path::Path;

use burn::tensor::ElementConversion;
use burn::tensor::backend::Backend;
use llava::LlavaError;
use llava::load::LoadedLlava;
use llava_data::conversation::conv_template;
use llava_data::dataset::{LlavaDataset, OnError, SampleConfig};
use llava_data::preprocess::PreprocessOptions;

use crate::run::TrainError;
use crate::{Batch, BatchLoss, batch_loss};

/// The negative log-likelihood a model gives a dataset's supervised tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Perplexity {
    /// Sum over the supervised tokens of `-ln p(token)` (nats).
    pub nll: f64,
    /// Supervised tokens counted (after the label shift; truncated tokens are not counted).
    pub tokens: usize,
    /// Samples read.
    pub samples: usize,
}

impl Perplexity {
    /// Mean negative log-likelihood per supervised token (nats): the loss over the whole data.
    pub fn mean_nll(&self) -> f64 {
        if self.tokens == 0 { f64::NAN } else { self.nll / self.tokens as f64 }
    }

    /// `exp(mean_nll)`; NaN when no token was supervised.
    pub fn value(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// A batch's perplexity from its loss (the mean over its `supervised` tokens).
    fn of_batch(mean_loss: f64, supervised: usize, samples: usize) -> Self {
        Self { nll: mean_loss * supervised as f64, tokens: supervised, samples }
    }

    /// Adds `other`'s tokens and samples to these (the perplexity of both together).
    pub fn merge(&mut self, other: Perplexity) {
        self.nll += other.nll;
        self.tokens += other.tokens;
        self.samples += other.samples;
    }
}

/// The perplexity of `batches` (token-weighted over all of them, unlike the validation loss,
/// which averages the batches' means), each spliced and truncated at `max_length` as in training.
pub fn batches_perplexity<B: Backend>(model: &llava::Llava<B>, batches: &[Batch<B>], max_length: usize) -> Perplexity {
    let mut total = Perplexity::default();
    for batch in batches {
        let BatchLoss { loss, supervised, .. } = batch_loss(model, batch, max_length);
        // A batch without a supervised token has a NaN mean loss and adds only its samples.
        let mean = if supervised > 0 { loss.into_scalar().elem::<f64>() } else { 0.0 };
        total.merge(Perplexity::of_batch(mean, supervised, batch.input_ids.len()));
    }
    total
}

/// What [`dataset_perplexity`] reads and how.
#[derive(Debug, Clone)]
pub struct PerplexityOptions {
    /// The conversation template the model was trained with (`plain` for stage-1 captions,
    /// `v1` for Vicuna-style conversations).
    pub template: String,
    /// Samples per forward pass.
    pub batch_size: usize,
    /// Tokens per sequence after the images are spliced in (longer ones are cut, as in training).
    pub max_length: usize,
    /// At most this many samples (the first ones); `None`: all.
    pub limit: Option<usize>,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        Self { template: "v1".into(), batch_size: 8, max_length: 2048, limit: None }
    }
}

/// The perplexity of a loaded model (float or quantized) on the LLaVA JSON file `data`, whose
/// images are in `image_folder`. A record that cannot be read is an error naming it.
pub fn dataset_perplexity<B: Backend>(
    loaded: &LoadedLlava<B>, data: &Path, image_folder: &Path, options: &PerplexityOptions, device: &B::Device,
) -> Result<Perplexity, TrainError> {
    let tokenizer = loaded.tokenizer.as_ref().ok_or(LlavaError::NoTokenizer)?;
    let template =
        conv_template(&options.template).ok_or_else(|| LlavaError::UnknownTemplate(options.template.clone()))?;
    if options.batch_size == 0 || options.max_length == 0 {
        return Err(TrainError::Config("the batch size and the maximum length must be at least 1".into()));
    }
    let dataset = LlavaDataset::open(data, image_folder, OnError::Stop)?;
    let config = SampleConfig {
        template,
        processor: loaded.processor.clone(),
        aspect: loaded.config.image_aspect,
        options: PreprocessOptions { model_max_length: options.max_length, ..Default::default() },
    };
    let count = options.limit.map_or(dataset.len(), |n| n.min(dataset.len()));
    let shape = loaded.processor.output_shape();
    let mut total = Perplexity::default();
    let indices: Vec<usize> = (0..count).collect();
    let progress = llava_io::activity::doing(&format!("perplexity of {count} samples of {}", data.display()));
    for chunk in indices.chunks(options.batch_size) {
        let samples = chunk.iter().map(|&i| dataset.sample(i, tokenizer, &config)).collect::<Result<Vec<_>, _>>()?;
        let batch = crate::run::to_batch(&samples, shape, device);
        total.merge(batches_perplexity(&loaded.model, std::slice::from_ref(&batch), options.max_length));
        tracing::info!("perplexity: {}/{count} samples, {:.4} so far", total.samples, total.value());
    }
    drop(progress);
    if total.tokens == 0 {
        return Err(TrainError::Config(format!(
            "{}: no supervised token in {count} samples (the template `{}` masks every one)",
            data.display(),
            options.template
        )));
    }
    Ok(total)
}
