//! Parity with the reference implementation (Hugging Face transformers 4.57, see
//! scripts/fixtures/gen_model_parity.py), on the CPU backend and on wgpu.
//!
//! For two tiny checkpoints (llava-hf layout with an MLP projector and sharded safetensors; the
//! original LLaVA layout with a linear projector, bf16 sharded PyTorch `.bin` files and a full
//! CLIPModel tower) this checks vision features, projector output and logits of a padded batch
//! (one image mid-text, text only, two images) against the reference, and greedy tokens with and
//! without the KV cache, one at a time and batched with left padding.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use llava::generate::{DecodeBatch, GenerationConfig, SequenceRequest, generate};
use llava::load::{LoadOptions, load_dir};
use llava::{Llava, PaddingSide};
use llava_checkpoint::{Exporter, SaveDtype, WeightStore};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity").join(name)
}

struct Expected {
    store: WeightStore,
    rows: Vec<Vec<i64>>,
}

impl Expected {
    fn open(dir: &Path) -> Self {
        let store = WeightStore::open(&dir.join("expected.safetensors")).unwrap();
        let inputs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
        let rows = serde_json::from_value(inputs["input_ids"].clone()).unwrap();
        Self { store, rows }
    }

    fn shape(&self, name: &str) -> Vec<usize> {
        self.store.info(name).unwrap().shape.clone()
    }

    fn values(&self, name: &str) -> Vec<f32> {
        self.store.read_f32(name, &self.shape(name)).unwrap()
    }

    fn tensor<B: Backend, const D: usize>(&self, name: &str, device: &B::Device) -> Tensor<B, D> {
        let shape: [usize; D] = self.shape(name).try_into().unwrap();
        Tensor::from_data(TensorData::new(self.values(name), shape), device)
    }

    /// Integer tensors are stored as I64 and read through the raw safetensors file.
    fn ints(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let path = self.store.files()[0].clone();
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        let values = view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        (view.shape().to_vec(), values)
    }
}

fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, expected: &[f32]) -> f32 {
    let a = a.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    assert_eq!(a.len(), expected.len(), "element count");
    a.iter().zip(expected).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check_model<B: Backend>(device: &B::Device, dir: &Path, tol: f32) {
    check_model_with::<B>(device, dir, tol, &LoadOptions::default())
}

fn check_model_with<B: Backend>(device: &B::Device, dir: &Path, tol: f32, options: &LoadOptions) {
    let loaded = load_dir::<B>(dir, options, device).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let model = &loaded.model;
    let exp = Expected::open(dir);

    // Vision features and projector output.
    let pixels = exp.tensor::<B, 4>("pixel_values", device);
    let features = model.encode_images(pixels.clone());
    let d = max_abs_diff(features.vision.clone(), &exp.values("vision_features"));
    assert!(d <= tol, "vision_features differ by {d} (tolerance {tol}) in {}", dir.display());
    let d = max_abs_diff(features.projected.clone(), &exp.values("image_features"));
    assert!(d <= tol, "image_features differ by {d} (tolerance {tol}) in {}", dir.display());

    // Logits of the right-padded batch, compared on real positions only.
    let batch = model.splice(&exp.rows, None, Some(features.projected), None, PaddingSide::Right);
    let (_, lengths) = exp.ints("lengths");
    assert_eq!(batch.lengths, lengths.iter().map(|&l| l as usize).collect::<Vec<_>>(), "spliced lengths");
    let logits = model.forward(&batch);
    let [b, len, vocab] = logits.dims();
    assert_eq!([b, len, vocab], <[usize; 3]>::try_from(exp.shape("logits")).unwrap());
    let ours = logits.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let theirs = exp.values("logits");
    let mut worst = 0f32;
    for row in 0..b {
        for pos in 0..batch.lengths[row] {
            let at = (row * len + pos) * vocab;
            for v in 0..vocab {
                worst = worst.max((ours[at + v] - theirs[at + v]).abs());
            }
        }
    }
    assert!(worst <= tol, "logits differ by {worst} (tolerance {tol}) in {}", dir.display());

    check_greedy(model, &exp, pixels, device);
}

fn check_greedy<B: Backend>(model: &Llava<B>, exp: &Expected, pixels: Tensor<B, 4>, device: &B::Device) {
    let (shape, greedy) = exp.ints("greedy");
    let steps = shape[1];
    let expected: Vec<Vec<u32>> = greedy.chunks(steps).map(|c| c.iter().map(|&t| t as u32).collect()).collect();
    let config = GenerationConfig { max_new_tokens: steps, eos_ids: vec![], ..Default::default() };
    // One row at a time; images are consumed in order.
    let mut image_at = 0;
    for (row, prompt) in exp.rows.iter().enumerate() {
        let n = prompt.iter().filter(|&&t| t == llava_data::IMAGE_TOKEN_INDEX).count();
        #[allow(clippy::single_range_in_vec_init)] // Burn's slice takes one range per axis.
        let px = (n > 0).then(|| pixels.clone().slice([image_at..image_at + n]));
        image_at += n;
        let out = generate(model, std::slice::from_ref(prompt), px, &config, |_, _| true);
        assert_eq!(out[0], expected[row], "greedy tokens of row {row}");
    }
    // All rows at once: left padding, one cache.
    let out = generate(model, &exp.rows, Some(pixels.clone()), &config, |_, _| true);
    assert_eq!(out, expected, "batched greedy tokens");

    // Rows joining a running batch two steps apart (continuous batching): each row's history is
    // aligned with the others' by front padding, and its tokens are those it gets alone.
    let mut batch = DecodeBatch::new(model);
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); exp.rows.len()];
    let mut row_of = std::collections::HashMap::new();
    let mut image_at = 0;
    let mut step = |batch: &mut DecodeBatch<'_, B>, row_of: &std::collections::HashMap<u64, usize>| {
        batch.step(|id, token| {
            got[row_of[&id]].push(token);
            true
        });
    };
    for (row, prompt) in exp.rows.iter().enumerate() {
        let n = prompt.iter().filter(|&&t| t == llava_data::IMAGE_TOKEN_INDEX).count();
        #[allow(clippy::single_range_in_vec_init)] // Burn's slice takes one range per axis.
        let px = (n > 0).then(|| pixels.clone().slice([image_at..image_at + n]));
        image_at += n;
        let request = SequenceRequest {
            prompt: prompt.clone(),
            max_new_tokens: steps,
            sampling: Default::default(),
            eos_ids: vec![],
        };
        row_of.insert(batch.join(vec![request], px)[0], row);
        step(&mut batch, &row_of);
        step(&mut batch, &row_of);
    }
    while !batch.is_empty() {
        step(&mut batch, &row_of);
    }
    assert_eq!(got, expected, "greedy tokens of rows that joined a running batch");
    let _ = device;
}

