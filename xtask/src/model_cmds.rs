//! `forward` and `generate`: run a checkpoint from a local directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::DType;
use burn::tensor::backend::Backend;
use clap::Args;
use llava::backend::BackendKind;
use llava::generate::{GenerationConfig, SamplingConfig, generate as run_generation};
use llava::load::{LoadOptions, LoadedLlava, ModelParts, WeightsDtype, load_dir, resolve_dir};
use llava::plan::{GenerationShape, MemoryPlan, PlanDtypes, generation_plan, held_dtypes};
use llava::{PaddingSide, SelectFeature};
use llava_checkpoint::{Exporter, SaveDtype};
use llava_data::image::AspectMode;
use llava_kernels::QuantFormat;

/// Where the model comes from.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A llava-hf, original-LLaVA or plain LLaMA checkpoint directory.
    #[arg(long, required_unless_present = "llm")]
    pub model: Option<PathBuf>,
    /// Separate parts: a CLIP directory (with --llm and --projector instead of --model).
    #[arg(long, requires_all = ["llm", "projector"], conflicts_with = "model")]
    pub clip: Option<PathBuf>,
    /// Separate parts: a LLaMA/Vicuna directory.
    #[arg(long, requires_all = ["clip", "projector"])]
    pub llm: Option<PathBuf>,
    /// Separate parts: the projector weights (mm_projector.bin or .safetensors).
    #[arg(long, requires_all = ["clip", "llm"])]
    pub projector: Option<PathBuf>,
    /// Vision-tower layer for separate parts (Python-style index).
    #[arg(long, default_value_t = -2, allow_hyphen_values = true)]
    pub select_layer: i64,
    /// CLIP directory to use instead of the one the checkpoint's `mm_vision_tower` names.
    #[arg(long)]
    pub vision_tower: Option<PathBuf>,
    /// Hugging Face hub cache to look `mm_vision_tower` up in (default: the usual cache).
    #[arg(long)]
    pub hf_cache: Option<PathBuf>,
    /// Image aspect mode: crop (square) or pad; default from the checkpoint.
    #[arg(long)]
    pub image_aspect: Option<AspectMode>,
    /// cpu, wgpu or cuda (when compiled in).
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// Dtype the weights are held in: auto (as stored: an f16/bf16 checkpoint stays half
    /// precision), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: WeightsDtype,
    /// Quantize the LLM's linear layers as they load: q8 (int8 blocks), q4 (4-bit blocks) or
    /// nf4 (4-bit NormalFloat). A model saved by `cargo xtask quantize` loads quantized anyway.
    #[arg(long, value_name = "FORMAT")]
    pub quantize: Option<QuantFormat>,
    /// Quantize the vision tower's encoder layers too, in --quantize's format (the reference's
    /// --load-4bit/--load-8bit quantize the tower as well).
    #[arg(long, requires = "quantize")]
    pub quantize_vision: bool,
    /// A LoRA folder's base LLM directory (default: its adapter_config.json's
    /// base_model_name_or_path). --model DIR then names the LoRA folder.
    #[arg(long, value_name = "DIR")]
    pub lora_base: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// The memory check before a run loads anything.
#[derive(Args, Debug, Clone, Default)]
pub struct MemoryArgs {
    /// The memory the run may use (e.g. 24GiB): checked against the run's memory plan instead of
    /// the memory available now (the CPU) or nothing (GPU backends, whose memory Burn does not report).
    #[arg(long, value_parser = llava::plan::parse_bytes, value_name = "SIZE")]
    pub memory_limit: Option<u64>,
    /// Start even when the memory plan says the run does not fit.
    #[arg(long)]
    pub ignore_memory_plan: bool,
}

impl MemoryArgs {
    /// The capacity to check a plan against (`None`: no check).
    pub fn capacity(&self, backend: BackendKind) -> Option<llava::plan::Capacity> {
        if self.ignore_memory_plan { None } else { llava::plan::capacity(backend, self.memory_limit) }
    }
}

/// Batch and lengths of a generation, decided from the model's configuration.
pub type ShapeFor<'a> = &'a dyn Fn(&llava::LlavaConfig) -> GenerationShape;

