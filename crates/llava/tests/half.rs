//! Half-precision checkpoints (issue 13): an f16 or bf16 llava-hf folder stays in its dtype in
//! memory, and its results equal the f32 path of the same weights within the tolerances that
//! Hugging Face's own f16/bf16 run gives against that f32 path (scripts/fixtures/gen_half_parity.py).

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor, TensorData};
use llava::PaddingSide;
use llava::generate::{GenerationConfig, generate};
use llava::load::{LoadOptions, load_dir};
use llava_checkpoint::WeightStore;

type B = llava::backend::Cpu;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/half").join(name)
}

/// Every float parameter's dtype, counted.
fn dtypes<M: Module<B>>(module: &M) -> Vec<(DType, usize)> {
    struct Count(Vec<(DType, usize)>);
    impl ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let dtype = param.val().dtype();
            match self.0.iter_mut().find(|(d, _)| *d == dtype) {
                Some((_, n)) => *n += 1,
                None => self.0.push((dtype, 1)),
            }
        }
    }
    let mut count = Count(Vec::new());
    module.visit(&mut count);
    count.0
}

struct Expected(WeightStore);

impl Expected {
    fn values(&self, name: &str) -> Vec<f32> {
        let shape = self.0.info(name).unwrap().shape.clone();
        self.0.read_f32(name, &shape).unwrap()
    }
    fn scalar(&self, name: &str) -> f32 {
        self.values(name)[0]
    }
    fn ints(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let bytes = std::fs::read(&self.0.files()[0]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        let values = view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        (view.shape().to_vec(), values)
    }
}

fn max_abs_diff<const D: usize>(a: Tensor<B, D>, expected: &[f32]) -> f32 {
    let a = a.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    assert_eq!(a.len(), expected.len());
    a.iter().zip(expected).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check(name: &str, dtype: DType) {
    let dir = fixture(name);
    let device = Default::default();
    let loaded = load_dir::<B>(&dir, &LoadOptions::default(), &device).unwrap();
    let model = &loaded.model;
    assert_eq!(dtypes(model), vec![(dtype, dtypes(model)[0].1)], "every weight stays {dtype:?}");

    let exp = Expected(WeightStore::open(&dir.join("expected.safetensors")).unwrap());
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let rows: Vec<Vec<i64>> = serde_json::from_value(inputs["input_ids"].clone()).unwrap();
    let pixel_shape: [usize; 4] = exp.0.info("pixel_values").unwrap().shape.clone().try_into().unwrap();
    let pixels = Tensor::<B, 4>::from_data(TensorData::new(exp.values("pixel_values"), pixel_shape), &device);

    let features = model.encode_images(pixels.clone());
    for (what, ours) in [("vision_features", features.vision.clone()), ("image_features", features.projected.clone())] {
        let (d, tol) = (max_abs_diff(ours, &exp.values(what)), exp.scalar(&format!("tol_{what}")));
        assert!(d <= tol, "{name} {what}: {d} from the f32 path; Hugging Face's own {dtype:?} run is {tol} from it");
    }
    let batch = model.splice(&rows, None, Some(features.projected), None, PaddingSide::Right);
    let logits = model.forward(&batch).into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let (theirs, tol) = (exp.values("logits"), exp.scalar("tol_logits"));
    let (len, vocab) = (batch.valid[0].len(), theirs.len() / (rows.len() * batch.valid[0].len()));
    let mut worst = 0f32;
    for (row, &n) in batch.lengths.iter().enumerate() {
        for at in (row * len * vocab..(row * len + n) * vocab).step_by(1) {
            worst = worst.max((logits[at] - theirs[at]).abs());
        }
    }
    assert!(worst <= tol, "{name} logits: {worst} from the f32 path; Hugging Face's own {dtype:?} run is {tol}");

    // Greedy tokens of the f32 path, all rows at once (left padding, KV cache).
    let (shape, greedy) = exp.ints("greedy");
    let expected: Vec<Vec<u32>> = greedy.chunks(shape[1]).map(|c| c.iter().map(|&t| t as u32).collect()).collect();
    let config = GenerationConfig { max_new_tokens: shape[1], eos_ids: vec![], ..Default::default() };
    assert_eq!(generate(model, &rows, Some(pixels), &config, |_, _| true), expected, "{name} greedy tokens");
}

#[test]
fn f16_checkpoint_stays_f16_and_matches_the_f32_path_within_hf_f16_tolerance() {
    check("f16", DType::F16);
}

#[test]
fn bf16_checkpoint_stays_bf16_and_matches_the_f32_path_within_hf_bf16_tolerance() {
    check("bf16", DType::BF16);
}

/// `--dtype`: a requested dtype overrides the stored one, tensor by tensor.
#[test]
fn a_requested_dtype_overrides_the_stored_one() {
    let device = Default::default();
    for (requested, name) in [(DType::F32, "bf16"), (DType::BF16, "f16"), (DType::F16, "bf16")] {
        let options = LoadOptions { dtype: Some(requested), ..Default::default() };
        let loaded = load_dir::<B>(&fixture(name), &options, &device).unwrap();
        let found = dtypes(&loaded.model);
        assert_eq!(found.len(), 1, "{name} as {requested:?}: {found:?}");
        assert_eq!(found[0].0, requested);
    }
}

/// Float elements of a checkpoint's weights (buffers, `position_ids` and older transformers'
/// `rotary_emb.inv_freq`, are not weights: no model holds them).
fn float_elements(dir: &Path, prefix: &str) -> u64 {
    let store = WeightStore::open(dir).unwrap();
    let names: Vec<String> = store.names().map(str::to_string).collect();
    names
        .iter()
        .filter(|n| n.starts_with(prefix) && !n.ends_with("position_ids") && !n.ends_with("rotary_emb.inv_freq"))
        .map(|n| store.info(n).unwrap())
        .filter(|i| i.dtype.burn().is_some())
        .map(|i| i.shape.iter().product::<usize>() as u64)
        .sum()
}

#[test]
fn the_memory_plan_counts_every_weight_transformers_wrote_in_its_stored_dtype() {
    let parity = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity");
    let cases = [
        (fixture("f16"), vec![(fixture("f16"), "")], Some(DType::F16)),
        (fixture("bf16"), vec![(fixture("bf16"), "")], Some(DType::BF16)),
        (parity.join("hf-mlp"), vec![(parity.join("hf-mlp"), "")], Some(DType::F32)),
        // The CLIP directory is a whole CLIPModel; the tower is its `vision_model`.
        (
            parity.join("orig-linear"),
            vec![(parity.join("orig-linear"), ""), (parity.join("orig-linear/clip"), "vision_model.")],
            Some(DType::F32),
        ),
    ];
    for (dir, checkpoints, dtype) in cases {
        // gen_model_parity.py writes the original layout's LLM and projector as a bf16 `.bin`
        // (the reference's own format) beside an f32 CLIP tower.
        let original = dir.ends_with("orig-linear");
        let expected = if original { (dtype, Some(DType::BF16), Some(DType::BF16)) } else { (dtype, dtype, dtype) };
        let source = llava::load::resolve_dir(&dir, &LoadOptions::default()).unwrap();
        let (vision, projector, llm) = llava::plan::parameter_counts(&source.config);
        let stored: u64 = checkpoints.iter().map(|(dir, prefix)| float_elements(dir, prefix)).sum();
        assert_eq!(vision + projector + llm, stored, "{}", dir.display());
        let dtypes = source.stored_dtypes();
        assert_eq!((dtypes.vision, dtypes.projector, dtypes.llm), expected, "{}", dir.display());
    }
}
