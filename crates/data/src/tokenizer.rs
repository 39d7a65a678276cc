//! One tokenizer type over the two formats LLaVA checkpoints ship: a Hugging Face
//! `tokenizer.json` (through the `tokenizers` crate) and a SentencePiece `tokenizer.model`
//! (read directly, see [`crate::sentencepiece`]), with added tokens from `added_tokens.json` /
//! `tokenizer_config.json`.
//!
//! Encoding follows Hugging Face's slow `LlamaTokenizer` in legacy mode, which the reference
//! uses (`use_fast=False`): special and added tokens written in the text (`<s>`, `</s>`,
//! `<image>`…) are split out first and map to their ids; every remaining segment is encoded on
//! its own with its dummy-prefix `▁`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use crate::sentencepiece::{PieceKind, SentencePiece};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {reason}")]
    Load { path: PathBuf, reason: String },
}

fn load_err(path: &Path, reason: impl ToString) -> TokenizerError {
    TokenizerError::Load { path: path.to_path_buf(), reason: reason.to_string() }
}

// One tokenizer per program: boxing the larger variant would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum Inner {
    SentencePiece(SentencePiece),
    Hf(Box<tokenizers::Tokenizer>),
}

#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: Inner,
    /// Tokens matched literally in text before encoding, longest first.
    specials: Vec<(String, u32)>,
    /// Ids dropped by `decode(.., skip_special = true)`.
    special_ids: HashSet<u32>,
    /// Added tokens beyond (or overriding) the SentencePiece vocabulary.
    added: BTreeMap<u32, String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_id: Option<u32>,
    /// Hugging Face's `legacy` flag (tokenizer_config.json; default true): legacy gives every
    /// segment after a special token its own dummy-prefix `▁`, non-legacy does not.
    legacy: bool,
    source: PathBuf,
}

impl Tokenizer {
    /// Loads a `tokenizer.json`, a `tokenizer.model`, or a directory holding either (the
    /// SentencePiece model is preferred, as the reference loads the slow tokenizer).
    pub fn from_path(path: &Path) -> Result<Self, TokenizerError> {
        if path.is_dir() {
            for name in ["tokenizer.model", "tokenizer.json"] {
                let p = path.join(name);
                if p.is_file() {
                    return Self::from_path(&p);
                }
            }
            return Err(load_err(path, "no tokenizer.model or tokenizer.json in this directory"));
        }
        let is_json = path.extension().is_some_and(|e| e == "json");
        if is_json { Self::from_hf_json(path) } else { Self::from_sentencepiece(path) }
    }

    fn from_hf_json(path: &Path) -> Result<Self, TokenizerError> {
        // tokenizers 0.23 panics on some malformed files (an `expect` inside its decoder's
        // deserializer): caught and reported as the file's error.
        let tok = crate::quiet::catch_quietly(|| tokenizers::Tokenizer::from_file(path))
            .map_err(|e| load_err(path, e))?
            .map_err(|e| load_err(path, e))?;
        let id = |t: &str| tok.token_to_id(t);
        let special_ids = tok.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        let (bos, eos) = special_names(path.parent());
        Ok(Self {
            bos_id: bos.as_deref().and_then(id).or_else(|| id("<s>")),
            eos_id: eos.as_deref().and_then(id).or_else(|| id("</s>")),
            unk_id: id("<unk>"),
            inner: Inner::Hf(Box::new(tok)),
            specials: Vec::new(),
            special_ids,
            added: BTreeMap::new(),
            legacy: true,
            source: path.to_path_buf(),
        })
    }

