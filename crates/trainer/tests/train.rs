//! Training semantics: the reference's LR schedule and loss, what each stage freezes, gradient
//! accumulation, and that a tiny model can overfit a sample.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use llava::{LlavaConfig, SelectFeature};
use llava_data::image::AspectMode;
use llava_llm::LlamaConfig;
use llava_projector::ProjectorKind;
use llava_trainer::{Batch, OptimConfig, Stage, Trainer, loss::causal_lm_loss, param_values, schedule};
use llava_vision_encoder::ClipVisionConfig;

type B = Autodiff<llava::backend::Cpu>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/trainer")
}

#[test]
fn schedule_matches_hf_cosine_with_warmup() {
    let runs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("schedule.json")).unwrap()).unwrap();
    for run in runs.as_array().unwrap() {
        let total = run["total"].as_u64().unwrap() as usize;
        let warmup = schedule::warmup_steps(total, 0.03);
        assert_eq!(warmup, run["warmup"].as_u64().unwrap() as usize);
        let base = run["base_lr"].as_f64().unwrap();
        for (step, lr) in run["lrs"].as_array().unwrap().iter().enumerate() {
            let ours = base * schedule::cosine_with_warmup(step, warmup, total);
            assert!((ours - lr.as_f64().unwrap()).abs() < 1e-12, "total {total} step {step}: {ours} vs {lr}");
        }
    }
}

fn st_labels(bytes: &[u8]) -> Vec<i64> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensor("labels").unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn loss_matches_torch_cross_entropy_with_ignore_index() {
    let store = llava_checkpoint::WeightStore::open(&fixtures().join("loss.safetensors")).unwrap();
    let logits = store.read_f32("logits", &[2, 7, 11]).unwrap();
    let expected = store.read_f32("loss", &[1]).unwrap()[0];
    let bytes = std::fs::read(fixtures().join("loss.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let labels: Vec<i64> = st
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let device = Default::default();
    let logits = Tensor::<llava::backend::Cpu, 3>::from_data(TensorData::new(logits, [2, 7, 11]), &device);
    let labels = Tensor::<llava::backend::Cpu, 2, Int>::from_data(TensorData::new(labels, [2, 7]), &device);
    let (loss, n) = causal_lm_loss(logits, labels);
    let shifted_valid =
        (0..2).flat_map(|r| (1..7).map(move |j| r * 7 + j)).filter(|&i| st_labels(&bytes)[i] != -100).count();
    assert_eq!(n, shifted_valid, "supervised tokens");
    let loss: f32 = loss.into_scalar();
    assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
}

fn tiny() -> LlavaConfig {
    LlavaConfig {
        vision: ClipVisionConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 28,
            patch_size: 14,
            ..Default::default()
        },
        text: LlamaConfig {
            vocab_size: 40,
            hidden_size: 24,
            intermediate_size: 40,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 128,
            rms_norm_eps: 1e-5,
            ..Default::default()
        },
        projector: ProjectorKind::MlpGelu { depth: 2 },
        select_layer: -2,
        select_feature: SelectFeature::Patch,
        image_aspect: AspectMode::Crop,
        max_length: 128,
    }
}

/// A model whose lazily initialised parameters are materialised now, so clones are identical
/// (the backend RNG is shared by tests running in parallel).
fn model(device: &<B as burn::tensor::backend::BackendTypes>::Device) -> llava::Llava<B> {
    let _rng = random_lock();
    let m = tiny().init::<B>(device);
    let _ = param_values(&m);
    m
}

/// The backend's generator is one per process: a test whose results depend on the sequence it
/// draws (LoRA dropout) holds this lock while it trains, and every draw of the other tests takes it.
static RANDOM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn random_lock() -> std::sync::MutexGuard<'static, ()> {
    RANDOM.lock().unwrap_or_else(|e| e.into_inner())
}

/// `[n, 3, 28, 28]` standard-normal pixels.
fn pixels<BB: Backend>(n: usize, device: &BB::Device) -> Tensor<BB, 4> {
    let _rng = random_lock();
    Tensor::random([n, 3, 28, 28], Distribution::Normal(0.0, 1.0), device)
}

fn batch<BB: Backend>(device: &BB::Device, rows: &[(Vec<i64>, Vec<i64>)]) -> Batch<BB> {
    let images = rows.iter().flat_map(|(ids, _)| ids.iter()).filter(|&&t| t == -200).count();
    Batch {
        input_ids: rows.iter().map(|r| r.0.clone()).collect(),
        labels: rows.iter().map(|r| r.1.clone()).collect(),
        pixels: (images > 0).then(|| pixels(images, device)),
    }
}

fn sample(seed: i64) -> (Vec<i64>, Vec<i64>) {
    let ids: Vec<i64> = [1, -200].into_iter().chain((0..8).map(|i| 3 + (i * 7 + seed * 5) % 36)).collect();
    let labels: Vec<i64> = ids.iter().enumerate().map(|(i, &t)| if i < 4 { -100 } else { t }).collect();
    (ids, labels)
}

type Values = Vec<Vec<f32>>;

