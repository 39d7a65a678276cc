//! The multimodal projector W: vision features → LLM embedding space.
//! Depends on `llava-checkpoint` and `llava-kernels` only; knows nothing of the towers around it.
//!
//! * `linear` — one `Linear(vision → text)` with bias (the LLaVA paper).
//! * `mlp{N}x_gelu` — `N` linears with exact GELU between them (LLaVA-1.5 uses `mlp2x_gelu`).
//!
//! Two checkpoint namings load: the original LLaVA one (`model.mm_projector.weight` for linear,
//! `model.mm_projector.{0,2,4..}.*` for the MLP, as in `mm_projector.bin`) and llava-hf's
//! (`multi_modal_projector.linear_{1,2}.*`).
//!
//! ```
//! use burn::backend::Flex;
//! use llava_projector::{ProjectorConfig, ProjectorKind};
//!
//! let config = ProjectorConfig { kind: ProjectorKind::parse("mlp2x_gelu").unwrap(), vision_hidden: 8, text_hidden: 16 };
//! let projector = config.init::<Flex>(&Default::default());
//! let x = burn::tensor::Tensor::<Flex, 3>::ones([1, 4, 8], &Default::default());
//! assert_eq!(projector.forward(x).dims(), [1, 4, 16]);
//! ```

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use llava_checkpoint::{Exporter, Loader, WeightStore, WeightsError};
use serde::{Deserialize, Serialize};

/// Projector architecture, named as the reference's `mm_projector_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ProjectorKind {
    Linear,
    /// `depth` linears with GELU between them.
    MlpGelu {
        depth: usize,
    },
}

impl ProjectorKind {
    /// Parses `linear` or `mlp{N}x_gelu`.
    pub fn parse(s: &str) -> Option<Self> {
        if s == "linear" {
            return Some(Self::Linear);
        }
        let depth = s.strip_prefix("mlp")?.strip_suffix("x_gelu")?.parse().ok()?;
        (depth >= 1).then_some(Self::MlpGelu { depth })
    }

    pub fn name(&self) -> String {
        match self {
            Self::Linear => "linear".into(),
            Self::MlpGelu { depth } => format!("mlp{depth}x_gelu"),
        }
    }

    pub fn depth(&self) -> usize {
        match self {
            Self::Linear => 1,
            Self::MlpGelu { depth } => *depth,
        }
    }
}

impl TryFrom<String> for ProjectorKind {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s).ok_or_else(|| format!("unknown projector type `{s}` (expected linear or mlp<N>x_gelu)"))
    }
}

impl From<ProjectorKind> for String {
    fn from(k: ProjectorKind) -> String {
        k.name()
    }
}

/// Which checkpoint naming to read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorNaming {
    /// `mm_projector.weight` / `mm_projector.{0,2,..}.weight` (index of the Linear in the
    /// `nn.Sequential`, GELUs in between).
    Original,
    /// `linear_1`, `linear_2`, … (llava-hf).
    LlavaHf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectorConfig {
    pub kind: ProjectorKind,
    /// Vision tower width (`mm_hidden_size`).
    pub vision_hidden: usize,
    /// LLM embedding width.
    pub text_hidden: usize,
}

impl ProjectorConfig {
    /// The number of weights (every layer has a bias). For memory plans: no weight is read.
    pub fn num_parameters(&self) -> u64 {
        let (v, t) = (self.vision_hidden as u64, self.text_hidden as u64);
        (v * t + t) + (self.kind.depth() as u64 - 1) * (t * t + t)
    }

    /// Random initialisation as PyTorch's `nn.Linear` default (uniform ±1/sqrt(fan_in)).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Projector<B> {
        let layers = (0..self.kind.depth())
            .map(|i| {
                let d_in = if i == 0 { self.vision_hidden } else { self.text_hidden };
                let bound = 1.0 / (d_in as f64).sqrt();
                let mut l = LinearConfig::new(d_in, self.text_hidden).init(device);
                l.weight = Param::from_tensor(Tensor::random(
                    [d_in, self.text_hidden],
                    Distribution::Uniform(-bound, bound),
                    device,
                ));
                l.bias = Some(Param::from_tensor(Tensor::random(
                    [self.text_hidden],
                    Distribution::Uniform(-bound, bound),
                    device,
                )));
                l
            })
            .collect();
        Projector { layers, kind: self.kind }
    }

    /// Infers the architecture from the tensors present under `prefix` in either naming.
    pub fn detect(store: &WeightStore, prefix: &str) -> Option<(ProjectorKind, ProjectorNaming)> {
        let p = |n: &str| if prefix.is_empty() { n.to_string() } else { format!("{prefix}.{n}") };
        if store.contains(&p("weight")) {
            return Some((ProjectorKind::Linear, ProjectorNaming::Original));
        }
        if store.contains(&p("linear_1.weight")) {
            let depth = (1..).take_while(|i| store.contains(&p(&format!("linear_{i}.weight")))).count();
            return Some((ProjectorKind::MlpGelu { depth }, ProjectorNaming::LlavaHf));
        }
        if store.contains(&p("0.weight")) {
            let depth = (0..).take_while(|i| store.contains(&p(&format!("{}.weight", 2 * i)))).count();
            return Some((ProjectorKind::MlpGelu { depth }, ProjectorNaming::Original));
        }
        None
    }
}

fn layer_name(naming: ProjectorNaming, kind: ProjectorKind, i: usize) -> String {
    match (naming, kind) {
        (ProjectorNaming::Original, ProjectorKind::Linear) => String::new(),
        (ProjectorNaming::Original, _) => (2 * i).to_string(),
        (ProjectorNaming::LlavaHf, _) => format!("linear_{}", i + 1),
    }
}

#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    /// GELU is applied between consecutive layers (never after the last).
    pub layers: Vec<Linear<B>>,
    #[module(skip)]
    pub kind: ProjectorKind,
}

impl<B: Backend> Projector<B> {
    /// `[.., vision_hidden]` → `[.., text_hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                h = gelu(h);
            }
            h = llava_kernels::linear_tokens(layer, h);
        }
        h
    }

    /// Loads the projector of `config` from `vb` in the given naming.
    pub fn load(config: &ProjectorConfig, naming: ProjectorNaming, vb: &Loader<'_, B>) -> Result<Self, WeightsError> {
        let layers = (0..config.kind.depth())
            .map(|i| {
                let d_in = if i == 0 { config.vision_hidden } else { config.text_hidden };
                vb.linear(&layer_name(naming, config.kind, i), d_in, config.text_hidden, true)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { layers, kind: config.kind })
    }

    pub fn export(&self, naming: ProjectorNaming, e: &mut Exporter) {
        let kind = self.kind;
        for (i, l) in self.layers.iter().enumerate() {
            e.linear(&layer_name(naming, kind, i), l);
        }
    }
}
