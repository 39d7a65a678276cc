//! AdamW as a Burn optimizer whose per-parameter update is [`llava_kernels::adamw_step`]: one
//! fused pass on the CPU backend (moments updated in place), Burn's operations elsewhere. The
//! state is Burn's `AdamWState`, so checkpoints are the same either way.
//!
//! The formula is Burn's (and torch.optim.AdamW's, up to rounding):
//! `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p·(1 − lr·wd) − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`.

use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWState, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
pub use llava_kernels::AdamWParams;

/// AdamW whose update is one pass per parameter on the CPU backend (see the module docs).
#[derive(Clone)]
pub struct FusedAdamW {
    params: AdamWParams,
}

impl FusedAdamW {
    pub fn new(params: AdamWParams) -> Self {
        Self { params }
    }

    /// The optimizer for a whole module, as `AdamWConfig::init` returns Burn's.
    pub fn init<B: AutodiffBackend, M: burn::module::AutodiffModule<B>>(self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self, lr: f64, tensor: Tensor<B, D>, grad: Tensor<B, D>, state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let (time, moments) = match state {
            Some(s) => (s.momentum.time + 1, Some((s.momentum.moment_1, s.momentum.moment_2))),
            None => (1, None),
        };
        let step = llava_kernels::ParamStep { lr, time, param: tensor, grad, moments };
        let [param, moment_1, moment_2] = llava_kernels::adamw_step(&self.params, step);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (param, Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::AdamWConfig;
    use burn::tensor::Distribution;

    #[test]
    fn fused_steps_match_burns_adamw_formula() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let params = AdamWParams { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.1 };
        let fused = FusedAdamW::new(params);
        let burn_adamw =
            AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(0.1).build();
        B::seed(&device, 1);
        let start = Tensor::<B, 2>::random([70, 300], Distribution::Normal(0.0, 1.0), &device);
        let (mut a, mut b) = (start.clone(), start.clone());
        let (mut sa, mut sb) = (None, None);
        for step in 0..4 {
            let grad = Tensor::<B, 2>::random([70, 300], Distribution::Normal(0.0, 1.0), &device);
            let lr = 1e-3 * (step + 1) as f64;
            (a, sa) = SimpleOptimizer::<B>::step(&fused, lr, a, grad.clone(), sa);
            (b, sb) = SimpleOptimizer::<B>::step(&burn_adamw, lr, b, grad, sb);
            let diff = (a.clone() - b.clone()).abs().max().into_scalar();
            assert!(diff < 1e-6, "step {step}: parameters differ by {diff}");
            let (ma, mb) = (&sa.as_ref().unwrap().momentum, &sb.as_ref().unwrap().momentum);
            assert_eq!(ma.time, mb.time);
            let dm = (ma.moment_1.clone() - mb.moment_1.clone()).abs().max().into_scalar();
            let dv = (ma.moment_2.clone() - mb.moment_2.clone()).abs().max().into_scalar();
            assert!(dm < 1e-7 && dv < 1e-7, "moments differ by {dm}, {dv}");
        }
        // The parameters did move.
        assert!((a.clone() - start).abs().max().into_scalar() > 1e-4);

        // Moments are updated in place only when the state alone holds them: a copy kept
        // elsewhere (a checkpoint record being written, say) is left as it was.
        let kept = sa.clone().unwrap();
        let before = kept.momentum.moment_1.to_data();
        let grad = Tensor::<B, 2>::random([70, 300], Distribution::Normal(0.0, 1.0), &device);
        let (_, next) = SimpleOptimizer::<B>::step(&fused, 1e-3, a, grad, sa);
        assert_eq!(kept.momentum.moment_1.to_data(), before);
        assert_ne!(next.unwrap().momentum.moment_1.to_data(), before);
    }
}
