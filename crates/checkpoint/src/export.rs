//! Writing modules back under Hugging Face names, as safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, LayerNorm, Linear, RmsNorm};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use llava_kernels::AnyLinear;

use crate::{Result, WeightStore, WeightsError};

/// Element type of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    /// Each tensor in the dtype it is held (or stored) in: f32 master weights as f32, a frozen
    /// bf16 tower as bf16, a tensor passed through from a checkpoint as it is stored there.
    #[default]
    Keep,
    F32,
    BF16,
    F16,
}

impl SaveDtype {
    fn target(self, own: DType) -> DType {
        if !matches!(own, DType::F64 | DType::F32 | DType::F16 | DType::BF16) {
            return own; // integer tensors (quantized codes) are written as they are
        }
        match self {
            SaveDtype::Keep => own,
            SaveDtype::F32 => DType::F32,
            SaveDtype::BF16 => DType::BF16,
            SaveDtype::F16 => DType::F16,
        }
    }
}

/// A module's tensor, read out of it only when the file is written: saving a trainable model
/// never holds a second copy of its weights (only the tensor being written).
struct Deferred(Box<dyn Fn() -> TensorData>);

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deferred")
    }
}

/// One tensor to write.
#[derive(Debug)]
enum Entry {
    /// Values held in memory, in their own dtype.
    Values(TensorData),
    /// A tensor of a module (a cheap handle on it, no copy), as `shape` and `dtype`.
    Tensor { shape: Vec<usize>, dtype: DType, data: Deferred },
    /// A tensor of a checkpoint, read only when the file is written (so a frozen tower is never
    /// held twice) and written with its stored bytes' values.
    Stored {
        store: Arc<WeightStore>,
        name: String,
        shape: Vec<usize>,
        dtype: DType,
        /// Rows written after the stored ones ([`Exporter::pad_rows_with_mean`]), in `dtype`.
        extra_rows: Option<TensorData>,
    },
    /// A name and shape only ([`Exporter::declaring`]): a tensor to be passed through.
    Declared { shape: Vec<usize>, dtype: DType },
}

impl Entry {
    fn shape(&self) -> Vec<usize> {
        match self {
            Entry::Values(data) => data.shape.to_vec(),
            Entry::Tensor { shape, .. } => shape.clone(),
            Entry::Stored { shape, extra_rows: None, .. } | Entry::Declared { shape, .. } => shape.clone(),
            Entry::Stored { shape, extra_rows: Some(extra), .. } => {
                let mut shape = shape.clone();
                shape[0] += extra.shape[0];
                shape
            }
        }
    }
    fn dtype(&self) -> DType {
        match self {
            Entry::Values(data) => data.dtype,
            Entry::Tensor { dtype, .. } => *dtype,
            Entry::Stored { dtype, .. } | Entry::Declared { dtype, .. } => *dtype,
        }
    }
}

/// Collects named tensors and writes them as one safetensors file.
#[derive(Debug, Default)]
pub struct Exporter {
    prefix: Vec<String>,
    tensors: BTreeMap<String, Entry>,
    /// Record names, shapes and dtypes only (no values are copied).
    declare_only: bool,
}

impl Exporter {
    pub fn new() -> Self {
        Self::default()
    }

    /// An exporter that records each exported tensor's name, shape and dtype without copying its
    /// values: for a module whose every tensor is then [`Exporter::pass_through`]-ed from the
    /// checkpoint it was loaded from (a frozen tower), so that saving never holds a copy of it.
    /// [`Exporter::save`] refuses a declared tensor that was not passed through.
    pub fn declaring() -> Self {
        Self { declare_only: true, ..Self::default() }
    }

    /// Runs `f` with `name` pushed onto the name prefix.
    pub fn scope<R>(&mut self, name: impl AsRef<str>, f: impl FnOnce(&mut Self) -> R) -> R {
        self.prefix.push(name.as_ref().to_string());
        let r = f(self);
        self.prefix.pop();
        r
    }

