//! A SentencePiece BPE model read straight from `tokenizer.model` (the protobuf that Vicuna and
//! the original LLaVA checkpoints ship), encoding exactly as the SentencePiece library does for
//! LLaMA: identity normalisation, spaces → `▁`, a dummy-prefix `▁`, greedy highest-score pair
//! merges (leftmost first on ties), and byte fallback (`<0xNN>`) for characters not in the vocab.

use std::collections::{BinaryHeap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceKind,
}

#[derive(Debug, Clone)]
pub struct SentencePiece {
    pub pieces: Vec<Piece>,
    /// Pieces that BPE may produce (normal and user-defined), by text.
    mergeable: HashMap<String, u32>,
    byte_ids: [Option<u32>; 256],
    pub unk_id: u32,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_dummy_prefix: bool,
    pub byte_fallback: bool,
}

/// Minimal protobuf wire-format reader.
struct Proto<'a> {
    data: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

impl<'a> Proto<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn next(&mut self) -> Result<Option<(u32, Field<'a>)>, String> {
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.pos += 8;
                Field::Fixed64
            }
            2 => {
                let len = self.varint()? as usize;
                let end = self.pos.checked_add(len).filter(|e| *e <= self.data.len()).ok_or("truncated field")?;
                let b = &self.data[self.pos..end];
                self.pos = end;
                Field::Bytes(b)
            }
            5 => {
                let b = self.data.get(self.pos..self.pos + 4).ok_or("truncated fixed32")?;
                self.pos += 4;
                Field::Fixed32(u32::from_le_bytes(b.try_into().unwrap()))
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        if self.pos > self.data.len() {
            return Err("truncated message".into());
        }
        Ok(Some((field, value)))
    }
}

