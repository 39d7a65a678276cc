//! Training strings, token ids and labels, as the reference's `llava/train/train.py`
//! (`preprocess_multimodal`, `preprocess_plain`, `preprocess_v1`, `preprocess_llama_2`,
//! `preprocess_mpt` and the default "###" path), quirks included: the LLaMA length offsets,
//! the legacy-tokenizer adjustment, and the tokenization-mismatch rule that masks a whole sample.

use crate::conversation::{Conversation, SepStyle};
use crate::tokenizer::{Tokenizer, tokenizer_image_token};
use crate::{DEFAULT_IMAGE_TOKEN, IGNORE_INDEX};

/// One turn of a LLaVA conversation (`{"from": "human"|"gpt", "value": …}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    #[error("unknown speaker `{0}` (expected `human` or `gpt`)")]
    UnknownSpeaker(String),
    #[error("turn {0} is from the wrong speaker: roles must alternate human, gpt, …")]
    RolesDoNotAlternate(usize),
    #[error("the `plain` template needs exactly 2 turns with <image> in the first (got {0} turns)")]
    PlainShape(usize),
    #[error("the conversation is empty")]
    Empty,
}

/// Result of preprocessing one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// With [`crate::IMAGE_TOKEN_INDEX`] (-200) where the image goes.
    pub input_ids: Vec<i64>,
    /// [`IGNORE_INDEX`] (-100) where no loss is taken.
    pub labels: Vec<i64>,
    /// The full training string that was tokenized.
    pub prompt: String,
    /// `Some((cur_len, total_len))` when the reference's mismatch rule masked the whole sample.
    pub mismatch: Option<(usize, usize)>,
}

/// Options of the reference's `DataArguments` / `ModelArguments` that change preprocessing.
#[derive(Debug, Clone)]
pub struct PreprocessOptions {
    /// `tokenizer.model_max_length` (2048 in every reference script).
    pub model_max_length: usize,
    /// Wrap `<image>` in `<im_start>`/`<im_end>` (paper-era chat model; off in every v1+ script).
    pub mm_use_im_start_end: bool,
    /// Whether the multimodal normalisation runs (the model has a vision tower).
    pub is_multimodal: bool,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        Self { model_max_length: 2048, mm_use_im_start_end: false, is_multimodal: true }
    }
}

/// `preprocess_multimodal`: in every turn containing `<image>`, move it to the front followed by a
/// newline (`<Image><image></Image>` for mmtag templates), optionally wrapped in start/end tokens.
pub fn preprocess_multimodal(turns: &mut [Turn], template: &Conversation, options: &PreprocessOptions) {
    if !options.is_multimodal {
        return;
    }
    for turn in turns.iter_mut() {
        if turn.value.contains(DEFAULT_IMAGE_TOKEN) {
            let rest = turn.value.replace(DEFAULT_IMAGE_TOKEN, "");
            turn.value = format!("{DEFAULT_IMAGE_TOKEN}\n{}", py_strip(&rest)).trim_matches(is_py_space).to_string();
            if template.version.contains("mmtag") {
                turn.value = turn.value.replace(DEFAULT_IMAGE_TOKEN, "<Image><image></Image>");
            }
        }
        if options.mm_use_im_start_end {
            turn.value = turn.value.replace(DEFAULT_IMAGE_TOKEN, "<im_start><image><im_end>");
        }
    }
}

/// Python's `str.isspace` characters (what `str.strip()` removes).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Tokenizes for length counting: `tokenizer_image_token` with an image, the plain tokenizer
/// (BOS added) without.
fn tokenize(tokenizer: &Tokenizer, text: &str, has_image: bool) -> Vec<i64> {
    if has_image {
        tokenizer_image_token(tokenizer, text)
    } else {
        tokenizer.encode(text, true).into_iter().map(i64::from).collect()
    }
}

/// The full sample's ids: with an image no truncation; without, truncated to `max_len` as the
/// tokenizer call with `truncation=True` does.
fn tokenize_full(tokenizer: &Tokenizer, text: &str, has_image: bool, max_len: usize) -> Vec<i64> {
    let mut ids = tokenize(tokenizer, text, has_image);
    if !has_image {
        ids.truncate(max_len);
    }
    ids
}