fn split(trainer: &Trainer<B>) -> (Values, Values, Values) {
    let m = &trainer.model;
    let vals = |v: Vec<(burn::module::ParamId, Vec<f32>)>| v.into_iter().map(|(_, x)| x).collect::<Vec<_>>();
    (vals(param_values(&m.vision)), vals(param_values(&m.projector)), vals(param_values(&m.llm)))
}

fn config(lr: f64, accumulation: usize) -> OptimConfig {
    OptimConfig {
        learning_rate: lr,
        warmup_ratio: 0.0,
        gradient_accumulation_steps: accumulation,
        total_steps: 100,
        ..Default::default()
    }
}

#[test]
fn each_stage_trains_only_its_parameters() {
    let device = Default::default();
    for stage in [Stage::One, Stage::Two] {
        let mut trainer = Trainer::new(model(&device), stage, config(1e-2, 1));
        let before = split(&trainer);
        let report = trainer.micro_step(&batch(&device, &[sample(0), sample(1)])).expect("one micro-batch per step");
        assert!(report.loss.is_finite() && report.grad_norm > 0.0, "{report:?}");
        let after = split(&trainer);
        assert_eq!(before.0, after.0, "{stage:?}: the vision tower is bit-identical");
        assert_ne!(before.1, after.1, "{stage:?}: the projector trains");
        if stage == Stage::One {
            assert_eq!(before.2, after.2, "stage 1: the LLM is bit-identical");
        } else {
            assert!(before.2.iter().zip(&after.2).all(|(a, b)| a != b), "stage 2: every LLM tensor trains");
        }
    }
}

#[test]
fn accumulating_micro_batches_equals_one_larger_batch() {
    let device = Default::default();
    let rows = [sample(2), sample(3)];
    let base = model(&device);
    let pixels = pixels::<B>(2, &device);
    let run = |accumulation: usize| {
        let pixels = pixels.clone();
        let mut trainer = Trainer::new(base.clone(), Stage::Two, config(1e-3, accumulation));
        let report = if accumulation == 1 {
            trainer.micro_step(&Batch {
                input_ids: rows.iter().map(|r| r.0.clone()).collect(),
                labels: rows.iter().map(|r| r.1.clone()).collect(),
                pixels: Some(pixels),
            })
        } else {
            let mut last = None;
            for (k, r) in rows.iter().enumerate() {
                last = trainer.micro_step(&Batch {
                    input_ids: vec![r.0.clone()],
                    labels: vec![r.1.clone()],
                    #[allow(clippy::single_range_in_vec_init)] // Burn's slice takes one range per axis.
                    pixels: Some(pixels.clone().slice([k..k + 1])),
                });
            }
            last
        };
        (report.unwrap(), split(&trainer))
    };
    let (one, p1) = run(1);
    let (two, p2) = run(2);
    assert!((one.loss - two.loss).abs() < 1e-5, "{} vs {}", one.loss, two.loss);
    assert!(
        (one.grad_norm - two.grad_norm).abs() < 1e-4 * one.grad_norm.max(1.0),
        "{} vs {}",
        one.grad_norm,
        two.grad_norm
    );
    let max =
        p1.1.iter()
            .chain(&p1.2)
            .flatten()
            .zip(p2.1.iter().chain(&p2.2).flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
    assert!(max < 1e-5, "parameters differ by {max}");
}

/// The first and the 81st loss of 81 steps on one sample.
fn overfit(mut trainer: Trainer<B>) -> (f64, f64) {
    let b = batch(&Default::default(), &[sample(4)]);
    let first = trainer.micro_step(&b).unwrap().loss;
    let last = (0..80).map(|_| trainer.micro_step(&b).unwrap().loss).last().unwrap();
    (first, last)
}

#[test]
fn a_tiny_model_overfits_one_sample() {
    let (first, last) = overfit(Trainer::new(model(&Default::default()), Stage::Two, config(1e-2, 1)));
    assert!(last < 0.05 && first > 2.0, "loss {first} → {last}");
}

/// Six one-sample batches sharing one picture (the resume tests' run).
fn six_batches(device: &<B as burn::tensor::backend::BackendTypes>::Device) -> Vec<Batch<B>> {
    let pixels = pixels::<B>(1, device);
    (0..6)
        .map(|k| {
            let (ids, labels) = sample(10 + k);
            Batch { input_ids: vec![ids], labels: vec![labels], pixels: Some(pixels.clone()) }
        })
        .collect()
}

#[test]
fn resuming_from_a_checkpoint_continues_bit_identically() {
    let device = Default::default();
    let base = model(&device);
    let batches = six_batches(&device);
    for stage in [Stage::One, Stage::Two] {
        let cfg = OptimConfig { learning_rate: 1e-2, warmup_ratio: 0.2, total_steps: 6, ..Default::default() };
        let mut straight = Trainer::new(base.clone(), stage, cfg.clone());
        let full: Vec<f64> = batches.iter().map(|b| straight.micro_step(b).unwrap().loss).collect();

        let tmp = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(base.clone(), stage, cfg.clone());
        for b in &batches[..3] {
            first.micro_step(b).unwrap();
        }
        let saved =
            llava_trainer::checkpoint::save(&first, tmp.path(), 2, serde_json::json!({"next_batch": 3})).unwrap();
        drop(first); // the run is "killed"

        let mut resumed = Trainer::new(base.clone(), stage, cfg);
        let extra = llava_trainer::checkpoint::load(&mut resumed, &saved).unwrap();
        assert_eq!(extra["next_batch"], 3);
        let rest: Vec<f64> = batches[3..].iter().map(|b| resumed.micro_step(b).unwrap().loss).collect();
        assert_eq!(rest, full[3..].to_vec(), "{stage:?}: the resumed loss curve equals the uninterrupted one");
        assert_eq!(
            param_values(&resumed.model).into_iter().map(|p| p.1).collect::<Vec<_>>(),
            param_values(&straight.model).into_iter().map(|p| p.1).collect::<Vec<_>>()
        );
    }
}

#[test]
fn checkpoints_are_atomic_and_only_the_last_ones_are_kept() {
    let device = Default::default();
    let mut trainer = Trainer::new(model(&device), Stage::One, config(1e-3, 1));
    let tmp = tempfile::tempdir().unwrap();
    let b = batch::<B>(&device, &[sample(1)]);
    for _ in 0..4 {
        trainer.micro_step(&b).unwrap();
        llava_trainer::checkpoint::save(&trainer, tmp.path(), 2, serde_json::Value::Null).unwrap();
    }
    // A crash mid-write leaves only a `.partial` directory, which is not a checkpoint.
    std::fs::create_dir_all(tmp.path().join("checkpoint-9.partial")).unwrap();
    let steps: Vec<usize> = llava_trainer::checkpoint::list(tmp.path()).unwrap().into_iter().map(|c| c.0).collect();
    assert_eq!(steps, vec![3, 4]);
}

#[test]
fn gradient_checkpointing_gives_the_same_step() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use burn::module::AutodiffModule;
    type Ckpt = Autodiff<llava::backend::Cpu, BalancedCheckpointing>;
    let device = Default::default();
    let base = model(&device);
    let rows = [sample(5), sample(6)];
    let pixels = pixels::<B>(2, &device);
    let batch_of = |p: Tensor<llava::backend::Cpu, 4>| {
        (rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), rows.iter().map(|r| r.1.clone()).collect::<Vec<_>>(), p)
    };
    let (ids, labels, inner_pixels) = batch_of(pixels.clone().inner());

    let mut plain = Trainer::new(base.clone(), Stage::Two, config(1e-2, 1));
    let a = plain.micro_step(&Batch { input_ids: ids.clone(), labels: labels.clone(), pixels: Some(pixels) }).unwrap();
    let mut checkpointed = Trainer::new(llava::Llava::<Ckpt>::from_inner(base.valid()), Stage::Two, config(1e-2, 1));
    let b = checkpointed
        .micro_step(&Batch { input_ids: ids, labels, pixels: Some(Tensor::from_inner(inner_pixels)) })
        .unwrap();
    assert!((a.loss - b.loss).abs() < 1e-6 && (a.grad_norm - b.grad_norm).abs() < 1e-5 * a.grad_norm, "{a:?} vs {b:?}");
    let flat = |v: Vec<(burn::module::ParamId, Vec<f32>)>| v.into_iter().flat_map(|(_, x)| x).collect::<Vec<f32>>();
    let (pa, pb) = (flat(param_values(&plain.model.llm)), flat(param_values(&checkpointed.model.llm)));
    let max = pa.iter().zip(&pb).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(max < 1e-6, "updated LLM weights differ by {max}");
}

