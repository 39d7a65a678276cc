//! The checkpoint index: which tensors exist, where their bytes are, and which have been used.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};

use crate::pickle::{self, TorchTensor};
use crate::{Result, WeightsError, io_err};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F16,
    BF16,
    F32,
    F64,
    /// Bytes: the codes of a quantized weight (read with [`WeightStore::read_words`]).
    U8,
    /// Integer or boolean buffers (e.g. CLIP's `position_ids`): indexed, never loaded as weights.
    Other(&'static str),
}

impl StoredDtype {
    fn size(self) -> usize {
        match self {
            StoredDtype::F16 | StoredDtype::BF16 => 2,
            StoredDtype::F32 => 4,
            StoredDtype::F64 => 8,
            StoredDtype::U8 => 1,
            StoredDtype::Other(_) => 0,
        }
    }

    /// The Burn dtype of a floating-point tensor; `None` for integer and boolean buffers.
    pub fn burn(self) -> Option<DType> {
        match self {
            StoredDtype::F16 => Some(DType::F16),
            StoredDtype::BF16 => Some(DType::BF16),
            StoredDtype::F32 => Some(DType::F32),
            StoredDtype::F64 => Some(DType::F64),
            StoredDtype::U8 | StoredDtype::Other(_) => None,
        }
    }

    /// The dtype a tensor is held in when no other is asked for: as stored, f64 as f32 (no model
    /// computes in f64); `None` for integer and boolean buffers.
    pub fn held(self) -> Option<DType> {
        self.burn().map(|d| if d == DType::F64 { DType::F32 } else { d })
    }

    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F16 => "F16",
            StoredDtype::BF16 => "BF16",
            StoredDtype::F32 => "F32",
            StoredDtype::F64 => "F64",
            StoredDtype::U8 => "U8",
            StoredDtype::Other(n) => n,
        }
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub dtype: StoredDtype,
    file: usize,
    location: Location,
}

#[derive(Debug, Clone)]
enum Location {
    /// Absolute byte offset of a contiguous tensor in a safetensors file.
    Safetensors { offset: u64 },
    /// A storage entry inside a PyTorch zip archive, with the view's offset and strides (elements).
    Torch { entry: String, offset: usize, stride: Vec<usize> },
}

/// Names that are buffers rather than weights: loaders never ask for them, so they are not
/// reported as unused.
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids") || name.ends_with("rotary_emb.inv_freq")
}

/// An index of all tensors of a (possibly sharded) checkpoint.
#[derive(Debug)]
pub struct WeightStore {
    files: Vec<PathBuf>,
    tensors: BTreeMap<String, TensorInfo>,
    used: Mutex<BTreeSet<String>>,
    memory_map: bool,
}

/// The environment variable that turns memory maps off for every [`WeightStore`] a program opens
/// (`LLAVA_NO_MMAP=1`), as llama.cpp's `--no-mmap` does: for files on a network file system that
/// may change under the run, where a mapped page that can no longer be read ends the process.
pub const NO_MMAP_ENV: &str = "LLAVA_NO_MMAP";

impl WeightStore {
    /// Opens a checkpoint file, a shard index (`*.index.json`) or a directory holding one.
    pub fn open(path: &Path) -> Result<Self> {
        let files = resolve_files(path)?;
        Self::open_files(&files)
    }