/// The conversation rendered with `template`, the first turn dropped when it is not from the
/// human (as the reference does).
fn render(turns: &[Turn], template: &Conversation) -> Result<String, PreprocessError> {
    let mut conv = template.clone();
    conv.messages.clear();
    let role_of = |from: &str| match from {
        "human" => Ok(0),
        "gpt" => Ok(1),
        other => Err(PreprocessError::UnknownSpeaker(other.to_string())),
    };
    let mut turns = turns;
    if let Some(first) = turns.first()
        && role_of(&first.from)? != 0
    {
        turns = &turns[1..];
    }
    for (j, turn) in turns.iter().enumerate() {
        let role = role_of(&turn.from)?;
        if role != j % 2 {
            return Err(PreprocessError::RolesDoNotAlternate(j));
        }
        let name = conv.roles[role].clone();
        conv.append_message(&name, Some(&turn.value));
    }
    Ok(conv.get_prompt())
}

/// Preprocesses one sample's turns (after [`preprocess_multimodal`]) for `template`, dispatching
/// as the reference's `preprocess` does.
pub fn preprocess(
    turns: &[Turn], tokenizer: &Tokenizer, template: &Conversation, has_image: bool, options: &PreprocessOptions,
) -> Result<Processed, PreprocessError> {
    if turns.is_empty() {
        return Err(PreprocessError::Empty);
    }
    match template.sep_style {
        SepStyle::Plain => preprocess_plain(turns, tokenizer, template),
        SepStyle::Llama2 => preprocess_rounds(turns, tokenizer, template, has_image, options, RoundRule::Llama2),
        _ if template.version.starts_with("v1") => {
            preprocess_rounds(turns, tokenizer, template, has_image, options, RoundRule::V1)
        }
        _ if template.version == "mpt" => {
            preprocess_rounds(turns, tokenizer, template, has_image, options, RoundRule::Mpt)
        }
        _ => preprocess_hash(turns, tokenizer, template, has_image, options),
    }
}

/// `preprocess_plain`: `<image>` + caption + `\n`; BOS and image masked.
fn preprocess_plain(
    turns: &[Turn], tokenizer: &Tokenizer, template: &Conversation,
) -> Result<Processed, PreprocessError> {
    if turns.len() != 2 || !turns[0].value.contains(DEFAULT_IMAGE_TOKEN) {
        return Err(PreprocessError::PlainShape(turns.len()));
    }
    let prompt = format!("{DEFAULT_IMAGE_TOKEN}{}{}", turns[1].value, template.sep);
    let input_ids = tokenizer_image_token(tokenizer, &prompt);
    let masked = tokenizer_image_token(tokenizer, DEFAULT_IMAGE_TOKEN).len().min(input_ids.len());
    let mut labels = input_ids.clone();
    labels[..masked].fill(IGNORE_INDEX);
    Ok(Processed { input_ids, labels, prompt, mismatch: None })
}

#[derive(Clone, Copy, PartialEq)]
enum RoundRule {
    V1,
    Llama2,
    Mpt,
}