/// The dtype of every float parameter of a module.
fn dtypes<BB: Backend, M: burn::module::Module<BB>>(module: &M) -> Vec<burn::tensor::DType> {
    struct Collect<BB: Backend>(Vec<burn::tensor::DType>, std::marker::PhantomData<BB>);
    impl<BB: Backend> burn::module::ModuleVisitor<BB> for Collect<BB> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<BB, D>>) {
            self.0.push(param.val().dtype());
        }
    }
    let mut c = Collect::<BB>(Vec::new(), Default::default());
    module.visit(&mut c);
    c.0
}

#[test]
fn bf16_mixed_precision_keeps_f32_masters_and_follows_the_f32_step() {
    use burn::tensor::DType::{BF16, F32};
    let device = Default::default();
    let base = model(&device);
    let b = batch::<B>(&device, &[sample(7), sample(8)]);
    for stage in [Stage::One, Stage::Two] {
        let mut full = Trainer::new(base.clone(), stage, config(1e-3, 1));
        let mut mixed = Trainer::new(base.clone(), stage, config(1e-3, 1)).with_compute_dtype(BF16);
        let before = split(&mixed);
        // The model keeps f32 weights (the trainable ones are the optimizer's master copy, the
        // frozen ones are saved as loaded); the forward really runs in bf16.
        assert!(dtypes(&mixed.model).iter().all(|&d| d == F32), "{stage:?}: f32 masters");
        let compute = mixed.compute_model();
        assert!(dtypes(&compute).iter().all(|&d| d == BF16), "{stage:?}: bf16 compute copy");

        let (a, m) = (full.micro_step(&b).unwrap(), mixed.micro_step(&b).unwrap());
        assert!((a.loss - m.loss).abs() < 0.02 * a.loss, "{stage:?}: loss f32 {} vs bf16 {}", a.loss, m.loss);
        assert!(
            (a.grad_norm - m.grad_norm).abs() < 0.05 * a.grad_norm,
            "{stage:?}: grad norm f32 {} vs bf16 {}",
            a.grad_norm,
            m.grad_norm
        );
        let after = split(&mixed);
        assert_eq!(before.0, after.0, "{stage:?}: the frozen vision tower is unchanged");
        // The bf16 step moves the f32 masters the way the f32 step moves its weights.
        let delta = |t: &Trainer<B>, from: &[Vec<f32>]| -> Vec<f32> {
            split(t).1.iter().flatten().zip(from.iter().flatten()).map(|(x, y)| x - y).collect()
        };
        let start = split(&Trainer::new(base.clone(), stage, config(1e-3, 1))).1;
        let (da, dm) = (delta(&full, &start), delta(&mixed, &start));
        let dot: f32 = da.iter().zip(&dm).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cosine = dot / (norm(&da) * norm(&dm));
        assert!(cosine > 0.9, "{stage:?}: projector updates point the same way (cosine {cosine})");
        assert!(dtypes(&mixed.model).iter().all(|&d| d == F32), "{stage:?}: masters stay f32 after the step");
        if stage == Stage::One {
            assert_eq!(before.2, after.2, "stage 1: the frozen LLM keeps its exact f32 weights");
        }
    }
}

