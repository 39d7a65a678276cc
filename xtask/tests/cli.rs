//! The `cargo xtask` commands end to end on a tiny checkpoint written by `demo-model`:
//! outputs, standard-output hygiene, and clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use llava::generate::{GenerationConfig, generate};
use llava::load::{LoadOptions, load_dir};
use llava_checkpoint::{Exporter, SaveDtype, WeightStore};
use llava_data::image::AspectMode;

type B = llava::backend::Cpu;

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .expect("run xtask")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "xtask failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn err(out: &Output) -> String {
    assert!(!out.status.success(), "xtask unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn demo_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    ok(&xtask(&["demo-model", "--out", model.to_str().unwrap()]));
    model
}

const PROMPT: &str = "USER: <image>\nWhat is unusual about this image? ASSISTANT:";

fn image() -> PathBuf {
    repo().join("datasets/demo-images/extreme_ironing.jpg")
}

#[test]
fn forward_writes_the_four_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let out = tmp.path().join("fwd.safetensors");
    ok(&xtask(&[
        "forward",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image().to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--out",
        out.to_str().unwrap(),
    ]));
    let store = WeightStore::open(&out).unwrap();
    let loaded = load_dir::<B>(&model, &LoadOptions::default(), &Default::default()).unwrap();
    let tokens = llava_data::tokenizer_image_token(loaded.tokenizer.as_ref().unwrap(), PROMPT).len() - 1 + 16;
    let vocab = loaded.config.text.vocab_size;
    assert_eq!(store.info("logits").unwrap().shape, vec![tokens, vocab]);
    assert_eq!(store.info("vision_features").unwrap().shape, vec![16, 64]);
    assert_eq!(store.info("image_features").unwrap().shape, vec![16, 64]);
    assert_eq!(store.info("pixel_values").unwrap().shape, vec![3, 56, 56]);
    let pixels = store.read_f32("pixel_values", &[3, 56, 56]).unwrap();
    let expected = llava_data::image::load_and_preprocess(&image(), &loaded.processor, AspectMode::Crop).unwrap();
    assert_eq!(pixels, expected);
}

#[test]
fn generate_prints_only_the_greedy_text() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let img = image();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ];
    let first = xtask(&args);
    let stdout = ok(&first);
    assert_eq!(stdout, ok(&xtask(&args)), "greedy output is deterministic");
    assert!(String::from_utf8_lossy(&first.stderr).contains("new tokens"), "progress goes to stderr");

    // Same tokens as the library's greedy generation, decoded.
    let device = Default::default();
    let loaded = load_dir::<B>(&model, &LoadOptions::default(), &device).unwrap();
    let tok = loaded.tokenizer.as_ref().unwrap();
    let ids = llava_data::tokenizer_image_token(tok, PROMPT);
    let pixels = llava::image_tensor::<B>(&image(), &loaded.processor, loaded.config.image_aspect, &device).unwrap();
    let config = GenerationConfig { max_new_tokens: 8, eos_ids: vec![2], ..Default::default() };
    let out = generate(&loaded.model, &[ids], Some(pixels), &config, |_, _| true);
    assert_eq!(stdout, format!("{}\n", tok.decode(&out[0], true)));
}