    fn from_sentencepiece(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|e| load_err(path, e))?;
        let sp = SentencePiece::from_bytes(&bytes).map_err(|e| load_err(path, e))?;
        let mut specials = Vec::new();
        let mut special_ids = HashSet::new();
        for (id, p) in sp.pieces.iter().enumerate() {
            if matches!(p.kind, PieceKind::Control | PieceKind::Unknown) {
                specials.push((p.text.clone(), id as u32));
                special_ids.insert(id as u32);
            }
        }
        let mut added = BTreeMap::new();
        let mut legacy = true;
        let dir = path.parent().unwrap_or(Path::new("."));
        // added_tokens.json: {"<image>": 32000, ...}
        let added_path = dir.join("added_tokens.json");
        if added_path.is_file() {
            let text = std::fs::read_to_string(&added_path).map_err(|e| load_err(&added_path, e))?;
            let map: BTreeMap<String, u32> = serde_json::from_str(&text).map_err(|e| load_err(&added_path, e))?;
            for (content, id) in map {
                added.insert(id, content);
            }
        }
        // tokenizer_config.json: {"added_tokens_decoder": {"32000": {"content": "<image>", "special": true}}}
        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;
            if let Some(l) = json.get("legacy").and_then(|l| l.as_bool()) {
                legacy = l;
            }
            if let Some(map) = json.get("added_tokens_decoder").and_then(|m| m.as_object()) {
                for (id, entry) in map {
                    let (Ok(id), Some(content)) = (id.parse::<u32>(), entry.get("content").and_then(|c| c.as_str()))
                    else {
                        return Err(load_err(&config_path, format!("malformed added_tokens_decoder entry `{id}`")));
                    };
                    if entry.get("special").and_then(|s| s.as_bool()).unwrap_or(false) {
                        special_ids.insert(id);
                    }
                    added.insert(id, content.to_string());
                }
            }
        }
        for (id, content) in &added {
            if !specials.iter().any(|(t, _)| t == content) {
                specials.push((content.clone(), *id));
            }
        }
        specials.sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        let (bos, eos) = special_names(Some(dir));
        let find = |name: Option<String>, fallback: Option<u32>| {
            name.and_then(|n| specials.iter().find(|(t, _)| *t == n).map(|(_, id)| *id)).or(fallback)
        };
        Ok(Self {
            bos_id: find(bos, sp.bos_id),
            eos_id: find(eos, sp.eos_id),
            unk_id: Some(sp.unk_id),
            inner: Inner::SentencePiece(sp),
            specials,
            special_ids,
            added,
            legacy,
            source: path.to_path_buf(),
        })
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    pub fn legacy(&self) -> bool {
        self.legacy
    }

    /// Sets the `legacy` behaviour explicitly (overriding tokenizer_config.json).
    pub fn with_legacy(mut self, legacy: bool) -> Self {
        self.legacy = legacy;
        self
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::SentencePiece(sp) => {
                sp.vocab_size().max(self.added.keys().next_back().map_or(0, |k| *k as usize + 1))
            }
            Inner::Hf(t) => t.get_vocab_size(true),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::SentencePiece(sp) => self
                .specials
                .iter()
                .find(|(t, _)| t == token)
                .map(|(_, id)| *id)
                .or_else(|| sp.pieces.iter().position(|p| p.text == token).map(|i| i as u32)),
            Inner::Hf(t) => t.token_to_id(token),
        }
    }

    /// Token ids of `text`, with BOS first when `add_bos`.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if add_bos {
            ids.extend(self.bos_id);
        }
        match &self.inner {
            Inner::Hf(t) => {
                let enc = t.encode(text, false).expect("tokenizers encode");
                ids.extend_from_slice(enc.get_ids());
            }
            Inner::SentencePiece(sp) => {
                // Non-legacy (transformers ≥ 4.36 `LlamaTokenizer(legacy=False)`): one `▁` for the
                // whole text, no dummy prefix per segment, and a lone leading `▁` before a
                // special token dropped.
                let prefixed;
                let text = if self.legacy || text.is_empty() {
                    text
                } else {
                    prefixed = format!("▁{}", text.replace('▁', " "));
                    &prefixed
                };
                let start = ids.len();
                let mut rest = text;
                while !rest.is_empty() {
                    // Leftmost special token; the longest one at that position.
                    let hit = self
                        .specials
                        .iter()
                        .filter_map(|(t, id)| rest.find(t.as_str()).map(|pos| (pos, t.len(), *id)))
                        .min_by_key(|(pos, len, _)| (*pos, std::cmp::Reverse(*len)));
                    let (segment, special) = match hit {
                        Some((pos, len, id)) => {
                            let seg = &rest[..pos];
                            rest = &rest[pos + len..];
                            (seg, Some(id))
                        }
                        None => (std::mem::take(&mut rest), None),
                    };
                    ids.extend(sp.encode_with(segment, self.legacy));
                    ids.extend(special);
                }
                if !self.legacy && ids.len() >= start + 2 && self.special_ids.contains(&ids[start + 1]) {
                    let underline = sp.pieces.iter().position(|p| p.text == "▁").map(|i| i as u32);
                    if Some(ids[start]) == underline {
                        ids.remove(start);
                    }
                }
            }
        }
        ids
    }

    /// Text of `ids`. With `skip_special`, special tokens (BOS, EOS, UNK, special added tokens)
    /// are dropped, as Hugging Face's `skip_special_tokens=True`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, skip_special).unwrap_or_default(),
            Inner::SentencePiece(sp) => self.decode_like_hf_slow(sp, ids, skip_special),
        }
    }

    /// Hugging Face's slow `LlamaTokenizer._decode` (legacy), quirks included: added tokens
    /// beyond the SentencePiece vocabulary are joined to the text with spaces, the first piece
    /// loses its dummy-prefix `▁`, and a space is inserted before a special token that follows text.
    fn decode_like_hf_slow(&self, sp: &SentencePiece, ids: &[u32], skip_special: bool) -> String {
        let mut sub_texts: Vec<String> = Vec::new();
        let mut current: Vec<u32> = Vec::new();
        for &id in ids {
            if skip_special && self.special_ids.contains(&id) {
                continue;
            }
            if let Some(content) = self.added.get(&id).filter(|_| id as usize >= sp.vocab_size()) {
                if !current.is_empty() {
                    let s = self.tokens_to_string(sp, &current);
                    if !s.is_empty() {
                        sub_texts.push(s);
                    }
                    current.clear();
                }
                sub_texts.push(content.clone());
            } else {
                current.push(id);
            }
        }
        if !current.is_empty() {
            sub_texts.push(self.tokens_to_string(sp, &current));
        }
        sub_texts.join(" ")
    }

    /// `LlamaTokenizer.convert_tokens_to_string` (legacy).
    fn tokens_to_string(&self, sp: &SentencePiece, ids: &[u32]) -> String {
        let is_special = |id: u32| {
            self.special_ids.contains(&id)
                || sp.pieces.get(id as usize).is_some_and(|p| matches!(p.kind, PieceKind::Control | PieceKind::Unknown))
        };
        let mut out = String::new();
        let mut sub: Vec<(u32, bool)> = Vec::new(); // (id, strip its leading `▁`)
        let mut prev_special = false;
        for (i, &id) in ids.iter().enumerate() {
            if is_special(id) {
                if !prev_special && i != 0 {
                    out.push(' ');
                }
                out.push_str(&sp_decode(sp, &sub));
                out.push_str(&sp.pieces[id as usize].text);
                prev_special = true;
                sub.clear();
            } else {
                let starts_ws =
                    sp.pieces.get(id as usize).is_some_and(|p| p.kind != PieceKind::Byte && p.text.starts_with('▁'));
                if prev_special && i == 1 && !starts_ws {
                    out.push(' ');
                }
                sub.push((id, i == 0 && starts_ws));
                prev_special = false;
            }
        }
        out.push_str(&sp_decode(sp, &sub));
        out
    }

    /// A decoder that turns ids, one at a time, into text as soon as it is complete (a
    /// character split over byte-fallback tokens is held back until its last byte arrives).
    pub fn stream(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, ids: Vec::new(), emitted: 0, skip_special }
    }
}