#[test]
fn bf16_mixed_precision_overfits_one_sample() {
    let trainer = Trainer::new(model(&Default::default()), Stage::Two, config(1e-2, 1))
        .with_compute_dtype(burn::tensor::DType::BF16);
    let (first, last) = overfit(trainer);
    assert!(last < 0.1 && first > 2.0, "loss {first} → {last}");
}

/// Every file of a checkpoint (relative paths), from its manifest.
fn checkpoint_files(dir: &Path) -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(llava_io::MANIFEST_FILE)).unwrap()).unwrap();
    manifest["files"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn a_truncated_flipped_or_deleted_file_of_the_newest_checkpoint_falls_back_to_the_previous_one() {
    use llava_trainer::checkpoint::{latest_intact, load, save};
    let device = Default::default();
    let b = batch::<B>(&device, &[sample(1)]);
    let mut trainer = Trainer::new(model(&device), Stage::Two, config(1e-3, 1));
    let clean = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        trainer.micro_step(&b).unwrap();
        save(&trainer, clean.path(), 2, serde_json::json!({ "position": trainer.step })).unwrap();
    }
    let newest = clean.path().join("checkpoint-2");
    let files = checkpoint_files(&newest);
    assert!(files.len() >= 4 && files.contains(&"state.json".to_string()), "{files:?}");
    assert_eq!(latest_intact(clean.path()).unwrap().newest.unwrap().0, 2);

    let mut tried = 0;
    for file in files.iter().chain(std::iter::once(&llava_io::MANIFEST_FILE.to_string())) {
        for fault in ["truncate", "flip", "delete"] {
            let tmp = tempfile::tempdir().unwrap();
            for step in [1, 2] {
                let from = clean.path().join(format!("checkpoint-{step}"));
                let to = tmp.path().join(format!("checkpoint-{step}"));
                std::fs::create_dir_all(&to).unwrap();
                for f in checkpoint_files(&from).iter().chain(std::iter::once(&llava_io::MANIFEST_FILE.to_string())) {
                    std::fs::copy(from.join(f), to.join(f)).unwrap();
                }
            }
            let target = tmp.path().join("checkpoint-2").join(file);
            let mut bytes = std::fs::read(&target).unwrap();
            match fault {
                "truncate" => {
                    bytes.truncate(bytes.len() / 2);
                    std::fs::write(&target, &bytes).unwrap();
                }
                "flip" => {
                    let at = bytes.len() / 3;
                    bytes[at] ^= 0x04;
                    std::fs::write(&target, &bytes).unwrap();
                }
                _ => std::fs::remove_file(&target).unwrap(),
            }
            let llava_trainer::checkpoint::Intact { newest, rejected } = latest_intact(tmp.path()).unwrap();
            let (step, path) = newest.unwrap_or_else(|| panic!("{fault} {file}: no fallback"));
            assert_eq!(step, 1, "{fault} {file}");
            assert_eq!(rejected.len(), 1, "{fault} {file}");
            assert!(rejected[0].path.ends_with("checkpoint-2"), "{fault} {file}");
            // The warning names the faulty file (or the missing manifest).
            let named = if file == llava_io::MANIFEST_FILE { "manifest" } else { file.as_str() };
            assert!(rejected[0].reason.contains(named), "{fault} {file}: {}", rejected[0].reason);
            let mut resumed = Trainer::new(model(&device), Stage::Two, config(1e-3, 1));
            let extra = load(&mut resumed, &path).unwrap();
            assert_eq!((resumed.step, extra["position"].as_u64()), (1, Some(1)), "{fault} {file}");
            tried += 1;
        }
    }
    assert_eq!(tried, 3 * (files.len() + 1));
}