    /// Indexes the given checkpoint files (safetensors or PyTorch `.bin`) as one checkpoint.
    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for (file_index, path) in files.iter().enumerate() {
            let entries = if is_safetensors(path) {
                index_safetensors(path, file_index)?
            } else {
                index_torch(path, file_index)?
            };
            for (name, info) in entries {
                if tensors.contains_key(&name) {
                    tracing::warn!("tensor `{name}` appears in more than one shard; keeping the first");
                    continue;
                }
                tensors.insert(name, info);
            }
        }
        tracing::debug!("indexed {} tensors from {} file(s)", tensors.len(), files.len());
        let memory_map = std::env::var_os(NO_MMAP_ENV).is_none_or(|v| v.is_empty() || v == "0");
        Ok(Self { files: files.to_vec(), tensors, used: Mutex::new(BTreeSet::new()), memory_map })
    }

    /// Whether a safetensors tensor read in the dtype it is stored in is memory-mapped (the
    /// default, unless [`NO_MMAP_ENV`] is set) instead of copied into the heap.
    ///
    /// Mapped, a tensor's bytes are the page cache's: loading costs no copy and no second
    /// buffer, pages are read when first used, and a 13 GB checkpoint occupies 13 GB however
    /// often it is loaded. The map is private: a backend writing into the tensor writes into its
    /// own copy, never into the file. The cost is the memory map's: a file truncated while the
    /// program runs ends it when a lost page is read (the reason for the switch).
    pub fn with_memory_map(mut self, memory_map: bool) -> Self {
        self.memory_map = memory_map;
        self
    }

    /// See [`Self::with_memory_map`].
    pub fn memory_map(&self) -> bool {
        self.memory_map
    }

    /// Whether [`Self::read`] of `name` in its stored dtype gives a memory map of the file
    /// (memory maps on, a safetensors tensor aligned to its element size): then only the pages
    /// a run reads become resident.
    pub fn maps(&self, name: &str) -> bool {
        self.tensors.get(name).is_some_and(|info| self.mappable(info))
    }

    /// Whether `info`'s tensor, read in its stored dtype, is a memory map of its file: maps on, a
    /// little-endian host (safetensors' byte order), a floating-point safetensors tensor whose
    /// offset is a multiple of its element size (writers align tensors so, but the format does
    /// not require it; a map's bytes are aligned as their offset is).
    fn mappable(&self, info: &TensorInfo) -> bool {
        match info.location {
            Location::Safetensors { offset } => {
                info.dtype.burn().is_some() && self.maps_at(offset, info.dtype.size().max(1))
            }
            Location::Torch { .. } => false,
        }
    }

    /// Whether bytes at `offset` of a safetensors file, read as little-endian values of `align`
    /// bytes, are a memory map: maps on, a little-endian host, `offset` a multiple of `align`.
    fn maps_at(&self, offset: u64, align: usize) -> bool {
        self.memory_map && cfg!(target_endian = "little") && offset.is_multiple_of(align as u64)
    }

    /// The checkpoint files this store reads.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether any tensor name starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// The dtype in which tensors under `prefix` (`""`: all) are held when none is asked for
    /// ([`StoredDtype::held`]), by bytes: the one holding most of them. `None` when no
    /// floating-point tensor is there. Reads headers only, for memory plans.
    pub fn dominant_dtype(&self, prefix: &str) -> Option<DType> {
        let mut bytes: Vec<(DType, u64)> = Vec::new();
        let dotted = if prefix.is_empty() { String::new() } else { format!("{prefix}.") };
        for (_, info) in self.tensors.range(dotted.clone()..).take_while(|(k, _)| k.starts_with(&dotted)) {
            let Some(dtype) = info.dtype.held() else { continue };
            let n = info.shape.iter().product::<usize>() as u64 * info.dtype.size() as u64;
            match bytes.iter_mut().find(|(d, _)| *d == dtype) {
                Some((_, total)) => *total += n,
                None => bytes.push((dtype, n)),
            }
        }
        bytes.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }

    /// Reads a tensor as f32, checking its shape, and marks it used.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let data = self.read(name, expected, Some(DType::F32))?;
        Ok(data.into_vec::<f32>().expect("read as F32"))
    }

    /// Tensor `name`'s entry and file, when it exists with exactly shape `expected` (the errors
    /// name the tensor, both shapes and the file).
    fn shaped(&self, name: &str, expected: &[usize]) -> Result<(&TensorInfo, &PathBuf)> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::Missing { name: name.to_string(), hint: self.missing_hint(name) })?;
        let path = &self.files[info.file];
        if info.shape != expected {
            return Err(WeightsError::Shape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
                path: path.clone(),
            });
        }
        Ok((info, path))
    }

    /// Reads a tensor in `dtype`, or in the dtype it is stored in when `None` (f64 becomes f32),
    /// checking its shape, and marks it used. A half-precision tensor read in its own dtype is
    /// never widened: the only buffers are its bytes and their typed copy.
    pub fn read(&self, name: &str, expected: &[usize], dtype: Option<DType>) -> Result<TensorData> {
        let (info, path) = self.shaped(name, expected)?;
        let _doing =
            llava_io::activity::doing(&format!("reading tensor `{name}` {:?} from {}", info.shape, path.display()));
        let unsupported =
            |dtype: &str| WeightsError::Dtype { name: name.to_string(), dtype: dtype.into(), path: path.clone() };
        let stored = info.dtype.burn().ok_or_else(|| unsupported(info.dtype.name()))?;
        let held = info.dtype.held().unwrap_or(stored);
        let target = match dtype.unwrap_or(held) {
            t @ (DType::F32 | DType::F16 | DType::BF16 | DType::F64) => t,
            other => return Err(unsupported(&format!("{other:?} (as the requested dtype)"))),
        };
        let numel: usize = info.shape.iter().product();
        let data = match &info.location {
            Location::Safetensors { offset } => {
                let mut file = File::open(path).map_err(io_err(path))?;
                // The file's little-endian bytes are the values.
                let as_stored = cfg!(target_endian = "little") && stored == target;
                let mapped = (as_stored && self.mappable(info))
                    .then(|| map_tensor(&file, *offset, numel * info.dtype.size()))
                    .flatten();
                file.seek(SeekFrom::Start(*offset)).map_err(io_err(path))?;
                if let Some(bytes) = mapped {
                    Some(TensorData::from_bytes(bytes, info.shape.clone(), stored))
                } else if as_stored {
                    // Read straight into the typed buffer: the file's little-endian bytes are the
                    // values (one copy, from the page cache, instead of bytes then values).
                    let shape = info.shape.clone();
                    Some(match stored {
                        DType::F16 => {
                            TensorData::new(read_values::<f16>(&mut file, numel).map_err(io_err(path))?, shape)
                        }
                        DType::BF16 => {
                            TensorData::new(read_values::<bf16>(&mut file, numel).map_err(io_err(path))?, shape)
                        }
                        DType::F64 => {
                            TensorData::new(read_values::<f64>(&mut file, numel).map_err(io_err(path))?, shape)
                        }
                        _ => TensorData::new(read_values::<f32>(&mut file, numel).map_err(io_err(path))?, shape),
                    })
                } else {
                    let mut bytes = vec![0u8; numel * info.dtype.size()];
                    file.read_exact(&mut bytes).map_err(io_err(path))?;
                    decode(&bytes, stored, target, info.shape.clone(), None).flatten()
                }
            }
            Location::Torch { entry, offset, stride } => {
                // The bytes this view reaches: its last element's position plus one, in elements.
                let reach = (stride.len() == info.shape.len())
                    .then(|| {
                        info.shape.iter().zip(stride.iter()).try_fold(offset.checked_add(1)?, |end, (&d, &s)| {
                            end.checked_add(d.saturating_sub(1).checked_mul(s)?)
                        })
                    })
                    .flatten()
                    .map(|end| if numel == 0 { 0 } else { end })
                    .and_then(|end| end.checked_mul(info.dtype.size()));
                let needed = reach.ok_or_else(|| WeightsError::Format {
                    path: path.clone(),
                    reason: format!("tensor `{name}`: shape {:?} and stride {stride:?} do not fit", info.shape),
                })?;
                let storage = pickle::read_entry(path, entry, needed)?;
                let view = StridedView { offset: *offset, stride };
                decode(&storage, stored, target, info.shape.clone(), Some(view)).ok_or_else(|| {
                    WeightsError::Format {
                        path: path.clone(),
                        reason: format!("tensor `{name}` points outside its storage `{entry}`"),
                    }
                })?
            }
        };
        let data = data.ok_or_else(|| WeightsError::Format {
            path: path.clone(),
            reason: format!("tensor `{name}`: its bytes do not fill shape {:?}", info.shape),
        })?;
        self.used.lock().unwrap().insert(name.to_string());
        Ok(data)
    }

    /// Reads a U8 tensor of exactly `expected` shape `[rows, bytes]` from a safetensors file (the
    /// codes of a quantized weight) as little-endian `i32` words, `[rows, bytes / 4]`, and marks
    /// it used. Like [`Self::read`] in the stored dtype, it is a memory map of the file where it
    /// can be (maps on, a little-endian host, the offset a multiple of 4), else read.
    pub fn read_words(&self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let (info, path) = self.shaped(name, expected)?;
        let (StoredDtype::U8, Location::Safetensors { offset }) = (info.dtype, &info.location) else {
            return Err(WeightsError::Dtype {
                name: name.to_string(),
                dtype: format!("{} (expected U8 codes in a safetensors file)", info.dtype.name()),
                path: path.clone(),
            });
        };
        let [rows, bytes] = *expected else {
            return Err(WeightsError::Format {
                path: path.clone(),
                reason: format!("tensor `{name}`: codes are a matrix, not shape {expected:?}"),
            });
        };
        if !bytes.is_multiple_of(4) {
            return Err(WeightsError::Format {
                path: path.clone(),
                reason: format!("tensor `{name}`: {bytes} code bytes per row is not whole 32-bit words"),
            });
        }
        let _doing =
            llava_io::activity::doing(&format!("reading tensor `{name}` {:?} from {}", info.shape, path.display()));
        let shape = vec![rows, bytes / 4];
        let mut file = File::open(path).map_err(io_err(path))?;
        let mapped = self.maps_at(*offset, 4).then(|| map_tensor(&file, *offset, rows * bytes)).flatten();
        let data = match mapped {
            Some(bytes) => TensorData::from_bytes(bytes, shape, DType::I32),
            None => {
                let mut raw = vec![0u8; rows * bytes];
                file.seek(SeekFrom::Start(*offset)).map_err(io_err(path))?;
                file.read_exact(&mut raw).map_err(io_err(path))?;
                let words: Vec<i32> =
                    raw.chunks_exact(4).map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect();
                TensorData::new(words, shape)
            }
        };
        self.used.lock().unwrap().insert(name.to_string());
        Ok(data)
    }

    /// Tensors that no loader asked for (buffers such as `position_ids` excluded).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().unwrap();
        self.tensors.keys().filter(|k| !used.contains(*k) && !is_buffer(k)).cloned().collect()
    }

    /// Marks tensors as deliberately ignored (e.g. CLIP's text tower when only vision is used).
    pub fn ignore_prefix(&self, prefix: &str) {
        let mut used = self.used.lock().unwrap();
        for name in self.tensors.keys().filter(|k| k.starts_with(prefix)) {
            used.insert(name.clone());
        }
    }

    /// Errors with the list of unused tensors, if there are any.
    pub fn ensure_all_used(&self) -> Result<()> {
        let unused = self.unused();
        if unused.is_empty() {
            return Ok(());
        }
        let mut names = unused.iter().take(20).cloned().collect::<Vec<_>>().join(", ");
        if unused.len() > 20 {
            names.push_str(&format!(" … and {} more", unused.len() - 20));
        }
        Err(WeightsError::Unused { names })
    }

    fn missing_hint(&self, name: &str) -> String {
        // Point at the closest existing name sharing the longest prefix: a renamed layout is the
        // usual cause.
        let parent = name.rsplit_once('.').map_or("", |(p, _)| p);
        let siblings: Vec<&str> = self
            .tensors
            .keys()
            .filter(|k| !parent.is_empty() && k.starts_with(parent))
            .take(4)
            .map(String::as_str)
            .collect();
        let files = self.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        if siblings.is_empty() {
            format!(" (files: {files})")
        } else {
            format!(" (nearby: {}; files: {files})", siblings.join(", "))
        }
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// Turns a user-given path into the list of checkpoint files.
fn resolve_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        if path.to_string_lossy().ends_with(".index.json") {
            return shards_from_index(path);
        }
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(WeightsError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    }
    for index in ["model.safetensors.index.json", "pytorch_model.bin.index.json"] {
        let p = path.join(index);
        if p.is_file() {
            return shards_from_index(&p);
        }
    }
    for single in ["model.safetensors", "pytorch_model.bin"] {
        let p = path.join(single);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io_err(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_safetensors(p))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(WeightsError::NotFound { path: path.to_path_buf() });
    }
    Ok(found)
}

fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(io_err(index))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| WeightsError::Format { path: index.to_path_buf(), reason: e.to_string() })?;
    let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| WeightsError::Format {
        path: index.to_path_buf(),
        reason: "missing object field `weight_map`".into(),
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let shards: BTreeSet<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    // Shards live beside their index: a name that leaves the folder is refused, naming it.
    let files: Vec<PathBuf> = shards
        .iter()
        .map(|s| {
            llava_io::join_inside(dir, Path::new(s), false)
                .map_err(|e| WeightsError::Format { path: index.to_path_buf(), reason: format!("weight_map: {e}") })
        })
        .collect::<Result<_>>()?;
    for f in &files {
        if !f.is_file() {
            return Err(WeightsError::Format {
                path: index.to_path_buf(),
                reason: format!("shard {} listed in weight_map does not exist", f.display()),
            });
        }
    }
    Ok(files)
}

fn index_safetensors(path: &Path, file: usize) -> Result<Vec<(String, TensorInfo)>> {
    let format_err = |reason: String| WeightsError::Format { path: path.to_path_buf(), reason };
    let mut f = File::open(path).map_err(io_err(path))?;
    let file_len = f.metadata().map_err(io_err(path))?.len();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes)
        .map_err(|_| format_err("file is shorter than the 8-byte safetensors header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(format_err(format!("header length {header_len} does not fit a {file_len}-byte file")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io_err(path))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format_err(format!("header is not JSON: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    for (name, entry) in json {
        if name == "__metadata__" {
            continue;
        }
        let dtype = entry["dtype"].as_str().unwrap_or("");
        let dtype = match dtype {
            "F16" => StoredDtype::F16,
            "BF16" => StoredDtype::BF16,
            "F32" => StoredDtype::F32,
            "F64" => StoredDtype::F64,
            "I64" => StoredDtype::Other("I64"),
            "I32" => StoredDtype::Other("I32"),
            "I8" => StoredDtype::Other("I8"),
            "U8" => StoredDtype::U8,
            "BOOL" => StoredDtype::Other("BOOL"),
            other => return Err(format_err(format!("tensor `{name}` has unknown dtype `{other}`"))),
        };
        // Every dimension a non-negative integer (`[64, -1]` is refused, not read as `[64]`), the
        // element count and the byte range free of overflow, and the range inside the file.
        let shape: Vec<usize> = entry["shape"]
            .as_array()
            .ok_or_else(|| format_err(format!("tensor `{name}` has no shape")))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                format_err(format!("tensor `{name}`: shape {} has a dimension that is not a size", entry["shape"]))
            })?;
        let offsets = entry["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| format_err(format!("tensor `{name}` has no data_offsets")))?;
        if offsets.0 > offsets.1 {
            return Err(format_err(format!("tensor `{name}`: data_offsets {offsets:?} end before they start")));
        }
        let end = data_start.checked_add(offsets.1).filter(|&end| end <= file_len).ok_or_else(|| {
            format_err(format!(
                "tensor `{name}` ends at byte {} but the file has {file_len} bytes (truncated download?)",
                data_start.saturating_add(offsets.1)
            ))
        })?;
        let bytes = shape.iter().try_fold(dtype.size().max(1), |n, &d| n.checked_mul(d));
        if dtype.size() > 0 && bytes != Some((offsets.1 - offsets.0) as usize) {
            return Err(format_err(format!(
                "tensor `{name}`: byte range {offsets:?} does not match shape {shape:?} of {dtype_name}",
                dtype_name = dtype.name()
            )));
        }
        ranges.push((data_start + offsets.0, end, name.clone()));
        out.push((
            name,
            TensorInfo { shape, dtype, file, location: Location::Safetensors { offset: data_start + offsets.0 } },
        ));
    }
    // Two tensors sharing bytes would alias each other's data: refuse overlapping ranges.
    ranges.sort();
    for pair in ranges.windows(2) {
        let ((_, end, first), (start, _, second)) = (&pair[0], &pair[1]);
        if start < end {
            return Err(format_err(format!("tensors `{first}` and `{second}` overlap in the file")));
        }
    }
    Ok(out)
}

