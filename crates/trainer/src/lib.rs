//! The two LLaVA training stages on Burn: what is frozen, the loss, the optimizer step.
//! Depends on the composed model (`llava`), the data crate and the kernels; nothing but the
//! demo and the command line depends on it, and it knows no evaluation.
//!
//! * **Stage 1** (feature alignment): vision tower and LLM frozen, only the projector W trains.
//! * **Stage 2** (end-to-end fine-tuning): vision tower frozen, projector and LLM train.
//!
//! Frozen parameters are marked `no_grad`, so the autodiff graph records no weight gradients for
//! them and the optimizer holds no state for them. The loss is the reference's (Hugging Face
//! `LlamaForCausalLM`): next-token cross-entropy, mean over the micro-batch's unmasked tokens.
//! The optimizer is AdamW with Hugging Face Trainer's settings (β 0.9/0.999, ε 1e-8, no weight
//! decay), the learning rate follows `get_cosine_schedule_with_warmup`, gradients are accumulated
//! over micro-batches (each micro-batch loss divided by their number, as HF does) and clipped by
//! their global L2 norm.
//!
//! The step is written against `GradientsParams`, so averaging them across devices (Burn's
//! collective all-reduce) slots in between accumulation and clipping without changing the rest.
//!
//! Mixed precision ([`Trainer::with_compute_dtype`], the reference's `--bf16`): trainable
//! parameters stay f32 (the optimizer's master copy, as DeepSpeed keeps it) and are cast to bf16
//! for each forward through Burn's differentiable cast, so their gradients arrive in f32; frozen
//! towers are cast once and their bf16 copy reused (their f32 weights stay, so the saved model
//! holds the checkpoint's exact values). Activations are bf16; RMSNorm statistics and the loss
//! are f32, as in Hugging Face's LLaMA. On the CPU backend activations stay f32
//! (`llava_kernels::activation_dtype`) and the products with bf16 weights run in bf16 inside the
//! kernels (AVX-512 BF16), which is faster there than Flex's bf16 arithmetic.

pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod loss;
pub mod metrics;
pub mod perplexity;
pub mod plan;
pub mod replicas;
pub mod run;
pub mod schedule;

use adamw::{AdamWParams, FusedAdamW};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor};
use llava::{Llava, PaddingSide};
use llava_llm::LlamaModel;
use llava_vision_encoder::ClipVisionModel;
use serde::{Deserialize, Serialize};

/// Which parameters train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Projector only.
    One,
    /// Projector and LLM.
    Two,
}

/// Marks the frozen parts of `stage` (`require_grad = false`): the vision tower always, the LLM
/// in stage 1, and the LLM's base weights whenever it carries LoRA adapters (then the adapters
/// and the projector are what trains, in either stage).
pub fn freeze<B: AutodiffBackend>(mut model: Llava<B>, stage: Stage) -> Llava<B> {
    model.vision = model.vision.no_grad();
    if stage == Stage::One || model.llm.has_lora() {
        model.llm = model.llm.freeze_base();
    }
    model
}

/// The trainable parameters as f32 masters (a half-precision checkpoint's values widened,
/// exactly); frozen parameters stay in whatever dtype they were loaded in.
fn f32_masters<B: AutodiffBackend>(mut model: Llava<B>) -> Llava<B> {
    model.projector = model.projector.map(&mut ToF32Leaves);
    model.llm = model.llm.map(&mut ToF32Leaves);
    model
}

/// Casts trainable half-precision parameters to f32 as new leaves of the graph.
struct ToF32Leaves;

impl<B: AutodiffBackend> ModuleMapper<B> for ToF32Leaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| {
            if t.dtype() == DType::F32 || !t.is_require_grad() {
                return t;
            }
            Tensor::from_inner(t.inner().cast(DType::F32)).require_grad()
        })
    }
}

/// Every parameter as a new leaf of the autodiff graph (same values, same id, same
/// `require_grad`), sharing no graph node with the module it was cloned from.
struct FreshLeaves;

impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| {
            let trainable = t.is_require_grad();
            let fresh = Tensor::from_inner(t.inner());
            if trainable { fresh.require_grad() } else { fresh }
        })
    }
}

/// Optimisation settings (the reference's HF Trainer arguments).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_epsilon: f32,
    /// The projector's own peak learning rate (the reference's `mm_projector_lr`), on the same
    /// schedule; `None`: `learning_rate`.
    pub projector_learning_rate: Option<f64>,
    /// Global-norm clipping (`max_grad_norm`, 1.0 in HF); `None` disables it.
    pub max_grad_norm: Option<f32>,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps of the whole run (for the schedule).
    pub total_steps: usize,
    /// Longest spliced sequence (`model_max_length`).
    pub max_length: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-3,
            projector_learning_rate: None,
            warmup_ratio: 0.03,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: Some(1.0),
            gradient_accumulation_steps: 1,
            total_steps: 1,
            max_length: 2048,
        }
    }
}

/// A micro-batch: prompts with `-200` where images go, their labels, and the images in order.
pub struct Batch<B: Backend> {
    pub input_ids: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    /// `[images, 3, H, W]`, one per `-200` in the batch, in order.
    pub pixels: Option<Tensor<B, 4>>,
}

/// The loss of one batch and what it counted.
pub struct BatchLoss<B: Backend> {
    /// Mean cross-entropy over the supervised tokens (1 element).
    pub loss: Tensor<B, 1>,
    pub supervised: usize,
    /// Tokens after splicing, padding excluded.
    pub tokens: usize,
}

/// Images encoded, spliced into the prompts (right padding, truncated at `max_length`), decoded,
/// and the causal-LM loss taken: the forward half of a training step, also the validation loss.
pub fn batch_loss<B: Backend>(model: &Llava<B>, batch: &Batch<B>, max_length: usize) -> BatchLoss<B> {
    let (hidden, labels, tokens) = batch_hidden(model, batch, max_length);
    let (loss, supervised) = loss::lm_head_loss(&model.llm, hidden, labels);
    BatchLoss { loss, supervised, tokens }
}

/// [`batch_loss`] for a training step (same value and gradient; see [`loss::lm_head_loss_train`]).
pub fn batch_loss_train<B: AutodiffBackend>(model: &Llava<B>, batch: &Batch<B>, max_length: usize) -> BatchLoss<B> {
    let (hidden, labels, tokens) = batch_hidden(model, batch, max_length);
    let (loss, supervised) = loss::lm_head_loss_train(&model.llm, hidden, labels);
    BatchLoss { loss, supervised, tokens }
}

/// The decoder's final hidden states, the spliced labels and the token count of a batch.
fn batch_hidden<B: Backend>(
    model: &Llava<B>, batch: &Batch<B>, max_length: usize,
) -> (Tensor<B, 3>, Tensor<B, 2, Int>, usize) {
    let features = batch.pixels.clone().map(|p| model.encode_images(p).projected);
    let spliced = model.splice(&batch.input_ids, Some(&batch.labels), features, Some(max_length), PaddingSide::Right);
    let labels = spliced.labels.clone().expect("labels were given");
    (model.hidden(&spliced), labels, spliced.lengths.iter().sum())
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Mean of the micro-batch losses of this step.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (after splicing, padding excluded) processed in this step.
    pub tokens: usize,
    /// Supervised tokens in this step.
    pub supervised: usize,
}