// ---- LoRA -------------------------------------------------------------------------------------

fn lora_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lora")
}

fn read_f32(store: &llava_checkpoint::WeightStore, name: &str) -> (Vec<f32>, Vec<usize>) {
    let shape = store.info(name).unwrap_or_else(|| panic!("{name} in the fixture")).shape.clone();
    (store.read_f32(name, &shape).unwrap(), shape)
}

/// Token ids, stored as f32 in the fixture.
fn read_ids(store: &llava_checkpoint::WeightStore, name: &str) -> (Vec<i64>, Vec<usize>) {
    let (v, shape) = read_f32(store, name);
    (v.into_iter().map(|x| x as i64).collect(), shape)
}

fn assert_close(ours: &[f32], theirs: &[f32], tol: f32, what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!((a - b).abs() <= tol * scale.max(1e-3), "{what}[{i}]: {a} vs {b} (scale {scale})");
    }
}

/// PEFT's LoRA on a tiny LlamaForCausalLM (tests/fixtures/lora, scripts/fixtures/gen_lora.py):
/// the adapter file PEFT wrote loads, and the logits, the loss, every adapter gradient and the
/// merged model's logits are PyTorch's.
#[test]
fn lora_logits_loss_gradients_and_merge_match_peft() {
    let device = Default::default();
    let dir = lora_fixtures();
    let config = LlamaConfig::from_hf_dir(&dir.join("base")).unwrap();
    let base_store = llava_checkpoint::WeightStore::open(&dir.join("base")).unwrap();
    let base =
        llava_llm::LlamaModel::<B>::load_hf(&config, &llava_checkpoint::Loader::new(&base_store, &device)).unwrap();
    let lora = llava_llm::LoraConfig::from_dir(&dir.join("adapter")).unwrap();
    assert_eq!((lora.r, lora.lora_alpha, lora.target_modules.len()), (4, 8.0, 7));
    let adapter_store = llava_checkpoint::WeightStore::open(&dir.join("adapter")).unwrap();
    let model = base.load_lora(&lora, &adapter_store).unwrap().freeze_base();
    adapter_store.ensure_all_used().unwrap();

    let expected = llava_checkpoint::WeightStore::open(&dir.join("expected.safetensors")).unwrap();
    let (ids, ids_shape) = read_ids(&expected, "input_ids");
    let (labels, _) = read_ids(&expected, "labels");
    let [b, s] = [ids_shape[0], ids_shape[1]];
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, s]), &device);
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [b, s]), &device);
    let logits = model.forward_ids(ids.clone(), None);
    assert_close(
        &logits.clone().into_data().to_vec::<f32>().unwrap(),
        &read_f32(&expected, "logits").0,
        1e-5,
        "logits",
    );
    let (loss, _) = causal_lm_loss(logits, labels);
    let value: f32 = loss.clone().into_scalar();
    assert!((value - read_f32(&expected, "loss").0[0]).abs() < 1e-5, "loss {value}");
    let grads = loss.backward();
    let mut checked = 0;
    for (name, p) in model.projections() {
        let a = p.lora.as_ref().unwrap();
        for (which, param) in [("A", &a.lora_a), ("B", &a.lora_b)] {
            let grad = param.val().grad(&grads).expect("adapters train");
            // Ours are [in, r] / [r, out]; PyTorch's [r, in] / [out, r].
            let grad = grad.transpose().into_data().to_vec::<f32>().unwrap();
            let theirs = read_f32(&expected, &format!("grad.base_model.model.model.{name}.lora_{which}.weight")).0;
            assert_close(&grad, &theirs, 1e-4, &format!("{name}.lora_{which} gradient"));
            checked += 1;
        }
        assert!(p.base.as_float().unwrap().weight.val().grad(&grads).is_none(), "{name}: the base is frozen");
    }
    assert_eq!(checked, 28);
    let merged = burn::module::AutodiffModule::valid(&model).merge_lora().unwrap();
    let merged_logits = merged.forward_ids(ids.inner(), None).into_data().to_vec::<f32>().unwrap();
    assert_close(&merged_logits, &read_f32(&expected, "merged_logits").0, 1e-5, "merged logits");
}

fn lora_model(device: &<B as burn::tensor::backend::BackendTypes>::Device, dropout: f64) -> llava::Llava<B> {
    let mut m = model(device);
    let lora =
        llava_llm::LoraConfig { r: 2, lora_alpha: 4.0, lora_dropout: dropout, ..llava_llm::LoraConfig::reference() };
    m.llm = m.llm.with_lora(&lora, 3).unwrap();
    let _ = param_values(&m);
    m
}

fn adapters(trainer: &Trainer<B>) -> Values {
    trainer
        .model
        .llm
        .lora_adapters()
        .into_iter()
        .flatten()
        .flat_map(|a| [a.lora_a.val(), a.lora_b.val()])
        .map(|t| t.into_data().to_vec::<f32>().unwrap())
        .collect()
}