    fn path(&self, name: &str) -> String {
        let mut parts: Vec<&str> = self.prefix.iter().map(String::as_str).filter(|p| !p.is_empty()).collect();
        if !name.is_empty() {
            parts.push(name);
        }
        parts.join(".")
    }

    pub fn raw(&mut self, name: &str, shape: Vec<usize>, values: Vec<f32>) {
        self.data(name, TensorData::new(values, shape));
    }

    /// A tensor's values in their own dtype.
    pub fn data(&mut self, name: &str, data: TensorData) {
        self.tensors.insert(self.path(name), Entry::Values(data));
    }

    /// A module's tensor, in its own dtype. Its values are read when the file is written (the
    /// exporter holds a handle on the tensor, not a copy).
    pub fn tensor<B: Backend, const D: usize>(&mut self, name: &str, t: &Tensor<B, D>) {
        let (shape, dtype) = (t.dims().to_vec(), t.dtype());
        let entry = if self.declare_only {
            Entry::Declared { shape, dtype }
        } else {
            let t = t.clone();
            Entry::Tensor { shape, dtype, data: Deferred(Box::new(move || t.to_data())) }
        };
        self.tensors.insert(self.path(name), entry);
    }

    pub fn param<B: Backend, const D: usize>(&mut self, name: &str, p: &Param<Tensor<B, D>>) {
        self.tensor(name, &p.val());
    }

    /// Writes a Burn `[in, out]` linear as PyTorch's `[out, in]`, in its own dtype.
    pub fn linear<B: Backend>(&mut self, name: &str, l: &Linear<B>) {
        // `[in, out]`.transpose() is the `[out, in]` view; its data comes out in that order (for
        // a loaded weight, which is that transpose already, without reordering).
        let transposed = l.weight.val().transpose();
        self.scope(name, |e| {
            e.tensor("weight", &transposed);
            if let Some(b) = &l.bias {
                e.param("bias", b);
            }
        });
    }

    /// Writes a linear layer that may be quantized: a float one as [`Exporter::linear`], a
    /// quantized one as [`crate::quantized_weight_name`]'s tensors (codes and scales).
    pub fn any_linear<B: Backend>(&mut self, name: &str, layer: &AnyLinear<B>) {
        match layer {
            AnyLinear::Float(linear) => self.linear(name, linear),
            AnyLinear::Quantized(q) => self.scope(name, |e| {
                let m = q.to_matrix();
                let [rows, cols] = [m.rows, m.cols];
                let code_bytes = cols * m.format.bits() / 8;
                e.data(&crate::quantized_weight_name(m.format), TensorData::new(m.values, [rows, code_bytes]));
                e.data("weight_scale", TensorData::new(m.scales, [rows, cols / llava_kernels::quant::BLOCK]));
                if let Some(bias) = &q.bias {
                    e.param("bias", bias);
                }
            }),
        }
    }

    /// Replaces every tensor exported under `prefix` by the tensor of `store` at the same name
    /// under `store_prefix`, as stored there (its dtype and exact values), read only when the
    /// file is written. For frozen towers: the saved model then holds the input checkpoint's
    /// values whatever dtype the run held them in. Errors when a name is missing from the store
    /// or its shape differs (the store is not the tower's source).
    pub fn pass_through(&mut self, prefix: &str, store: &Arc<WeightStore>, store_prefix: &str) -> Result<usize> {
        let under = |name: &str| match (prefix.is_empty(), name.strip_prefix(prefix)) {
            (true, _) => Some(name.to_string()),
            (false, Some(rest)) => rest.strip_prefix('.').map(str::to_string),
            _ => None,
        };
        let mut replaced = 0;
        for (name, entry) in self.tensors.iter_mut() {
            let Some(rest) = under(name) else { continue };
            let source = if store_prefix.is_empty() { rest } else { format!("{store_prefix}.{rest}") };
            let info = store.info(&source).ok_or_else(|| WeightsError::Missing {
                name: source.clone(),
                hint: format!(" (source of `{name}`)"),
            })?;
            let shape = entry.shape();
            if info.shape != shape {
                return Err(WeightsError::Shape {
                    name: source,
                    expected: shape,
                    found: info.shape.clone(),
                    path: store.files().first().cloned().unwrap_or_default(),
                });
            }
            let dtype = info.dtype.burn().unwrap_or(DType::F32);
            *entry = Entry::Stored { store: Arc::clone(store), name: source, shape, dtype, extra_rows: None };
            replaced += 1;
        }
        Ok(replaced)
    }