impl ModelArgs {
    /// A checkpoint directory with every other option at its default.
    pub fn for_dir(dir: &Path, backend: BackendKind) -> Self {
        Self {
            model: Some(dir.to_path_buf()),
            clip: None,
            llm: None,
            projector: None,
            select_layer: -2,
            vision_tower: None,
            hf_cache: None,
            image_aspect: None,
            backend,
            dtype: WeightsDtype::default(),
            quantize: None,
            quantize_vision: false,
            lora_base: None,
            memory: MemoryArgs::default(),
        }
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            vision_tower: self.vision_tower.clone(),
            hf_cache: self.hf_cache.clone(),
            image_aspect: self.image_aspect,
            dtype: self.dtype.0,
            quantize: self.quantize,
            quantize_vision: self.quantize_vision,
            lora_base: self.lora_base.clone(),
        }
    }

    /// The model as separate parts (`--clip`, `--llm`, `--projector`), when given so.
    fn parts(&self) -> Option<ModelParts> {
        let (None, Some(clip), Some(llm), Some(projector)) = (&self.model, &self.clip, &self.llm, &self.projector)
        else {
            return None;
        };
        Some(ModelParts {
            clip_dir: clip.clone(),
            llm_dir: llm.clone(),
            projector_file: projector.clone(),
            select_layer: self.select_layer,
            select_feature: SelectFeature::Patch,
            image_aspect: self.image_aspect.unwrap_or_default(),
        })
    }

    /// The memory plan of a generation with this model (configs and checkpoint headers only),
    /// and what would change it: the other weight dtypes, and a smaller batch where `batch_flag`
    /// names the option that sets it.
    pub fn plan<B: Backend>(
        &self, device: &B::Device, shape: ShapeFor<'_>, batch_flag: Option<&str>,
    ) -> Result<(MemoryPlan, Vec<(String, u64)>)> {
        let (config, stored, has_vision, saved_quantized, maps_embeddings) = match (&self.model, self.parts()) {
            (Some(dir), _) => {
                let source =
                    resolve_dir(dir, &self.load_options()).with_context(|| format!("reading {}", dir.display()))?;
                let stored = source.stored_dtypes();
                let saved = (source.stored_quantization(), source.stored_vision_quantization().is_some());
                let maps = source.maps_input_embeddings();
                (source.config, stored, source.has_vision, saved, maps)
            }
            (None, Some(parts)) => {
                let (config, stored) = parts.describe()?;
                (config, stored, true, (None, false), false)
            }
            _ => bail!("give --model DIR, or --clip DIR --llm DIR --projector FILE"),
        };
        let shape = shape(&config);
        let (saved_quantized, saved_vision_quantized) = saved_quantized;
        let quantize = saved_quantized.or(self.quantize);
        let quantize_vision = saved_vision_quantized || self.quantize_vision;
        let plan_with_quantized = |dtype: Option<DType>, quantize, vision, shape: GenerationShape, capacity| {
            let held = held_dtypes::<B>(stored, dtype, device);
            let act = llava_kernels::activation_dtype::<B>(held.llm);
            generation_plan(
                &config,
                has_vision,
                // Host memory maps matter to the CPU's plan only (GPU backends copy the weights).
                PlanDtypes {
                    stored,
                    held,
                    activations: act,
                    quantize,
                    quantize_vision: vision,
                    embeddings_mapped: maps_embeddings && self.backend == BackendKind::Cpu,
                },
                shape,
                B::name(device),
                capacity,
            )
        };
        let plan_with = |dtype, shape, capacity| plan_with_quantized(dtype, quantize, quantize_vision, shape, capacity);
        let plan = plan_with(self.dtype.0, shape, self.memory.capacity(self.backend));
        let current = held_dtypes::<B>(stored, self.dtype.0, device).llm;
        let mut alternatives = Vec::new();
        for (flag, dtype) in [("--dtype f16", DType::F16), ("--dtype bf16", DType::BF16)] {
            let held = held_dtypes::<B>(stored, Some(dtype), device);
            if held.llm == dtype && dtype != current {
                alternatives.push((flag.to_string(), plan_with(Some(dtype), shape, None).peak()));
            }
        }
        if quantize.is_none() {
            for format in [QuantFormat::Q8, QuantFormat::Q4] {
                alternatives.push((
                    format!("--quantize {format}"),
                    plan_with_quantized(self.dtype.0, Some(format), false, shape, None).peak(),
                ));
            }
        } else if has_vision && !quantize_vision {
            alternatives.push((
                "--quantize-vision".to_string(),
                plan_with_quantized(self.dtype.0, quantize, true, shape, None).peak(),
            ));
        }
        if let Some(flag) = batch_flag {
            let mut batch = shape.batch / 2;
            while batch >= 1 {
                let smaller = GenerationShape { batch, ..shape };
                alternatives.push((format!("{flag} {batch}"), plan_with(self.dtype.0, smaller, None).peak()));
                batch /= 2;
            }
        }
        Ok((plan, alternatives))
    }

    /// Loads the model after its memory plan is checked (refused with a message naming what
    /// does not fit and what would, unless `--ignore-memory-plan`); returns the plan too.
    pub fn load_planned<B: Backend>(
        &self, device: &B::Device, shape: ShapeFor<'_>, batch_flag: Option<&str>,
    ) -> Result<(LoadedLlava<B>, MemoryPlan)> {
        let (plan, alternatives) = self.plan::<B>(device, shape, batch_flag)?;
        tracing::info!("memory plan: peak {} ({})", llava::plan::human(plan.peak()), plan.run);
        plan.check(&alternatives)?;
        Ok((self.load(device)?, plan))
    }

    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<LoadedLlava<B>> {
        let start = Instant::now();
        let loaded = match (&self.model, self.parts()) {
            (Some(dir), _) => load_dir::<B>(dir, &self.load_options(), device)
                .with_context(|| format!("loading {}", dir.display()))?,
            (None, Some(parts)) => parts.load::<B>(&self.load_options(), device)?,
            _ => bail!("give --model DIR, or --clip DIR --llm DIR --projector FILE"),
        };
        tracing::info!(
            "loaded {:?} checkpoint in {:.1}s: vision {} layers, projector {}, LLM {} layers × {} (vocab {})",
            loaded.layout,
            start.elapsed().as_secs_f32(),
            loaded.config.vision.num_hidden_layers,
            loaded.config.projector.name(),
            loaded.config.text.num_hidden_layers,
            loaded.config.text.hidden_size,
            loaded.config.text.vocab_size,
        );
        Ok(loaded)
    }
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image file; the prompt's `<image>` marks where it goes.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Raw prompt text (BOS is added).
    #[arg(long, allow_hyphen_values = true)]
    pub prompt: String,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn forward(args: ForwardArgs) -> Result<()> {
    llava::with_backend!(args.model.backend, forward_on(&args))
}