#[test]
fn plain_llama_directory_generates_from_bos_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = demo_model(tmp.path());
    // Extract the LLM as a LlamaForCausalLM directory.
    let loaded = load_dir::<B>(&demo, &LoadOptions::default(), &Default::default()).unwrap();
    let llm_dir = tmp.path().join("llama");
    std::fs::create_dir_all(&llm_dir).unwrap();
    let mut e = Exporter::new();
    loaded.model.llm.export(&mut e, "model", "lm_head");
    e.save(&llm_dir.join("model.safetensors"), SaveDtype::F32, &[]).unwrap();
    std::fs::write(llm_dir.join("config.json"), loaded.config.text.to_hf_json().to_string()).unwrap();
    std::fs::copy(demo.join("tokenizer.model"), llm_dir.join("tokenizer.model")).unwrap();
    let out = xtask(&["generate", "--model", llm_dir.to_str().unwrap(), "--prompt", "", "--max-new-tokens", "4"]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("after a 1-token prompt"));
    // An image makes no sense for a text-only model.
    let out = xtask(&[
        "generate",
        "--model",
        llm_dir.to_str().unwrap(),
        "--image",
        image().to_str().unwrap(),
        "--prompt",
        "<image>",
    ]);
    assert!(err(&out).contains("text-only"));

    // Quantized, a plain LLaMA directory stays one: LlamaForCausalLM names and config, the
    // tokenizer copied, generating what the model quantized at load generates.
    let q4 = tmp.path().join("llama-q4");
    ok(&xtask(&["quantize", "--model", llm_dir.to_str().unwrap(), "--quantize", "q4", "--out", q4.to_str().unwrap()]));
    let config = read_json(&q4.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert!(q4.join("tokenizer.model").is_file());
    let store = WeightStore::open(&q4.join("model.safetensors")).unwrap();
    assert!(store.contains("model.layers.0.mlp.up_proj.weight_q4") && store.contains("lm_head.weight_q8"));
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--prompt", "", "--max-new-tokens", "4"];
        args.extend(extra);
        ok(&xtask(&args))
    };
    assert_eq!(run(&q4, &[]), run(&llm_dir, &["--quantize", "q4"]));
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let m = model.to_str().unwrap();

    let missing = tmp.path().join("nope.jpg");
    let msg = err(&xtask(&["generate", "--model", m, "--image", missing.to_str().unwrap(), "--prompt", "<image>"]));
    assert!(msg.contains("nope.jpg"), "{msg}");

    let corrupt = tmp.path().join("corrupt.jpg");
    std::fs::write(&corrupt, b"not a jpeg").unwrap();
    let msg = err(&xtask(&["generate", "--model", m, "--image", corrupt.to_str().unwrap(), "--prompt", "<image>"]));
    assert!(msg.contains("corrupt.jpg"), "{msg}");

    let msg = err(&xtask(&["generate", "--model", m, "--prompt", "<image> hi"]));
    assert!(msg.contains("no image was given"), "{msg}");

    // The pixel limit (PIL's decompression-bomb limit by default) can be lowered or raised.
    let msg = err(&xtask(&[
        "--max-image-pixels",
        "10000",
        "generate",
        "--model",
        m,
        "--image",
        image().to_str().unwrap(),
        "--prompt",
        PROMPT,
    ]));
    assert!(msg.contains("extreme_ironing.jpg") && msg.contains("more than the 10000 allowed"), "{msg}");
    assert!(msg.contains("--max-image-pixels"), "{msg}");

    // A prompt longer than the model's context is refused, naming both lengths.
    let long = "hello ".repeat(5000);
    let msg = err(&xtask(&["generate", "--model", m, "--prompt", &long]));
    assert!(msg.contains("longer than the model's context") && msg.contains("max_position_embeddings"), "{msg}");

    // wgpu on a machine without a Vulkan driver: an error saying so, not a panic in the runtime.
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["generate", "--model", m, "--prompt", "hi", "--backend", "wgpu", "--max-new-tokens", "1"])
        .env("VK_ICD_FILENAMES", tmp.path().join("no-driver.json"))
        .env("VK_DRIVER_FILES", tmp.path().join("no-driver.json"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let msg = err(&out);
    assert!(msg.contains("--backend wgpu: the backend cannot start") && msg.contains("mesa-vulkan-drivers"), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");

    // A config that does not fit the weights: the error names the tensor and both shapes.
    let bad = tmp.path().join("bad-config");
    copy_dir(&model, &bad);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bad.join("config.json")).unwrap()).unwrap();
    config["text_config"]["intermediate_size"] = 100.into();
    std::fs::write(bad.join("config.json"), config.to_string()).unwrap();
    let msg = err(&xtask(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "hi"]));
    assert!(msg.contains("gate_proj.weight") && msg.contains("[100, 64]") && msg.contains("[172, 64]"), "{msg}");

    // A truncated checkpoint names the file.
    let truncated = tmp.path().join("truncated");
    copy_dir(&model, &truncated);
    let weights = truncated.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&weights).unwrap().set_len(len / 2).unwrap();
    let msg = err(&xtask(&["generate", "--model", truncated.to_str().unwrap(), "--prompt", "hi"]));
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");

    // Tensors nothing consumes are reported, not ignored.
    let extra = tmp.path().join("extra");
    copy_dir(&model, &extra);
    let store = WeightStore::open(&extra).unwrap();
    let mut e = Exporter::new();
    for name in store.names() {
        let shape = store.info(name).unwrap().shape.clone();
        e.raw(name, shape.clone(), store.read_f32(name, &shape).unwrap());
    }
    e.raw("language_model.model.layers.9.mlp.up_proj.weight", vec![2, 2], vec![0.0; 4]);
    drop(store);
    e.save(&extra.join("model.safetensors"), SaveDtype::F32, &[]).unwrap();
    let msg = err(&xtask(&["generate", "--model", extra.to_str().unwrap(), "--prompt", "hi"]));
    assert!(msg.contains("unused") && msg.contains("layers.9.mlp.up_proj.weight"), "{msg}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

// ---- data commands ---------------------------------------------------------------------------

fn read_i64(path: &Path, name: &str) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name} is i64");
    t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn tokenize_prints_only_the_ids() {
    let tok = repo().join("datasets/tokenizers/llama/tokenizer.model");
    let out = ok(&xtask(&["tokenize", "--tokenizer", tok.to_str().unwrap(), "--text", "Hello world"]));
    assert_eq!(out, "[15043,3186]\n");
    let out =
        ok(&xtask(&["tokenize", "--tokenizer", tok.parent().unwrap().to_str().unwrap(), "--text", "Hi</s>", "--bos"]));
    assert_eq!(out, "[1,6324,2]\n");
}

