//! A reader for PyTorch's `torch.save` format (a zip archive holding `data.pkl` and one entry per
//! storage), enough to index a state dict without executing any Python: the pickle opcodes that
//! `torch.save` emits are interpreted, and only `torch._utils._rebuild_tensor_v2`,
//! `_rebuild_parameter` and `collections.OrderedDict` are understood as callables, and the storage
//! classes as names. Any other global is refused with its name (as `torch.load(weights_only=True)`
//! refuses it), never executed nor silently skipped.
//!
//! Every allocation is bounded by the file before it is made: `data.pkl` is read only up to
//! [`MAX_PICKLE_BYTES`], the values the machine builds (memo copies included) may not exceed
//! [`WORK_PER_PICKLE_BYTE`] nodes per byte of pickle, and a storage entry is read only as far as
//! the tensors that view it reach, however large its header says it inflates.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::{Result, WeightsError, io_err};

/// The largest `data.pkl` read (a 70B model's state dict pickles to about 1 MB).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Values (nodes) the machine may build per byte of pickle: a memo bomb, where every `BINGET`
/// doubles a nested list, is refused long before it exhausts memory.
pub const WORK_PER_PICKLE_BYTE: usize = 64;

/// The globals a state dict may name: tensor rebuilders, the dict class, storage classes.
fn is_known_global(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => {
            matches!(
                name,
                "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_parameter" | "_rebuild_parameter_with_state"
            )
        }
        "collections" => name == "OrderedDict",
        "torch" => name.ends_with("Storage"),
        _ => false,
    }
}

/// One tensor of a state dict, located inside the archive.
#[derive(Debug, Clone)]
pub struct TorchTensor {
    /// Storage class name, e.g. `BFloat16Storage`.
    pub dtype: String,
    /// Zip entry of the storage bytes.
    pub entry: String,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

// Scalars and bytes are parsed so the stream stays in sync, even though nothing reads them.
#[allow(dead_code)]
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage { dtype: String, key: String },
    Tensor(Box<TorchTensor>),
    Object,
    Mark,
}

fn format_err(path: &Path, reason: impl Into<String>) -> WeightsError {
    WeightsError::Format { path: path.to_path_buf(), reason: reason.into() }
}

fn open_archive(path: &Path) -> Result<zip::ZipArchive<File>> {
    let file = File::open(path).map_err(io_err(path))?;
    zip::ZipArchive::new(file).map_err(|e| {
        format_err(
            path,
            format!("not a PyTorch zip checkpoint ({e}); legacy pre-1.6 torch.save files are not supported"),
        )
    })
}

/// Reads the state dict of a `.bin`/`.pt` file: tensor names and where their data lives.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, TorchTensor)>> {
    let mut archive = open_archive(path)?;
    let pkl_name = (0..archive.len())
        .filter_map(|i| archive.name_for_index(i).map(String::from))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| format_err(path, "no data.pkl in the archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    let mut bytes = Vec::new();
    let entry = archive.by_name(&pkl_name).map_err(|e| format_err(path, e.to_string()))?;
    let limit = inflation_limit(entry.compressed_size()).min(MAX_PICKLE_BYTES);
    entry.take(limit + 1).read_to_end(&mut bytes).map_err(io_err(path))?;
    if bytes.len() as u64 > limit {
        return Err(format_err(path, format!("data.pkl inflates past {limit} bytes (a zip bomb, not a state dict)")));
    }
    let root = Machine::new(&bytes, &prefix).run().map_err(|e| format_err(path, format!("data.pkl: {e}")))?;

    let mut dict = root;
    // Training frameworks often nest the weights one level down.
    for key in ["state_dict", "model", "module"] {
        if let Value::Dict(items) = &dict
            && let Some((_, v @ Value::Dict(_))) = items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key))
        {
            dict = v.clone();
        }
    }
    let Value::Dict(items) = dict else {
        return Err(format_err(path, "the pickled object is not a dict of tensors"));
    };
    let mut out = Vec::new();
    for (k, v) in items {
        if let (Value::Str(name), Value::Tensor(t)) = (k, v) {
            out.push((name, *t));
        }
    }
    Ok(out)
}

