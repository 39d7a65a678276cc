//! Memory plans: what a run will hold, before anything is loaded.
//!
//! A plan is a list of what is held for the whole run (weights, optimizer state, the process
//! itself) and of phases that come and go one after another (loading, encoding the images,
//! prefill and decode; a training step, a checkpoint write, the final save). Its peak is the held
//! total plus the largest phase. Sizes come from the configs and the checkpoint headers alone (no
//! weight is read), with the shapes this implementation allocates: parameter counts are exact
//! (tested against the modules), activations are the tensors alive at the largest point of each
//! phase, and the process baseline is a measured constant ([`RUNTIME_BYTES`]).
//!
//! [`MemoryPlan::check`] compares the peak with the device's capacity ([`cpu_capacity`] on the
//! CPU: the memory available now, or the cgroup's limit; a limit the user gives elsewhere, as
//! Burn 0.21 reports no device memory) and refuses with a message naming what does not fit and
//! what would.

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use llava_kernels::QuantFormat;
use serde::Serialize;

use crate::LlavaConfig;
use crate::backend::BackendKind;
use crate::load::PartDtypes;

/// The resident memory of the process before any model exists: code, the thread pools, the
/// allocator's arenas, the tokenizer. Measured as the peak RSS of `generate` on the demo model
/// (xtask, Flex, 2 threads: 40.0 MiB with 16.6 MiB of weights and under 1 MiB of activations).
pub const RUNTIME_BYTES: u64 = 24 << 20;

/// One thing a run holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanEntry {
    pub what: String,
    pub bytes: u64,
}

impl PlanEntry {
    pub fn new(what: impl Into<String>, bytes: u64) -> Self {
        Self { what: what.into(), bytes }
    }
}

/// Memory that exists only during one part of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanPhase {
    pub name: String,
    pub entries: Vec<PlanEntry>,
}

impl PlanPhase {
    pub fn new(name: impl Into<String>, entries: Vec<PlanEntry>) -> Self {
        Self { name: name.into(), entries }
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }
}

/// How much memory the device has for the run, and where that figure comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capacity {
    pub bytes: u64,
    pub source: String,
}

/// What a run will hold on one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    /// What the run is (`generate`, `stage 1`, …).
    pub run: String,
    /// The device, in words.
    pub device: String,
    /// Held for the whole run.
    pub held: Vec<PlanEntry>,
    /// One at a time, on top of `held`.
    pub phases: Vec<PlanPhase>,
    /// `None` where the device's memory is unknown.
    pub capacity: Option<Capacity>,
}

/// A run that does not fit, with what would.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DoesNotFit {
    pub message: String,
    pub peak: u64,
    pub capacity: u64,
}

impl MemoryPlan {
    pub fn held_bytes(&self) -> u64 {
        self.held.iter().map(|e| e.bytes).sum()
    }

    /// The phase with the most memory.
    pub fn peak_phase(&self) -> Option<&PlanPhase> {
        self.phases.iter().max_by_key(|p| p.bytes())
    }

    /// The most the run holds at any time.
    pub fn peak(&self) -> u64 {
        self.held_bytes() + self.peak_phase().map_or(0, PlanPhase::bytes)
    }

    /// `Ok` when the peak fits the capacity (or the capacity is unknown). `alternatives` are
    /// what the caller could change, each with the peak it would have; those that fit are named
    /// in the message.
    pub fn check(&self, alternatives: &[(String, u64)]) -> Result<(), DoesNotFit> {
        let Some(capacity) = &self.capacity else { return Ok(()) };
        let peak = self.peak();
        if peak <= capacity.bytes {
            return Ok(());
        }
        let mut largest: Vec<&PlanEntry> =
            self.held.iter().chain(self.peak_phase().into_iter().flat_map(|p| &p.entries)).collect();
        largest.sort_by_key(|e| std::cmp::Reverse(e.bytes));
        let parts: Vec<String> = largest.iter().take(3).map(|e| format!("{} {}", e.what, human(e.bytes))).collect();
        let fitting: Vec<String> = alternatives
            .iter()
            .filter(|(_, p)| *p <= capacity.bytes)
            .map(|(what, p)| format!("{what} (peak {})", human(*p)))
            .collect();
        let advice = if fitting.is_empty() {
            "nothing this command can change fits: use a machine with more memory, or quantized weights".to_string()
        } else {
            format!("what would fit: {}", fitting.join("; "))
        };
        Err(DoesNotFit {
            message: format!(
                "{} does not fit {}: it needs about {} at its peak ({}: largest {}), the device has {} ({}); {advice}. \
                 `cargo xtask plan` with the same arguments prints the whole plan; --memory-limit sets another capacity",
                self.run,
                self.device,
                human(peak),
                self.peak_phase().map_or("held", |p| p.name.as_str()),
                parts.join(", "),
                human(capacity.bytes),
                capacity.source,
            ),
            peak,
            capacity: capacity.bytes,
        })
    }

