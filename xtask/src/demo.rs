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

/// The bundled demo end to end: write the demo checkpoint if missing, then run `forward` and
/// `generate` on a bundled photo.
pub fn demo() -> Result<()> {
    let root = repo_root();
    let model_dir = root.join("runs/demo-model");
    if !model_dir.join("config.json").is_file() {
        write_demo_model(&model_dir, 42)?;
    }
    let image = root.join("datasets/demo-images/extreme_ironing.jpg");
    let prompt = "USER: <image>\nWhat is unusual about this image? ASSISTANT:".to_string();
    let model = crate::model_cmds::ModelArgs {
        model: Some(model_dir.clone()),
        clip: None,
        llm: None,
        projector: None,
        select_layer: -2,
        vision_tower: None,
        hf_cache: None,
        image_aspect: None,
        backend: Default::default(),
    };
    let out = model_dir.join("forward.safetensors");
    crate::model_cmds::forward(crate::model_cmds::ForwardArgs {
        model: model.clone(),
        image: Some(image.clone()),
        prompt: prompt.clone(),
        out: out.clone(),
    })?;
    crate::model_cmds::generate(crate::model_cmds::GenerateArgs {
        model,
        image: Some(image),
        prompt,
        max_new_tokens: 16,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    })?;
    tracing::info!("the weights are random, so the text above is noise; see README for real checkpoints");
    Ok(())
}