/// `preprocess_v1`, `preprocess_llama_2` and `preprocess_mpt`: split the string into rounds,
/// mask each round's instruction by token counts, then apply the mismatch rule.
fn preprocess_rounds(
    turns: &[Turn], tokenizer: &Tokenizer, template: &Conversation, has_image: bool, options: &PreprocessOptions,
    rule: RoundRule,
) -> Result<Processed, PreprocessError> {
    let prompt = render(turns, template)?;
    let input_ids = tokenize_full(tokenizer, &prompt, has_image, options.model_max_length);
    let pad = tokenizer.unk_id().map_or(0, i64::from);
    let total_len = input_ids.iter().filter(|&&t| t != pad).count();
    let mut labels = input_ids.clone();

    let (rounds, sep): (Vec<String>, String) = match rule {
        RoundRule::V1 => (
            prompt.split(template.sep2.as_deref().unwrap_or("")).map(String::from).collect(),
            format!("{}{}: ", template.sep, template.roles[1]),
        ),
        RoundRule::Llama2 => {
            (prompt.split(template.sep2.as_deref().unwrap_or("")).map(String::from).collect(), "[/INST] ".to_string())
        }
        RoundRule::Mpt => {
            let pieces: Vec<&str> = prompt.split(template.sep.as_str()).collect();
            let mut re_rounds = vec![pieces[..pieces.len().min(3)].join(&template.sep)];
            let mut idx = 3;
            while idx < pieces.len() {
                re_rounds.push(pieces[idx..(idx + 2).min(pieces.len())].join(&template.sep));
                idx += 2;
            }
            (re_rounds, format!("{}{}", template.sep, template.roles[1]))
        }
    };
    let (mut cur_len, bos_offset) = if rule == RoundRule::Mpt { (0usize, 1i64) } else { (1usize, 2i64) };
    fill(&mut labels, 0, cur_len as i64);
    for (i, rou) in rounds.iter().enumerate() {
        if rou.is_empty() {
            break;
        }
        let parts: Vec<&str> = rou.split(sep.as_str()).collect();
        if parts.len() != 2 {
            break;
        }
        let instruction = format!("{}{sep}", parts[0]);
        let mut round_len = tokenize(tokenizer, rou, has_image).len() as i64;
        let mut instruction_len = tokenize(tokenizer, &instruction, has_image).len() as i64 - bos_offset;
        // The reference's adjustments for how `USER` tokenizes after `</s>` (tokenizers >= 0.14).
        match rule {
            RoundRule::V1 if i != 0 && !tokenizer.legacy() => {
                round_len -= 1;
                instruction_len -= 1;
            }
            RoundRule::Mpt if i != 0 && tokenizer.legacy() => {
                round_len += 1;
                instruction_len += 1;
            }
            _ => {}
        }
        fill(&mut labels, cur_len as i64, cur_len as i64 + instruction_len);
        cur_len = (cur_len as i64 + round_len).max(0) as usize;
    }
    let n = labels.len() as i64;
    fill(&mut labels, cur_len as i64, n);
    let mut mismatch = None;
    if cur_len < options.model_max_length && cur_len != total_len {
        labels.fill(IGNORE_INDEX);
        tracing::warn!("tokenization mismatch: {cur_len} vs. {total_len}. (ignored)");
        mismatch = Some((cur_len, total_len));
    }
    Ok(Processed { input_ids, labels, prompt, mismatch })
}

/// Python slice assignment `labels[start:end] = IGNORE_INDEX` (negative and out-of-range bounds
/// behave as in Python).
fn fill(labels: &mut [i64], start: i64, end: i64) {
    let n = labels.len() as i64;
    let clamp = |i: i64| if i < 0 { (n + i).max(0) } else { i.min(n) } as usize;
    let (s, e) = (clamp(start), clamp(end));
    if s < e {
        labels[s..e].fill(IGNORE_INDEX);
    }
}

/// The default path (paper-era v0 and `--version v0` at v1.0.1): `"### Role: text\n"` turns after
/// `system + "\n\n"`, masks from per-piece token counts (each counted with its own BOS).
fn preprocess_hash(
    turns: &[Turn], tokenizer: &Tokenizer, template: &Conversation, has_image: bool, options: &PreprocessOptions,
) -> Result<Processed, PreprocessError> {
    let header = format!("{}\n\n", template.system);
    let mut pieces = Vec::with_capacity(turns.len());
    let mut prompt = header.clone();
    for turn in turns {
        let role = match turn.from.to_lowercase().as_str() {
            "human" => template.roles[0].clone(),
            "gpt" => template.roles[1].clone(),
            _ => "unknown".to_string(),
        };
        let piece = format!("### {role}: {}\n", turn.value);
        prompt += &piece;
        pieces.push(piece);
    }
    prompt += "### ";
    let input_ids = tokenize_full(tokenizer, &prompt, has_image, options.model_max_length);
    let mut labels = input_ids.clone();
    // `_tokenize_fn` / `tokenizer_image_token` lengths, each piece with its own BOS.
    let len_of = |text: &str| tokenize_full(tokenizer, text, has_image, options.model_max_length).len();
    let mut cur = len_of(&header) as i64;
    fill(&mut labels, 0, cur);
    for (piece, turn) in pieces.iter().zip(turns) {
        let len = len_of(piece) as i64;
        if turn.from == "human" {
            fill(&mut labels, cur + 2, cur + len);
        }
        cur += len;
    }
    Ok(Processed { input_ids, labels, prompt, mismatch: None })
}