fn forward_on<B: Backend>(device: &B::Device, args: &ForwardArgs) -> Result<()> {
    let loaded = args.model.load::<B>(device)?;
    let (ids, pixels) = loaded.prompt_inputs(&args.prompt, args.image.as_deref())?;
    let model = &loaded.model;
    let mut e = Exporter::new();
    let features = pixels.as_ref().map(|p| model.encode_images(p.clone()));
    if let (Some(f), Some(p)) = (&features, &pixels) {
        let [_, t, dv] = f.vision.dims();
        let [_, _, d] = f.projected.dims();
        e.tensor("vision_features", &f.vision.clone().reshape([t, dv]));
        e.tensor("image_features", &f.projected.clone().reshape([t, d]));
        let [_, c, h, w] = p.dims();
        e.tensor("pixel_values", &p.clone().reshape([c, h, w]));
    }
    let batch = model.splice(&[ids], None, features.map(|f| f.projected), None, PaddingSide::Right);
    let logits = model.forward(&batch);
    let [_, len, vocab] = logits.dims();
    e.tensor("logits", &logits.reshape([len, vocab]));
    e.save(&args.out, SaveDtype::F32, &[])?;
    tracing::info!("wrote {} ({len} tokens after splicing, vocab {vocab})", args.out.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Raw prompt text (BOS is added; empty = start from BOS alone).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed: args.seed }
        .validate()
        .map_err(anyhow::Error::msg)?;
    llava::with_backend!(args.model.backend, generate_on(&args))
}

impl GenerateArgs {
    /// The shape of this generation: one prompt (its tokens bounded by its bytes + BOS).
    pub fn shape(&self) -> GenerationShape {
        GenerationShape {
            command: "generate",
            batch: 1,
            text_tokens: self.prompt.replace(llava_data::DEFAULT_IMAGE_TOKEN, "").len() + 1,
            images: usize::from(self.image.is_some()),
            max_new_tokens: self.max_new_tokens,
        }
    }
}

