//! The memory plan of a training run ([`llava::plan`] for the vocabulary): what stage 1 or 2 holds
//! for its whole run (frozen towers in the run's weight dtype, the trainable parameters' f32
//! masters and AdamW moments, validation batches) and in each phase (loading, a training step
//! with its saved activations, gradients and loss, a checkpoint write, the final save).
//!
//! Sequences are planned at the longest the run's data gives (the longest texts tokenized and
//! templated, plus the image's tokens; at most `training.model_max_length`; a batch is padded to
//! its longest sample), with every text position supervised: the plan is the run's worst step.

use burn::tensor::DType;
use llava::LlavaConfig;
use llava::plan::{
    Capacity, MemoryPlan, PlanEntry, PlanPhase, RUNTIME_BYTES, dtype_bytes, dtype_name, parameter_counts,
};

use crate::Stage;
use crate::config::RunConfig;

/// What shapes a training plan: the recipe's model and batch, and the dtype the run holds its
/// weights in ([`crate::run::weights_dtype`]).
#[derive(Debug, Clone)]
pub struct TrainingShape {
    pub stage: Stage,
    pub micro_batch: usize,
    pub accumulation: usize,
    pub sequence: usize,
    pub weights: DType,
    pub gradient_checkpointing: bool,
    /// Validation samples, preprocessed once and held (their pixels).
    pub validation_samples: usize,
    /// Text pretraining of the LLM before stage 1 (the demo's): batch size.
    pub text_pretrain_batch: Option<usize>,
    /// The towers' stored dtypes (a conversion at load reads each tensor's bytes first).
    pub stored: llava::load::PartDtypes,
    /// The CPU backend ([`llava_kernels::half_products_widen`]): activations are f32 and the
    /// products of trained half-precision weights compute through f32 copies.
    pub widened_products: bool,
    /// LoRA: the adapters' rank and the frozen LLM's format (`None`: the run's float dtype).
    pub lora: Option<(usize, Option<llava::QuantFormat>)>,
    /// Quantized layers dequantize again in the backward pass instead of keeping a float copy
    /// ([`llava_kernels::quantized_backward_recomputes`]); set by the caller, `false` here.
    pub quantized_backward_recomputes: bool,
    /// LoRA: the modules trained whole beside the adapters (`modules_to_save`), counted as
    /// trainable f32 parameters (their frozen copies stay in the LLM's entry).
    pub lora_modules_to_save: Vec<String>,
}

impl TrainingShape {
    /// The shape `cfg` asks for, with weights in `weights`.
    pub fn from_recipe(
        cfg: &RunConfig, weights: DType, validation_samples: usize, stored: llava::load::PartDtypes,
        widened_products: bool,
    ) -> Result<Self, String> {
        let lora = match cfg.lora_enabled() {
            Some(l) => Some((l.r, l.quantize()?)),
            None => None,
        };
        Ok(Self {
            stage: cfg.stage,
            micro_batch: cfg.training.per_device_batch_size.max(1),
            accumulation: cfg.gradient_accumulation_steps(cfg.world_size().unwrap_or(1)).max(1),
            sequence: cfg.training.model_max_length,
            weights,
            gradient_checkpointing: cfg.training.gradient_checkpointing,
            validation_samples,
            text_pretrain_batch: cfg.text_pretrain.as_ref().map(|p| p.batch_size),
            stored,
            widened_products,
            lora,
            quantized_backward_recomputes: false,
            lora_modules_to_save: cfg.lora_enabled().map(|l| l.modules_to_save.clone()).unwrap_or_default(),
        })
    }
}

