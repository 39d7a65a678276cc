//! LLaVA JSON datasets (a list of `{id, image?, conversations: [{from, value}]}` with an image
//! folder: CC3M-595K, LCS-558K, LLaVA-Instruct-158K/80K, mix665k), turned into training samples
//! exactly as the reference's `LazySupervisedDataset.__getitem__`, plus the reference's samplers
//! and a multi-threaded prefetching loader.
//!
//! Records are parsed up front (text only); images are read lazily, per sample. Bad records and
//! bad images are reported with the file, the index and the id; [`OnError`] decides whether a
//! run skips (and counts) them or stops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::conversation::Conversation;
use crate::image::{AspectMode, ProcessorConfig, load_and_preprocess};
use crate::preprocess::{PreprocessOptions, Turn, preprocess, preprocess_multimodal};
use crate::tokenizer::Tokenizer;

/// One record of a LLaVA JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub conversations: Vec<Turn>,
}

impl Record {
    pub fn id_string(&self) -> String {
        match &self.id {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

/// What to do with a bad record or image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Report it, count it, and go on without it.
    #[default]
    Skip,
    /// Stop with the error.
    Stop,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: record {index} (id {id}): {reason}")]
    Record { path: PathBuf, index: usize, id: String, reason: String },
}

/// A parsed dataset file.
#[derive(Debug, Clone)]
pub struct LlavaDataset {
    pub path: PathBuf,
    pub image_folder: PathBuf,
    pub records: Vec<Record>,
    /// Indices (in the file) of the kept records.
    pub source_index: Vec<usize>,
    /// Records skipped at load, with their errors.
    pub skipped: Vec<DatasetError>,
    /// Image paths may be absolute (for data laid out that way); relative ones are always kept
    /// inside `image_folder`.
    pub allow_absolute_images: bool,
}

impl LlavaDataset {
    /// Reads and validates a LLaVA JSON file (a JSON array). A record's image path must stay
    /// inside `image_folder` (no absolute path, no `..` out of it); see [`Self::open_with`].
    pub fn open(path: &Path, image_folder: &Path, on_error: OnError) -> Result<Self, DatasetError> {
        Self::open_with(path, image_folder, on_error, false)
    }

    /// [`Self::open`], with absolute image paths allowed or not.
    pub fn open_with(
        path: &Path, image_folder: &Path, on_error: OnError, allow_absolute_images: bool,
    ) -> Result<Self, DatasetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DatasetError::File { path: path.into(), reason: e.to_string() })?;
        let values: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| DatasetError::File {
            path: path.into(),
            reason: format!("not a JSON array of records: {e}"),
        })?;
        let mut records = Vec::with_capacity(values.len());
        let mut source_index = Vec::with_capacity(values.len());
        let mut skipped = Vec::new();
        for (index, value) in values.into_iter().enumerate() {
            let id = value
                .get("id")
                .map(|v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string()))
                .unwrap_or_else(|| "?".into());
            let err = |reason: String| DatasetError::Record { path: path.into(), index, id: id.clone(), reason };
            let parsed = serde_json::from_value::<Record>(value).map_err(|e| err(e.to_string())).and_then(|r| {
                validate(&r).map_err(&err)?;
                if let Some(image) = &r.image {
                    llava_io::join_inside(image_folder, Path::new(image), allow_absolute_images)
                        .map_err(|e| err(e.to_string()))?;
                }
                Ok(r)
            });
            match parsed {
                Ok(r) => {
                    records.push(r);
                    source_index.push(index);
                }
                Err(e) if on_error == OnError::Skip => {
                    tracing::warn!("skipping: {e}");
                    skipped.push(e);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            path: path.into(),
            image_folder: image_folder.into(),
            records,
            source_index,
            skipped,
            allow_absolute_images,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The reference's `modality_lengths`: whitespace word count of all turns, negative for
    /// text-only samples.
    pub fn modality_lengths(&self) -> Vec<i64> {
        self.records
            .iter()
            .map(|r| {
                let n: usize = r.conversations.iter().map(|t| t.value.split_whitespace().count()).sum();
                if r.image.is_some() { n as i64 } else { -(n as i64) }
            })
            .collect()
    }

    fn record_error(&self, i: usize, reason: String) -> DatasetError {
        DatasetError::Record {
            path: self.path.clone(),
            index: self.source_index[i],
            id: self.records[i].id_string(),
            reason,
        }
    }
}

fn validate(r: &Record) -> Result<(), String> {
    if r.conversations.is_empty() {
        return Err("`conversations` is empty".into());
    }
    for (k, t) in r.conversations.iter().enumerate() {
        if t.from != "human" && t.from != "gpt" {
            return Err(format!("turn {k}: unknown `from` value `{}` (expected human or gpt)", t.from));
        }
    }
    Ok(())
}

/// How samples are turned into tensors' contents.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub template: Conversation,
    pub processor: ProcessorConfig,
    pub aspect: AspectMode,
    pub options: PreprocessOptions,
}

/// One training sample, ready to batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub index: usize,
    pub id: String,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// `[3, H, W]` when the record has an image.
    pub pixel_values: Option<Vec<f32>>,
}

