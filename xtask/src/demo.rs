//! The bundled demo's commands (`demo`, `demo-model`, `demo-data`, `demo-towers`, `demo-sqa`):
//! argument parsing around `llava_demo`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use llava::backend::BackendKind;
use llava_demo::{DemoPaths, shapes::ShapesConfig};
use llava_trainer::Stage;

#[derive(Args, Debug)]
pub struct DemoModelArgs {
    /// Output directory (default: runs/demo-model in the checkout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Writes the random demo checkpoint (llava-hf layout, f32 safetensors, tokenizer.model).
pub fn demo_model(args: DemoModelArgs, root: &Path) -> Result<()> {
    let paths = DemoPaths::new(root);
    let out = args.out.unwrap_or_else(|| paths.runs().join("demo-model"));
    Ok(llava_demo::write_demo_model(&out, &paths.tokenizer(), args.seed)?)
}

#[derive(Args, Debug)]
pub struct DemoDataArgs {
    /// Output directory (default: datasets/demo-shapes in the checkout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = ShapesConfig::default().seed)]
    pub seed: u64,
}

/// (Re)generates the demo's synthetic shapes dataset, deterministically from the seed.
pub fn demo_data(args: DemoDataArgs, root: &Path) -> Result<()> {
    let out = args.out.unwrap_or_else(|| DemoPaths::new(root).data());
    Ok(llava_demo::write_demo_data(&out, args.seed)?)
}

#[derive(Args, Debug)]
pub struct DemoTowersArgs {
    /// Output directory: writes `clip/` (CLIPVisionModel) and `llm/` (LlamaForCausalLM +
    /// tokenizer); default runs/demo-towers in the checkout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Other sizes than the demo's (for memory and speed measurements): the LLM's width.
    #[arg(long)]
    pub llm_hidden: Option<usize>,
    #[arg(long)]
    pub llm_intermediate: Option<usize>,
    #[arg(long)]
    pub llm_layers: Option<usize>,
    #[arg(long)]
    pub vision_hidden: Option<usize>,
    #[arg(long)]
    pub vision_layers: Option<usize>,
    /// The vision tower's image size (a multiple of its patch size, 14).
    #[arg(long)]
    pub image_size: Option<usize>,
}

/// The demo's towers (or towers of other sizes), randomly initialised, as Hugging Face directories.
pub fn demo_towers(args: DemoTowersArgs, root: &Path) -> Result<()> {
    let paths = DemoPaths::new(root);
    let out = args.out.clone().unwrap_or_else(|| paths.runs().join("demo-towers"));
    let mut config = llava_demo::demo_config();
    let text = &mut config.text;
    text.hidden_size = args.llm_hidden.unwrap_or(text.hidden_size);
    text.intermediate_size = args.llm_intermediate.unwrap_or(text.intermediate_size);
    text.num_hidden_layers = args.llm_layers.unwrap_or(text.num_hidden_layers);
    let vision = &mut config.vision;
    vision.hidden_size = args.vision_hidden.unwrap_or(vision.hidden_size);
    vision.intermediate_size = 2 * vision.hidden_size;
    vision.num_hidden_layers = args.vision_layers.unwrap_or(vision.num_hidden_layers);
    vision.image_size = args.image_size.unwrap_or(vision.image_size);
    config.validate().map_err(|reason| anyhow::anyhow!("demo-towers: {reason}"))?;
    Ok(llava_demo::write_towers(&config, &out.join("clip"), &out.join("llm"), &paths.tokenizer(), args.seed)?)
}

#[derive(Args, Debug)]
pub struct DemoSqaArgs {
    /// The stage-2 model (default: the demo's, runs/demo-stage2/model in the checkout).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// Quantize the LLM's linear layers (q8, q4, nf4) as the model loads.
    #[arg(long)]
    pub quantize: Option<llava_kernels::QuantFormat>,
    /// Quantize the vision tower's encoder layers too, in --quantize's format.
    #[arg(long, requires = "quantize")]
    pub quantize_vision: bool,
}

/// Predicts and scores the demo's held-out questions, with real and with blank pictures.
pub fn demo_sqa(args: DemoSqaArgs, root: &Path) -> Result<()> {
    let paths = DemoPaths::new(root);
    let model = args.model.clone().unwrap_or_else(|| paths.stage2_model());
    let (results, chance) = llava::with_backend!(args.backend, demo_sqa_on(&paths, &model, &args))?;
    for r in results {
        let res = &r.result;
        eprintln!("ScienceQA-style {} split, {}:", args.split, r.label);
        let img = res.img_acc.map(|a| format!(", IMG-Accuracy: {a:.2}%")).unwrap_or_default();
        eprintln!("Total: {}, Correct: {}, Accuracy: {:.2}%{img}", res.count, res.correct, res.acc);
        println!("{}", llava_eval::score::format_table(res));
        tracing::info!(
            "held-out accuracy with {}: {:.2}% ({}/{}); chance {chance:.2}%",
            r.label,
            res.acc,
            res.correct,
            res.count
        );
    }
    Ok(())
}

fn demo_sqa_on<B: burn::tensor::backend::Backend>(
    device: &B::Device, paths: &DemoPaths, model: &Path, args: &DemoSqaArgs,
) -> Result<(Vec<llava_demo::DemoAccuracy>, f64)> {
    let load = llava::load::LoadOptions {
        quantize: args.quantize,
        quantize_vision: args.quantize_vision,
        ..Default::default()
    };
    Ok(llava_demo::demo_sqa::<B>(paths, model, &args.split, args.batch_size, &load, device)?)
}

/// The bundled demo end to end, with no arguments: stage 1 and stage 2 on the synthetic shapes
/// dataset (`cargo xtask stage1`, `cargo xtask stage2`), the held-out ScienceQA-style evaluation
/// with real and with blank pictures (`cargo xtask demo-sqa`), and one answer streamed by
/// `generate` about a held-out picture.
pub fn demo(root: &Path) -> Result<()> {
    let demo_args = || crate::train_cmds::StageArgs {
        config: None,
        overrides: Vec::new(),
        resume: false,
        allow_config_change: false,
        max_steps: None,
        run_dir: None,
        backend: BackendKind::fastest(),
        memory: Default::default(),
    };
    crate::train_cmds::stage(demo_args(), Stage::One, root)?;
    crate::train_cmds::stage(demo_args(), Stage::Two, root)?;
    demo_sqa(
        DemoSqaArgs {
            model: None,
            split: "test".into(),
            batch_size: 16,
            backend: Default::default(),
            quantize: None,
            quantize_vision: false,
        },
        root,
    )?;
    let paths = DemoPaths::new(root);
    let (image, prompt) = llava_demo::describe_prompt(&paths)?;
    eprintln!("{}: \"Describe the image briefly.\"", image.display());
    crate::model_cmds::generate(crate::model_cmds::GenerateArgs {
        model: crate::model_cmds::ModelArgs::for_dir(&paths.stage2_model(), Default::default()),
        image: Some(image),
        prompt,
        max_new_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    })
}