/// Activations one LLM layer keeps for the backward pass over `tokens` positions of `rows`
/// sequences: the residual stream and both normed inputs, q/k/v and their rotated copies, the
/// attention's probabilities (f32) and context, the MLP's gate, up and product. Under gradient
/// checkpointing the element-wise results are recomputed instead (the inputs of the matrix
/// products stay); with `frozen` weights (stage 1) the products' inputs are not kept at all.
pub fn llm_layer_saved(
    config: &LlavaConfig, rows: usize, tokens: usize, act: DType, checkpointing: bool, frozen: bool,
) -> u64 {
    let t = &config.text;
    let n = (rows * tokens) as u64;
    let a = dtype_bytes(act);
    let (d, inter) = (t.hidden_size as u64, t.intermediate_size as u64);
    let q = (t.num_attention_heads * t.head_dim()) as u64;
    let kv = (t.num_kv_heads() * t.head_dim()) as u64;
    let probs = (rows * t.num_attention_heads * tokens * tokens) as u64 * 4;
    let per_token = match (frozen, checkpointing) {
        // Frozen weights need no weight gradients, so the products keep no inputs: only the norms'
        // inputs, the attention's q/k/v and the MLP's gate and up stay.
        (true, _) => 2 * d + q + 2 * kv + 2 * inter,
        (false, true) => 2 * d + 2 * q + 2 * kv + 2 * inter,
        (false, false) => 4 * d + 3 * q + 3 * kv + 3 * inter,
    };
    n * a * per_token + probs
}