/// The training state: model, optimizer, accumulated gradients, step counter.
pub struct Trainer<B: AutodiffBackend> {
    pub model: Llava<B>,
    pub optim: OptimizerAdaptor<FusedAdamW, Llava<B>, B>,
    pub config: OptimConfig,
    pub stage: Stage,
    /// Optimizer steps taken.
    pub step: usize,
    accumulator: GradientsAccumulator<Llava<B>>,
    /// Mixed precision: the dtype the forward and backward run in; `None` = the parameters' own.
    compute_dtype: Option<DType>,
    /// Under mixed precision, the frozen towers cast once: the vision tower, and in stage 1 the LLM.
    frozen_compute: Option<(ClipVisionModel<B>, Option<LlamaModel<B>>)>,
    micro: usize,
    pending: (f64, usize, usize),
    /// Seeds the backend's generator before each micro-step (LoRA dropout masks), so that a
    /// resumed run draws the same masks.
    seed: u64,
    /// Data-parallel: this trainer's replica; gradients and step statistics are averaged with
    /// the others' before clipping.
    replica: Option<replicas::Replica>,
}

impl<B: AutodiffBackend> Trainer<B> {
    pub fn new(model: Llava<B>, stage: Stage, config: OptimConfig) -> Self {
        let optim = FusedAdamW::new(AdamWParams {
            beta_1: config.adam_beta1,
            beta_2: config.adam_beta2,
            epsilon: config.adam_epsilon,
            weight_decay: config.weight_decay,
        })
        .init::<B, Llava<B>>();
        Self {
            model: f32_masters(freeze(model, stage)),
            optim,
            config,
            stage,
            step: 0,
            accumulator: GradientsAccumulator::new(),
            compute_dtype: None,
            frozen_compute: None,
            micro: 0,
            pending: (0.0, 0, 0),
            seed: 0,
            replica: None,
        }
    }

    /// The run's seed: the dropout masks of micro-step `k` come from the backend's generator
    /// seeded with a mix of `seed` and `k` (only when something draws, i.e. LoRA dropout).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Makes this trainer one of `replica.count` data-parallel replicas (registered with the
    /// collective by [`replicas::register`]): each optimizer step averages the accumulated
    /// gradients over the replicas, so every replica takes the same step.
    ///
    /// Call it before [`Self::with_compute_dtype`]. The parameters become leaves of their own
    /// in the autodiff graph: replicas made from clones of one model would otherwise share leaf
    /// nodes, and Burn 0.21's autodiff graphs, merged across threads through a shared node,
    /// deadlock when two replicas run a backward pass and a forward pass at once.
    pub fn with_replica(mut self, replica: replicas::Replica) -> Self {
        self.replica = (replica.count > 1).then_some(replica);
        if self.replica.is_some() {
            self.model = self.model.map(&mut FreshLeaves);
        }
        self
    }