/// SentencePiece's `DecodePieces`: pieces concatenated, `▁` → space, byte pieces as bytes, and
/// the leading `▁` of the first piece that has one (while nothing visible came before) dropped.
/// `strip` marks a piece whose first `▁` the caller already removed.
fn sp_decode(sp: &SentencePiece, pieces: &[(u32, bool)]) -> String {
    let mut bytes = Vec::new();
    let mut bos_ws = true;
    for &(id, strip) in pieces {
        let Some(piece) = sp.pieces.get(id as usize) else { continue };
        if piece.kind == PieceKind::Byte {
            bytes.extend(sp.piece_bytes(id, false));
            bos_ws = false;
            continue;
        }
        let mut text: &str = &piece.text;
        if strip {
            text = text.strip_prefix('▁').unwrap_or(text);
        }
        let mut consumed = false;
        if bos_ws
            && sp.add_dummy_prefix
            && let Some(rest) = text.strip_prefix('▁')
        {
            text = rest;
            consumed = true;
        }
        if bos_ws && (!text.is_empty() || consumed) {
            bos_ws = false;
        }
        bytes.extend(text.replace('▁', " ").into_bytes());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads `bos_token` / `eos_token` names from `tokenizer_config.json` or `special_tokens_map.json`.
fn special_names(dir: Option<&Path>) -> (Option<String>, Option<String>) {
    let Some(dir) = dir else { return (None, None) };
    let name = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    };
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else { continue };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        let bos = json.get("bos_token").and_then(name);
        let eos = json.get("eos_token").and_then(name);
        if bos.is_some() || eos.is_some() {
            return (bos, eos);
        }
    }
    (None, None)
}

/// Incremental decoding for streamed generation.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
    skip_special: bool,
}

impl StreamDecoder<'_> {
    /// Adds one token and returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special);
        // An incomplete UTF-8 sequence decodes to U+FFFD at the end: wait for more bytes.
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted {
            return String::new();
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        new
    }

    /// Everything decoded so far.
    pub fn text(&self) -> String {
        self.tokenizer.decode(&self.ids, self.skip_special)
    }
}

/// The reference's `tokenizer_image_token`: split the prompt on `<image>`, tokenize every chunk
/// on its own (each with its dummy prefix), keep one BOS at the start, and put
/// [`crate::IMAGE_TOKEN_INDEX`] (-200) where each `<image>` was.
pub fn tokenizer_image_token(tokenizer: &Tokenizer, prompt: &str) -> Vec<i64> {
    let chunks: Vec<Vec<u32>> = prompt.split(crate::DEFAULT_IMAGE_TOKEN).map(|c| tokenizer.encode(c, true)).collect();
    let bos = tokenizer.bos_id();
    let mut out: Vec<i64> = Vec::new();
    let offset = match (chunks.first().and_then(|c| c.first()), bos) {
        (Some(first), Some(bos)) if *first == bos => {
            out.push(bos as i64);
            1
        }
        _ => 0,
    };
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 {
            out.push(crate::IMAGE_TOKEN_INDEX);
        }
        out.extend(chunk.iter().skip(offset).map(|&t| t as i64));
    }
    out
}