    /// The plan as a table.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "memory plan: {} on {}", self.run, self.device);
        let _ = writeln!(out, "  held for the whole run:");
        for e in &self.held {
            let _ = writeln!(out, "    {:>10}  {}", human(e.bytes), e.what);
        }
        let _ = writeln!(out, "    {:>10}  total", human(self.held_bytes()));
        let peak_name = self.peak_phase().map(|p| p.name.clone());
        for phase in &self.phases {
            let mark = if Some(&phase.name) == peak_name.as_ref() { "  <- peak" } else { "" };
            let _ = writeln!(out, "  while {} (+{}){mark}:", phase.name, human(phase.bytes()));
            for e in &phase.entries {
                let _ = writeln!(out, "    {:>10}  {}", human(e.bytes), e.what);
            }
        }
        let _ = writeln!(out, "  peak: {}", human(self.peak()));
        match &self.capacity {
            Some(c) => {
                let verdict = if self.peak() <= c.bytes { "fits" } else { "does NOT fit" };
                let _ = writeln!(out, "  capacity: {} ({}): {verdict}", human(c.bytes), c.source);
            }
            None => {
                let _ = writeln!(out, "  capacity: unknown on this device (give one with --memory-limit)");
            }
        }
        out
    }
}

/// One line for the end of a run: the measured peak next to the plan's.
pub fn peak_report(plan: &MemoryPlan) -> Option<String> {
    let measured = peak_resident_bytes()?;
    Some(format!(
        "memory: peak resident {} (plan {}, plan/measured {:.2})",
        human(measured),
        human(plan.peak()),
        plan.peak() as f64 / measured as f64
    ))
}

/// Logs (at debug level) the resident memory now and at its peak so far, at a named point of a
/// run: how a plan's phases are checked against the process.
pub fn log_resident(at: &str) {
    // Called once per training step: read /proc only when the line will be printed.
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    if let (Some(now), Some(peak)) = (resident_bytes(), peak_resident_bytes()) {
        tracing::debug!("resident {at}: {} (peak so far {})", human(now), human(peak));
    }
}

/// Bytes as `12.3 GiB` / `456.7 MiB`.
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Parses `24GiB`, `24G`, `1500MiB`, `1.5 GB` (binary units either way) or a byte count.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a size (e.g. 24GiB, 1500MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("`{text}`: unknown unit (B, KiB, MiB, GiB, TiB)")),
    };
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("`{text}`: a size must be positive"));
    }
    Ok((value * scale as f64) as u64)
}

/// Bytes per element.
pub fn dtype_bytes(dtype: DType) -> u64 {
    dtype.size() as u64
}

/// Lowercase name of a float dtype (`f16`, `bf16`, `f32`).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// The memory this process may still take on the CPU: `MemAvailable` of `/proc/meminfo` plus
/// what the process already holds, or the cgroup's limit when that is lower. `None` off Linux.
pub fn cpu_capacity() -> Option<Capacity> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib << 10)
    };
    let available = field("MemAvailable:")?;
    let own = resident_bytes().unwrap_or(0);
    let mut capacity = Capacity { bytes: available + own, source: "MemAvailable in /proc/meminfo".into() };
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(limit) = cgroup
        && limit < capacity.bytes
    {
        capacity = Capacity { bytes: limit, source: "the cgroup's memory.max".into() };
    }
    Some(capacity)
}