/// Reads the first `needed` bytes of one storage entry (what the tensor viewing it reaches): an
/// entry whose header claims more, or which inflates to more, is never read past them.
pub fn read_entry(path: &Path, entry: &str, needed: usize) -> Result<Vec<u8>> {
    let mut archive = open_archive(path)?;
    let file =
        archive.by_name(entry).map_err(|e| format_err(path, format!("storage `{entry}`: {e} (truncated file?)")))?;
    // Checked before allocating: the entry's own size (a stored entry's is its bytes in the file;
    // a deflated one may claim at most `inflation_limit` of what it occupies).
    if needed as u64 > file.size() {
        return Err(format_err(
            path,
            format!("storage `{entry}` holds {} bytes, its tensors need {needed} (truncated file?)", file.size()),
        ));
    }
    if file.size() > inflation_limit(file.compressed_size()) {
        return Err(format_err(
            path,
            format!(
                "storage `{entry}` claims {} bytes from {} compressed (a zip bomb; torch.save stores storages uncompressed)",
                file.size(),
                file.compressed_size()
            ),
        ));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(needed)
        .map_err(|_| format_err(path, format!("storage `{entry}`: cannot allocate {needed} bytes for it")))?;
    file.take(needed as u64).read_to_end(&mut bytes).map_err(io_err(path))?;
    if bytes.len() < needed {
        return Err(format_err(
            path,
            format!("storage `{entry}` holds {} bytes, its tensors need {needed} (truncated file?)", bytes.len()),
        ));
    }
    Ok(bytes)
}

/// The most bytes an entry of `compressed` bytes may inflate to: torch.save stores entries
/// uncompressed, so a 64-fold ratio (and 1 MiB for tiny entries) is generous for a real file and
/// far below what a zip bomb (about 1000-fold) asks for.
fn inflation_limit(compressed: u64) -> u64 {
    compressed.saturating_mul(64).max(1 << 20)
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    prefix: &'a str,
    /// Nodes the machine may still build (see [`WORK_PER_PICKLE_BYTE`]).
    budget: std::cell::Cell<usize>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], prefix: &'a str) -> Self {
        let budget = data.len().saturating_mul(WORK_PER_PICKLE_BYTE).max(1 << 16);
        Self { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), prefix, budget: budget.into() }
    }

    /// A copy of `v` (a memo read or write), paid for from the budget by its node count before
    /// anything is cloned; `missing` is the error when there is nothing to copy.
    fn copy(&self, v: Option<&Value>, missing: &str) -> std::result::Result<Value, String> {
        let v = v.ok_or_else(|| missing.to_string())?;
        let cost = v.nodes(self.budget.get());
        if cost >= self.budget.get() {
            return Err(format!(
                "the pickle builds more than {} values from {} bytes (a memo bomb?)",
                self.data.len().saturating_mul(WORK_PER_PICKLE_BYTE).max(1 << 16),
                self.data.len()
            ));
        }
        self.budget.set(self.budget.get() - cost);
        Ok(v.clone())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos + n;
        if end > self.data.len() {
            return Err("unexpected end of pickle".into());
        }
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }

    fn pop(&mut self) -> std::result::Result<Value, String> {
        self.stack.pop().ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> std::result::Result<Vec<Value>, String> {
        let mark = self.stack.iter().rposition(|v| matches!(v, Value::Mark)).ok_or("MARK not found")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn string(&mut self, n: usize) -> std::result::Result<Value, String> {
        Ok(Value::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
    }

    fn run(mut self) -> std::result::Result<Value, String> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = u64::from_le_bytes(self.take(8)?.try_into().unwrap()) as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    let top = self.copy(self.stack.last(), "BINPUT on empty stack")?;
                    self.memo.insert(k, top);
                }
                b'r' => {
                    let k = self.u32()?;
                    let top = self.copy(self.stack.last(), "LONG_BINPUT on empty stack")?;
                    self.memo.insert(k, top);
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    let top = self.copy(self.stack.last(), "MEMOIZE on empty stack")?;
                    self.memo.insert(k, top);
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    let v = self.copy(self.memo.get(&k), "BINGET of unknown memo")?;
                    self.stack.push(v);
                }
                b'j' => {
                    let k = self.u32()?;
                    let v = self.copy(self.memo.get(&k), "LONG_BINGET of unknown memo")?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(global(module, name)?);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(global(m, n)?),
                        _ => return Err("STACK_GLOBAL with non-string operands".into()),
                    }
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, b) in bytes.iter().enumerate().take(8) {
                        v |= (*b as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a]));
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b]));
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b, c]));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs =
                        items.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone())).collect();
                    self.stack.push(Value::Dict(pairs));
                }
                b'a' => {
                    let v = self.pop()?;
                    if let Some(Value::List(l)) = self.stack.last_mut() {
                        l.push(v);
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    if let Some(Value::List(l)) = self.stack.last_mut() {
                        l.extend(items);
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    if let Some(Value::Dict(d)) = self.stack.last_mut() {
                        d.push((k, v));
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if let Some(Value::Dict(d)) = self.stack.last_mut() {
                        for c in items.chunks(2).filter(|c| c.len() == 2) {
                            d.push((c[0].clone(), c[1].clone()));
                        }
                    }
                }
                0x8f => self.stack.push(Value::List(Vec::new())), // EMPTY_SET
                0x90 => {
                    self.pop_mark()?; // ADDITEMS
                }
                b'b' => {
                    self.pop()?; // BUILD: object state is irrelevant for tensors
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v);
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(Value::Object); // NEWOBJ
                }
                other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", self.pos - 1)),
            }
        }
    }

    fn persistent_load(&self, pid: Value) -> std::result::Result<Value, String> {
        // ('storage', torch.FloatStorage, '0', 'cpu', numel)
        let Value::Tuple(items) = pid else { return Err("persistent id is not a tuple".into()) };
        match items.as_slice() {
            [Value::Str(tag), Value::Global(_, storage), Value::Str(key), ..] if tag == "storage" => {
                Ok(Value::Storage { dtype: storage.clone(), key: format!("{}data/{}", self.prefix, key) })
            }
            _ => Err("unknown persistent id".into()),
        }
    }

    fn reduce(&self, callable: Value, args: Value) -> std::result::Result<Value, String> {
        let Value::Global(module, name) = callable else { return Ok(Value::Object) };
        let args = match args {
            Value::Tuple(a) => a,
            _ => return Ok(Value::Object),
        };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                let (Some(Value::Storage { dtype, key }), Some(Value::Int(offset)), Some(size), Some(stride)) =
                    (args.first(), args.get(1), args.get(2), args.get(3))
                else {
                    return Err("malformed _rebuild_tensor_v2 arguments".into());
                };
                Ok(Value::Tensor(Box::new(TorchTensor {
                    dtype: dtype.clone(),
                    entry: key.clone(),
                    offset: *offset as usize,
                    shape: ints(size)?,
                    stride: ints(stride)?,
                })))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                Ok(args.into_iter().next().unwrap_or(Value::None))
            }
            ("collections", "OrderedDict") => Ok(Value::Dict(Vec::new())),
            _ => Ok(Value::Object),
        }
    }
}