/// Rewrites the llava-hf fixture with transformers ≥ 4.52 key names (`model.language_model.*`,
/// `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.*`) into a temporary dir.
fn renamed_hf_fixture() -> tempfile::TempDir {
    let src = fixture("hf-mlp");
    let tmp = tempfile::tempdir().unwrap();
    let store = WeightStore::open(&src).unwrap();
    let mut e = Exporter::new();
    for name in store.names() {
        let shape = store.info(name).unwrap().shape.clone();
        let values = store.read_f32(name, &shape).unwrap();
        let renamed = if let Some(rest) = name.strip_prefix("language_model.model.") {
            format!("model.language_model.{rest}")
        } else if name == "language_model.lm_head.weight" {
            "lm_head.weight".to_string()
        } else {
            format!("model.{name}")
        };
        e.raw(&renamed, shape, values);
    }
    e.save(&tmp.path().join("model.safetensors"), SaveDtype::F32, &[]).unwrap();
    for f in ["config.json", "expected.safetensors", "inputs.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

mod cpu {
    use super::*;
    type B = llava::backend::Cpu;
    const TOL: f32 = 1e-4;

    #[test]
    fn llava_hf_mlp_projector_safetensors_shards() {
        check_model::<B>(&Default::default(), &fixture("hf-mlp"), TOL);
    }

    #[test]
    fn llava_hf_new_key_names() {
        let dir = renamed_hf_fixture();
        check_model::<B>(&Default::default(), dir.path(), TOL);
    }

    /// The expected values are Hugging Face's f32 run of the bf16 weights' values, so the
    /// weights are widened here: kept in bf16, this CPU's products would be bf16 ones (AVX-512
    /// BF16, as PyTorch's bf16 model), which tests/half.rs checks against HF's own bf16 run.
    #[test]
    fn original_layout_linear_projector_bf16_bin_shards() {
        let options = LoadOptions { dtype: Some(burn::tensor::DType::F32), ..Default::default() };
        check_model_with::<B>(&Default::default(), &fixture("orig-linear"), TOL, &options);
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    type B = llava::backend::Wgpu;
    const TOL: f32 = 1e-3;

    #[test]
    fn llava_hf_mlp_projector_safetensors_shards() {
        check_model::<B>(&Default::default(), &fixture("hf-mlp"), TOL);
    }

    #[test]
    fn original_layout_linear_projector_bf16_bin_shards() {
        check_model::<B>(&Default::default(), &fixture("orig-linear"), TOL);
    }
}

/// CUDA (run by scripts/gpu/check.sh when a GPU is lent; never in CI).
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    type B = llava::backend::Cuda;
    const TOL: f32 = 1e-3;

    #[test]
    fn llava_hf_mlp_projector_safetensors_shards() {
        check_model::<B>(&Default::default(), &fixture("hf-mlp"), TOL);
    }

    #[test]
    fn original_layout_linear_projector_bf16_bin_shards() {
        check_model::<B>(&Default::default(), &fixture("orig-linear"), TOL);
    }
}

/// The original layout names its tower as a hub id; it is found in a local Hugging Face cache
/// (never downloaded), and a missing one is a clear error.
#[test]
fn original_layout_finds_hub_tower_in_local_cache() {
    type B = llava::backend::Cpu;
    let src = fixture("orig-linear");
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), model_dir.join(entry.file_name())).unwrap();
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap()).unwrap();
    config["mm_vision_tower"] = "openai/clip-tiny-test".into();
    std::fs::write(model_dir.join("config.json"), config.to_string()).unwrap();

    let cache = tmp.path().join("hub");
    let options = LoadOptions { hf_cache: Some(cache.clone()), ..Default::default() };
    let err = load_dir::<B>(&model_dir, &options, &Default::default()).err().expect("no tower yet");
    assert!(err.to_string().contains("openai/clip-tiny-test") && err.to_string().contains("--vision-tower"), "{err}");

    let repo = cache.join("models--openai--clip-tiny-test");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join("clip").join(f), snapshot.join(f)).unwrap();
    }
    let loaded = load_dir::<B>(&model_dir, &options, &Default::default()).unwrap();
    let exp = Expected::open(&src);
    let features = loaded.model.encode_images(exp.tensor::<B, 4>("pixel_values", &Default::default()));
    assert!(max_abs_diff(features.vision, &exp.values("vision_features")) <= 1e-4);
}