/// The capacity a run on `backend` is checked against: `limit` when given (`--memory-limit`),
/// else the CPU's ([`cpu_capacity`]); unknown on the GPU backends (Burn 0.21 reports no device
/// memory), where only a given limit is checked.
pub fn capacity(backend: BackendKind, limit: Option<u64>) -> Option<Capacity> {
    match (limit, backend) {
        (Some(bytes), _) => Some(Capacity { bytes, source: "--memory-limit".into() }),
        (None, BackendKind::Cpu) => cpu_capacity(),
        (None, _) => None,
    }
}

/// The dtype each part will be held in: the one asked for, else the stored one; f32 where the
/// backend cannot hold it (as the loader decides).
pub fn held_dtypes<B: Backend>(stored: PartDtypes, requested: Option<DType>, device: &B::Device) -> HeldDtypes {
    let pick = |stored: Option<DType>| {
        let wanted = requested.or(stored).unwrap_or(DType::F32);
        if B::supports_dtype(device, wanted) { wanted } else { DType::F32 }
    };
    HeldDtypes { vision: pick(stored.vision), projector: pick(stored.projector), llm: pick(stored.llm) }
}

/// Resident memory of this process now (`VmRSS`), on Linux.
pub fn resident_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

/// The most this process has been resident so far (`VmHWM`), on Linux.
pub fn peak_resident_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib << 10)
}

/// The dtype each part's weights are held in during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldDtypes {
    pub vision: DType,
    pub projector: DType,
    pub llm: DType,
}

/// The dtypes a plan needs: as stored, as held, and the activations'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanDtypes {
    pub stored: PartDtypes,
    pub held: HeldDtypes,
    pub activations: DType,
    /// The LLM's linear layers quantized (see [`crate::LoadOptions::quantize`]).
    pub quantize: Option<QuantFormat>,
    /// The vision tower's encoder layers quantized too, in `quantize`'s format (see
    /// [`crate::LoadOptions::quantize_vision`]).
    pub quantize_vision: bool,
    /// The LLM's input embedding table is a memory map of its file in host memory (held as
    /// stored, on the CPU; see `ModelSource::maps_input_embeddings`): generation reads only its
    /// tokens' rows, so an untied table is not counted as resident.
    pub embeddings_mapped: bool,
}

/// Parameter counts of each part.
pub fn parameter_counts(config: &LlavaConfig) -> (u64, u64, u64) {
    (config.vision.num_parameters(), config.projector_config().num_parameters(), config.text.num_parameters())
}

/// The weights of each part, as plan entries (`has_vision: false`: a text-only model, whose
/// placeholder tower is a few bytes).
///
/// With `quantize`, the decoder's linear layers are held in that format and an untied LM head in
/// q8 (as [`llava_llm::LlamaModel::load_quantized`] holds them); the rest of the LLM in its dtype.
/// With `vision_quantize`, the vision tower's encoder layers likewise
/// ([`llava_vision_encoder::ClipVisionModel::load_quantized`]).
pub fn weight_entries(
    config: &LlavaConfig, held: HeldDtypes, has_vision: bool, quantize: Option<QuantFormat>,
    vision_quantize: Option<QuantFormat>,
) -> Vec<PlanEntry> {
    let (vision, projector, llm) = parameter_counts(config);
    let bits = |params: u64, format: QuantFormat| (params as f64 * format.bits_per_weight() / 8.0) as u64;
    let mut entries = Vec::new();
    if has_vision {
        match vision_quantize {
            None => entries.push(weights("vision tower", vision, held.vision)),
            Some(format) => {
                let linear = quantizable_vision_parameters(config);
                entries.push(PlanEntry::new(
                    format!("vision tower linear layers ({} parameters, {format})", count(linear)),
                    bits(linear, format),
                ));
                entries.push(weights("vision tower embeddings and norms", vision - linear, held.vision));
            }
        }
        entries.push(weights("projector", projector, held.projector));
    }
    match quantize {
        None => entries.push(weights("LLM", llm, held.llm)),
        Some(format) => {
            let (linear, head) = quantizable_parameters(config);
            entries.push(PlanEntry::new(
                format!("LLM linear layers ({} parameters, {format})", count(linear)),
                bits(linear, format),
            ));
            if head > 0 {
                entries.push(PlanEntry::new(
                    format!("LM head ({} parameters, q8)", count(head)),
                    bits(head, QuantFormat::Q8),
                ));
            }
            entries.push(weights("LLM embeddings and norms", llm - linear - head, held.llm));
        }
    }
    entries
}