impl LlavaDataset {
    /// The longest tokenized text among the `candidates` records with the most text (by bytes),
    /// templated as [`LlavaDataset::sample`] does but without reading any image: `(longest with
    /// an image, longest without)`, in tokens, the `<image>` marker not counted (a sample is that
    /// many tokens plus the image's). For memory plans: the sequence a batch will be padded to.
    /// Records that do not preprocess are skipped (training skips them too).
    pub fn longest_text_tokens(
        &self, tokenizer: &Tokenizer, config: &SampleConfig, candidates: usize,
    ) -> (usize, usize) {
        let bytes = |r: &Record| r.conversations.iter().map(|t| t.value.len()).sum::<usize>();
        let mut order: Vec<usize> = (0..self.records.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(bytes(&self.records[i])));
        let (mut with_image, mut without) = (0, 0);
        for &i in order.iter().take(candidates) {
            let record = &self.records[i];
            let mut turns = record.conversations.clone();
            let has_image = record.image.is_some();
            if has_image {
                preprocess_multimodal(&mut turns, &config.template, &config.options);
            }
            let Ok(processed) = preprocess(&turns, tokenizer, &config.template, has_image, &config.options) else {
                continue;
            };
            let text = processed.input_ids.iter().filter(|&&id| id != crate::IMAGE_TOKEN_INDEX).count();
            if has_image {
                with_image = with_image.max(text);
            } else {
                without = without.max(text);
            }
        }
        (with_image, without)
    }

    /// `LazySupervisedDataset.__getitem__(i)`: image loaded and preprocessed, `<image>` moved to
    /// the front of its turn, the conversation templated, tokenized and masked.
    pub fn sample(&self, i: usize, tokenizer: &Tokenizer, config: &SampleConfig) -> Result<Sample, DatasetError> {
        let record = &self.records[i];
        let mut turns = record.conversations.clone();
        let pixel_values = match &record.image {
            Some(image) => {
                let path = llava_io::join_inside(&self.image_folder, Path::new(image), self.allow_absolute_images)
                    .map_err(|e| self.record_error(i, e.to_string()))?;
                let px = load_and_preprocess(&path, &config.processor, config.aspect)
                    .map_err(|e| self.record_error(i, e.to_string()))?;
                preprocess_multimodal(&mut turns, &config.template, &config.options);
                Some(px)
            }
            None => None,
        };
        let processed = preprocess(&turns, tokenizer, &config.template, record.image.is_some(), &config.options)
            .map_err(|e| self.record_error(i, e.to_string()))?;
        // One image, one place: the reference moves every turn's `<image>` to the front of that
        // turn, so an image in two turns would need two images (the reference fails inside its
        // model with an index error; here the record is named instead).
        let places = processed.input_ids.iter().filter(|&&t| t == crate::IMAGE_TOKEN_INDEX).count();
        let pixel_values = match (pixel_values, places) {
            (Some(_), n) if n > 1 => {
                return Err(self.record_error(i, format!("{n} turns hold `<image>`, but a record has one image")));
            }
            // Truncation at model_max_length cut the image's place off: the reference still
            // encodes the image and uses none of it, which is the same as not giving it.
            (Some(_), 0) => None,
            (px, _) => px,
        };
        Ok(Sample {
            index: i,
            id: record.id_string(),
            input_ids: processed.input_ids,
            labels: processed.labels,
            pixel_values,
        })
    }
}

/// A seeded permutation of `0..n`.
pub fn shuffled_indices(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut StdRng::seed_from_u64(seed));
    idx
}

/// The reference's `split_to_even_chunks`: deal indices (longest first) to the currently
/// shortest chunk; round-robin when they do not divide evenly.
fn split_to_even_chunks(indices: &[usize], lengths: &[i64], num_chunks: usize) -> Vec<Vec<usize>> {
    if !indices.len().is_multiple_of(num_chunks) {
        return (0..num_chunks).map(|c| indices.iter().skip(c).step_by(num_chunks).copied().collect()).collect();
    }
    let per_chunk = indices.len() / num_chunks;
    let mut chunks = vec![Vec::new(); num_chunks];
    let mut chunk_lengths = vec![0f64; num_chunks];
    for &index in indices {
        let shortest = (0..num_chunks).fold(0, |best, c| if chunk_lengths[c] < chunk_lengths[best] { c } else { best });
        chunks[shortest].push(index);
        chunk_lengths[shortest] += lengths[index] as f64;
        if chunks[shortest].len() == per_chunk {
            chunk_lengths[shortest] = f64::INFINITY;
        }
    }
    chunks
}

/// `get_length_grouped_indices`: random megabatches of `world × batch`, each sorted by length
/// (longest first) and split into balanced chunks.
pub fn length_grouped_indices(lengths: &[i64], batch: usize, world: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..lengths.len()).collect();
    indices.shuffle(rng);
    let mega = world * batch;
    indices
        .chunks(mega)
        .flat_map(|m| {
            let mut m = m.to_vec();
            m.sort_by(|a, b| lengths[*b].cmp(&lengths[*a]));
            split_to_even_chunks(&m, lengths, world).into_iter().flatten()
        })
        .collect()
}