impl SentencePiece {
    /// Parses a serialized `ModelProto`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut model_type = 1u64; // UNIGRAM is the protobuf default
        let mut byte_fallback = false;
        let mut add_dummy_prefix = true;
        let (mut unk, mut bos, mut eos) = (0i64, 1i64, 2i64);
        let mut top = Proto::new(bytes);
        while let Some((field, value)) = top.next()? {
            match (field, value) {
                (1, Field::Bytes(b)) => {
                    let mut p = Proto::new(b);
                    let (mut text, mut score, mut kind) = (String::new(), 0f32, 1u64);
                    while let Some((f, v)) = p.next()? {
                        match (f, v) {
                            (1, Field::Bytes(s)) => text = String::from_utf8_lossy(s).into_owned(),
                            (2, Field::Fixed32(s)) => score = f32::from_bits(s),
                            (3, Field::Varint(k)) => kind = k,
                            _ => {}
                        }
                    }
                    let kind = match kind {
                        2 => PieceKind::Unknown,
                        3 => PieceKind::Control,
                        4 => PieceKind::UserDefined,
                        5 => PieceKind::Unused,
                        6 => PieceKind::Byte,
                        _ => PieceKind::Normal,
                    };
                    pieces.push(Piece { text, score, kind });
                }
                (2, Field::Bytes(b)) => {
                    let mut p = Proto::new(b);
                    while let Some((f, v)) = p.next()? {
                        match (f, v) {
                            (3, Field::Varint(t)) => model_type = t,
                            (35, Field::Varint(x)) => byte_fallback = x != 0,
                            (40, Field::Varint(x)) => unk = x as i64,
                            (41, Field::Varint(x)) => bos = x as i32 as i64,
                            (42, Field::Varint(x)) => eos = x as i32 as i64,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    let mut p = Proto::new(b);
                    while let Some((f, v)) = p.next()? {
                        if let (3, Field::Varint(x)) = (f, v) {
                            add_dummy_prefix = x != 0;
                        }
                    }
                }
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("no pieces (not a SentencePiece model?)".into());
        }
        if model_type != 2 {
            return Err(format!("model_type {model_type} is not BPE (2); only BPE models (LLaMA) are supported"));
        }
        let mut mergeable = HashMap::new();
        let mut byte_ids = [None; 256];
        for (id, p) in pieces.iter().enumerate() {
            match p.kind {
                PieceKind::Normal | PieceKind::UserDefined => {
                    mergeable.entry(p.text.clone()).or_insert(id as u32);
                }
                PieceKind::Byte => {
                    if let Some(hex) = p.text.strip_prefix("<0x").and_then(|s| s.strip_suffix('>'))
                        && let Ok(b) = u8::from_str_radix(hex, 16)
                    {
                        byte_ids[b as usize] = Some(id as u32);
                    }
                }
                _ => {}
            }
        }
        let id = |x: i64| (x >= 0 && (x as usize) < pieces.len()).then_some(x as u32);
        Ok(Self {
            mergeable,
            byte_ids,
            unk_id: id(unk).unwrap_or(0),
            bos_id: id(bos),
            eos_id: id(eos),
            add_dummy_prefix,
            byte_fallback,
            pieces,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Encodes one text segment (no BOS, no special-token splitting).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, self.add_dummy_prefix)
    }

    /// Encodes with or without the dummy-prefix `▁` (Hugging Face's non-legacy Llama tokenizer
    /// turns it off and adds one `▁` to the whole text itself).
    pub fn encode_with(&self, text: &str, dummy_prefix: bool) -> Vec<u32> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut normalized = String::with_capacity(text.len() + 3);
        if dummy_prefix {
            normalized.push('▁');
        }
        for c in text.chars() {
            normalized.push(if c == ' ' { '▁' } else { c });
        }
        // Symbols as byte ranges of `normalized`, in a doubly linked list.
        let mut start: Vec<usize> = normalized.char_indices().map(|(i, _)| i).collect();
        let n = start.len();
        start.push(normalized.len());
        let mut end: Vec<usize> = start[1..].to_vec();
        start.truncate(n);
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<usize> = (1..=n).collect(); // n = none
        let mut alive = vec![true; n];

        #[derive(PartialEq)]
        struct Candidate {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Eq for Candidate {}
        impl Ord for Candidate {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                // Highest score first; on ties, the leftmost pair.
                self.score.partial_cmp(&o.score).unwrap_or(std::cmp::Ordering::Equal).then(o.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Candidate {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }

        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<Candidate>, l: usize, r: usize, start: &[usize], end: &[usize]| {
            let s = &normalized[start[l]..end[r]];
            if let Some(&id) = self.mergeable.get(s) {
                heap.push(Candidate { score: self.pieces[id as usize].score, left: l, right: r, len: s.len() });
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, i, i + 1, &start, &end);
        }
        while let Some(c) = heap.pop() {
            // Skip stale candidates whose symbols changed since they were queued.
            if !alive[c.left] || !alive[c.right] || next[c.left] != c.right || end[c.right] - start[c.left] != c.len {
                continue;
            }
            end[c.left] = end[c.right];
            alive[c.right] = false;
            next[c.left] = next[c.right];
            if next[c.left] < n {
                prev[next[c.left]] = c.left as isize;
            }
            if prev[c.left] >= 0 {
                push(&mut heap, prev[c.left] as usize, c.left, &start, &end);
            }
            if next[c.left] < n {
                push(&mut heap, c.left, next[c.left], &start, &end);
            }
        }

        let mut ids = Vec::with_capacity(n);
        let mut i = 0;
        while i < n {
            let s = &normalized[start[i]..end[i]];
            match self.mergeable.get(s) {
                Some(&id) => ids.push(id),
                None if self.byte_fallback => {
                    for b in s.bytes() {
                        ids.push(self.byte_ids[b as usize].unwrap_or(self.unk_id));
                    }
                }
                None => ids.push(self.unk_id),
            }
            i = next[i];
        }
        ids
    }

    /// The raw bytes a piece stands for (`▁` → space, `<0xNN>` → that byte). Control and unknown
    /// pieces give their text only when `keep_special`.
    pub fn piece_bytes(&self, id: u32, keep_special: bool) -> Vec<u8> {
        let Some(p) = self.pieces.get(id as usize) else { return Vec::new() };
        match p.kind {
            PieceKind::Byte => {
                self.byte_ids.iter().position(|b| *b == Some(id)).map(|b| vec![b as u8]).unwrap_or_default()
            }
            PieceKind::Control | PieceKind::Unknown | PieceKind::Unused => {
                if keep_special {
                    p.text.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            _ => p.text.replace('▁', " ").into_bytes(),
        }
    }
}