/// Parameters of the decoder's linear layers (weights only; biases stay float), and of the LM
/// head when it is not tied to the embeddings (0 when tied).
pub fn quantizable_parameters(config: &LlavaConfig) -> (u64, u64) {
    let t = &config.text;
    let (d, inter) = (t.hidden_size as u64, t.intermediate_size as u64);
    let q = (t.num_attention_heads * t.head_dim()) as u64;
    let kv = (t.num_key_value_heads.unwrap_or(t.num_attention_heads) * t.head_dim()) as u64;
    let per_layer =
        block_sized(d, d * q + 2 * d * kv + 2 * d * inter) + block_sized(q, q * d) + block_sized(inter, inter * d);
    let head = if t.tie_word_embeddings { 0 } else { block_sized(d, t.vocab_size as u64 * d) };
    (per_layer * t.num_hidden_layers as u64, head)
}

/// Parameters of the vision tower's encoder-layer linear layers (weights only; biases stay
/// float), those whose input width is a multiple of the block.
pub fn quantizable_vision_parameters(config: &LlavaConfig) -> u64 {
    let v = &config.vision;
    let (d, inter) = (v.hidden_size as u64, v.intermediate_size as u64);
    (block_sized(d, 4 * d * d + d * inter) + block_sized(inter, inter * d)) * v.num_hidden_layers as u64
}

/// `params` of matrices with `inputs` input features when they are quantized, else 0: a matrix is
/// quantized when its input width is a multiple of the block (`Loader::any_linear`'s rule).
fn block_sized(inputs: u64, params: u64) -> u64 {
    if inputs.is_multiple_of(llava_kernels::quant::BLOCK as u64) { params } else { 0 }
}

fn weights(part: &str, params: u64, dtype: DType) -> PlanEntry {
    PlanEntry::new(
        format!("{part} weights ({} parameters, {})", count(params), dtype_name(dtype)),
        params * dtype_bytes(dtype),
    )
}

/// A parameter count as `7.06B`, `88.3M` or `12.5K`.
pub fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n => format!("{:.1}K", n as f64 / 1e3),
    }
}

/// The shape of a generation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationShape {
    /// The command, for the plan's title (`generate`, `chat`, `sqa-predict`).
    pub command: &'static str,
    /// Prompts decoded together.
    pub batch: usize,
    /// Text tokens of the longest prompt (BOS included, `<image>` excluded).
    pub text_tokens: usize,
    /// Images per prompt.
    pub images: usize,
    pub max_new_tokens: usize,
}

/// The activations alive at the widest point of one LLM layer's forward pass without autodiff
/// (the residual stream, the normed input, then either the attention's projections and scores or
/// the MLP's gate, up and product), for `tokens` positions of `rows` sequences, in bytes.
pub fn llm_layer_activations(config: &LlavaConfig, rows: usize, tokens: usize, act: DType) -> u64 {
    let t = &config.text;
    let n = (rows * tokens) as u64;
    let a = dtype_bytes(act);
    let (d, inter) = (t.hidden_size as u64, t.intermediate_size as u64);
    let q = (t.num_attention_heads * t.head_dim()) as u64;
    let kv = (t.num_key_value_heads.unwrap_or(t.num_attention_heads) * t.head_dim()) as u64;
    // Attention: q, k, v, their rotated copies, the context; scores per head in f32.
    let attention = n * a * (2 * q + 4 * kv + q + d) + attention_scores(rows, t.num_attention_heads, tokens);
    let mlp = n * a * 3 * inter;
    n * a * 2 * d + attention.max(mlp)
}

/// Softmax scores of one layer's attention, `[rows, heads, tokens, tokens]` f32 (Burn's attention
/// on the GPU backends; the CPU kernel needs less, per head, so this bounds it).
fn attention_scores(rows: usize, heads: usize, tokens: usize) -> u64 {
    (rows * heads * tokens * tokens) as u64 * 4
}