/// The plan of a training run of `config` shaped as `shape`.
pub fn training_plan(
    config: &LlavaConfig, shape: &TrainingShape, device: impl Into<String>, capacity: Option<Capacity>,
) -> MemoryPlan {
    let (vision, projector, llm) = parameter_counts(config);
    let w = shape.weights;
    let wb = dtype_bytes(w);
    let mixed = w != DType::F32;
    let lora_params = shape.lora.map_or(0, |(r, _)| {
        llava_llm::lora::lora_parameters(
            &config.text,
            &llava_llm::LoraConfig { r, ..llava_llm::LoraConfig::reference() },
        )
    });
    let embedding_params = (config.text.vocab_size * config.text.hidden_size) as u64;
    let lora_params = lora_params
        + shape
            .lora_modules_to_save
            .iter()
            .filter(|m| m.as_str() == "embed_tokens" || !config.text.tie_word_embeddings)
            .count() as u64
            * embedding_params;
    let full_llm = shape.stage == Stage::Two && shape.lora.is_none();
    let trainable = projector + lora_params + if full_llm { llm } else { 0 };
    let rows = shape.micro_batch;
    let images = rows; // one image per sample, the LLaVA datasets' case
    let tokens = shape.sequence;
    let n = (rows * tokens) as u64;
    // Image positions are never supervised (their labels are -100).
    let supervised = (rows * tokens.saturating_sub(config.image_tokens())) as u64;
    // Flex computes in f32 whatever the weights (`llava_kernels::activation_dtype`).
    let act = if shape.widened_products { DType::F32 } else { w };
    let a = dtype_bytes(act);
    let t = &config.text;
    let (d, inter, vocab) = (t.hidden_size as u64, t.intermediate_size as u64, t.vocab_size as u64);

    let mut held = vec![
        PlanEntry::new("process (code, thread pools, tokenizer)", RUNTIME_BYTES),
        PlanEntry::new(
            format!("vision tower, frozen ({} parameters, {})", llava::plan::count(vision), dtype_name(w)),
            vision * wb,
        ),
    ];
    match (shape.lora, full_llm) {
        (Some((r, Some(format))), _) => {
            let (linear, head) = llava::plan::quantizable_parameters(config);
            let bits =
                |params: u64, format: llava::QuantFormat| (params as f64 * format.bits_per_weight() / 8.0) as u64;
            held.push(PlanEntry::new(
                format!("LLM linear layers, frozen ({} parameters, {format})", llava::plan::count(linear)),
                bits(linear, format),
            ));
            held.push(PlanEntry::new(
                format!("LM head, frozen ({} parameters, q8)", llava::plan::count(head)),
                bits(head, llava::QuantFormat::Q8),
            ));
            held.push(PlanEntry::new(
                format!("LLM embeddings and norms, frozen ({})", dtype_name(w)),
                (llm - linear - head) * wb,
            ));
            held.push(lora_entry(r, lora_params));
        }
        (Some((r, None)), _) => {
            held.push(PlanEntry::new(
                format!("LLM, frozen ({} parameters, {})", llava::plan::count(llm), dtype_name(w)),
                llm * wb,
            ));
            held.push(lora_entry(r, lora_params));
        }
        (None, false) => held.push(PlanEntry::new(
            format!("LLM, frozen ({} parameters, {})", llava::plan::count(llm), dtype_name(w)),
            llm * wb,
        )),
        (None, true) => {
            held.push(PlanEntry::new(format!("LLM, trainable ({} parameters, f32)", llava::plan::count(llm)), llm * 4))
        }
    }
    held.push(PlanEntry::new(
        format!("projector, trainable ({} parameters, f32)", llava::plan::count(projector)),
        projector * 4,
    ));
    held.push(PlanEntry::new(
        format!("AdamW moments of the {} trainable parameters (2 × f32)", llava::plan::count(trainable)),
        trainable * 8,
    ));
    let v = &config.vision;
    let pixels_per_image = (v.num_channels * v.image_size * v.image_size) as u64 * 4;
    if shape.validation_samples > 0 {
        held.push(PlanEntry::new(
            format!("validation batches ({} samples' pixels)", shape.validation_samples),
            shape.validation_samples as u64 * pixels_per_image,
        ));
    }

    let mut loading = vec![PlanEntry::new(
        "the largest tensor's bytes while they are converted",
        llava::plan::load_buffer_bytes(config, shape.stored.llm, w),
    )];
    if mixed && full_llm {
        loading.push(PlanEntry::new(
            format!("the LLM as loaded ({}), until its f32 masters exist", dtype_name(w)),
            llm * wb,
        ));
    }
    let mut phases = vec![PlanPhase::new("loading", loading)];

    let layers = t.num_hidden_layers as u64;
    // LoRA keeps the products' inputs (its adapters need them), as full training does.
    let frozen_llm = shape.stage == Stage::One && shape.lora.is_none();
    let saved = layers * llm_layer_saved(config, rows, tokens, act, shape.gradient_checkpointing, frozen_llm);
    let patches = (config.image_tokens() * images) as u64;
    let vision_out = patches * (v.hidden_size as u64 + 2 * d * config.projector.depth() as u64) * a;
    let mut step = vec![
        PlanEntry::new(
            format!(
                "activations kept for the backward pass ({rows} × {tokens} tokens{})",
                if shape.gradient_checkpointing { ", gradient checkpointing" } else { "" }
            ),
            saved + vision_out + n * d * a * 2,
        ),
        PlanEntry::new(
            "activation gradients of one layer (f32)".to_string(),
            n * 4 * (2 * d + 3 * inter) + (rows * t.num_attention_heads * tokens * tokens) as u64 * 4,
        ),
        PlanEntry::new("logits and their gradient on supervised positions (f32)", supervised * vocab * 4 * 2),
        PlanEntry::new("vision tower activations (no gradient)", llava::plan::vision_activations(config, images, act)),
        PlanEntry::new("parameter gradients (f32)", trainable * 4),
    ];
    if let Some((_, Some(format))) = shape.lora {
        if shape.quantized_backward_recomputes {
            // Autodiff<Flex>: each layer's weight is dequantized again for its input gradient,
            // one layer at a time, in f32.
            let t = &config.text;
            let largest = (t.intermediate_size * t.hidden_size).max(t.hidden_size * t.hidden_size) as u64;
            step.push(PlanEntry::new(
                format!("one {format} layer dequantized for its backward product (f32)"),
                largest * 4,
            ));
        } else {
            // Measured (7B, nf4, bf16) before the custom backward: the autodiff graph keeps each
            // layer's dequantized weight (Burn's dequantize + matmul), the whole base again.
            let (linear, head) = llava::plan::quantizable_parameters(config);
            step.push(PlanEntry::new(
                format!("{format} layers dequantized for the products, kept for the backward pass ({})", dtype_name(w)),
                (linear + head) * wb,
            ));
        }
    }
    if mixed {
        step.push(PlanEntry::new(
            format!("the trainable parameters cast to {} for the forward pass", dtype_name(w)),
            trainable * wb,
        ));
    }
    if mixed && shape.widened_products {
        // Measured on Flex: the LM head's product (and its gradient's) through an f32 copy.
        step.push(PlanEntry::new(
            "f32 copies of the largest matrix for half-precision products (CPU)",
            2 * llava::plan::largest_matrix(config) * 4,
        ));
    }
    phases.push(PlanPhase::new("a training step", step));
    phases.push(PlanPhase::new(
        "writing a checkpoint",
        vec![PlanEntry::new("the trainable parameters' record (f32 values)", trainable * 4)],
    ));
    // Saving writes one tensor at a time, read out of the module or the frozen source. The
    // llava-hf layout grows the embedding and the LM head by the `<image>` row: trainable ones are
    // held padded until written; frozen ones stay in their source (read once for the mean row).
    let embed = (t.vocab_size * t.hidden_size) as u64 * 4;
    let mut save =
        vec![PlanEntry::new("the tensor being read or written (f32)", llava::plan::largest_matrix(config) * 4)];
    if full_llm {
        save.push(PlanEntry::new("the embedding and LM head padded for `<image>` (f32)", 2 * embed));
    }
    phases.push(PlanPhase::new("saving the model", save));
    if let (Stage::One, Some(batch)) = (shape.stage, shape.text_pretrain_batch) {
        let rows = batch.max(1);
        let n = (rows * tokens) as u64;
        phases.push(PlanPhase::new(
            "text pretraining of the LLM",
            vec![
                PlanEntry::new("the LLM's f32 masters, gradients and AdamW moments", llm * (4 + 4 + 8)),
                PlanEntry::new(
                    format!("activations ({rows} × {tokens} tokens)"),
                    layers * llm_layer_saved(config, rows, tokens, DType::F32, shape.gradient_checkpointing, false)
                        + n * vocab * 4 * 2,
                ),
            ],
        ));
    }
    let stage = match shape.stage {
        Stage::One => 1,
        Stage::Two => 2,
    };
    MemoryPlan {
        run: format!(
            "stage {stage}{} (micro-batch {rows} × {tokens} tokens, weights {}{})",
            match shape.lora {
                Some((r, Some(format))) => format!(", QLoRA r {r} on a {format} base"),
                Some((r, None)) => format!(", LoRA r {r}"),
                None => String::new(),
            },
            dtype_name(w),
            if shape.gradient_checkpointing { ", gradient checkpointing" } else { "" }
        ),
        device: device.into(),
        held,
        phases,
        capacity,
    }
}

