//! Quantized LLMs (issue 16): `--quantize q8|q4|nf4` on the parity fixture. The quantized model
//! is exactly the float model whose linear layers carry the dequantized weights (up to float
//! summation order), and its logits stay near the float model's (measured and printed). Saving
//! and reloading is tested through `cargo xtask quantize` (xtask/tests/cli.rs).

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use llava::load::{LoadOptions, LoadedLlava, load_dir};
use llava::{PaddingSide, QuantFormat};
use llava_checkpoint::WeightStore;
use llava_kernels::AnyLinear;

type B = llava::backend::Cpu;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/hf-mlp")
}

fn load(dir: &Path, quantize: Option<QuantFormat>) -> LoadedLlava<B> {
    load_on::<B>(dir, quantize)
}

fn load_on<Bk: burn::tensor::backend::Backend>(dir: &Path, quantize: Option<QuantFormat>) -> LoadedLlava<Bk> {
    load_dir::<Bk>(dir, &LoadOptions { quantize, ..Default::default() }, &Default::default()).unwrap()
}

/// Logits `[rows × positions, vocab]` of the fixture's prompts with its pictures, valid positions only.
fn logits<Bk: burn::tensor::backend::Backend>(loaded: &LoadedLlava<Bk>) -> Vec<Vec<f32>> {
    let dir = fixture();
    let expected = WeightStore::open(&dir.join("expected.safetensors")).unwrap();
    let shape = expected.info("pixel_values").unwrap().shape.clone();
    let pixels = Tensor::<Bk, 4>::from_data(
        TensorData::new(expected.read_f32("pixel_values", &shape).unwrap(), shape),
        &Default::default(),
    );
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
    let rows: Vec<Vec<i64>> = serde_json::from_value(inputs["input_ids"].clone()).unwrap();
    let model = &loaded.model;
    let features = model.encode_images(pixels);
    let batch = model.splice(&rows, None, Some(features.projected), None, PaddingSide::Right);
    let values = model.forward(&batch).into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let (len, vocab) = (batch.valid[0].len(), loaded.config.text.vocab_size);
    let mut out = Vec::new();
    for (row, &n) in batch.lengths.iter().enumerate() {
        for p in 0..n {
            let at = (row * len + p) * vocab;
            out.push(values[at..at + vocab].to_vec());
        }
    }
    out
}

/// The same model with every quantized linear layer replaced by a float one holding its
/// dequantized weight.
fn dequantized(loaded: &mut LoadedLlava<B>) {
    let float = |layer: &mut AnyLinear<B>| *layer = layer.clone().dequantized();
    let llm = &mut loaded.model.llm;
    for (_, layer) in llm.projections_mut() {
        float(&mut layer.base);
    }
    if let Some(head) = &mut llm.lm_head {
        float(head);
    }
    for layer in &mut loaded.model.vision.layers {
        let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
        for linear in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj, &mut m.fc1, &mut m.fc2] {
            float(linear);
        }
    }
}

fn argmax(v: &[f32]) -> usize {
    llava_kernels::argmax(v) as usize
}

#[test]
fn a_quantized_model_is_the_float_model_of_its_dequantized_weights_and_stays_near_the_original() {
    let dir = fixture();
    let float = logits(&load(&dir, None));
    let spread = {
        let all: Vec<f32> = float.iter().flatten().copied().collect();
        let mean = all.iter().sum::<f32>() / all.len() as f32;
        (all.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / all.len() as f32).sqrt()
    };
    let mut errors = Vec::new();
    for format in QuantFormat::ALL {
        let mut loaded = load(&dir, Some(format));
        assert_eq!(loaded.model.llm.quantization(), Some(format));
        let quantized = logits(&loaded);
        dequantized(&mut loaded);
        let reference = logits(&loaded);
        // The kernels compute the float product of the dequantized weights: only the order of
        // the sums differs.
        for (q, r) in quantized.iter().flatten().zip(reference.iter().flatten()) {
            assert!((q - r).abs() <= 1e-4 * (1.0 + r.abs()), "{format}: {q} vs the dequantized float model's {r}");
        }
        let pairs = || quantized.iter().flatten().zip(float.iter().flatten());
        let worst = pairs().map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let mean = pairs().map(|(a, b)| (a - b).abs()).sum::<f32>() / float.len() as f32 / float[0].len() as f32;
        let agree = quantized.iter().zip(&float).filter(|(a, b)| argmax(a) == argmax(b)).count();
        eprintln!(
            "{format}: |Δlogit| max {worst:.4}, mean {mean:.4} (logits' spread {spread:.4}), top-1 agreement {agree}/{}",
            float.len()
        );
        // Quantization changes the logits (the comparison below would hold vacuously otherwise).
        assert!(worst > 0.0, "{format}: identical logits");
        errors.push((format, mean, agree));
    }
    // A q8 step is 127/8 ≈ 16 times finer than a q4 step: the 8-bit model's logits must be much
    // closer (a factor 4 of slack) and agree on the top token at least as often.
    let (q8, four_bit) = (errors[0], &errors[1..]);
    for &(format, mean, agree) in four_bit {
        assert!(q8.1 * 4.0 < mean, "q8 mean |Δlogit| {} vs {format} {mean}", q8.1);
        assert!(q8.2 >= agree, "q8 top-1 agreement {} vs {format} {agree}", q8.2);
    }
}