/// The activations of the vision tower encoding `images` images at once (no autodiff).
pub fn vision_activations(config: &LlavaConfig, images: usize, act: DType) -> u64 {
    let v = &config.vision;
    let tokens = v.num_patches() + 1;
    let n = (images * tokens) as u64;
    let a = dtype_bytes(act);
    let (d, inter) = (v.hidden_size as u64, v.intermediate_size as u64);
    let attention = n * a * 4 * d + attention_scores(images, v.num_attention_heads, tokens);
    let mlp = n * a * 2 * inter;
    let pixels = (images * v.num_channels * v.image_size * v.image_size) as u64 * 4;
    pixels + n * a * 3 * d + attention.max(mlp)
}

/// The KV cache of a generation: keys and values of every layer for `positions` positions.
pub fn kv_cache_bytes(config: &LlavaConfig, rows: usize, positions: usize, act: DType) -> u64 {
    let t = &config.text;
    let kv = (t.num_key_value_heads.unwrap_or(t.num_attention_heads) * t.head_dim()) as u64;
    2 * t.num_hidden_layers as u64 * (rows * positions) as u64 * kv * dtype_bytes(act)
}

/// Elements of the LLM's largest matrix (the embedding or LM head, or an MLP weight).
pub fn largest_matrix(config: &LlavaConfig) -> u64 {
    let t = &config.text;
    (t.vocab_size * t.hidden_size).max(t.hidden_size * t.intermediate_size) as u64
}

/// The buffer a load reads the largest tensor's bytes into while converting it from `stored`
/// to `held` (none when they are the same: the bytes are read straight into the tensor's own
/// buffer).
pub fn load_buffer_bytes(config: &LlavaConfig, stored: Option<DType>, held: DType) -> u64 {
    match stored {
        Some(stored) if stored != held => largest_matrix(config) * dtype_bytes(stored),
        _ => 0,
    }
}