    pub fn layer_norm<B: Backend>(&mut self, name: &str, n: &LayerNorm<B>) {
        self.scope(name, |e| {
            e.param("weight", &n.gamma);
            if let Some(b) = &n.beta {
                e.param("bias", b);
            }
        });
    }

    pub fn rms_norm<B: Backend>(&mut self, name: &str, n: &RmsNorm<B>) {
        self.scope(name, |e| e.param("weight", &n.gamma));
    }

    pub fn embedding<B: Backend>(&mut self, name: &str, emb: &Embedding<B>) {
        self.scope(name, |e| e.param("weight", &emb.weight));
    }

    pub fn conv2d<B: Backend>(&mut self, name: &str, c: &Conv2d<B>) {
        self.scope(name, |e| {
            e.param("weight", &c.weight);
            if let Some(b) = &c.bias {
                e.param("bias", b);
            }
        });
    }

    /// Grows the first dimension of tensor `name` to `rows`, filling new rows with the mean of
    /// the existing ones (how Hugging Face initialises embeddings of added tokens), in the
    /// tensor's own dtype. Returns false when there is no such 2-D tensor; a passed-through
    /// tensor that cannot be read is an error (never a silently unpadded matrix).
    pub fn pad_rows_with_mean(&mut self, name: &str, rows: usize) -> Result<bool> {
        let Some(entry) = self.tensors.get_mut(name) else { return Ok(false) };
        let shape = entry.shape();
        if shape.len() != 2 || shape[0] >= rows {
            return Ok(shape.len() == 2);
        }
        let dtype = entry.dtype();
        let (n, d) = (shape[0], shape[1]);
        let mean_of = |values: &[f32]| {
            let mut mean = vec![0f32; d];
            for row in values.chunks(d) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v / n as f32;
                }
            }
            mean
        };
        let padded = |data: TensorData| {
            let mut values = data.convert_dtype(DType::F32).into_vec::<f32>().expect("f32");
            let mean = mean_of(&values);
            for _ in n..rows {
                values.extend_from_slice(&mean);
            }
            Entry::Values(TensorData::new(values, [rows, d]).convert_dtype(dtype))
        };
        match entry {
            Entry::Values(data) => *entry = padded(data.clone()),
            Entry::Tensor { data, .. } => *entry = padded((data.0)()),
            // The stored rows stay in the checkpoint (read again while writing); only the new
            // rows are held.
            Entry::Stored { store, name, shape, extra_rows, .. } => {
                let mean = mean_of(&store.read_f32(name, shape)?);
                let extra: Vec<f32> = (n..rows).flat_map(|_| mean.iter().copied()).collect();
                *extra_rows = Some(TensorData::new(extra, [rows - n, d]).convert_dtype(dtype));
            }
            Entry::Declared { .. } => return Ok(false),
        }
        Ok(true)
    }

    /// Moves every tensor of `other` into this exporter (same names win from `other`).
    pub fn extend(&mut self, other: Exporter) {
        self.tensors.extend(other.tensors);
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Writes the collected tensors to `path` atomically (a temporary file renamed into place), so
    /// an interrupted write never leaves a broken file under the final name. Tensors passed
    /// through from a checkpoint are read one at a time while writing.
    pub fn save(&self, path: &Path, dtype: SaveDtype, metadata: &[(&str, &str)]) -> Result<()> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            let meta: serde_json::Map<String, serde_json::Value> =
                metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
            header.insert("__metadata__".into(), meta.into());
        }
        if let Some((name, _)) = self.tensors.iter().find(|(_, e)| matches!(e, Entry::Declared { .. })) {
            return Err(WeightsError::Missing {
                name: name.clone(),
                hint: " (declared for a pass-through, but no checkpoint provided it)".into(),
            });
        }
        let mut offset = 0usize;
        for (name, entry) in &self.tensors {
            let (shape, target) = (entry.shape(), dtype.target(entry.dtype()));
            let len = shape.iter().product::<usize>() * target.size();
            let dtype_name = match target {
                DType::F64 => "F64",
                DType::F16 => "F16",
                DType::BF16 => "BF16",
                DType::U8 => "U8",
                _ => "F32",
            };
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype_name, "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        let mut header_bytes = serde_json::to_vec(&header).expect("header serialises");
        // Align the data section to 8 bytes, as the reference writer does.
        while !header_bytes.len().is_multiple_of(8) {
            header_bytes.push(b' ');
        }
        let mut failed = None;
        llava_io::write_atomically(path, |f| {
            f.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
            f.write_all(&header_bytes)?;
            for entry in self.tensors.values() {
                let target = dtype.target(entry.dtype());
                let data = match entry {
                    Entry::Values(data) if data.dtype == target => std::borrow::Cow::Borrowed(data),
                    Entry::Values(data) => std::borrow::Cow::Owned(data.clone().convert_dtype(target)),
                    Entry::Tensor { data, .. } => std::borrow::Cow::Owned((data.0)().convert_dtype(target)),
                    Entry::Stored { store, name, shape, extra_rows, .. } => {
                        match store.read(name, shape, Some(target)) {
                            Ok(data) => {
                                if let Some(extra) = extra_rows {
                                    f.write_all(data.as_bytes())?;
                                    std::borrow::Cow::Owned(extra.clone().convert_dtype(target))
                                } else {
                                    std::borrow::Cow::Owned(data)
                                }
                            }
                            Err(e) => {
                                failed = Some(e);
                                return Err(std::io::Error::other("a passed-through tensor could not be read"));
                            }
                        }
                    }
                    Entry::Declared { .. } => unreachable!("checked before writing"),
                };
                // Little-endian, as safetensors stores them (every supported target is).
                f.write_all(data.as_bytes())?;
            }
            Ok(())
        })
        .map_err(|source| failed.take().unwrap_or(WeightsError::Io { path: path.to_path_buf(), source }))
    }

    /// Writes the tensors as `torch.save` does (a zip of `archive/data.pkl`, one stored entry per
    /// tensor and `archive/version`), a state dict that `torch.load` reads, for tools that only
    /// read `.bin` files (the LLaVA reference's `non_lora_trainables.bin`). Tensors in memory
    /// only (not passed-through ones); f32, f16 or bf16. The pickle is the one `torch.save`
    /// writes for a plain state dict: an `OrderedDict` of `torch._utils._rebuild_tensor_v2` calls
    /// on persistent storages.
    pub fn save_torch(&self, path: &Path, dtype: SaveDtype) -> Result<()> {
        let mut pickle = vec![0x80, 2]; // PROTO 2
        let global = |p: &mut Vec<u8>, module: &str, name: &str| {
            p.push(b'c');
            p.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        };
        let unicode = |p: &mut Vec<u8>, text: &str| {
            p.push(b'X');
            p.extend_from_slice(&(text.len() as u32).to_le_bytes());
            p.extend_from_slice(text.as_bytes());
        };
        let int = |p: &mut Vec<u8>, v: usize| {
            p.push(b'J');
            p.extend_from_slice(&(v as i32).to_le_bytes());
        };
        global(&mut pickle, "collections", "OrderedDict");
        pickle.extend_from_slice(b")R("); // OrderedDict(), MARK
        let mut storages = Vec::new();
        for (key, (name, entry)) in self.tensors.iter().enumerate() {
            let target = dtype.target(entry.dtype());
            let data = match entry {
                Entry::Values(data) => data.clone().convert_dtype(target),
                Entry::Tensor { data, .. } => (data.0)().convert_dtype(target),
                Entry::Stored { .. } | Entry::Declared { .. } => {
                    return Err(WeightsError::Missing {
                        name: name.clone(),
                        hint: " (a passed-through tensor cannot be written as a .bin)".into(),
                    });
                }
            };
            let storage = match target {
                DType::F16 => "HalfStorage",
                DType::BF16 => "BFloat16Storage",
                _ => "FloatStorage",
            };
            let shape = entry.shape();
            let numel: usize = shape.iter().product();
            unicode(&mut pickle, name);
            global(&mut pickle, "torch._utils", "_rebuild_tensor_v2");
            pickle.extend_from_slice(b"((");
            unicode(&mut pickle, "storage");
            global(&mut pickle, "torch", storage);
            unicode(&mut pickle, &key.to_string());
            unicode(&mut pickle, "cpu");
            int(&mut pickle, numel);
            pickle.extend_from_slice(b"tQ"); // TUPLE, BINPERSID
            int(&mut pickle, 0); // storage offset
            pickle.push(b'(');
            for &d in &shape {
                int(&mut pickle, d);
            }
            pickle.extend_from_slice(b"t(");
            let mut stride = 1;
            let mut strides = vec![0; shape.len()];
            for (i, &d) in shape.iter().enumerate().rev() {
                strides[i] = stride;
                stride *= d;
            }
            for s in strides {
                int(&mut pickle, s);
            }
            pickle.push(b't');
            pickle.push(0x89); // NEWFALSE: requires_grad
            global(&mut pickle, "collections", "OrderedDict");
            pickle.extend_from_slice(b")Rt"); // backward hooks; the args TUPLE
            pickle.push(b'R'); // REDUCE
            storages.push(data);
        }
        pickle.extend_from_slice(b"u."); // SETITEMS, STOP
        let io = |source: std::io::Error| WeightsError::Io { path: path.to_path_buf(), source };
        llava_io::write_atomically(path, |f| {
            let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            let entry = |zip: &mut zip::ZipWriter<std::io::Cursor<Vec<u8>>>, name: &str, bytes: &[u8]| {
                zip.start_file(format!("archive/{name}"), stored).map_err(std::io::Error::other)?;
                std::io::Write::write_all(zip, bytes)
            };
            entry(&mut zip, "data.pkl", &pickle)?;
            entry(&mut zip, "byteorder", b"little")?;
            for (key, data) in storages.iter().enumerate() {
                entry(&mut zip, &format!("data/{key}"), data.as_bytes())?;
            }
            entry(&mut zip, "version", b"3\n")?;
            let bytes = zip.finish().map_err(std::io::Error::other)?.into_inner();
            f.write_all(&bytes)
        })
        .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WeightStore;

    /// A `torch.save`-format file written here reads back (through the `.bin` reader, which
    /// interprets the pickle as `torch.load` does) to the same names, shapes and values.
    #[test]
    fn torch_format_files_read_back_exactly() {
        let mut e = Exporter::new();
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
        e.data("base_model.model.model.mm_projector.0.weight", TensorData::new(a.clone(), [3, 4]));
        e.data("base_model.model.model.mm_projector.0.bias", TensorData::new(vec![0.5f32, -2.0, 3.0], [3]));
        let dir = tempfile::tempdir().unwrap();
        for (dtype, tol) in [(SaveDtype::F32, 0.0), (SaveDtype::F16, 1e-3), (SaveDtype::BF16, 1e-2)] {
            let path = dir.path().join("non_lora_trainables.bin");
            e.save_torch(&path, dtype).unwrap();
            let store = WeightStore::open_files(&[path]).unwrap();
            assert_eq!(store.names().count(), 2);
            let back = store.read_f32("base_model.model.model.mm_projector.0.weight", &[3, 4]).unwrap();
            assert!(back.iter().zip(&a).all(|(x, y)| (x - y).abs() <= tol), "{back:?}");
            let bias = store.read_f32("base_model.model.model.mm_projector.0.bias", &[3]).unwrap();
            assert_eq!(bias, [0.5, -2.0, 3.0]);
        }
    }
}