fn base_weights(trainer: &Trainer<B>) -> Values {
    let mut llm = trainer.model.llm.clone();
    llm.set_lora_adapters(Vec::new());
    param_values(&llm).into_iter().map(|p| p.1).collect()
}

/// LoRA in stage 2: the vision tower and the LLM's base weights stay bit-identical; the adapters
/// (every one, lora_B leaving zero) and the projector train, the projector at its own rate.
#[test]
fn lora_trains_only_the_adapters_and_the_projector() {
    let device = Default::default();
    let cfg = OptimConfig { projector_learning_rate: Some(0.0), ..config(1e-2, 1) };
    let mut trainer = Trainer::new(lora_model(&device, 0.05), Stage::Two, cfg).with_seed(1);
    assert!(trainer.lora());
    let (vision, projector, _) = split(&trainer);
    let (base, lora) = (base_weights(&trainer), adapters(&trainer));
    // Two steps: lora_B starts at zero, so lora_A's first gradient is zero (as in PEFT).
    let b = batch(&device, &[sample(0), sample(1)]);
    let rng = random_lock(); // dropout draws
    trainer.micro_step(&b).unwrap();
    trainer.micro_step(&b).unwrap();
    drop(rng);
    let after = split(&trainer);
    assert_eq!(vision, after.0, "the vision tower is bit-identical");
    assert_eq!(projector, after.1, "a projector learning rate of 0 leaves the projector as it was");
    assert_eq!(base, base_weights(&trainer), "the LLM's base weights are bit-identical");
    let trained = adapters(&trainer);
    assert!(lora.iter().zip(&trained).all(|(a, b)| a != b), "every adapter matrix trains");

    let mut trainer = Trainer::new(lora_model(&device, 0.05), Stage::Two, config(1e-2, 1));
    let rng = random_lock();
    trainer.micro_step(&b).unwrap();
    drop(rng);
    assert_ne!(projector, split(&trainer).1, "the projector trains at the main rate");

    // modules_to_save: the embeddings and the LM head train too; the decoder's base does not.
    let mut m = lora_model(&device, 0.0);
    m.llm.modules_to_save = vec!["embed_tokens".into(), "lm_head".into()];
    let mut trainer = Trainer::new(m, Stage::Two, config(1e-2, 1));
    let llm = &trainer.model.llm;
    let head = |llm: &llava_llm::LlamaModel<B>| param_values(llm.lm_head.as_ref().unwrap());
    let (embed, lm_head, layers) =
        (param_values(&llm.embed_tokens), head(llm), param_values(&llm.layers[1].mlp.up_proj.base));
    trainer.micro_step(&b).unwrap();
    let llm = &trainer.model.llm;
    assert_ne!(embed, param_values(&llm.embed_tokens));
    assert_ne!(lm_head, head(llm));
    assert_eq!(layers, param_values(&llm.layers[1].mlp.up_proj.base));
}

/// A LoRA run with dropout, killed after 3 steps and resumed from its checkpoint (which holds
/// only the adapters, projector and optimizer), continues exactly as the uninterrupted run.
#[test]
fn lora_with_dropout_resumes_bit_identically() {
    let device = Default::default();
    let base = lora_model(&device, 0.3);
    let batches = six_batches(&device);
    let cfg = OptimConfig { learning_rate: 1e-2, warmup_ratio: 0.2, total_steps: 6, ..Default::default() };
    let _rng = random_lock();
    let new = || Trainer::new(base.clone(), Stage::Two, cfg.clone()).with_seed(9);
    let mut straight = new();
    let full: Vec<f64> = batches.iter().map(|b| straight.micro_step(b).unwrap().loss).collect();
    let mut again = new();
    let repeat: Vec<f64> = batches.iter().map(|b| again.micro_step(b).unwrap().loss).collect();
    assert_eq!(full, repeat, "the dropout masks come from the seed");
    // (lora_B is zero until the first step with a learning rate above 0, the second of the
    // warmup: the first two losses do not depend on the masks.)
    let mut other_seed = Trainer::new(base.clone(), Stage::Two, cfg.clone()).with_seed(10);
    let other: Vec<f64> = batches[..3].iter().map(|b| other_seed.micro_step(b).unwrap().loss).collect();
    assert_ne!(other[2], full[2], "dropout is on");

    let tmp = tempfile::tempdir().unwrap();
    let mut first = new();
    for b in &batches[..3] {
        first.micro_step(b).unwrap();
    }
    let saved = llava_trainer::checkpoint::save(&first, tmp.path(), 2, serde_json::json!({})).unwrap();
    assert!(saved.join("lora.bin").is_file() && !saved.join("llm.bin").exists(), "only the adapters are saved");
    drop(first);
    let mut resumed = new();
    llava_trainer::checkpoint::load(&mut resumed, &saved).unwrap();
    let rest: Vec<f64> = batches[3..].iter().map(|b| resumed.micro_step(b).unwrap().loss).collect();
    assert_eq!(rest, full[3..].to_vec());
    assert_eq!(adapters(&resumed), adapters(&straight));
    assert_eq!(split(&resumed).1, split(&straight).1);
}