fn lora_entry(r: usize, params: u64) -> PlanEntry {
    PlanEntry::new(
        format!("LoRA adapters, trainable (r {r}, {} parameters, f32)", llava::plan::count(params)),
        params * 4,
    )
}

/// What a user could change to make a run fit, each with its plan's peak: gradient checkpointing,
/// smaller micro-batches (the same global batch, more accumulation), bf16 weights.
pub fn alternatives(config: &LlavaConfig, shape: &TrainingShape, bf16_supported: bool) -> Vec<(String, u64)> {
    let peak = |s: &TrainingShape| training_plan(config, s, "", None).peak();
    let mut out = Vec::new();
    if !shape.gradient_checkpointing {
        let s = TrainingShape { gradient_checkpointing: true, ..shape.clone() };
        out.push(("--set training.gradient_checkpointing=true".to_string(), peak(&s)));
    }
    let mut micro = shape.micro_batch / 2;
    while micro >= 1 {
        let s = TrainingShape { micro_batch: micro, ..shape.clone() };
        out.push((format!("--set training.per_device_batch_size={micro}"), peak(&s)));
        micro /= 2;
    }
    if shape.weights == DType::F32 && bf16_supported {
        let s = TrainingShape { weights: DType::BF16, ..shape.clone() };
        out.push(("--set training.bf16=true".to_string(), peak(&s)));
    }
    out
}