/// A global the reader knows, or an error naming it.
fn global(module: String, name: String) -> std::result::Result<Value, String> {
    if is_known_global(&module, &name) {
        Ok(Value::Global(module, name))
    } else {
        Err(format!(
            "refuses global `{module}.{name}`: a state dict names only torch's tensor-rebuild functions, storage classes and OrderedDict (this file may run code under torch.load)"
        ))
    }
}

impl Value {
    /// Nodes in this value; counting stops once it reaches `limit` (the budget left).
    fn nodes(&self, limit: usize) -> usize {
        let children: Vec<&Value> = match self {
            Value::Tuple(v) | Value::List(v) => v.iter().collect(),
            Value::Dict(pairs) => pairs.iter().flat_map(|(k, v)| [k, v]).collect(),
            Value::Str(s) => return 1 + s.len() / 64,
            Value::Bytes(b) => return 1 + b.len() / 64,
            _ => return 1,
        };
        let mut count = 1usize;
        for c in children {
            count += c.nodes(limit.saturating_sub(count));
            if count >= limit {
                break;
            }
        }
        count
    }
}

fn ints(v: &Value) -> std::result::Result<Vec<usize>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items
            .iter()
            .map(|i| match i {
                Value::Int(x) if *x >= 0 => Ok(*x as usize),
                _ => Err("expected a tuple of non-negative ints".to_string()),
            })
            .collect(),
        _ => Err("expected a tuple".into()),
    }
}