/// QLoRA: with the LLM's linear layers in NF4, a step's loss and adapter gradients are those of
/// a float model holding the dequantized weights, and the 4-bit codes never change.
#[test]
fn qlora_follows_the_float_model_of_its_dequantized_base() {
    let device = Default::default();
    let mut config = tiny();
    config.text.hidden_size = 32;
    config.text.intermediate_size = 64;
    let rng = random_lock();
    let mut base = config.init::<B>(&device);
    for (_, p) in base.llm.projections_mut() {
        p.base = p.base.clone().quantized(llava::QuantFormat::Nf4).unwrap();
    }
    let lora = llava_llm::LoraConfig { r: 2, lora_alpha: 4.0, lora_dropout: 0.0, ..llava_llm::LoraConfig::reference() };
    base.llm = base.llm.with_lora(&lora, 3).unwrap();
    let _ = param_values(&base);
    drop(rng);
    let mut float = base.clone();
    for (_, p) in float.llm.projections_mut() {
        if let llava_kernels::AnyLinear::Quantized(q) = &p.base {
            let mut linear = burn::nn::LinearConfig::new(q.dims()[1], q.dims()[0]).with_bias(false).init(&device);
            linear.weight = burn::module::Param::from_tensor(q.dequantize().transpose());
            p.base = llava_kernels::AnyLinear::Float(linear);
        }
    }
    let b = batch(&device, &[sample(5)]);
    let mut quantized = Trainer::new(base, Stage::Two, config_lr(1e-2));
    let mut reference = Trainer::new(float, Stage::Two, config_lr(1e-2));
    let codes = |t: &Trainer<B>| match &t.model.llm.layers[0].mlp.up_proj.base {
        llava_kernels::AnyLinear::Quantized(q) => q.values.clone().into_data().to_vec::<i32>().unwrap(),
        _ => panic!("quantized"),
    };
    let before = codes(&quantized);
    for _ in 0..3 {
        let (q, f) = (quantized.micro_step(&b).unwrap(), reference.micro_step(&b).unwrap());
        assert!((q.loss - f.loss).abs() < 1e-5 && (q.grad_norm - f.grad_norm).abs() < 1e-4, "{q:?} vs {f:?}");
    }
    assert_eq!(codes(&quantized), before);
    for (a, b) in adapters(&quantized).iter().zip(adapters(&reference)) {
        assert_close(a, &b, 1e-4, "adapters after 3 steps");
    }
}

fn config_lr(lr: f64) -> OptimConfig {
    config(lr, 1)
}

// ---- data parallel -----------------------------------------------------------------------------

use llava_trainer::replicas::{self, CollectiveLease, Replica};

