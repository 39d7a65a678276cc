//! ScienceQA prediction as the reference's `llava/eval/model_vqa_science.py`: the question text
//! with `<image>` removed, `"<image>\n"` put in front when the item has an image, the optional
//! single-prediction instruction, the conversation template, greedy (or sampled) generation to EOS,
//! and one answer line per question. Batched (left padding, KV cache) instead of one at a time.

use std::path::{Path, PathBuf};

use crate::EvalError;
use crate::scienceqa::SINGLE_PRED_PROMPT;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use llava_data::conversation::Conversation;
use llava_data::dataset::Record;
use llava_data::image::{AspectMode, ProcessorConfig, load_and_preprocess, preprocess};
use llava_data::{DEFAULT_IMAGE_TOKEN, Tokenizer, tokenizer_image_token};
use rand::Rng;
use serde::{Deserialize, Serialize};

use llava::LlavaError;
use llava::generate::{GenerationConfig, generate};
use llava::model::Llava;

/// One question of a LLaVA-format question file (`llava_test_CQM-A.json`): the first human turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub id: String,
    pub image: Option<String>,
    pub human: String,
}

/// The prompt of a question: the templated text (with `<image>` where the image goes) and the
/// `prompt` field the reference records (`"<image>\n" + question [+ instruction]`).
pub fn science_prompt(question: &Question, single_pred_prompt: bool, template: &Conversation) -> (String, String) {
    let qs = question.human.replace(DEFAULT_IMAGE_TOKEN, "").trim().to_string();
    let (mut qs, mut recorded) = match question.image {
        Some(_) => (format!("{DEFAULT_IMAGE_TOKEN}\n{qs}"), format!("{DEFAULT_IMAGE_TOKEN}\n{qs}")),
        None => (qs.clone(), qs),
    };
    if single_pred_prompt {
        qs = format!("{qs}\n{SINGLE_PRED_PROMPT}");
        recorded = format!("{recorded}\n{SINGLE_PRED_PROMPT}");
    }
    let mut conv = template.clone();
    let [user, assistant] = conv.roles.clone();
    conv.append_message(&user, Some(&qs));
    conv.append_message(&assistant, None);
    (conv.get_prompt(), recorded)
}

/// One line of the answers file, the reference's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnswerRecord {
    pub question_id: String,
    pub prompt: String,
    pub text: String,
    pub answer_id: String,
    pub model_id: String,
    pub metadata: serde_json::Value,
}

/// A `shortuuid`-style id (22 characters of its 57-letter alphabet).
pub fn answer_id(rng: &mut impl Rng) -> String {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    (0..22).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Where a question's pixels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageSource {
    /// The file the question names.
    #[default]
    File,
    /// A blank (white) picture instead of every image: what the model answers without seeing.
    Blank,
}

/// The inputs every prediction batch shares.
pub struct ScienceRunner<'a, B: Backend> {
    pub model: &'a Llava<B>,
    pub tokenizer: &'a Tokenizer,
    pub processor: &'a ProcessorConfig,
    pub aspect: AspectMode,
    pub template: &'a Conversation,
    pub image_folder: PathBuf,
    pub images: ImageSource,
    pub single_pred_prompt: bool,
    pub generation: GenerationConfig,
}

impl<'a, B: Backend> ScienceRunner<'a, B> {
    /// A runner for a loaded model (its processor, aspect mode and EOS ids), reading images from
    /// `image_folder`, with the reference's defaults: real images, no single-prediction
    /// instruction, greedy decoding up to `max_new_tokens`. Fails when the model has no tokenizer.
    pub fn new(
        loaded: &'a llava::LoadedLlava<B>, template: &'a Conversation, image_folder: PathBuf, max_new_tokens: usize,
    ) -> Result<Self, LlavaError> {
        Ok(Self {
            model: &loaded.model,
            tokenizer: loaded.tokenizer.as_ref().ok_or(LlavaError::NoTokenizer)?,
            processor: &loaded.processor,
            aspect: loaded.config.image_aspect,
            template,
            image_folder,
            images: ImageSource::File,
            single_pred_prompt: false,
            generation: GenerationConfig { max_new_tokens, eos_ids: loaded.eos_ids(), ..Default::default() },
        })
    }

    fn pixels(&self, question: &Question) -> Result<Option<Vec<f32>>, LlavaError> {
        let Some(image) = &question.image else { return Ok(None) };
        Ok(Some(match self.images {
            ImageSource::File => {
                // A question's image stays inside the image folder.
                let path = llava_io::join_inside(&self.image_folder, Path::new(image), false)
                    .map_err(|e| LlavaError::config(&question.id, e))?;
                load_and_preprocess(&path, self.processor, self.aspect)?
            }
            ImageSource::Blank => preprocess(
                &::image::RgbImage::from_pixel(336, 336, ::image::Rgb([255, 255, 255])),
                self.processor,
                self.aspect,
            ),
        }))
    }

    /// Answers a batch of questions: (recorded prompt, decoded text) per question, in order.
    pub fn answer(&self, questions: &[Question]) -> Result<Vec<(String, String)>, LlavaError> {
        let mut prompts = Vec::with_capacity(questions.len());
        let mut recorded = Vec::with_capacity(questions.len());
        let mut pixels = Vec::new();
        for q in questions {
            let (prompt, rec) = science_prompt(q, self.single_pred_prompt, self.template);
            prompts.push(tokenizer_image_token(self.tokenizer, &prompt));
            recorded.push(rec);
            if let Some(p) = self.pixels(q)? {
                pixels.extend(p);
            }
        }
        let [c, h, w] = self.processor.output_shape();
        let n = pixels.len() / (c * h * w);
        let device = self.model.llm.embed_tokens.weight.device();
        let tensor = (n > 0).then(|| Tensor::<B, 4>::from_data(TensorData::new(pixels, [n, c, h, w]), &device));
        let ids = generate(self.model, &prompts, tensor, &self.generation, |_, _| true);
        Ok(recorded
            .into_iter()
            .zip(ids)
            .map(|(r, ids)| (r, self.tokenizer.decode(&ids, true).trim().to_string()))
            .collect())
    }
}

