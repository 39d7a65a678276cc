//! Writing modules back under Hugging Face names, as safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{Embedding, LayerNorm, Linear, RmsNorm};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::{Result, WeightsError};

/// Element type of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    #[default]
    F32,
    BF16,
    F16,
}

/// Collects named f32 tensors and writes them as one safetensors file.
#[derive(Debug, Default)]
pub struct Exporter {
    prefix: Vec<String>,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Exporter {
    pub fn new() -> Self {
        Self::default()
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
        self.tensors.insert(self.path(name), (shape, values));
    }

    pub fn tensor<B: Backend, const D: usize>(&mut self, name: &str, t: &Tensor<B, D>) {
        let shape = t.dims().to_vec();
        let values = t.to_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
        self.raw(name, shape, values);
    }

    pub fn param<B: Backend, const D: usize>(&mut self, name: &str, p: &Param<Tensor<B, D>>) {
        self.tensor(name, &p.val());
    }

    /// Writes a Burn `[in, out]` linear as PyTorch's `[out, in]`.
    pub fn linear<B: Backend>(&mut self, name: &str, l: &Linear<B>) {
        let w = l.weight.val();
        let [d_in, d_out] = w.dims();
        let values = w.to_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
        let mut t = vec![0f32; values.len()];
        for i in 0..d_in {
            for o in 0..d_out {
                t[o * d_in + i] = values[i * d_out + o];
            }
        }
        self.scope(name, |e| {
            e.raw("weight", vec![d_out, d_in], t);
            if let Some(b) = &l.bias {
                e.param("bias", b);
            }
        });
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
    /// the existing ones (how Hugging Face initialises embeddings of added tokens). Returns
    /// false when there is no such 2-D tensor.
    pub fn pad_rows_with_mean(&mut self, name: &str, rows: usize) -> bool {
        let Some((shape, values)) = self.tensors.get_mut(name) else { return false };
        if shape.len() != 2 || shape[0] >= rows {
            return shape.len() == 2;
        }
        let (n, d) = (shape[0], shape[1]);
        let mut mean = vec![0f32; d];
        for row in values.chunks(d) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v / n as f32;
            }
        }
        for _ in n..rows {
            values.extend_from_slice(&mean);
        }
        shape[0] = rows;
        true
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
    /// an interrupted write never leaves a broken file under the final name.
    pub fn save(&self, path: &Path, dtype: SaveDtype, metadata: &[(&str, &str)]) -> Result<()> {
        let (dtype_name, size) = match dtype {
            SaveDtype::F32 => ("F32", 4),
            SaveDtype::BF16 => ("BF16", 2),
            SaveDtype::F16 => ("F16", 2),
        };
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            let meta: serde_json::Map<String, serde_json::Value> =
                metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
            header.insert("__metadata__".into(), meta.into());
        }
        let mut offset = 0usize;
        for (name, (shape, values)) in &self.tensors {
            let len = values.len() * size;
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
        crate::write_atomically(path, |f| {
            f.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
            f.write_all(&header_bytes)?;
            for (_, values) in self.tensors.values() {
                for v in values {
                    match dtype {
                        SaveDtype::F32 => f.write_all(&v.to_le_bytes())?,
                        SaveDtype::BF16 => f.write_all(&half::bf16::from_f32(*v).to_le_bytes())?,
                        SaveDtype::F16 => f.write_all(&half::f16::from_f32(*v).to_le_bytes())?,
                    }
                }
            }
            Ok(())
        })
        .map_err(|source| WeightsError::Io { path: path.to_path_buf(), source })
    }
}
