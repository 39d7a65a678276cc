//! `demo-model` and `demo`: a tiny randomly initialised LLaVA, written as a llava-hf checkpoint
//! directory with the bundled LLaMA tokenizer, so every command can be tried on a fresh clone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use llava::LlavaConfig;
use llava::backend::Cpu;
use llava::model::SelectFeature;
use llava_data::image::AspectMode;
use llava_llm::LlamaConfig;
use llava_projector::ProjectorKind;
use llava_vision_encoder::ClipVisionConfig;

/// The repository root (xtask lives one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent").to_path_buf()
}

/// A small LLaVA: CLIP-architecture tower (56 px, patch 14 → 16 image tokens) and a
/// LLaMA-architecture decoder with the real 32,000-token LLaMA vocabulary.
pub fn demo_config() -> LlavaConfig {
    LlavaConfig {
        vision: ClipVisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            image_size: 56,
            patch_size: 14,
            ..Default::default()
        },
        text: LlamaConfig {
            vocab_size: 32000,
            hidden_size: 64,
            intermediate_size: 172,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 512,
            rms_norm_eps: 1e-5,
            pad_token_id: Some(0),
            ..Default::default()
        },
        projector: ProjectorKind::MlpGelu { depth: 2 },
        select_layer: -2,
        select_feature: SelectFeature::Patch,
        image_aspect: AspectMode::Crop,
        max_length: 512,
    }
}

#[derive(Args, Debug)]
pub struct DemoModelArgs {
    /// Output directory.
    #[arg(long, default_value = "runs/demo-model")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Writes the demo checkpoint (llava-hf layout, f32 safetensors, tokenizer.model).
pub fn write_demo_model(out: &Path, seed: u64) -> Result<()> {
    let device = Default::default();
    Cpu::seed(&device, seed);
    let config = demo_config();
    let model = config.init::<Cpu>(&device);
    let tokenizer_dir = repo_root().join("datasets/tokenizers/llama");
    llava::save::save_model(&model, &config, out, &tokenizer_dir).with_context(|| format!("writing {}", out.display()))?;
    tracing::info!("wrote a random demo LLaVA checkpoint to {}", out.display());
    Ok(())
}

pub fn demo_model(args: DemoModelArgs) -> Result<()> {
    write_demo_model(&args.out, args.seed)
}

/// The bundled demo end to end, with no arguments: stage 1 and stage 2 on the synthetic shapes
/// dataset (`cargo xtask stage1`, `cargo xtask stage2`), the held-out ScienceQA-style evaluation
/// with real and with blank pictures (`cargo xtask demo-sqa`), and one answer streamed by
/// `generate` about a held-out picture.
pub fn demo() -> Result<()> {
    let demo_args = || crate::train_cmds::StageArgs {
        config: None,
        overrides: Vec::new(),
        resume: false,
        max_steps: None,
        run_dir: None,
        backend: llava::backend::BackendKind::fastest(),
    };
    crate::train_cmds::stage(demo_args(), llava_trainer::Stage::One)?;
    crate::train_cmds::stage(demo_args(), llava_trainer::Stage::Two)?;
    crate::eval_cmds::demo_sqa(crate::eval_cmds::DemoSqaArgs {
        model: PathBuf::from("runs/demo-stage2/model"),
        split: "test".into(),
        batch_size: 16,
        backend: Default::default(),
    })?;
    let root = repo_root();
    let questions = root.join(crate::train_cmds::DEMO_DATA).join("scienceqa/llava_test_CQM-A.json");
    let first: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&questions)?)?;
    let image = root.join(crate::train_cmds::DEMO_DATA).join("images").join(first[0]["image"].as_str().context("image")?);
    let prompt = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, \
                  and polite answers to the user's questions. USER: <image>\nDescribe the image briefly. ASSISTANT:";
    eprintln!("{}: \"Describe the image briefly.\"", image.display());
    crate::model_cmds::generate(crate::model_cmds::GenerateArgs {
        model: crate::model_cmds::ModelArgs::for_dir(&root.join("runs/demo-stage2/model"), Default::default()),
        image: Some(image),
        prompt: prompt.into(),
        max_new_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    })
}