/// The answers already in an answers file, for a resumed run: a torn last line (a kill or a full
/// disk during its write) is cut off the file, every complete line is kept in the file as it is,
/// and those that parse as answers are returned (one that does not is named in a warning and
/// left in place). Nothing is rewritten, so no kill at any moment loses a complete answer.
pub fn resume_answers(path: &Path) -> Result<Vec<AnswerRecord>, EvalError> {
    let recovered = llava_io::lines::recover(path).map_err(EvalError::io(path))?;
    Ok(llava_io::lines::parse_json(path, &recovered.lines, "kept, and its question asked again")
        .filter_map(|(_, answer)| answer)
        .collect())
}

/// The questions of a LLaVA-format question file (a JSON array of records; the first human turn
/// of each is the question).
pub fn read_questions(path: &Path) -> Result<Vec<Question>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(EvalError::io(path))?;
    let records: Vec<Record> = serde_json::from_str(&text)
        .map_err(|e| EvalError::format(path, format!("not a LLaVA question file (JSON array of records): {e}")))?;
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let human = r.conversations.first().map(|t| t.value.clone());
            let human = human.ok_or_else(|| {
                EvalError::format(path, format!("record {i} (id {}) has no conversation", r.id_string()))
            })?;
            Ok(Question { id: r.id_string(), image: r.image, human })
        })
        .collect()
}

/// How [`predict_to_file`] splits and labels the work.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// Questions per generation batch.
    pub batch_size: usize,
    /// The reference's `--num-chunks` / `--chunk-idx`: answer only chunk `chunk_idx` of `num_chunks`.
    pub num_chunks: usize,
    pub chunk_idx: usize,
    /// The `model_id` field of each answer line.
    pub model_id: String,
}

/// `model_vqa_science` over a question list into an answers file (one JSON line per question):
/// an existing file is resumed (its complete lines kept, those questions skipped); `progress`
/// gets (answered, to answer) after each batch. Returns the number answered now.
pub fn predict_to_file<B: Backend>(
    runner: &ScienceRunner<'_, B>, questions: Vec<Question>, out: &Path, options: &PredictOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize, EvalError> {
    if options.num_chunks == 0 || options.chunk_idx >= options.num_chunks {
        return Err(EvalError::Options(format!(
            "chunk index {} is not one of {} chunks (0-based)",
            options.chunk_idx, options.num_chunks
        )));
    }
    let questions = chunk(questions, options.num_chunks, options.chunk_idx);
    let done: std::collections::HashSet<String> = resume_answers(out)?.into_iter().map(|a| a.question_id).collect();
    let todo: Vec<Question> = questions.into_iter().filter(|q| !done.contains(&q.id)).collect();
    if !done.is_empty() {
        tracing::info!("{}: {} answers already written, {} to go", out.display(), done.len(), todo.len());
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(EvalError::io(parent))?;
    }
    let mut log = llava_io::lines::LineLog::append(out).map_err(EvalError::io(out))?;
    // Answer ids are random (shortuuid in the reference), not tied to the sampling seed.
    let mut rng = rand::rng();
    let mut answered = 0usize;
    for batch in todo.chunks(options.batch_size.max(1)) {
        let answers = runner.answer(batch)?;
        let mut lines = Vec::with_capacity(batch.len());
        for (q, (prompt, text)) in batch.iter().zip(answers) {
            let record = AnswerRecord {
                question_id: q.id.clone(),
                prompt,
                text,
                answer_id: answer_id(&mut rng),
                model_id: options.model_id.clone(),
                metadata: serde_json::json!({}),
            };
            lines.push(serde_json::to_string(&record).map_err(|e| EvalError::io(out)(std::io::Error::other(e)))?);
        }
        // One write per batch: a kill tears at most this batch's last line.
        log.write_lines(&lines).map_err(EvalError::io(out))?;
        answered += batch.len();
        progress(answered, todo.len());
    }
    Ok(answered)
}

/// Chunk `k` of `n` of the question list, as the reference's `get_chunk` (`--num-chunks`,
/// `--chunk-idx`): chunks of `ceil(len / n)` consecutive items; a chunk past the end is empty.
pub fn chunk<T>(items: Vec<T>, n: usize, k: usize) -> Vec<T> {
    assert!(n > 0 && k < n, "chunk {k} of {n}");
    let size = items.len().div_ceil(n).max(1);
    items.into_iter().skip(k * size).take(size).collect()
}

#[cfg(test)]
mod tests {
    use super::chunk;

    #[test]
    fn chunks_split_like_the_reference_and_cover_every_item_once() {
        let items: Vec<u32> = (0..10).collect();
        let parts: Vec<Vec<u32>> = (0..3).map(|k| chunk(items.clone(), 3, k)).collect();
        assert_eq!(parts, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        assert_eq!(chunk(items.clone(), 1, 0), items);
        // More chunks than items: ceil(2 / 4) = 1 item each, the rest empty.
        assert_eq!((0..4).map(|k| chunk(vec![7, 8], 4, k)).collect::<Vec<_>>(), vec![vec![7], vec![8], vec![], vec![]]);
    }
}