    /// Mixed precision: forward and backward in `dtype` (bf16), trainable parameters kept in
    /// f32 and cast for each forward, frozen towers cast once here and that copy reused. Towers
    /// loaded in `dtype` already (the run loads them in its compute dtype) are not copied: the
    /// cast of a tensor to its own dtype is the tensor itself.
    /// A frozen LLM base (stage 1, LoRA) is cast once too, without its adapters (they are cast
    /// at each forward); a quantized one is not cast (its scales keep their f16, its other
    /// weights were loaded in the compute dtype).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        let vision = self.model.vision.clone().map(&mut CastParams(dtype));
        let llm = (self.stage == Stage::One || self.lora()).then(|| {
            let mut llm = self.model.llm.clone();
            llm.set_lora_adapters(Vec::new());
            if llm.quantization().is_some() { llm } else { llm.map(&mut CastParams(dtype)) }
        });
        self.frozen_compute = Some((vision, llm));
        self.compute_dtype = Some(dtype);
        self
    }

    /// The dtype forward and backward compute in (f32 unless [`Self::with_compute_dtype`]).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype.unwrap_or(DType::F32)
    }

    /// The model the forward pass runs: [`Self::model`] itself, or under mixed precision its
    /// parameters cast to the compute dtype, still connected to the f32 ones in the autodiff
    /// graph (the gradients are registered for those).
    pub fn compute_model(&self) -> Llava<B> {
        let Some(dtype) = self.compute_dtype else { return self.model.clone() };
        let (frozen_vision, frozen_llm) = self.frozen_compute.clone().expect("set with the compute dtype");
        let llm = match frozen_llm {
            Some(mut llm) => {
                let trained = &self.model.llm;
                let adapters = trained.lora_adapters();
                llm.set_lora_adapters(adapters.into_iter().map(|a| a.map(|a| a.map(&mut CastParams(dtype)))).collect());
                if trained.saves("embed_tokens") {
                    llm.embed_tokens = trained.embed_tokens.clone().map(&mut CastParams(dtype));
                }
                if trained.saves("lm_head") {
                    llm.lm_head = trained.lm_head.clone().map(|h| h.map(&mut CastParams(dtype)));
                }
                llm
            }
            None => self.model.llm.clone().map(&mut CastParams(dtype)),
        };
        Llava {
            vision: frozen_vision,
            projector: self.model.projector.clone().map(&mut CastParams(dtype)),
            llm,
            select_layer: self.model.select_layer,
            select_feature: self.model.select_feature,
        }
    }

    /// Whether the LLM trains through LoRA adapters (its base frozen).
    pub fn lora(&self) -> bool {
        self.model.llm.has_lora()
    }

    /// The learning rate of the current optimizer step.
    pub fn lr(&self) -> f64 {
        self.config.learning_rate * self.schedule_factor()
    }

    /// The projector's learning rate of the current optimizer step.
    pub fn projector_lr(&self) -> f64 {
        self.config.projector_learning_rate.unwrap_or(self.config.learning_rate) * self.schedule_factor()
    }

    fn schedule_factor(&self) -> f64 {
        let warmup = schedule::warmup_steps(self.config.total_steps, self.config.warmup_ratio);
        schedule::cosine_with_warmup(self.step, warmup, self.config.total_steps)
    }

    /// Forward and backward on one micro-batch; after `gradient_accumulation_steps` of them,
    /// clips and applies the optimizer step and returns its report.
    ///
    /// A replicated trainer ([`Self::with_replica`]) steps through [`Self::try_micro_step`],
    /// which reports a failed all-reduce; here such a failure panics.
    pub fn micro_step(&mut self, batch: &Batch<B>) -> Option<StepReport> {
        self.try_micro_step(batch).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::micro_step`], with the failure of a replicated step (another replica gone) as
    /// an error. Without replicas it never fails.
    pub fn try_micro_step(&mut self, batch: &Batch<B>) -> Result<Option<StepReport>, replicas::ReplicaError> {
        let longest = batch.input_ids.iter().map(Vec::len).max().unwrap_or(0);
        let _doing = llava_io::activity::doing(&format!(
            "training step {}: {} sample(s) of up to {longest} text tokens",
            self.step + 1,
            batch.input_ids.len()
        ));
        if self.lora() {
            // The global index of this micro-batch: the same masks as one replica accumulating
            // every replica's micro-batches in turn.
            let (rank, count) = self.replica.map_or((0, 1), |r| (r.rank, r.count));
            let local = self.step * self.config.gradient_accumulation_steps + self.micro;
            let micro_index = (local * count + rank) as u64;
            let device = self.model.llm.embed_tokens.weight.device();
            B::seed(&device, splitmix(self.seed ^ splitmix(micro_index)));
        }
        let BatchLoss { loss, supervised, tokens } =
            batch_loss_train(&self.compute_model(), batch, self.config.max_length);
        let loss = loss / self.config.gradient_accumulation_steps as f64;
        let value = loss.clone().into_scalar().elem::<f64>() * self.config.gradient_accumulation_steps as f64;
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        tracing::debug!("{} gradient tensors", grads.len());
        self.accumulator.accumulate(&self.model, grads);
        self.pending.0 += value;
        self.pending.1 += tokens;
        self.pending.2 += supervised;
        self.micro += 1;
        if self.micro < self.config.gradient_accumulation_steps {
            return Ok(None);
        }
        self.apply().map(Some)
    }

    fn apply(&mut self) -> Result<StepReport, replicas::ReplicaError> {
        let mut grads = self.accumulator.grads();
        let mut micro_batches = self.micro;
        if let Some(replica) = self.replica {
            // Between accumulation and clipping, as the reference's DeepSpeed: the clipping
            // norm is the averaged gradient's, the same on every replica.
            let (loss_sum, tokens, supervised) = self.pending;
            let (averaged, sums) =
                replicas::all_reduce_step(replica, &self.model, grads, &[loss_sum, tokens as f64, supervised as f64])?;
            grads = averaged;
            self.pending = (sums[0], sums[1].round() as usize, sums[2].round() as usize);
            micro_batches *= replica.count;
        }
        let grad_norm = global_grad_norm(&self.model, &grads);
        if let Some(max) = self.config.max_grad_norm {
            // torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6) when that is < 1.
            let coef = max as f64 / (grad_norm + 1e-6);
            if coef < 1.0 {
                scale_grads(&self.model, &mut grads, coef);
            }
        }
        let lr = self.lr();
        if self.config.projector_learning_rate.is_some() {
            // Two steps of the same optimizer over disjoint parameters (the projector's, then the
            // rest): AdamW's state is per parameter, so this is the reference's two groups.
            let projector_grads = take_grads(&self.model.projector, &mut grads);
            let model = self.model.clone();
            self.model = self.optim.step(self.projector_lr(), model, projector_grads);
        }
        let model = self.model.clone();
        self.model = self.optim.step(lr, model, grads);
        let (loss_sum, tokens, supervised) = std::mem::take(&mut self.pending);
        let report = StepReport { loss: loss_sum / micro_batches as f64, lr, grad_norm, tokens, supervised };
        self.micro = 0;
        self.step += 1;
        Ok(report)
    }
}

use burn::tensor::ElementConversion;

/// SplitMix64's finaliser: nearby seeds give unrelated ones.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Casts every float parameter to a dtype (Burn's cast is differentiable: a tracked parameter's
/// gradient flows back through it in the original dtype).
struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| t.cast(self.0))
    }
}

struct NormVisitor<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NormVisitor<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sum += g.square().sum().into_scalar().elem::<f64>();
        }
    }
}

/// L2 norm over every gradient in `grads` (the trainable parameters of `model`).
pub fn global_grad_norm<B: AutodiffBackend>(model: &Llava<B>, grads: &GradientsParams) -> f64 {
    let mut v = NormVisitor::<B> { grads, sum: 0.0, _b: Default::default() };
    model.visit(&mut v);
    v.sum.sqrt()
}

struct ScaleVisitor<'a> {
    grads: &'a mut GradientsParams,
    coef: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register::<B::InnerBackend, D>(param.id, g * self.coef);
        }
    }
}

fn scale_grads<B: AutodiffBackend>(model: &Llava<B>, grads: &mut GradientsParams, coef: f64) {
    let mut v = ScaleVisitor { grads, coef };
    model.visit(&mut v);
}

/// Moves the gradients of `module`'s parameters out of `grads`.
fn take_grads<B: AutodiffBackend, M: Module<B>>(module: &M, grads: &mut GradientsParams) -> GradientsParams {
    struct Take<'a> {
        from: &'a mut GradientsParams,
        to: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id) {
                self.to.register::<B::InnerBackend, D>(param.id, g);
            }
        }
    }
    let mut take = Take { from: grads, to: GradientsParams::new() };
    module.visit(&mut take);
    take.to
}

/// All parameter values of a module by id, on the host (for tests and checkpoints).
pub fn param_values<B: Backend, M: Module<B>>(module: &M) -> Vec<(ParamId, Vec<f32>)> {
    struct Collect<B: Backend>(Vec<(ParamId, Vec<f32>)>, std::marker::PhantomData<B>);
    impl<B: Backend> ModuleVisitor<B> for Collect<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let v = param.val().into_data().convert::<f32>().into_vec::<f32>().expect("f32");
            self.0.push((param.id, v));
        }
    }
    let mut c = Collect::<B>(Vec::new(), Default::default());
    module.visit(&mut c);
    c.0
}
