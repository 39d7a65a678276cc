//! AdamW in one pass per parameter on Flex: the moments are updated in place when the optimizer
//! state alone holds them, the new parameters written once (Burn's `AdamW` is a dozen tensor
//! operations, each reading and allocating a parameter-sized tensor: a quarter of a CPU stage-2
//! step).

use crate::adamw::{AdamWParams, ParamStep};
use crate::cpu::flex::{flex_f32, flex_tensor, from_f32, into_tensor, owned_storage, values};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rayon::prelude::*;

/// The fused update on f32 Flex tensors; the step is given back untouched when any of them is
/// not one.
pub(crate) fn step<B: Backend, const D: usize>(
    p: &AdamWParams, step: ParamStep<B, D>,
) -> Result<[Tensor<B, D>; 3], ParamStep<B, D>> {
    let n = step.param.shape().num_elements();
    let flex = |t: &Tensor<B, D>| flex_f32(t).filter(|f| f.layout().num_elements() == n);
    let moments_fit = step.moments.as_ref().is_none_or(|(m, v)| flex(m).is_some() && flex(v).is_some());
    let (Some(param_f), Some(grad_f), true) = (flex(&step.param), flex(&step.grad), moments_fit) else {
        return Err(step);
    };
    let ParamStep { lr, time, param, moments, .. } = step;
    let (param_f, grad_f) = (param_f.to_contiguous(), grad_f.to_contiguous());
    let (params_in, grads) = (values(&param_f), values(&grad_f));
    let (mut m, mut v) = match moments {
        Some((m, v)) => (owned_storage(m).expect("checked above"), owned_storage(v).expect("checked above")),
        None => (flex_tensor(vec![0f32; n], param.shape()), flex_tensor(vec![0f32; n], param.shape())),
    };
    let mut out = vec![0f32; n];
    let (m_values, v_values) = (m.try_storage_mut::<f32>().expect("owned"), v.try_storage_mut::<f32>().expect("owned"));
    assert!(
        m_values.len() == n && v_values.len() == n,
        "AdamW moments hold {} and {} values for a parameter of {n}",
        m_values.len(),
        v_values.len()
    );
    update(p, lr, time, params_in, grads, m_values, v_values, &mut out);
    Ok([from_f32(out, param.shape()).expect("Flex"), into_tensor(m).expect("Flex"), into_tensor(v).expect("Flex")])
}

/// One AdamW step over flat buffers: `m`, `v` updated in place, the new parameters in `out`.
/// (Not generic, so it is compiled once, optimised, in this crate.)
#[allow(clippy::too_many_arguments)]
fn update(
    p: &AdamWParams, lr: f64, time: usize, params_in: &[f32], grads: &[f32], m: &mut [f32], v: &mut [f32],
    out: &mut [f32],
) {
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
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    fn the_fused_step_equals_the_reference_and_writes_only_moments_it_owns() {
        let device = Default::default();
        let params = AdamWParams { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.1 };
        Flex::seed(&device, 7);
        let start = Tensor::<Flex, 2>::random([33, 700], Distribution::Normal(0.0, 1.0), &device);
        let (mut fused, mut reference) = ((start.clone(), None), (start, None));
        for time in 1..=3 {
            let grad = Tensor::<Flex, 2>::random([33, 700], Distribution::Normal(0.0, 1.0), &device);
            let lr = 1e-3 * time as f64;
            let ours = ParamStep { lr, time, param: fused.0.clone(), grad: grad.clone(), moments: fused.1.take() };
            let [p, m, v] = step(&params, ours).expect("Flex f32 takes the fused path");
            let theirs = ParamStep { lr, time, param: reference.0, grad, moments: reference.1.take() };
            let [rp, rm, rv] = crate::reference::adamw_step(&params, theirs);
            for (a, b, what) in [(&p, &rp, "param"), (&m, &rm, "m"), (&v, &rv, "v")] {
                let diff = (a.clone() - b.clone()).abs().max().into_scalar();
                assert!(diff < 1e-6, "step {time}: {what} differs by {diff}");
            }
            fused = (p, Some((m, v)));
            reference = (rp, Some((rm, rv)));
        }
        // A copy of the moments kept elsewhere (a checkpoint being written) is left as it was.
        let (m, v) = fused.1.clone().unwrap();
        let before = m.to_data();
        let grad = Tensor::<Flex, 2>::random([33, 700], Distribution::Normal(0.0, 1.0), &device);
        let kept = ParamStep { lr: 1e-3, time: 4, param: fused.0, grad, moments: Some((m.clone(), v)) };
        let [_, next_m, _] = step(&params, kept).ok().unwrap();
        assert_eq!(m.to_data(), before);
        assert_ne!(next_m.to_data(), before);
    }
}