/// The generic path (Burn's integer and float operations: what CUDA and wgpu run) gives the CPU
/// kernels' logits, on wgpu through Mesa's lavapipe.
#[cfg(feature = "wgpu")]
#[test]
fn quantized_layers_run_on_wgpu_with_the_cpu_kernels_results() {
    type W = llava::backend::Wgpu;
    let dir = fixture();
    for format in QuantFormat::ALL {
        let cpu = logits(&load(&dir, Some(format)));
        let gpu = logits(&load_on::<W>(&dir, Some(format)));
        for (a, b) in gpu.iter().flatten().zip(cpu.iter().flatten()) {
            assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{format}: wgpu {a} vs cpu {b}");
        }
    }
}

/// The memory plan's LLM entries under `--quantize` are the bytes the loaded quantized LLM holds
/// (codes, scales, the float embeddings and norms), for every format.
#[test]
fn the_memory_plan_counts_the_quantized_llm_as_loaded() {
    use burn::tensor::DType;
    use llava::plan::{HeldDtypes, weight_entries};
    let dir = fixture();
    for format in QuantFormat::ALL {
        let loaded = load(&dir, Some(format));
        let llm = &loaded.model.llm;
        let float_bytes = |t: Tensor<B, 2>| (t.shape().num_elements() * t.dtype().size()) as u64;
        let mut held = float_bytes(llm.embed_tokens.weight.val()) + float_bytes(llm.norm.gamma.val().unsqueeze());
        for l in &llm.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            for layer in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
                held += layer.base.weight_bytes() as u64;
            }
            held += float_bytes(l.input_layernorm.gamma.val().unsqueeze())
                + float_bytes(l.post_attention_layernorm.gamma.val().unsqueeze());
        }
        held += llm.lm_head.as_ref().map_or(0, |h| h.weight_bytes() as u64);
        let dtypes = HeldDtypes { vision: DType::F32, projector: DType::F32, llm: DType::F32 };
        let planned: u64 =
            weight_entries(&loaded.config, dtypes, false, Some(format), None).iter().map(|e| e.bytes).sum();
        assert_eq!(planned, held, "{format}");
    }
}

/// The plan's vision-tower entries under `--quantize-vision` are the bytes a quantized tower
/// holds (codes, scales, biases, and the float embeddings and norms), for every format.
#[test]
fn the_memory_plan_counts_a_quantized_vision_tower_as_held() {
    use burn::tensor::DType;
    use llava::plan::{HeldDtypes, weight_entries};
    let mut config = load(&fixture(), None).config;
    // The fixture's tower (48 wide) has no block-sized width; a ViT's do (1024, 4096).
    config.vision.hidden_size = 64;
    config.vision.intermediate_size = 96;
    for format in QuantFormat::ALL {
        let mut tower = config.vision.init::<B>(&Default::default());
        let mut linear_bytes = 0;
        for layer in &mut tower.layers {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            for linear in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj, &mut m.fc1, &mut m.fc2] {
                *linear = linear.clone().quantized(format).unwrap();
                linear_bytes += linear.weight_bytes() as u64;
            }
        }
        assert_eq!(tower.quantization(), Some(format));
        let f32s = HeldDtypes { vision: DType::F32, projector: DType::F32, llm: DType::F32 };
        let planned: u64 = weight_entries(&config, f32s, true, None, Some(format))
            .iter()
            .filter(|e| e.what.starts_with("vision tower"))
            .map(|e| e.bytes)
            .sum();
        // The rest is f32 here: the tower's parameters less its linear layers' (weights and biases,
        // which `weight_bytes` counts).
        let (d, inter) = (64, 96);
        let linear_params = (4 * (d * d + d) + (d * inter + inter) + (inter * d + d)) * config.vision.num_hidden_layers;
        let float_params = config.vision.num_parameters() - linear_params as u64;
        assert_eq!(planned, linear_bytes + 4 * float_params, "{format}");
    }
}