fn generate_on<B: Backend>(device: &B::Device, args: &GenerateArgs) -> Result<()> {
    let (loaded, plan) = args.model.load_planned::<B>(device, &|_| args.shape(), None)?;
    let (ids, pixels) = loaded.prompt_inputs(&args.prompt, args.image.as_deref())?;
    let tokenizer = loaded.tokenizer.as_ref().expect("checked by prompt_inputs");
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingConfig { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
        eos_ids: loaded.eos_ids(),
    };
    let prompt_len = ids.len();
    let mut stream = tokenizer.stream(true);
    let stdout = std::io::stdout();
    let start = Instant::now();
    let mut count = 0usize;
    let mut write_error = None;
    run_generation(&loaded.model, &[ids], pixels, &config, |_, token| {
        count += 1;
        let piece = stream.push(token);
        let mut out = stdout.lock();
        if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
            write_error = Some(e);
            return false;
        }
        true
    });
    if let Some(e) = write_error {
        return Err(e).context("writing to standard output");
    }
    println!();
    let secs = start.elapsed().as_secs_f64();
    tracing::info!(
        "{count} new tokens after a {prompt_len}-token prompt in {secs:.2}s ({:.1} tokens/s)",
        count as f64 / secs.max(1e-9)
    );
    if let Some(line) = llava::plan::peak_report(&plan) {
        tracing::info!("{line}");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The model to read (any supported checkpoint, in any float dtype) and `--quantize FORMAT`.
    #[command(flatten)]
    pub model: ModelArgs,
    /// The folder to write: the same layout as the input's (llava-hf for an MLP projector),
    /// the LLM's linear layers (and with --quantize-vision the vision tower's) as quantized
    /// tensors, everything else as loaded.
    #[arg(long)]
    pub out: PathBuf,
}

/// `cargo xtask quantize`: quantize once, save, and load the result in seconds afterwards.
pub fn quantize(args: QuantizeArgs) -> Result<()> {
    if args.model.quantize.is_none() {
        bail!("give --quantize q8, q4 or nf4");
    }
    llava::with_backend!(args.model.backend, quantize_on(&args))
}

fn quantize_on<B: Backend>(device: &B::Device, args: &QuantizeArgs) -> Result<()> {
    let loaded = args.model.load::<B>(device)?;
    let tokenizer_dir = match (&args.model.model, &args.model.llm) {
        (Some(dir), _) | (None, Some(dir)) => dir.clone(),
        _ => bail!("give --model DIR, or --clip DIR --llm DIR --projector FILE"),
    };
    let start = Instant::now();
    if loaded.has_vision {
        llava::save::save_model(
            &loaded.model,
            &loaded.config,
            &args.out,
            &tokenizer_dir,
            &llava::save::FrozenSources::default(),
        )
    } else {
        llava::save::save_llm(&loaded.model, &loaded.config, &args.out, &tokenizer_dir)
    }
    .with_context(|| format!("writing {}", args.out.display()))?;
    let bytes: u64 = std::fs::read_dir(&args.out)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    println!(
        "wrote {} ({}, LLM {}, vision tower {}) in {:.1}s",
        args.out.display(),
        llava::plan::human(bytes),
        loaded.model.llm.quantization().map_or("float", |f| f.name()),
        loaded.model.vision.quantization().map_or("float", |f| f.name()),
        start.elapsed().as_secs_f32()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct MergeLoraArgs {
    /// A LoRA folder (stage 2 with lora.enable, or the reference's finetune_lora.sh output).
    #[arg(long)]
    pub adapter: PathBuf,
    /// The base LLM directory (default: the adapter's base_model_name_or_path).
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// The merged model's folder (llava-hf for an MLP projector, the original layout for a
    /// linear one), weights in the base's dtype.
    #[arg(long)]
    pub out: PathBuf,
}

/// `cargo xtask merge-lora`: the reference's `merge_lora_weights.py` (W + B·A·α/r folded into
/// each adapted layer, in f32, stored in the base weight's dtype).
pub fn merge_lora(args: MergeLoraArgs) -> Result<()> {
    let device = Default::default();
    let options = LoadOptions { lora_base: args.base.clone(), ..Default::default() };
    let start = Instant::now();
    let mut loaded = load_dir::<llava::backend::Cpu>(&args.adapter, &options, &device)
        .with_context(|| format!("loading {}", args.adapter.display()))?;
    let adapters = loaded.model.llm.projections().iter().filter(|(_, p)| p.lora.is_some()).count();
    if adapters == 0 {
        bail!("{}: no LoRA adapter found", args.adapter.display());
    }
    loaded.model.llm = loaded.model.llm.merge_lora()?;
    llava::save::save_model(
        &loaded.model,
        &loaded.config,
        &args.out,
        &args.adapter,
        &llava::save::FrozenSources::default(),
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "merged {adapters} adapters of {} into {} in {:.1}s",
        args.adapter.display(),
        args.out.display(),
        start.elapsed().as_secs_f32()
    );
    Ok(())
}