#[cfg(test)]
mod tests {
    use llava::SelectFeature;
    use llava_data::image::AspectMode;
    use llava_llm::LlamaConfig;
    use llava_projector::ProjectorKind;
    use llava_vision_encoder::ClipVisionConfig;

    use super::*;

    fn llava_7b() -> LlavaConfig {
        LlavaConfig {
            vision: ClipVisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                image_size: 336,
                patch_size: 14,
                ..Default::default()
            },
            text: LlamaConfig {
                hidden_size: 4096,
                intermediate_size: 11008,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                ..Default::default()
            },
            projector: ProjectorKind::MlpGelu { depth: 2 },
            select_layer: -2,
            select_feature: SelectFeature::Patch,
            image_aspect: AspectMode::Pad,
            max_length: 2048,
        }
    }

    fn shape(lora: Option<(usize, Option<llava::QuantFormat>)>) -> TrainingShape {
        TrainingShape {
            stage: Stage::Two,
            micro_batch: 1,
            accumulation: 1,
            sequence: 662,
            weights: DType::BF16,
            gradient_checkpointing: true,
            validation_samples: 0,
            text_pretrain_batch: None,
            stored: llava::load::PartDtypes { vision: Some(DType::F16), projector: None, llm: Some(DType::F16) },
            widened_products: true,
            lora,
            quantized_backward_recomputes: false,
            lora_modules_to_save: Vec::new(),
        }
    }

    fn entry(plan: &MemoryPlan, phase: Option<&str>, starts: &str) -> Option<u64> {
        let entries = match phase {
            None => &plan.held,
            Some(name) => &plan.phases.iter().find(|p| p.name == name).unwrap().entries,
        };
        entries.iter().find(|e| e.what.starts_with(starts)).map(|e| e.bytes)
    }

    /// LoRA holds the base frozen (no f32 masters, no moments for it), the adapters' f32 values
    /// and moments; QLoRA holds the base's linear layers in 4.5 bits but, during a step, their
    /// dequantized copies in the compute dtype (measured at 7B: the autodiff graph keeps them).
    #[test]
    fn lora_and_qlora_plans_count_what_they_hold() {
        let config = llava_7b();
        let plan = |lora| training_plan(&config, &shape(lora), "test", None);
        let (full, lora, qlora) =
            (plan(None), plan(Some((128, None))), plan(Some((128, Some(llava::QuantFormat::Nf4)))));
        let adapters = llava_llm::lora::lora_parameters(&config.text, &llava_llm::LoraConfig::reference());
        assert_eq!(entry(&lora, None, "LoRA adapters"), Some(adapters * 4));
        assert_eq!(entry(&lora, None, "LLM, frozen"), Some(config.text.num_parameters() * 2));
        assert!(entry(&lora, Some("loading"), "the LLM as loaded").is_none(), "no f32 masters of the base");
        let (linear, head) = llava::plan::quantizable_parameters(&config);
        let dequantized = entry(&qlora, Some("a training step"), "nf4 layers dequantized");
        assert_eq!(dequantized, Some((linear + head) * 2));
        assert!(entry(&lora, Some("a training step"), "nf4 layers dequantized").is_none());
        // Where the backward pass dequantizes again (the CPU backend), one layer at a time.
        let recomputing =
            TrainingShape { quantized_backward_recomputes: true, ..shape(Some((128, Some(llava::QuantFormat::Nf4)))) };
        let qlora_cpu = training_plan(&config, &recomputing, "test", None);
        assert!(entry(&qlora_cpu, Some("a training step"), "nf4 layers dequantized").is_none());
        let t = &config.text;
        let one = entry(&qlora_cpu, Some("a training step"), "one nf4 layer dequantized");
        assert_eq!(one, Some((t.intermediate_size * t.hidden_size * 4) as u64));
        assert!(qlora_cpu.peak() < qlora.peak());
        let held = |p: &MemoryPlan| p.held.iter().map(|e| e.bytes).sum::<u64>();
        assert!(held(&qlora) < held(&lora) && held(&lora) < held(&full));
        assert!(lora.peak() < full.peak());
    }
}