/// The reference's `group_by_modality_length` order (`get_modality_length_grouped_indices`):
/// image and text-only samples are length-grouped separately, their full megabatches shuffled
/// together, and the two leftover partial megabatches appended as one, sorted by index.
/// `lengths` as [`LlavaDataset::modality_lengths`]; `world` = devices × gradient accumulation.
pub fn modality_length_grouped_indices(lengths: &[i64], batch: usize, world: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    if lengths.iter().all(|&l| l > 0) || lengths.iter().all(|&l| l < 0) {
        let abs: Vec<i64> = lengths.iter().map(|l| l.abs()).collect();
        return length_grouped_indices(&abs, batch, world, &mut rng);
    }
    let (mm, lang): (Vec<usize>, Vec<usize>) = (0..lengths.len()).partition(|&i| lengths[i] > 0);
    let group = |ids: &[usize], rng: &mut StdRng| -> Vec<usize> {
        let l: Vec<i64> = ids.iter().map(|&i| lengths[i].abs()).collect();
        length_grouped_indices(&l, batch, world, rng).into_iter().map(|k| ids[k]).collect()
    };
    let mm_order = group(&mm, &mut rng);
    let lang_order = group(&lang, &mut rng);
    let mega = world * batch;
    let mut mm_mb: Vec<Vec<usize>> = mm_order.chunks(mega).map(<[usize]>::to_vec).collect();
    let mut lang_mb: Vec<Vec<usize>> = lang_order.chunks(mega).map(<[usize]>::to_vec).collect();
    let mut additional = mm_mb.pop().unwrap_or_default();
    additional.extend(lang_mb.pop().unwrap_or_default());
    let mut megabatches: Vec<Vec<usize>> = mm_mb.into_iter().chain(lang_mb).collect();
    megabatches.shuffle(&mut rng);
    if !additional.is_empty() {
        additional.sort_unstable();
        megabatches.push(additional);
    }
    megabatches.into_iter().flatten().collect()
}

/// Decodes and preprocesses samples on `workers` threads, `prefetch` samples ahead of the
/// consumer, and yields them in `order`. Failed samples come back as errors in their place.
pub struct Prefetcher {
    rx: mpsc::Receiver<(usize, Result<Sample, DatasetError>)>,
    pending: BTreeMap<usize, Result<Sample, DatasetError>>,
    next: usize,
    total: usize,
    credit: mpsc::SyncSender<()>,
}

impl Prefetcher {
    pub fn new(
        dataset: Arc<LlavaDataset>, tokenizer: Arc<Tokenizer>, config: Arc<SampleConfig>, order: Vec<usize>,
        workers: usize, prefetch: usize,
    ) -> Self {
        let total = order.len();
        let order = Arc::new(order);
        let cursor = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        // Credits bound how far ahead the workers run.
        let (credit_tx, credit_rx) = mpsc::sync_channel::<()>(prefetch.max(1));
        for _ in 0..prefetch.max(1) {
            let _ = credit_tx.try_send(());
        }
        let credit_rx = Arc::new(std::sync::Mutex::new(credit_rx));
        for _ in 0..workers.max(1) {
            let (dataset, tokenizer, config, order, cursor, tx, credit_rx) = (
                dataset.clone(),
                tokenizer.clone(),
                config.clone(),
                order.clone(),
                cursor.clone(),
                tx.clone(),
                credit_rx.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    if credit_rx.lock().unwrap().recv().is_err() {
                        return;
                    }
                    let pos = cursor.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = order.get(pos) else { return };
                    if tx.send((pos, dataset.sample(i, &tokenizer, &config))).is_err() {
                        return;
                    }
                }
            });
        }
        Self { rx, pending: BTreeMap::new(), next: 0, total, credit: credit_tx }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Sample, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        while !self.pending.contains_key(&self.next) {
            let (pos, item) = self.rx.recv().ok()?;
            self.pending.insert(pos, item);
        }
        let item = self.pending.remove(&self.next);
        self.next += 1;
        let _ = self.credit.try_send(());
        item
    }
}

/// The paper's stage-1 brief-description instructions (appendix table, 11 entries).
pub const BRIEF_INSTRUCTIONS: [&str; 11] = [
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
];

/// A stage-1 (CC3M-595K style) conversation for a caption: a random brief instruction with
/// `<image>` before or after it at random (the paper's `[X_q, X_v]` or `[X_v, X_q]`).
pub fn brief_description_turns(caption: &str, rng: &mut StdRng) -> Vec<Turn> {
    use rand::Rng;
    let instruction = BRIEF_INSTRUCTIONS[rng.random_range(0..BRIEF_INSTRUCTIONS.len())];
    let human =
        if rng.random_bool(0.5) { format!("{instruction}\n<image>") } else { format!("<image>\n{instruction}") };
    vec![Turn { from: "human".into(), value: human }, Turn { from: "gpt".into(), value: caption.to_string() }]
}
