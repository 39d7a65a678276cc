//! AdamW with one fused pass per parameter on the Flex CPU backend.
//!
//! Burn's `AdamW` writes the update as a dozen tensor operations (moments, bias corrections,
//! square root, division, decay), each reading and allocating a parameter-sized tensor: at stage
//! 2 that was a quarter of a CPU training step. On Flex this optimizer does the same arithmetic
//! in one pass over parameter, gradient and both moments: the moments are updated in place
//! (their storage belongs to the optimizer state alone), the new parameters written once. Other
//! backends (wgpu, CUDA) get Burn's `AdamW` unchanged. The state is Burn's `AdamWState`, so
//! checkpoints are the same either way.
//!
//! The formula is Burn's (and torch.optim.AdamW's, up to rounding):
//! `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p·(1 − lr·wd) − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`.

use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use burn_flex::FlexTensor;
use llava_weights::flex::{flex_f32, from_f32, into_tensor};
use rayon::prelude::*;

/// Hyperparameters as the reference names them.
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

/// AdamW whose update is one pass per parameter on Flex (see the module docs).
#[derive(Clone)]
pub struct FusedAdamW {
    params: AdamWParams,
    /// Burn's optimizer, used on every other backend.
    fallback: AdamW,
}

impl FusedAdamW {
    pub fn new(params: AdamWParams) -> Self {
        let fallback = AdamWConfig::new()
            .with_beta_1(params.beta_1)
            .with_beta_2(params.beta_2)
            .with_epsilon(params.epsilon)
            .with_weight_decay(params.weight_decay)
            .build();
        Self { params, fallback }
    }

    /// The optimizer for a whole module, as `AdamWConfig::init` returns Burn's.
    pub fn init<B: AutodiffBackend, M: burn::module::AutodiffModule<B>>(self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }
}

impl<B: Backend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        // Flex f32 throughout, and no AMSGrad maximum (which this pass does not keep).
        let fusable = |t: &Tensor<B, D>| flex_f32(t).is_some();
        let fused = fusable(&tensor)
            && fusable(&grad)
            && state.as_ref().is_none_or(|s| s.momentum.max_moment_2.is_none() && fusable(&s.momentum.moment_1) && fusable(&s.momentum.moment_2));
        if !fused {
            return SimpleOptimizer::<B>::step(&self.fallback, lr, tensor, grad, state);
        }
        let (param, moment_1, moment_2, time) = fused_step(&self.params, lr, &tensor, &grad, state).expect("Flex f32 tensors, checked above");
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (param, Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}

fn flex<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<FlexTensor> {
    Some(flex_f32(t)?.to_contiguous())
}

/// A moment's storage to update in place: its own buffer once the state's tensor is dropped
/// (nothing else holds it in a run), else a contiguous copy.
fn owned_moment<B: Backend, const D: usize>(t: Tensor<B, D>) -> Option<FlexTensor> {
    let mut flex = flex_f32(&t)?.to_contiguous();
    drop(t);
    if flex.try_storage_mut::<f32>().is_none() {
        let shape = flex.layout().shape().clone();
        flex = FlexTensor::from_data(TensorData::new(flex.as_slice::<f32>()?.to_vec(), shape));
    }
    Some(flex)
}

type Fused<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>, usize);

/// The fused update on Flex f32 tensors (the caller checked the backend, dtype and state).
fn fused_step<B: Backend, const D: usize>(
    p: &AdamWParams,
    lr: f64,
    tensor: &Tensor<B, D>,
    grad: &Tensor<B, D>,
    state: Option<AdamWState<B, D>>,
) -> Option<Fused<B, D>> {
    let param = flex(tensor)?;
    let grad = flex(grad)?;
    let shape = tensor.shape();
    let n = shape.num_elements();
    let (mut m, mut v, time) = match state {
        Some(s) => (owned_moment(s.momentum.moment_1)?, owned_moment(s.momentum.moment_2)?, s.momentum.time + 1),
        None => {
            let zeros = || FlexTensor::from_data(TensorData::new(vec![0f32; n], shape.clone()));
            (zeros(), zeros(), 1)
        }
    };
    let (params_in, grads) = (param.as_slice::<f32>()?, grad.as_slice::<f32>()?);
    let mut out = vec![0f32; n];
    let (m_values, v_values) = (m.try_storage_mut::<f32>()?, v.try_storage_mut::<f32>()?);
    if params_in.len() != n || grads.len() != n || m_values.len() != n || v_values.len() != n {
        return None;
    }
    update(p, lr, time, params_in, grads, m_values, v_values, &mut out);
    Some((from_f32(out, shape)?, into_tensor(m)?, into_tensor(v)?, time))
}

/// One AdamW step over flat buffers: `m`, `v` updated in place, the new parameters in `out`.
/// (Not generic, so it is compiled once, optimised, in this crate.)
#[allow(clippy::too_many_arguments)]
fn update(p: &AdamWParams, lr: f64, time: usize, params_in: &[f32], grads: &[f32], m: &mut [f32], v: &mut [f32], out: &mut [f32]) {
    let (b1, b2, eps) = (p.beta_1, p.beta_2, p.epsilon);
    let bc1 = 1f32 - b1.powi(time as i32);
    let bc2 = 1f32 - b2.powi(time as i32);
    let lr32 = lr as f32;
    let decay = 1f32 - (lr * p.weight_decay as f64) as f32;
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(params_in.par_chunks(CHUNK).zip(grads.par_chunks(CHUNK)))
        .for_each(|(((out, m), v), (params_in, grads))| {
            for i in 0..out.len() {
                let g = grads[i];
                let mi = b1 * m[i] + (1.0 - b1) * g;
                let vi = b2 * v[i] + (1.0 - b2) * (g * g);
                m[i] = mi;
                v[i] = vi;
                let delta = (mi / bc1) / ((vi / bc2).sqrt() + eps);
                out[i] = params_in[i] * decay - delta * lr32;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn fused_steps_match_burns_adamw_formula() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let params = AdamWParams { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.1 };
        let fused = FusedAdamW::new(params);
        let burn_adamw = AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(0.1).build();
        B::seed(&device, 1);
        let start = Tensor::<B, 2>::random([70, 300], Distribution::Normal(0.0, 1.0), &device);
        let (mut a, mut b) = (start.clone(), start.clone());
        let (mut sa, mut sb) = (None, None);
        for step in 0..4 {
            let grad = Tensor::<B, 2>::random([70, 300], Distribution::Normal(0.0, 1.0), &device);
            let lr = 1e-3 * (step + 1) as f64;
            // The fused path must be the one taken here.
            assert!(fused_step(&params, lr, &a, &grad, sa.clone()).is_some());
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