fn index_torch(path: &Path, file: usize) -> Result<Vec<(String, TensorInfo)>> {
    let tensors: Vec<(String, TorchTensor)> = pickle::read_state_dict(path)?;
    let mut out = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = match t.dtype.as_str() {
            "HalfStorage" => StoredDtype::F16,
            "BFloat16Storage" => StoredDtype::BF16,
            "FloatStorage" => StoredDtype::F32,
            "DoubleStorage" => StoredDtype::F64,
            "LongStorage" => StoredDtype::Other("I64"),
            "IntStorage" => StoredDtype::Other("I32"),
            "BoolStorage" => StoredDtype::Other("BOOL"),
            _ => StoredDtype::Other("unknown torch storage"),
        };
        let bytes = t.shape.iter().try_fold(dtype.size().max(1), |n, &d| n.checked_mul(d));
        if bytes.is_none_or(|b| b as u64 > u64::MAX / 2) {
            return Err(WeightsError::Format {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}`: shape {:?} overflows", t.shape),
            });
        }
        let location = Location::Torch { entry: t.entry, offset: t.offset, stride: t.stride };
        out.push((name, TensorInfo { shape: t.shape, dtype, file, location }));
    }
    Ok(out)
}

/// A private, read-only memory map of `len` bytes at `offset` in `file` as Burn bytes, or `None`
/// where it cannot serve (the platform refuses the map, or the file is now shorter than the index
/// said), and the caller reads instead.
fn map_tensor(file: &File, offset: u64, len: usize) -> Option<burn::tensor::Bytes> {
    // The map starts at a page boundary (a multiple of 4096), so the bytes' address is aligned
    // exactly as their offset in the file is ([`WeightStore::mappable`] checked that offset).
    if len == 0 {
        return None;
    }
    let end = offset.checked_add(len as u64)?;
    if file.metadata().ok()?.len() < end {
        return None;
    }
    // SAFETY: the map is read-only and private; what the file holds can change under it only
    // if another program truncates or rewrites it while we run (see `NO_MMAP_ENV`).
    let map = unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(file) }.ok()?;
    // Burn's shared bytes keep the map alive as long as a tensor uses them and copy them into
    // the heap the first time a backend writes into the tensor.
    Some(burn::tensor::Bytes::from_shared(bytes::Bytes::from_owner(map), burn::tensor::AllocationProperty::File))
}

/// Plain floating-point values (every bit pattern is a value) read from `file`'s next bytes, in the
/// host's byte order (the caller checked it is little-endian, as safetensors stores them).
fn read_values<T: Copy + Default>(file: &mut File, n: usize) -> std::io::Result<Vec<T>> {
    let mut values = vec![T::default(); n];
    // SAFETY: T is f16, bf16, f32 or f64: no padding, valid for any bytes; the slice covers
    // exactly the vector's initialised elements.
    let bytes = unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>()) };
    file.read_exact(bytes)?;
    Ok(values)
}

/// Where a PyTorch tensor sits in its storage (elements).
struct StridedView<'a> {
    offset: usize,
    stride: &'a [usize],
}

/// Stored little-endian bytes as a tensor of `target`: same dtype, a typed copy of the bytes;
/// otherwise each element converted on its own (no whole-tensor f32 buffer in between). `None`
/// when a view points outside the storage or the bytes do not fill the shape.
fn decode(
    bytes: &[u8], stored: DType, target: DType, shape: Vec<usize>, view: Option<StridedView>,
) -> Option<Option<TensorData>> {
    fn typed<T: Copy + burn::tensor::Element, const N: usize>(
        bytes: &[u8], shape: Vec<usize>, view: Option<&StridedView>, from: impl Fn([u8; N]) -> T + Sync + Send,
    ) -> Option<Option<TensorData>> {
        // On all threads: converting a 7B checkpoint's f16 into bf16 one element at a time on
        // one thread took longer than reading it (TinyLlama: 3.1 s against 1.1 s as stored).
        use rayon::prelude::*;
        let all: Vec<T> = bytes.par_chunks_exact(N).map(|c| from(c.try_into().unwrap())).collect();
        let values = match view {
            Some(view) => gather_strided(&all, view.offset, &shape, view.stride)?,
            None => all,
        };
        let numel: usize = shape.iter().product();
        Some((values.len() == numel).then(|| TensorData::new(values, shape)))
    }
    let view = view.as_ref();
    let numel: usize = shape.iter().product();
    if view.is_none()
        && stored != target
        && bytes.len() == numel * stored.size()
        && let Some(data) = convert_float(bytes, stored, target, shape.clone())
    {
        return Some(Some(data));
    }
    macro_rules! to {
        ($t:ty, $conv:expr) => {
            match stored {
                DType::F32 => typed::<$t, 4>(bytes, shape, view, |b| $conv(f32::from_le_bytes(b))),
                DType::F16 => typed::<$t, 2>(bytes, shape, view, |b| $conv(f16::from_le_bytes(b).to_f32())),
                DType::BF16 => typed::<$t, 2>(bytes, shape, view, |b| $conv(bf16::from_le_bytes(b).to_f32())),
                _ => typed::<$t, 8>(bytes, shape, view, |b| $conv(f64::from_le_bytes(b) as f32)),
            }
        };
    }
    match (stored, target) {
        (DType::F16, DType::F16) => typed::<f16, 2>(bytes, shape, view, f16::from_le_bytes),
        (DType::BF16, DType::BF16) => typed::<bf16, 2>(bytes, shape, view, bf16::from_le_bytes),
        (DType::F64, DType::F64) => typed::<f64, 8>(bytes, shape, view, f64::from_le_bytes),
        (_, DType::F16) => to!(f16, f16::from_f32),
        (_, DType::BF16) => to!(bf16, bf16::from_f32),
        (_, DType::F64) => to!(f64, f64::from),
        _ => to!(f32, std::convert::identity),
    }
}

/// f32, f16 and bf16 bytes converted into another of the three, in blocks on all threads through
/// a small f32 buffer (`half`'s slice conversions: F16C for f16); `None` for other dtypes. The
/// element-by-element path took longer than reading the file (a TinyLlama f16 → bf16 load: 3.1 s
/// against 1.1 s as stored, 42 % of it converting).
fn convert_float(bytes: &[u8], stored: DType, target: DType, shape: Vec<usize>) -> Option<TensorData> {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const BLOCK: usize = 16 * 1024;
    let from = match stored {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        _ => return None,
    };
    let len = bytes.len() / from;
    let widen = |src: &[u8], wide: &mut [f32]| match stored {
        DType::F32 => {
            wide.iter_mut().zip(src.chunks_exact(4)).for_each(|(w, b)| *w = f32::from_le_bytes(b.try_into().unwrap()))
        }
        DType::F16 => {
            src.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect::<Vec<_>>().convert_to_f32_slice(wide)
        }
        _ => src
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]))
            .collect::<Vec<_>>()
            .convert_to_f32_slice(wide),
    };
    let blocks = || bytes[..len * from].par_chunks(BLOCK * from);
    /// Half-precision values, each block widened to f32 then narrowed.
    fn narrowed<T: Copy + Send>(
        len: usize, zero: T, blocks: impl IndexedParallelIterator<Item = impl AsRef<[u8]>>,
        widen: impl Fn(&[u8], &mut [f32]) + Sync,
    ) -> Vec<T>
    where
        [T]: HalfFloatSliceExt,
    {
        let mut out = vec![zero; len];
        out.par_chunks_mut(BLOCK).zip(blocks).for_each(|(dst, src)| {
            let mut wide = vec![0f32; dst.len()];
            widen(src.as_ref(), &mut wide);
            dst.convert_from_f32_slice(&wide);
        });
        out
    }
    Some(match target {
        DType::F32 => {
            let mut out = vec![0f32; len];
            out.par_chunks_mut(BLOCK).zip(blocks()).for_each(|(dst, src)| widen(src, dst));
            TensorData::new(out, shape)
        }
        DType::F16 => TensorData::new(narrowed(len, f16::ZERO, blocks(), widen), shape),
        DType::BF16 => TensorData::new(narrowed(len, bf16::ZERO, blocks(), widen), shape),
        _ => return None,
    })
}

/// Copies a strided view out of a flat storage (PyTorch views are usually contiguous, but not
/// always: a transposed tensor saved as-is keeps its strides).
fn gather_strided<T: Copy>(storage: &[T], offset: usize, shape: &[usize], stride: &[usize]) -> Option<Vec<T>> {
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Some(Vec::new());
    }
    let last = offset + shape.iter().zip(stride).map(|(d, s)| (d - 1) * s).sum::<usize>();
    if last >= storage.len() || stride.len() != shape.len() {
        return None;
    }
    let contiguous = {
        let mut expect = 1;
        let mut ok = true;
        for (d, s) in shape.iter().zip(stride).rev() {
            if *d != 1 && *s != expect {
                ok = false;
            }
            expect *= d;
        }
        ok
    };
    if contiguous {
        if offset == 0 && numel == storage.len() {
            return Some(storage.to_vec());
        }
        return Some(storage[offset..offset + numel].to_vec());
    }
    let mut out = Vec::with_capacity(numel);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let pos = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(storage[pos]);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block-wise conversion gives, element for element, `half`'s own scalar conversion
    /// (round to nearest even) between every pair of f32, f16 and bf16, across block boundaries
    /// and for infinities, subnormals and values out of f16's range.
    #[test]
    fn float_conversion_equals_the_scalar_one_for_every_pair() {
        let mut values: Vec<f32> = (0..40_000).map(|i| ((i as f32) * 0.7310).sin() * 10f32.powi(i % 13 - 6)).collect();
        values.extend([f32::INFINITY, f32::NEG_INFINITY, 1e-40, -0.0, 70000.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]);
        let bytes_of = |dtype: DType| -> Vec<u8> {
            match dtype {
                DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            }
        };
        let stored_value = |dtype: DType, v: f32| match dtype {
            DType::F32 => v,
            DType::F16 => f16::from_f32(v).to_f32(),
            _ => bf16::from_f32(v).to_f32(),
        };
        for stored in [DType::F32, DType::F16, DType::BF16] {
            for target in [DType::F32, DType::F16, DType::BF16] {
                if stored == target {
                    continue;
                }
                let data = convert_float(&bytes_of(stored), stored, target, vec![values.len()]).unwrap();
                assert_eq!(data.dtype, target);
                let got: Vec<u32> = match target {
                    DType::F32 => data.to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect(),
                    DType::F16 => data.to_vec::<f16>().unwrap().iter().map(|v| v.to_bits() as u32).collect(),
                    _ => data.to_vec::<bf16>().unwrap().iter().map(|v| v.to_bits() as u32).collect(),
                };
                for (i, (g, v)) in got.iter().zip(&values).enumerate() {
                    let x = stored_value(stored, *v);
                    let want = match target {
                        DType::F32 => x.to_bits(),
                        DType::F16 => f16::from_f32(x).to_bits() as u32,
                        _ => bf16::from_f32(x).to_bits() as u32,
                    };
                    assert_eq!(*g, want, "{stored:?} -> {target:?}, element {i} ({x})");
                }
            }
        }
    }

    #[test]
    fn strided_gather_transposes() {
        // storage holds a 2x3 row-major matrix; the view is its 3x2 transpose.
        let storage = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let t = gather_strided(&storage, 0, &[3, 2], &[1, 3]).unwrap();
        assert_eq!(t, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert!(gather_strided(&storage, 1, &[3, 2], &[1, 3]).is_none());
    }

    /// A safetensors file written by hand: `(name, dtype, shape, bytes)` laid out in order, so a
    /// test can place a tensor at an offset no writer would.
    fn safetensors_file(dir: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> PathBuf {
        let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
        for (name, dtype, shape, bytes) in tensors {
            let range = [data.len(), data.len() + bytes.len()];
            header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": range}));
            data.extend_from_slice(bytes);
        }
        let mut header = serde_json::to_vec(&header).unwrap();
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        let path = dir.join("model.safetensors");
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header);
        file.extend(data);
        std::fs::write(&path, file).unwrap();
        path
    }

    fn half_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
        match dtype {
            DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            DType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Saved quantized codes are read as little-endian 32-bit words, a memory map of the file
    /// when aligned (else read, the same words), and a quantized layer loaded on Flex keeps that
    /// map as its codes: a saved quantized model is not copied at load.
    #[test]
    fn quantized_codes_are_mapped_words_and_stay_mapped_in_the_layer() {
        use burn::backend::Flex;
        use burn::tensor::AllocationProperty;
        let dir = tempfile::tempdir().unwrap();
        // A q4 layer [2 out, 64 in]: 32 code bytes per row, two f16 scales per row.
        let codes: Vec<u8> = (0..64u32).map(|i| (i * 37 % 251) as u8).collect();
        let scales = half_bytes(&[0.5, 0.25, -0.125, 2.0], DType::F16);
        let path = safetensors_file(
            dir.path(),
            &[
                ("l.weight_q4", "U8", vec![2, 32], codes.clone()),
                ("l.weight_scale", "F16", vec![2, 2], scales),
                ("pad", "U8", vec![1], vec![0]),
                ("odd.weight_q4", "U8", vec![2, 32], codes.clone()),
            ],
        );
        let mapped = WeightStore::open(&path).unwrap().with_memory_map(true);
        let copied = WeightStore::open(&path).unwrap().with_memory_map(false);
        let words = mapped.read_words("l.weight_q4", &[2, 32]).unwrap();
        assert!(matches!(words.bytes.property(), AllocationProperty::File));
        let read = copied.read_words("l.weight_q4", &[2, 32]).unwrap();
        assert!(matches!(read.bytes.property(), AllocationProperty::Native));
        // One byte past a word boundary: read, not mapped, the same words.
        let odd = mapped.read_words("odd.weight_q4", &[2, 32]).unwrap();
        assert!(matches!(odd.bytes.property(), AllocationProperty::Native));
        for data in [&words, &read, &odd] {
            assert_eq!((data.dtype, data.shape.as_slice()), (DType::I32, &[2, 8][..]));
            assert_eq!(data.as_bytes(), codes.as_slice());
        }
        let err = mapped.read_words("l.weight_scale", &[2, 2]).unwrap_err().to_string();
        assert!(err.contains("l.weight_scale") && err.contains("U8"), "{err}");

        let layer =
            crate::Loader::<Flex>::new(&mapped, &Default::default()).any_linear("l", 64, 2, false, None).unwrap();
        let llava_kernels::AnyLinear::Quantized(q) = layer else { panic!("not loaded quantized") };
        assert_eq!(q.to_matrix().values, codes);
        let held = q.values.into_data();
        assert!(matches!(held.bytes.property(), AllocationProperty::File), "the layer copied its codes");
    }

    /// A tensor read in the dtype it is stored in is a memory map of the file (no heap copy),
    /// holds the values the copying read gives, and a write into it changes neither the file
    /// nor another read of the same tensor; converted reads and unaligned tensors are copies.
    #[test]
    fn held_tensors_are_private_maps_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..3000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let path = safetensors_file(
            dir.path(),
            &[
                ("a.bf16", "BF16", vec![3, 1000], half_bytes(&values, DType::BF16)),
                ("b.f16", "F16", vec![3000], half_bytes(&values, DType::F16)),
                ("c.f32", "F32", vec![30, 100], half_bytes(&values, DType::F32)),
                ("d.odd", "U8", vec![1], vec![7]),
                // One byte after the U8 tensor: an f16 tensor at an odd offset.
                ("e.unaligned", "F16", vec![3000], half_bytes(&values, DType::F16)),
            ],
        );
        let file_before = std::fs::read(&path).unwrap();
        let mapped = WeightStore::open(&path).unwrap().with_memory_map(true);
        let copied = WeightStore::open(&path).unwrap().with_memory_map(false);
        assert!(mapped.maps("a.bf16") && mapped.maps("c.f32"));
        assert!(!mapped.maps("e.unaligned") && !copied.maps("a.bf16") && !mapped.maps("missing"));
        for (name, shape) in [("a.bf16", vec![3, 1000]), ("b.f16", vec![3000]), ("c.f32", vec![30, 100])] {
            let map = mapped.read(name, &shape, None).unwrap();
            let copy = copied.read(name, &shape, None).unwrap();
            assert!(matches!(map.bytes.property(), burn::tensor::AllocationProperty::File), "{name} is not mapped");
            assert!(matches!(copy.bytes.property(), burn::tensor::AllocationProperty::Native), "{name}");
            assert_eq!((map.dtype, &map.shape), (copy.dtype, &copy.shape), "{name}");
            assert_eq!(map.as_bytes(), copy.as_bytes(), "{name}");
        }
        // Converted on the way (bf16 -> f32) or unaligned: read into the heap, same values.
        let widened = mapped.read("a.bf16", &[3, 1000], Some(DType::F32)).unwrap();
        assert!(matches!(widened.bytes.property(), burn::tensor::AllocationProperty::Native));
        let unaligned = mapped.read("e.unaligned", &[3000], None).unwrap();
        assert!(matches!(unaligned.bytes.property(), burn::tensor::AllocationProperty::Native));
        assert_eq!(unaligned.as_bytes(), copied.read("b.f16", &[3000], None).unwrap().as_bytes());

        // Writing into a mapped tensor (as a backend's in-place operation does) writes a copy.
        let mut written = mapped.read("a.bf16", &[3, 1000], None).unwrap();
        written.bytes.iter_mut().for_each(|b| *b = 0xAB);
        assert!(written.as_bytes().iter().all(|&b| b == 0xAB));
        assert_eq!(std::fs::read(&path).unwrap(), file_before, "the file changed");
        let again = mapped.read("a.bf16", &[3, 1000], None).unwrap();
        assert_eq!(again.to_vec::<bf16>().unwrap(), values.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>());
    }
}