/// The plan of `generate` / `chat` / `sqa-predict`.
pub fn generation_plan(
    config: &LlavaConfig, has_vision: bool, dtypes: PlanDtypes, shape: GenerationShape, device: impl Into<String>,
    capacity: Option<Capacity>,
) -> MemoryPlan {
    let PlanDtypes { stored, held, activations: act, quantize, quantize_vision, embeddings_mapped } = dtypes;
    let images = if has_vision { shape.images } else { 0 };
    let tokens = shape.text_tokens + images * config.image_tokens();
    let positions = tokens + shape.max_new_tokens;
    let rows = shape.batch.max(1);
    let a = dtype_bytes(act);
    let d = config.text.hidden_size as u64;
    let mut held_entries = vec![PlanEntry::new("process (code, thread pools, tokenizer)", RUNTIME_BYTES)];
    held_entries.extend(weight_entries(config, held, has_vision, quantize, quantize.filter(|_| quantize_vision)));
    let text = &config.text;
    if embeddings_mapped
        && stored.llm == Some(held.llm)
        && !text.tie_word_embeddings
        && let Some(llm) = held_entries.last_mut()
    {
        // The LLM's entry (the last): its float part holds the input embeddings.
        let table = text.vocab_size as u64 * text.hidden_size as u64 * dtype_bytes(held.llm);
        llm.bytes = llm.bytes.saturating_sub(table);
        llm.what.push_str(", less the input embeddings (memory-mapped: only the rows of the tokens read)");
    }
    let loading = match quantize {
        // A quantized layer is read as its stored bytes, quantized, and dropped; the float
        // tensors (embeddings) are converted as usual.
        Some(_) => PlanEntry::new(
            "the largest matrix's stored bytes while it is quantized or converted",
            largest_matrix(config) * dtype_bytes(stored.llm.unwrap_or(held.llm))
                + load_buffer_bytes(config, stored.llm, held.llm),
        ),
        None => PlanEntry::new(
            "the largest tensor's bytes while they are converted",
            load_buffer_bytes(config, stored.llm, held.llm),
        ),
    };
    let mut phases = vec![PlanPhase::new("loading", vec![loading])];
    if images > 0 {
        phases.push(PlanPhase::new(
            "encoding the images",
            vec![PlanEntry::new(
                format!("vision activations ({} image(s))", rows * images),
                vision_activations(config, rows * images, act),
            )],
        ));
    }
    let head_dim = config.text.head_dim() as u64;
    phases.push(PlanPhase::new(
        "prefill and decoding",
        vec![
            PlanEntry::new(
                format!("KV cache ({rows} × {positions} positions, {})", dtype_name(act)),
                kv_cache_bytes(config, rows, positions, act),
            ),
            PlanEntry::new(
                format!("prefill activations ({rows} × {tokens} tokens)"),
                llm_layer_activations(config, rows, tokens, act)
                    + (rows * tokens) as u64 * (2 * d * a + 2 * head_dim * 4),
            ),
            PlanEntry::new("logits (f32)", rows as u64 * config.text.vocab_size as u64 * 4 * 2),
        ],
    ));
    MemoryPlan {
        run: format!("{} (batch {rows}, {tokens} prompt tokens, {} new)", shape.command, shape.max_new_tokens),
        device: device.into(),
        held: held_entries,
        phases,
        capacity,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use llava_llm::LlamaConfig;
    use llava_projector::ProjectorKind;
    use llava_vision_encoder::ClipVisionConfig;

    type B = crate::backend::Cpu;

    fn config(text: LlamaConfig, projector: ProjectorKind) -> LlavaConfig {
        LlavaConfig {
            vision: ClipVisionConfig {
                hidden_size: 24,
                intermediate_size: 40,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                image_size: 28,
                patch_size: 14,
                ..Default::default()
            },
            text,
            projector,
            select_layer: -2,
            select_feature: crate::SelectFeature::Patch,
            image_aspect: llava_data::image::AspectMode::Crop,
            max_length: 64,
        }
    }

    #[test]
    fn parameter_counts_equal_the_modules_of_every_variant() {
        let device = Default::default();
        let base = LlamaConfig {
            vocab_size: 50,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            ..Default::default()
        };
        let variants = [
            (base.clone(), ProjectorKind::Linear),
            (LlamaConfig { num_key_value_heads: Some(2), ..base.clone() }, ProjectorKind::MlpGelu { depth: 2 }),
            (
                LlamaConfig { attention_bias: true, mlp_bias: true, head_dim: Some(16), ..base.clone() },
                ProjectorKind::MlpGelu { depth: 3 },
            ),
            (LlamaConfig { tie_word_embeddings: true, ..base }, ProjectorKind::Linear),
        ];
        for (text, projector) in variants {
            let c = config(text, projector);
            let model = c.init::<B>(&device);
            let (vision, proj, llm) = parameter_counts(&c);
            assert_eq!(vision, model.vision.num_params() as u64, "vision {c:?}");
            assert_eq!(proj, model.projector.num_params() as u64, "projector {c:?}");
            assert_eq!(llm, model.llm.num_params() as u64, "llm {c:?}");
        }
    }

    #[test]
    fn a_plan_that_does_not_fit_names_the_largest_parts_and_what_fits() {
        let plan = MemoryPlan {
            run: "generate".into(),
            device: "cpu".into(),
            held: vec![PlanEntry::new("LLM weights", 10 << 30), PlanEntry::new("process", 1 << 20)],
            phases: vec![PlanPhase::new("decoding", vec![PlanEntry::new("KV cache", 4 << 30)])],
            capacity: Some(Capacity { bytes: 12 << 30, source: "test".into() }),
        };
        assert_eq!(plan.peak(), (14 << 30) + (1 << 20));
        let err = plan.check(&[("--dtype f16".into(), 7 << 30), ("--batch 64".into(), 20 << 30)]).unwrap_err();
        assert!(err.message.contains("LLM weights 10.00 GiB"), "{}", err.message);
        assert!(err.message.contains("KV cache 4.00 GiB"), "{}", err.message);
        assert!(err.message.contains("what would fit: --dtype f16 (peak 7.00 GiB)"), "{}", err.message);
        assert!(!err.message.contains("--batch 64"), "{}", err.message);
        let roomy = MemoryPlan { capacity: Some(Capacity { bytes: 15 << 30, source: "t".into() }), ..plan.clone() };
        assert!(roomy.check(&[]).is_ok());
        assert!(MemoryPlan { capacity: None, ..plan }.check(&[]).is_ok());
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("1.5 G"), Ok(3 << 29));
        assert_eq!(parse_bytes("1500MiB"), Ok(1500 << 20));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1G").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