#[test]
fn inspect_sample_and_preprocess_image_write_the_reference_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = repo().join("datasets/lcs558k-sample");
    let tok = repo().join("datasets/tokenizers/llama/tokenizer.model");
    let out = tmp.path().join("s.safetensors");
    ok(&xtask(&[
        "inspect-sample",
        "--data",
        data.join("blip_laion_cc_sbu_16.json").to_str().unwrap(),
        "--image-folder",
        data.join("images").to_str().unwrap(),
        "--template",
        "plain",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--index",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]));
    let ids = read_i64(&out, "input_ids");
    let labels = read_i64(&out, "labels");
    assert_eq!(&ids[..2], &[1, -200]);
    assert_eq!(&labels[..2], &[-100, -100]);
    assert_eq!(&labels[2..], &ids[2..]);

    // The sample's pixels equal preprocess-image on the same file.
    let records: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("blip_laion_cc_sbu_16.json")).unwrap()).unwrap();
    let image = data.join("images").join(records[3]["image"].as_str().unwrap());
    let processor = tmp.path().join("preprocessor_config.json");
    std::fs::write(&processor, r#"{"size": 224, "crop_size": 224}"#).unwrap();
    let px = tmp.path().join("px.safetensors");
    ok(&xtask(&[
        "preprocess-image",
        "--image",
        image.to_str().unwrap(),
        "--processor",
        tmp.path().to_str().unwrap(),
        "--out",
        px.to_str().unwrap(),
    ]));
    let a = WeightStore::open(&out).unwrap().read_f32("pixel_values", &[3, 224, 224]).unwrap();
    let b = WeightStore::open(&px).unwrap().read_f32("pixel_values", &[3, 224, 224]).unwrap();
    assert_eq!(a, b);

    let msg = err(&xtask(&[
        "inspect-sample",
        "--data",
        data.join("blip_laion_cc_sbu_16.json").to_str().unwrap(),
        "--image-folder",
        data.join("images").to_str().unwrap(),
        "--template",
        "nope",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--index",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(msg.contains("unknown template `nope`") && msg.contains("llava_v1"), "{msg}");
}

#[test]
fn sqa_convert_writes_the_reference_file() {
    let tmp = tempfile::tempdir().unwrap();
    let sqa = repo().join("tests/fixtures/scienceqa");
    for format in ["QCM-LEA", "llava15"] {
        let out = tmp.path().join("out.json");
        ok(&xtask(&[
            "sqa-convert",
            "--problems",
            sqa.join("problems.json").to_str().unwrap(),
            "--splits",
            sqa.join("pid_splits.json").to_str().unwrap(),
            "--split",
            "test",
            "--format",
            format,
            "--out",
            out.to_str().unwrap(),
        ]));
        let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(sqa.join(format!("expected/llava_test_{format}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(ours, expected, "{format}");
    }
}

// ---- training -------------------------------------------------------------------------------

fn recipe(dir: &Path, name: &str, stage: &str, template: &str, projector: Option<&Path>) -> PathBuf {
    let data = repo().join("datasets/lcs558k-sample");
    let towers = dir.join("towers");
    let pretrained =
        projector.map(|p| format!("pretrained_projector = {:?}\n", p.to_str().unwrap())).unwrap_or_default();
    let text = format!(
        "name = {name:?}\nstage = {stage:?}\n[model]\nvision_tower = {:?}\nllm = {:?}\nprojector_type = \"mlp2x_gelu\"\n{pretrained}\
         [data]\ndata_path = {:?}\nimage_folder = {:?}\ntemplate = {template:?}\n\
         [training]\nepochs = 2\nper_device_batch_size = 4\nglobal_batch_size = 8\nlearning_rate = 1e-3\n\
         [checkpoint]\nsave_steps = 1\nkeep = 2\n",
        towers.join("clip").to_str().unwrap(),
        towers.join("llm").to_str().unwrap(),
        data.join("blip_laion_cc_sbu_16.json").to_str().unwrap(),
        data.join("images").to_str().unwrap(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn tensor(file: &Path, name: &str) -> Vec<f32> {
    let store = WeightStore::open(file).unwrap();
    let shape = store.info(name).unwrap_or_else(|| panic!("{name} in {}", file.display())).shape.clone();
    store.read_f32(name, &shape).unwrap()
}

#[test]
fn stage1_then_stage2_train_save_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    ok(&xtask(&["demo-towers", "--out", t.join("towers").to_str().unwrap()]));
    let s1 = recipe(t, "s1", "one", "plain", None);
    let run1 = t.join("run1");
    ok(&xtask(&["stage1", "--config", s1.to_str().unwrap(), "--run-dir", run1.to_str().unwrap()]));
    for f in [
        "config.toml",
        "metrics.jsonl",
        "loss.png",
        "mm_projector.safetensors",
        "model/config.json",
        "checkpoints/checkpoint-4/state.json",
    ] {
        assert!(run1.join(f).exists(), "{f}");
    }
    assert!(!run1.join("checkpoints/checkpoint-2").exists(), "only the last 2 checkpoints are kept");
    let full = losses(&run1);
    assert_eq!(full.len(), 4);

    // Killed after 1 step, resumed: the rest of the loss curve is the uninterrupted one.
    let run1b = t.join("run1b");
    ok(&xtask(&["stage1", "--config", s1.to_str().unwrap(), "--run-dir", run1b.to_str().unwrap(), "--max-steps", "1"]));
    ok(&xtask(&["stage1", "--config", s1.to_str().unwrap(), "--run-dir", run1b.to_str().unwrap(), "--resume"]));
    assert_eq!(losses(&run1b), full);

    // Stage 1 leaves the towers untouched; the saved model is the llava-hf layout.
    let model1 = run1.join("model/model.safetensors");
    let tower_llm = t.join("towers/llm/model.safetensors");
    assert_eq!(
        tensor(&model1, "language_model.model.layers.0.mlp.up_proj.weight"),
        tensor(&tower_llm, "model.layers.0.mlp.up_proj.weight")
    );
    assert_eq!(
        tensor(&model1, "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
        tensor(&t.join("towers/clip/model.safetensors"), "vision_model.encoder.layers.0.mlp.fc1.weight")
    );

    // Stage 2 starts from the stage-1 projector and trains the LLM.
    let s2 = recipe(t, "s2", "two", "v1", Some(&run1.join("mm_projector.safetensors")));
    let run2 = t.join("run2");
    let msg = err(&xtask(&["stage1", "--config", s2.to_str().unwrap()]));
    assert!(msg.contains("stage2"), "{msg}");
    ok(&xtask(&[
        "stage2",
        "--config",
        s2.to_str().unwrap(),
        "--run-dir",
        run2.to_str().unwrap(),
        "--set",
        "training.epochs=1",
    ]));
    assert_eq!(losses(&run2).len(), 2);
    let model2 = run2.join("model/model.safetensors");
    assert_ne!(
        tensor(&model2, "language_model.model.layers.0.mlp.up_proj.weight"),
        tensor(&tower_llm, "model.layers.0.mlp.up_proj.weight")
    );
    assert_eq!(
        tensor(&model2, "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
        tensor(&t.join("towers/clip/model.safetensors"), "vision_model.encoder.layers.0.mlp.fc1.weight")
    );
    // The trained model loads for inference.
    let loaded = load_dir::<B>(&run2.join("model"), &LoadOptions::default(), &Default::default()).unwrap();
    assert_eq!(loaded.config.projector.name(), "mlp2x_gelu");

    // Stage 2 with LoRA (dropout on): the reference's output folder, resumable bit-identically,
    // loadable unmerged, and merged by merge-lora into a model with the same logits.
    let lora =
        ["--set", "training.epochs=1", "--set", "lora.enable=true", "--set", "lora.r=4", "--set", "lora.alpha=8"];
    let run3 = t.join("run3");
    let stage2 = |run: &Path, extra: &[&str]| {
        let mut args = vec!["stage2", "--config", s2.to_str().unwrap(), "--run-dir", run.to_str().unwrap()];
        args.extend_from_slice(&lora);
        args.extend_from_slice(extra);
        ok(&xtask(&args));
    };
    stage2(&run3, &[]);
    let lora_losses = losses(&run3);
    assert_eq!(lora_losses.len(), 2);
    let run3b = t.join("run3b");
    stage2(&run3b, &["--max-steps", "1"]);
    stage2(&run3b, &["--resume"]);
    assert_eq!(losses(&run3b), lora_losses, "a resumed LoRA run continues bit-identically");
    let adapter = run3.join("model");
    for f in ["adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.bin", "config.json"] {
        assert!(adapter.join(f).is_file(), "{f}");
    }
    assert!(!adapter.join("model.safetensors").exists(), "the frozen base is not copied");
    let peft = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(
        (peft["peft_type"].as_str(), peft["r"].as_u64(), peft["lora_alpha"].as_f64()),
        (Some("LORA"), Some(4), Some(8.0))
    );
    let shape = |file: &Path, name: &str| WeightStore::open(file).unwrap().info(name).unwrap().shape.clone();
    let down = shape(&tower_llm, "model.layers.1.mlp.down_proj.weight"); // [hidden, intermediate]
    let adapter_file = adapter.join("adapter_model.safetensors");
    assert_eq!(shape(&adapter_file, "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"), [4, down[1]]);
    assert_eq!(shape(&adapter_file, "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"), [down[0], 4]);
    let unmerged = load_dir::<B>(&adapter, &LoadOptions::default(), &Default::default()).unwrap();
    assert!(unmerged.model.llm.has_lora());
    let merged_dir = t.join("merged");
    let msg =
        ok(&xtask(&["merge-lora", "--adapter", adapter.to_str().unwrap(), "--out", merged_dir.to_str().unwrap()]));
    assert!(msg.contains("merged 14 adapters"), "{msg}");
    let merged = load_dir::<B>(&merged_dir, &LoadOptions::default(), &Default::default()).unwrap();
    assert!(!merged.model.llm.has_lora());
    let ids = || burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_ints([[1, 5, 9, 200, 3]], &Default::default());
    let a = unmerged.model.llm.forward_ids(ids(), None);
    let vocab = a.dims()[2];
    let a = a.into_data().to_vec::<f32>().unwrap();
    // The llava-hf layout adds the `<image>` row to the vocabulary: compare the base's columns.
    let b =
        merged.model.llm.forward_ids(ids(), None).slice([0..1, 0..5, 0..vocab]).into_data().to_vec::<f32>().unwrap();
    let base = loaded.model.llm.forward_ids(ids(), None).into_data().to_vec::<f32>().unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs())), "merged = base + adapter");
    assert!(a.iter().zip(&base).any(|(x, y)| (x - y).abs() > 1e-4), "the adapters changed the model");
    assert_eq!(
        tensor(&merged_dir.join("model.safetensors"), "multi_modal_projector.linear_1.weight"),
        tensor(&adapter.join("non_lora_trainables.bin"), "base_model.model.model.mm_projector.0.weight"),
        "the projector trained beside the adapters is the merged model's"
    );
    // Generation runs on the unmerged folder.
    ok(&xtask(&["generate", "--model", adapter.to_str().unwrap(), "--prompt", "hello", "--max-new-tokens", "3"]));
}

/// Data-parallel stage 2 on the CPU (two replicas in threads of one process): the loss curve and
/// the saved model equal one device's with the same global batch; a replica that dies mid-run
/// ends it with an error naming the replica and the intact checkpoint, and the run resumes to
/// the uninterrupted result.
#[test]
fn two_replicas_train_as_one_device_and_a_dead_replica_leaves_a_resumable_run() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    ok(&xtask(&["demo-towers", "--out", t.join("towers").to_str().unwrap()]));
    let s1 = recipe(t, "p1", "one", "plain", None);
    let run1 = t.join("p1");
    ok(&xtask(&["stage1", "--config", s1.to_str().unwrap(), "--run-dir", run1.to_str().unwrap(), "--max-steps", "1"]));
    let s2 = recipe(t, "p2", "two", "v1", Some(&run1.join("mm_projector.safetensors")));
    let stage2 = |run: &Path, devices: &str, extra: &[&str]| {
        let devices = format!("training.devices={devices}");
        let mut args =
            vec!["stage2", "--config", s2.to_str().unwrap(), "--run-dir", run.to_str().unwrap(), "--set", &devices];
        args.extend_from_slice(extra);
        xtask(&args)
    };
    // Global batch 8 = 4 per device × (2 devices, or 1 device accumulating 2 micro-batches).
    let one = t.join("one");
    ok(&stage2(&one, "1", &[]));
    let two = t.join("two");
    ok(&stage2(&two, "2", &[]));
    let (expected, got) = (losses(&one), losses(&two));
    assert_eq!(got.len(), 4);
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
    }
    let weights = |run: &Path| {
        let file = run.join("model/model.safetensors");
        let mut all = tensor(&file, "multi_modal_projector.linear_1.weight");
        all.extend(tensor(&file, "language_model.model.layers.1.mlp.down_proj.weight"));
        all.extend(tensor(&file, "language_model.lm_head.weight"));
        all
    };
    let max = weights(&one).iter().zip(weights(&two)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max <= 1e-5, "the two-replica model differs by {max}");

    // Replica 1 dies at its third micro-step (step 3): the run stops there, naming it.
    let dead = t.join("dead");
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    let devices_two = "training.devices=2";
    command.args(["stage2", "--config", s2.to_str().unwrap(), "--run-dir", dead.to_str().unwrap()]);
    command.args(["--set", devices_two]).env("NO_COLOR", "1").env(llava_io::fault::KILL_AT, "replica:1:step@3");
    let msg = err(&command.output().unwrap());
    assert!(msg.contains("stopped at step 3") && msg.contains("replica 1"), "{msg}");
    assert!(msg.contains("checkpoint-2") && msg.contains("--resume"), "{msg}");
    assert_eq!(losses(&dead), got[..2].to_vec());
    ok(&stage2(&dead, "2", &["--resume"]));
    assert_eq!(losses(&dead), got, "the resumed run ends as the uninterrupted one");
    assert_eq!(weights(&dead), weights(&two));

    // Device names must be the backend's.
    let msg = err(&stage2(&t.join("named"), r#"["cuda:0","cuda:1"]"#, &["--backend", "cpu"]));
    assert!(msg.contains("`cuda:0` is not a device of the cpu backend"), "{msg}");
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn sqa_eval_scores_the_gpt3_cot_results_as_the_scienceqa_paper() {
    let tmp = tempfile::tempdir().unwrap();
    let f = repo().join("tests/fixtures/scienceqa/gpt3");
    let out = tmp.path().join("result.json");
    let table = ok(&xtask(&[
        "sqa-eval",
        "--problems",
        f.join("problems.json").to_str().unwrap(),
        "--splits",
        f.join("pid_splits.json").to_str().unwrap(),
        "--results",
        f.join("gpt3_cot_final_test_QCM-ALE_2_seed_3.json").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    // The ScienceQA paper's row for GPT-3 (CoT), Table 4.
    let paper = [
        ("NAT", 75.44),
        ("SOC", 70.87),
        ("LAN", 78.09),
        ("TXT", 74.68),
        ("IMG", 67.43),
        ("NO", 79.93),
        ("G1-6", 78.23),
        ("G7-12", 69.68),
        ("Avg", 75.17),
    ];
    let result = read_json(&out);
    for (column, value) in paper {
        assert_eq!(result["categories"][column].as_f64(), Some(value), "{column}");
    }
    assert_eq!(result["count"], 4241);
    assert!(table.contains("75.17") && table.contains("G7-12"), "{table}");
}

#[test]
fn sqa_eval_parses_answers_as_the_reference_script() {
    let tmp = tempfile::tempdir().unwrap();
    let f = repo().join("tests/fixtures/scienceqa");
    let out = tmp.path().join("result.json");
    let args = |fallback: &'static str, out: &Path| {
        xtask(&[
            "sqa-eval",
            "--problems",
            f.join("problems.json").to_str().unwrap(),
            "--splits",
            f.join("pid_splits.json").to_str().unwrap(),
            "--answers",
            f.join("eval/answers.jsonl").to_str().unwrap(),
            "--fallback",
            fallback,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    ok(&args("wrong", &out));
    let ours = read_json(&out);
    let reference = read_json(&f.join("eval/expected_result.json"));
    for key in ["acc", "correct", "count", "results", "outputs"] {
        assert_eq!(ours[key], reference[key], "{key}");
    }
    // Paper-era fallback: every -1 becomes a valid random choice; parsed answers stay.
    let out_random = tmp.path().join("random.json");
    ok(&args("random", &out_random));
    let random = read_json(&out_random);
    let problems = read_json(&f.join("problems.json"));
    for (pid, index) in reference["results"].as_object().unwrap() {
        let r = random["results"][pid].as_i64().unwrap();
        if index.as_i64() == Some(-1) {
            assert!((0..problems[pid]["choices"].as_array().unwrap().len() as i64).contains(&r));
        } else {
            assert_eq!(Some(r), index.as_i64());
        }
    }
    let msg = err(&xtask(&["sqa-eval", "--problems", "nope.json", "--splits", "x.json", "--results", "y.json"]));
    assert!(msg.contains("nope.json"), "{msg}");
}

/// Six demo questions (real demo-shapes pictures) in a LLaVA question file.
fn demo_questions(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("shapes");
    ok(&xtask(&["demo-data", "--out", data.to_str().unwrap()]));
    let all = read_json(&data.join("scienceqa/llava_test_CQM-A.json"));
    let mut six: Vec<serde_json::Value> = all.as_array().unwrap()[..5].to_vec();
    // And one text-only question.
    six.push(serde_json::json!({"id": "text-1", "conversations": [{"from": "human", "value": "Which is a colour?\nA. red\nB. run"}, {"from": "gpt", "value": "A"}]}));
    let questions = dir.join("questions.json");
    std::fs::write(&questions, serde_json::to_string(&six).unwrap()).unwrap();
    (questions, data.join("images"))
}

fn answers(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn sqa_predict_batched_equals_one_at_a_time_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = demo_model(t);
    let (questions, images) = demo_questions(t);
    let predict_args = |out: &Path, batch: &str, chunk: [&str; 2]| -> Vec<String> {
        [
            "sqa-predict",
            "--model",
            model.to_str().unwrap(),
            "--questions",
            questions.to_str().unwrap(),
            "--image-folder",
            images.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--single-pred-prompt",
            "--template",
            "vicuna_v1",
            "--batch-size",
            batch,
            "--max-new-tokens",
            "6",
            "--num-chunks",
            chunk[0],
            "--chunk-idx",
            chunk[1],
        ]
        .map(String::from)
        .to_vec()
    };
    let predict_chunk = |out: &Path, batch: &str, chunk: [&str; 2]| {
        let args = predict_args(out, batch, chunk);
        ok(&xtask(&args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let predict = |out: &Path, batch: &str| predict_chunk(out, batch, ["1", "0"]);
    let one = t.join("one.jsonl");
    let four = t.join("four.jsonl");
    predict(&one, "1");
    predict(&four, "4");
    let (a, b) = (answers(&one), answers(&four));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["question_id"], y["question_id"]);
        assert_eq!(x["text"], y["text"], "batched greedy output differs for {}", x["question_id"]);
        for key in ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"] {
            assert!(x.get(key).is_some(), "{key}");
        }
    }
    let prompt = a[0]["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("<image>\n")
            && prompt.ends_with("\nAnswer with the option's letter from the given choices directly."),
        "{prompt}"
    );
    assert!(!a[5]["prompt"].as_str().unwrap().contains("<image>"));

    // Killed after two answers and half a line: the resumed file equals the full one.
    let text = std::fs::read_to_string(&four).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let resumed = t.join("resumed.jsonl");
    std::fs::write(&resumed, format!("{}\n{}\n{}", lines[0], lines[1], &lines[2][..10])).unwrap();
    predict(&resumed, "4");
    let c = answers(&resumed);
    assert_eq!(c.len(), 6);
    for (x, y) in c.iter().zip(&b) {
        assert_eq!((&x["question_id"], &x["text"]), (&y["question_id"], &y["text"]));
    }
    assert_eq!(c[0]["answer_id"], b[0]["answer_id"], "written answers are kept, not redone");

    // Killed (SIGKILL) in the middle of writing its second answer: the resumed file holds every
    // answer once, each the uninterrupted run's.
    let killed = t.join("killed.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(predict_args(&killed, "1", ["1", "0"]))
        .env(llava_io::fault::KILL_AT, "append:killed.jsonl@2")
        .output()
        .unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(9), "killed by the kill point");
    let torn = std::fs::read_to_string(&killed).unwrap();
    assert_eq!(torn.matches('\n').count(), 1, "one whole answer and a torn one: {torn}");
    predict(&killed, "1");
    let d = answers(&killed);
    assert_eq!(d.len(), 6);
    for (x, y) in d.iter().zip(&a) {
        assert_eq!((&x["question_id"], &x["text"]), (&y["question_id"], &y["text"]));
    }

    // --num-chunks 2: chunk 0 answers the first three questions, chunk 1 the other three.
    let (first, second) = (t.join("chunk0.jsonl"), t.join("chunk1.jsonl"));
    predict_chunk(&first, "4", ["2", "0"]);
    predict_chunk(&second, "4", ["2", "1"]);
    let chunked: Vec<_> = answers(&first).into_iter().chain(answers(&second)).collect();
    assert_eq!(chunked.len(), 6);
    for (x, y) in chunked.iter().zip(&b) {
        assert_eq!((&x["question_id"], &x["text"]), (&y["question_id"], &y["text"]));
    }
    let bad = xtask(&[
        "sqa-predict",
        "--model",
        model.to_str().unwrap(),
        "--questions",
        questions.to_str().unwrap(),
        "--image-folder",
        images.to_str().unwrap(),
        "--out",
        t.join("bad.jsonl").to_str().unwrap(),
        "--num-chunks",
        "2",
        "--chunk-idx",
        "2",
    ]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--chunk-idx 2"));
}

#[test]
fn chat_streams_replies_from_piped_turns_with_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let run = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args([
                "chat",
                "--model",
                model.to_str().unwrap(),
                "--image",
                image().to_str().unwrap(),
                "--temperature",
                "0",
                "--max-new-tokens",
                "5",
            ])
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        ok(&child.wait_with_output().unwrap())
    };
    // The first reply is what `generate` gives for the templated prompt: the model directory is
    // named `model`, so the reference's rule picks llava_v0 ("###" separators, "###" stops).
    let prompt = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.###Human: <image>\nWhat is this?###Assistant:";
    let generated = ok(&xtask(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image().to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "5",
    ]));
    let first = generated.strip_suffix('\n').unwrap().split("###").next().unwrap().to_string();
    // After /reset the same first turn (with the image again) gives the same greedy reply;
    // /exit ends the session before the last line.
    let out = run("What is this?\n/reset\nWhat is this?\n/exit\nnever read\n");
    assert_eq!(out, format!("{first}\n{first}\n"));
    // A second turn continues the conversation.
    let out = run("What is this?\nAnd then?\n");
    assert!(out.starts_with(&format!("{first}\n")) && out.len() > first.len() + 1, "{out}");
}

#[test]
fn the_no_argument_demo_runs_both_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let path = |p: &str| t.join(p).to_str().unwrap().to_string();
    let set = |kv: String| kv;
    // The demo's recipes, shortened: 2 text-pretraining steps, 3 stage-1 steps, 2 stage-2 steps.
    let s1 = [
        "stage1",
        "--run-dir",
        &path("s1"),
        "--max-steps",
        "3",
        "--set",
        "text_pretrain.steps=2",
        "--set",
        &set(format!("model.vision_tower={}", path("towers/clip"))),
        "--set",
        &set(format!("model.llm={}", path("towers/llm"))),
    ];
    ok(&xtask(&s1));
    assert_eq!(losses(&t.join("s1")).len(), 3);
    let pretrained = t.join("s1/llm/model.safetensors");
    assert_ne!(
        tensor(&pretrained, "model.layers.0.mlp.up_proj.weight"),
        tensor(&t.join("towers/llm/model.safetensors"), "model.layers.0.mlp.up_proj.weight"),
        "stage 1's text pretraining trains the LLM before freezing it"
    );
    let s2 = |projector: String, run: String| {
        xtask(&[
            "stage2",
            "--run-dir",
            &run,
            "--max-steps",
            "2",
            "--set",
            "training.eval_steps=1",
            "--set",
            &format!("model.vision_tower={}", path("towers/clip")),
            "--set",
            &format!("model.llm={}", path("s1/llm")),
            "--set",
            &format!("model.pretrained_projector={projector}"),
        ])
    };
    ok(&s2(path("s1/mm_projector.safetensors"), path("s2")));
    let metrics = std::fs::read_to_string(t.join("s2/metrics.jsonl")).unwrap();
    let val: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(val.len(), 2);
    assert!(val.iter().all(|v| v.is_finite() && *v > 0.0));
    let msg = err(&s2(path("missing.safetensors"), path("s2b")));
    assert!(msg.contains("run `cargo xtask stage1` first"), "{msg}");
}

// ---- memory plans ---------------------------------------------------------------------------

/// The ratio plan/measured a run reports at its end (`memory: peak resident … plan/measured R`).
fn plan_ratio(out: &Output) -> f64 {
    assert!(out.status.success(), "xtask failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.contains("memory: peak resident")).unwrap_or_else(|| panic!("{stderr}"));
    line.rsplit("plan/measured ").next().unwrap().trim_end_matches(')').trim().parse().unwrap()
}

#[test]
fn the_memory_plan_is_within_15_percent_of_the_measured_peak() {
    // A mid-size model (an 88M-parameter LLM 768 wide, a 4-layer CLIP at 112 px): large enough
    // that weights, optimizer state and activations, not the process, make the peak.
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let towers = t.join("towers");
    ok(&xtask(&[
        "demo-towers",
        "--out",
        towers.to_str().unwrap(),
        "--llm-hidden",
        "768",
        "--llm-intermediate",
        "2048",
        "--llm-layers",
        "6",
        "--vision-hidden",
        "256",
        "--vision-layers",
        "4",
        "--image-size",
        "112",
    ]));
    // Every sample truncated to 72 positions (64 image tokens + text), 4 per micro-batch.
    let common = ["--set", "training.model_max_length=72", "--set", "training.per_device_batch_size=4"];
    let within = |ratio: f64, what: &str| assert!((0.85..=1.15).contains(&ratio), "{what}: plan/measured {ratio}");

    let s1 = recipe(t, "s1", "one", "plain", None);
    let run1 = t.join("run1");
    let mut args = vec!["stage1", "--config", s1.to_str().unwrap(), "--run-dir", run1.to_str().unwrap()];
    args.extend(common);
    args.extend(["--set", "training.bf16=true", "--max-steps", "2"]);
    within(plan_ratio(&xtask(&args)), "stage 1 (bf16)");

    let s2 = recipe(t, "s2", "two", "v1", Some(&run1.join("mm_projector.safetensors")));
    let run2 = t.join("run2");
    let mut args = vec!["stage2", "--config", s2.to_str().unwrap(), "--run-dir", run2.to_str().unwrap()];
    args.extend(common);
    args.extend(["--set", "training.bf16=false", "--max-steps", "2"]);
    within(plan_ratio(&xtask(&args)), "stage 2 (f32)");
    // `plan` prints the same plan as JSON, without loading anything.
    args[0] = "stage2";
    let mut plan_args = vec!["plan", "--json"];
    plan_args.extend(&args);
    let plan: serde_json::Value = serde_json::from_str(&ok(&xtask(&plan_args))).unwrap();
    let phases: Vec<&str> = plan["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(phases.contains(&"a training step") && phases.contains(&"writing a checkpoint"), "{plan:#}");
    assert!(plan["held"].as_array().unwrap().iter().any(|e| e["what"].as_str().unwrap().starts_with("AdamW")));
    assert_eq!(plan["fits"], true, "{plan:#}");

    let model = run2.join("model");
    let m = model.to_str().unwrap();
    let image = image();
    let generate = ["--model", m, "--image", image.to_str().unwrap(), "--prompt", PROMPT, "--max-new-tokens", "16"];
    within(plan_ratio(&xtask(&[&["generate"][..], &generate].concat())), "generate (f32)");
}

#[test]
fn runs_that_do_not_fit_are_refused_before_loading_and_a_failed_allocation_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let m = model.to_str().unwrap();
    // A limit below the plan's peak: refused with what does not fit and what would.
    let msg = err(&xtask(&["generate", "--model", m, "--prompt", "hi", "--memory-limit", "2MiB"]));
    assert!(msg.contains("does not fit") && msg.contains("LLM weights") && msg.contains("2.0 MiB"), "{msg}");
    // A KV cache of a trillion positions: refused by the plan, naming the cache.
    let huge = ["generate", "--model", m, "--prompt", "hi", "--max-new-tokens", "1000000000000"];
    let msg = err(&xtask(&huge));
    assert!(msg.contains("does not fit") && msg.contains("KV cache"), "{msg}");
    // Past the plan, the allocation itself fails: an error message and exit status, no abort.
    let out = xtask(&[&huge[..], &["--ignore-memory-plan"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(llava::oom::EXIT_CODE), "{stderr}");
    assert!(stderr.contains("error: out of memory: an allocation of"), "{stderr}");
    assert!(stderr.contains("failed while generating for 1 prompt(s)"), "what was being allocated: {stderr}");
    assert!(!stderr.contains("memory allocation of") && !stderr.contains("backtrace"), "{stderr}");
}

/// Runs `args` with the kill point `kill_at` armed (or killed after `after` by the test), and
/// checks that it died by SIGKILL.
fn killed_run(args: &[&str], kill_at: Option<&str>, after: Option<std::time::Duration>) {
    use std::os::unix::process::ExitStatusExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command.args(args).env("NO_COLOR", "1").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    if let Some(point) = kill_at {
        command.env(llava_io::fault::KILL_AT, point);
    }
    let mut child = command.spawn().unwrap();
    if let Some(after) = after {
        std::thread::sleep(after);
        let _ = child.kill(); // SIGKILL (it may have finished already: then nothing is killed)
    }
    let status = child.wait().unwrap();
    if kill_at.is_some() {
        assert_eq!(status.signal(), Some(9), "{kill_at:?} was reached");
    }
}

#[test]
fn runs_killed_at_any_moment_resume_to_bit_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    ok(&xtask(&["demo-towers", "--out", t.join("towers").to_str().unwrap()]));
    let recipe = recipe(t, "k", "one", "plain", None);
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["stage1", "--config", recipe.to_str().unwrap(), "--run-dir", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let straight = t.join("straight");
    let started = std::time::Instant::now();
    ok(&xtask(&run(&straight, &[]).iter().map(String::as_str).collect::<Vec<_>>()));
    let duration = started.elapsed();
    let outputs = ["mm_projector.safetensors", "model/model.safetensors", "model/config.json"];
    let expected: Vec<Vec<u8>> = outputs.iter().map(|f| std::fs::read(straight.join(f)).unwrap()).collect();
    let expected_losses = losses(&straight);

    // Killed inside each kind of write (named kill points), then at moments spread over the run.
    let points = [
        "write:config.toml",
        "append:metrics.jsonl@2",
        "commit:checkpoint-2:manifest",
        "commit:checkpoint-3:manifest",
        "write:mm_projector.safetensors",
        "commit:model:manifest",
        "write:loss.png",
    ];
    let timed = [0.25, 0.5, 0.75];
    for (case, (point, fraction)) in
        points.iter().map(|p| (Some(*p), None)).chain(timed.iter().map(|f| (None, Some(*f)))).enumerate()
    {
        let dir = t.join(format!("case{case}"));
        let args = run(&dir, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        killed_run(&args, point, fraction.map(|f: f64| duration.mul_f64(f)));
        let resume = run(&dir, &["--resume"]);
        ok(&xtask(&resume.iter().map(String::as_str).collect::<Vec<_>>()));
        assert_eq!(losses(&dir), expected_losses, "{point:?} {fraction:?}: the loss curve, no line lost or repeated");
        for (file, bytes) in outputs.iter().zip(&expected) {
            assert!(&std::fs::read(dir.join(file)).unwrap() == bytes, "{point:?} {fraction:?}: {file} differs");
        }
        llava_io::Manifest::verify(&dir.join("model")).unwrap();
    }

    // A resume with another recipe is refused, naming the difference; allowed when asked.
    let dir = t.join("case0");
    let changed = run(&dir, &["--resume", "--set", "training.learning_rate=2e-3"]);
    let msg = err(&xtask(&changed.iter().map(String::as_str).collect::<Vec<_>>()));
    assert!(msg.contains("training.learning_rate: 0.001 → 0.002") && msg.contains("--allow-config-change"), "{msg}");
    let allowed = run(&dir, &["--resume", "--allow-config-change", "--set", "training.learning_rate=2e-3"]);
    ok(&xtask(&allowed.iter().map(String::as_str).collect::<Vec<_>>()));
}

#[test]
fn bad_records_are_named_and_skipped_or_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    ok(&xtask(&["demo-towers", "--out", t.join("towers").to_str().unwrap()]));
    // The bundled samples, one with an image path that leaves the image folder and one whose
    // image is in two turns.
    let data = repo().join("datasets/lcs558k-sample");
    let mut records = read_json(&data.join("blip_laion_cc_sbu_16.json"));
    records[3]["image"] = "../../../etc/passwd".into();
    records[5]["conversations"][1]["value"] = "<image>\nand again".into();
    let bad_data = t.join("bad.json");
    std::fs::write(&bad_data, records.to_string()).unwrap();
    let recipe_path = recipe(t, "bad", "one", "plain", None);
    let text = std::fs::read_to_string(&recipe_path).unwrap();
    let original = data.join("blip_laion_cc_sbu_16.json");
    std::fs::write(&recipe_path, text.replace(original.to_str().unwrap(), bad_data.to_str().unwrap())).unwrap();
    let run = |dir: &str, extra: &[&str]| {
        let run_dir = t.join(dir);
        let mut a = vec!["stage1", "--config", recipe_path.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()];
        a.extend_from_slice(extra);
        xtask(&a)
    };
    // Skipped by default, each named.
    let out = run("skip", &["--max-steps", "2"]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    assert!(log.contains("record 3") && log.contains("climbs out of"), "{log}");
    assert!(log.contains("turns hold `<image>`"), "{log}");
    // `data.on_bad_record = "stop"`: the run ends with the first one.
    let msg = err(&run("stop", &["--set", "data.on_bad_record=\"stop\""]));
    assert!(msg.contains("bad.json") && msg.contains("record 3") && msg.contains("climbs out of"), "{msg}");
}

/// `cargo xtask quantize` writes a model that loads quantized without being asked (in every
/// format), generates what the model quantized at load generates, saves the same bytes again,
/// and is smaller than the float file; a damaged quantized tensor is an error naming it.
#[test]
fn quantize_saves_a_model_that_reloads_to_its_codes_and_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let img = image();
    let float_size = std::fs::metadata(model.join("model.safetensors")).unwrap().len();
    let generate = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--model", dir.to_str().unwrap(), "--image", img.to_str().unwrap()];
        args.extend(["--prompt", PROMPT, "--max-new-tokens", "6", "--temperature", "0"]);
        args.extend(extra);
        ok(&xtask(&args))
    };
    for format in ["q8", "q4", "nf4"] {
        let (a, b) = (tmp.path().join(format!("{format}-a")), tmp.path().join(format!("{format}-b")));
        let out = ok(&xtask(&[
            "quantize",
            "--model",
            model.to_str().unwrap(),
            "--quantize",
            format,
            "--out",
            a.to_str().unwrap(),
        ]));
        assert!(out.contains(&format!("LLM {format}")), "{out}");
        let config = read_json(&a.join("config.json"));
        assert_eq!(config["quantization_config"]["format"], format);
        let size = std::fs::metadata(a.join("model.safetensors")).unwrap().len();
        assert!(size < float_size, "{format}: {size} bytes, float {float_size}");
        // Loaded without --quantize: the tensors say what they are.
        let loaded = load_dir::<B>(&a, &LoadOptions::default(), &Default::default()).unwrap();
        assert_eq!(loaded.model.llm.quantization().map(|f| f.name()), Some(format));
        assert_eq!(generate(&a, &[]), generate(&model, &["--quantize", format]), "{format}: saved = quantized at load");
        // The saved model saved again: the same bytes.
        ok(&xtask(&["quantize", "--model", a.to_str().unwrap(), "--quantize", format, "--out", b.to_str().unwrap()]));
        assert!(
            std::fs::read(a.join("model.safetensors")).unwrap() == std::fs::read(b.join("model.safetensors")).unwrap(),
            "{format}: saving the reloaded model writes identical bytes"
        );
    }

    // --quantize-vision: the vision tower's encoder layers too, saved and reloaded as they are.
    let tower = tmp.path().join("q8-vision");
    let out = ok(&xtask(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--quantize",
        "q8",
        "--quantize-vision",
        "--out",
        tower.to_str().unwrap(),
    ]));
    assert!(out.contains("LLM q8, vision tower q8"), "{out}");
    let modules = read_json(&tower.join("config.json"))["quantization_config"]["modules"].clone();
    assert!(modules.as_str().unwrap().contains("vision tower"), "{modules}");
    let loaded = load_dir::<B>(&tower, &LoadOptions::default(), &Default::default()).unwrap();
    assert_eq!(loaded.model.vision.quantization().map(|f| f.name()), Some("q8"));
    assert_eq!(generate(&tower, &[]), generate(&model, &["--quantize", "q8", "--quantize-vision"]));
    let e = err(&xtask(&["generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "--quantize-vision"]));
    assert!(e.contains("--quantize"), "{e}");

    // One scale tensor cut short: the load names it.
    let saved = tmp.path().join("q8-a");
    let bytes = std::fs::read(saved.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let victim = "language_model.model.layers.0.self_attn.q_proj.weight_scale";
    let original = st.tensor(victim).unwrap();
    let shape = original.shape().to_vec();
    let cut = &original.data()[..original.data().len() - shape[1] * 2];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != victim).collect();
    views.push((
        victim.to_string(),
        safetensors::tensor::TensorView::new(original.dtype(), vec![shape[0] - 1, shape[1]], cut).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &saved.join("model.safetensors")).unwrap();
    let e = err(&xtask(&["generate", "--model", saved.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "2"]));
    assert!(e.contains(victim), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// Under `--quantize`, the plan offers `--quantize-vision` with the peak that flag's own plan
/// has; a saved model whose tower is quantized is planned as such (no flag needed, none offered).
#[test]
fn the_memory_plan_offers_and_detects_a_quantized_vision_tower() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let plan = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["plan", "--json", "generate", "--model", dir.to_str().unwrap(), "--prompt", "hi"];
        args.extend(extra);
        serde_json::from_str::<serde_json::Value>(&ok(&xtask(&args))).unwrap()
    };
    let offered = |plan: &serde_json::Value| {
        plan["alternatives"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["what"] == "--quantize-vision")
            .map(|a| a["peak"].clone())
    };
    let llm_only = plan(&model, &["--quantize", "q4"]);
    let with_tower = plan(&model, &["--quantize", "q4", "--quantize-vision"]);
    assert!(with_tower["peak"].as_u64().unwrap() < llm_only["peak"].as_u64().unwrap());
    assert_eq!(offered(&llm_only), Some(with_tower["peak"].clone()));
    assert_eq!(offered(&with_tower), None);
    let saved = tmp.path().join("q4-tower");
    ok(&xtask(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--quantize",
        "q4",
        "--quantize-vision",
        "--out",
        saved.to_str().unwrap(),
    ]));
    let saved_plan = plan(&saved, &[]);
    assert_eq!(saved_plan["peak"], with_tower["peak"]);
    assert_eq!(offered(&saved_plan), None);
}