/// Runs `replicas` trainers of `base` in threads, replica r stepping on micro-batches r, r + R,
/// …; returns each replica's losses and final parameter values. `stop_before` makes replica 1
/// leave (as a dead device) before that micro-step, resetting the collective.
fn replicated(
    base: &llava::Llava<B>, cfg: &OptimConfig, batches: &[Batch<B>], count: usize, stop_before: Option<usize>,
) -> Vec<Result<(Vec<f64>, Values), String>> {
    let _lease = CollectiveLease::acquire();
    replicas::reset::<llava::backend::Cpu>();
    let out = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .map(|rank| {
                let replica = Replica { rank, count };
                let mut trainer = Trainer::new(base.clone(), Stage::Two, cfg.clone()).with_replica(replica);
                scope.spawn(move || -> Result<(Vec<f64>, Values), String> {
                    let device = Default::default();
                    replicas::register::<llava::backend::Cpu>(replica, &device).map_err(|e| e.to_string())?;
                    let mut losses = Vec::new();
                    for (k, batch) in batches.iter().skip(rank).step_by(count).enumerate() {
                        if rank == 1 && stop_before == Some(k) {
                            replicas::reset::<llava::backend::Cpu>();
                            return Err("replica 1 left".into());
                        }
                        if let Some(report) = trainer.try_micro_step(batch).map_err(|e| e.to_string())? {
                            losses.push(report.loss);
                        }
                    }
                    Ok((losses, param_values(&trainer.model).into_iter().map(|p| p.1).collect()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    replicas::reset::<llava::backend::Cpu>();
    out
}

/// Eight one-sample micro-batches; the fourth has no image, so on its replica the projector gets
/// no gradient (it counts as zero there, as in one replica's accumulation).
fn eight_batches(device: &<B as burn::tensor::backend::BackendTypes>::Device) -> Vec<Batch<B>> {
    let mut batches: Vec<Batch<B>> = six_batches(device);
    batches.extend(six_batches(device).into_iter().take(2));
    let (ids, labels) = sample(30);
    let text: Vec<i64> = ids.into_iter().filter(|&t| t != -200).collect();
    let labels = labels[1..].to_vec();
    batches[3] = Batch { input_ids: vec![text], labels: vec![labels], pixels: None };
    batches
}

#[test]
fn two_replicas_step_as_one_replica_accumulating_their_micro_batches() {
    let device = Default::default();
    let base = model(&device);
    let batches = eight_batches(&device);
    let cfg = |accumulation| OptimConfig {
        learning_rate: 1e-2,
        warmup_ratio: 0.25,
        total_steps: 4,
        gradient_accumulation_steps: accumulation,
        ..Default::default()
    };
    // One replica accumulating two micro-batches per step …
    let mut single = Trainer::new(base.clone(), Stage::Two, cfg(2));
    let expected: Vec<f64> = batches.iter().filter_map(|b| single.micro_step(b)).map(|r| r.loss).collect();
    let expected_params: Values = param_values(&single.model).into_iter().map(|p| p.1).collect();
    assert_eq!(expected.len(), 4);
    // … and two replicas of one micro-batch each.
    let outcomes = replicated(&base, &cfg(1), &batches, 2, None);
    for (rank, outcome) in outcomes.into_iter().enumerate() {
        let (losses, params) = outcome.unwrap();
        assert_eq!(losses.len(), 4, "replica {rank}");
        for (a, b) in losses.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "replica {rank}: loss {a} vs {b}");
        }
        let max = params.iter().flatten().zip(expected_params.iter().flatten()).map(|(a, b)| (a - b).abs());
        let max = max.fold(0f32, f32::max);
        assert!(max <= 1e-5, "replica {rank}: parameters differ by {max}");
    }
}

#[test]
fn a_replica_that_leaves_ends_the_others_step_with_an_error() {
    let device = Default::default();
    let base = model(&device);
    let batches = eight_batches(&device);
    let cfg = OptimConfig { learning_rate: 1e-2, total_steps: 4, ..Default::default() };
    let outcomes = replicated(&base, &cfg, &batches, 2, Some(2));
    let e = outcomes[0].as_ref().unwrap_err();
    assert!(e.contains("replica 0") && e.contains("all-reduce failed"), "{e}");
    assert_eq!(outcomes[1].as_ref().unwrap_err(), "replica 1 left");
    // The collective works again afterwards.
    let again = replicated(&base, &cfg, &batches[..2], 2, None);
    assert!(again.iter().all(Result::is_ok));
}

/// The perplexity is `exp` of the mean negative log-likelihood of the supervised tokens over the
/// whole data, computed here independently from the logits in f64 (log-sum-exp by hand), and it
/// weights batches by their supervised tokens: one batch of three rows and three batches of one
/// give the same value although the rows supervise 6, 3 and 6 tokens.
#[test]
fn perplexity_is_the_token_weighted_likelihood_of_the_supervised_tokens() {
    use burn::module::AutodiffModule;
    use llava_trainer::perplexity::batches_perplexity;
    type C = llava::backend::Cpu;
    let device = Default::default();
    let model = model(&device).valid();
    let mut short = sample(2);
    short.1.iter_mut().take(7).for_each(|l| *l = -100);
    let rows = [sample(1), short, sample(3)];
    let pixels = pixels::<C>(3, &device);
    let whole = Batch {
        input_ids: rows.iter().map(|r| r.0.clone()).collect(),
        labels: rows.iter().map(|r| r.1.clone()).collect(),
        pixels: Some(pixels.clone()),
    };
    let singles: Vec<Batch<C>> = (0..3)
        .map(|k| Batch {
            input_ids: vec![rows[k].0.clone()],
            labels: vec![rows[k].1.clone()],
            #[allow(clippy::single_range_in_vec_init)] // Burn's slice takes one range per axis.
            pixels: Some(pixels.clone().slice([k..k + 1])),
        })
        .collect();
    let max_length = 128;
    let together = batches_perplexity(&model, std::slice::from_ref(&whole), max_length);
    let apart = batches_perplexity(&model, &singles, max_length);

    // By hand: the spliced labels shifted by one against the logits, -ln softmax in f64.
    let features = model.encode_images(pixels).projected;
    let spliced = model.splice(
        &whole.input_ids,
        Some(&whole.labels),
        Some(features),
        Some(max_length),
        llava::PaddingSide::Right,
    );
    let logits = model.forward(&spliced);
    let [b, t, v] = logits.dims();
    let logits = logits.into_data().to_vec::<f32>().unwrap();
    let labels = spliced.labels.clone().unwrap().into_data().convert::<i64>().to_vec::<i64>().unwrap();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for r in 0..b {
        for j in 0..t - 1 {
            let label = labels[r * t + j + 1];
            if label < 0 {
                continue;
            }
            let row = &logits[(r * t + j) * v..(r * t + j + 1) * v];
            let top = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
            let lse = top + row.iter().map(|&x| (x as f64 - top).exp()).sum::<f64>().ln();
            nll += lse - row[label as usize] as f64;
            tokens += 1;
        }
    }
    assert_eq!(tokens, 15, "supervised tokens after the shift");
    assert_eq!((together.tokens, together.samples), (15, 3));
    assert_eq!((apart.tokens, apart.samples), (15, 3));
    let expected = (nll / tokens as f64).exp();
    for (what, got) in [("one batch", together.value()), ("three batches", apart.value())] {
        assert!((got - expected).abs() <= 1e-5 * expected, "{what}: perplexity {got} vs {expected} by hand");
    }
    // The validation loss (a mean of batch means) is not the same thing when counts differ.
    assert!(expected > 1.0 && together.mean_nll().is_finite());
}
