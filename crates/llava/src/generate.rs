//! Autoregressive generation: batched (left padding), with a KV cache, greedy or sampled.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use llava_llm::{KvCache, padded_causal_mask};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{Llava, PaddingSide};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingConfig {
    /// `temperature` finite and not negative, `top_p` in `(0, 1]` (a NaN temperature would
    /// sample from NaN probabilities).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature {} must be a finite number ≥ 0 (0 = greedy)", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// A row stops after emitting any of these.
    pub eos_ids: Vec<u32>,
    /// Reuse past keys/values (the normal path). `false` re-runs the whole sequence every step,
    /// which exists to check the cache.
    pub use_cache: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, sampling: SamplingConfig::default(), eos_ids: vec![2], use_cache: true }
    }
}

/// Chooses tokens from host-side logits, one row at a time.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.config.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) / t).exp())).collect();
        let total: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = 0;
            for (i, p) in probs.iter().enumerate() {
                cumulative += p.1;
                keep = i + 1;
                if cumulative >= self.config.top_p {
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for (id, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return *id;
            }
        }
        probs.last().map_or(0, |p| p.0)
    }
}

pub use llava_kernels::argmax;

/// Generates continuations of a batch of prompts (token ids with `-200` where images go).
///
/// `on_token(row, id)` is called for every new token as it is produced (for streaming) and may
/// return `false` to stop that row (e.g. a stop string appeared). Returns the new ids of each
/// row, EOS excluded.
pub fn generate<B: Backend>(
    model: &Llava<B>, prompts: &[Vec<i64>], pixels: Option<Tensor<B, 4>>, config: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Vec<Vec<u32>> {
    let device = model.llm.embed_tokens.weight.device();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let _doing = llava_io::activity::doing(&format!(
        "generating for {} prompt(s) of up to {longest} tokens with up to {} new tokens",
        prompts.len(),
        config.max_new_tokens
    ));
    let features = pixels.map(|p| model.encode_images(p).projected);
    let batch = model.splice(prompts, None, features, None, PaddingSide::Left);
    let b = prompts.len();
    let vocab = model.llm.vocab_size();
    let mut sampler = Sampler::new(config.sampling);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    if config.max_new_tokens == 0 {
        return out;
    }

    let mut valid = batch.valid.clone();
    let mut next_pos: Vec<i64> = batch.lengths.iter().map(|&l| l as i64).collect();
    // Room for the prompt and every new token: the cache never grows while decoding.
    let prompt_len = batch.embeds.dims()[1];
    let mut cache = KvCache::with_capacity(model.llm.layers.len(), prompt_len + config.max_new_tokens);
    let mut all_embeds = batch.embeds.clone();
    let mut all_positions = batch.positions.clone();
    let mut logits = if config.use_cache {
        model.prefill(&batch, &mut cache)
    } else {
        last_logits(model, &all_embeds, &all_positions, &valid)
    };

    for _step in 0..config.max_new_tokens {
        let host = logits.into_data().convert::<f32>().into_vec::<f32>().expect("f32 logits");
        let mut tokens = Vec::with_capacity(b);
        for row in 0..b {
            let token = sampler.sample(&host[row * vocab..(row + 1) * vocab]);
            tokens.push(token);
            if done[row] {
                continue;
            }
            if config.eos_ids.contains(&token) {
                done[row] = true;
                continue;
            }
            out[row].push(token);
            if !on_token(row, token) {
                done[row] = true;
            }
        }
        if done.iter().all(|d| *d) || out.iter().map(Vec::len).max() == Some(config.max_new_tokens) {
            break;
        }
        // Feed the chosen tokens (finished rows keep decoding; their output is ignored).
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [b, 1]),
            &device,
        );
        let embeds = model.llm.embed(ids);
        let positions = Tensor::<B, 2, Int>::from_data(TensorData::new(next_pos.clone(), [b, 1]), &device);
        next_pos.iter_mut().for_each(|p| *p += 1);
        valid.iter_mut().for_each(|v| v.push(true));
        logits = if config.use_cache {
            let padded = valid.iter().any(|v| v.iter().any(|x| !x));
            let mask = padded.then(|| padded_causal_mask::<B>(&valid, 1, &device));
            let hidden = model.llm.forward_embeds(embeds, positions, mask, Some(&mut cache));
            model.llm.logits(hidden).reshape([b, vocab])
        } else {
            all_embeds = Tensor::cat(vec![all_embeds, embeds], 1);
            all_positions = Tensor::cat(vec![all_positions, positions], 1);
            last_logits(model, &all_embeds, &all_positions, &valid)
        };
    }
    out
}

fn last_logits<B: Backend>(
    model: &Llava<B>, embeds: &Tensor<B, 3>, positions: &Tensor<B, 2, Int>, valid: &[Vec<bool>],
) -> Tensor<B, 2> {
    let [b, len, _] = embeds.dims();
    let padded = valid.iter().any(|v| v.iter().any(|x| !x));
    let mask = padded.then(|| padded_causal_mask::<B>(valid, len, &embeds.device()));
    let hidden = model.llm.forward_embeds(embeds.clone(), positions.clone(), mask, None);
    let d = hidden.dims()[2];
    model.llm.logits(hidden.slice([0..b, len - 1..len, 0..d])).reshape([b, model.llm.vocab_size()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(config: SamplingConfig, logits: &[f32], n: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(config);
        (0..n).map(|_| sampler.sample(logits)).collect()
    }

    #[test]
    fn sampling_parameters_out_of_range_are_refused() {
        let ok = SamplingConfig::default();
        assert!(ok.validate().is_ok());
        for (temperature, top_p) in
            [(f32::NAN, 1.0), (-0.1, 1.0), (f32::INFINITY, 1.0), (0.7, 0.0), (0.7, 1.5), (0.7, f32::NAN)]
        {
            let bad = SamplingConfig { temperature, top_p, seed: 0 };
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn greedy_is_argmax_with_first_index_on_ties() {
        assert_eq!(draws(SamplingConfig::default(), &[0.1, 2.0, 2.0, -1.0], 5), vec![1; 5]);
    }

    #[test]
    fn argmax_agrees_with_the_scalar_loop_on_long_rows() {
        let scalar = |v: &[f32]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best }) as u32;
        for len in [1usize, 15, 16, 17, 100, 32064] {
            for at in [0, len / 3, len - 1] {
                let mut v: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 2.0).collect();
                v[at] = 5.0;
                assert_eq!(argmax(&v), at as u32, "len {len}, max at {at}");
                // A tie later keeps the first; a NaN elsewhere never wins; a NaN first does.
                v[len - 1] = 5.0;
                assert_eq!(argmax(&v), scalar(&v));
                if len > 2 {
                    v[1] = f32::NAN;
                    assert_eq!(argmax(&v), scalar(&v));
                }
                v[0] = f32::NAN;
                assert_eq!(argmax(&v), 0);
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 20]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn sampling_is_reproducible_for_a_seed() {
        let logits = [0.5, 0.2, 0.1, 0.0, -0.3];
        let config = |seed| SamplingConfig { temperature: 1.0, top_p: 1.0, seed };
        assert_eq!(draws(config(7), &logits, 200), draws(config(7), &logits, 200));
        assert_ne!(draws(config(7), &logits, 200), draws(config(8), &logits, 200));
    }

    #[test]
    fn temperature_sampling_follows_softmax_of_scaled_logits() {
        let logits = [1.0f32, 0.0, -1.0];
        let t = 0.7f32;
        let n = 40_000;
        let got = draws(SamplingConfig { temperature: t, top_p: 1.0, seed: 3 }, &logits, n);
        let z: f32 = logits.iter().map(|l| (l / t).exp()).sum();
        for (i, l) in logits.iter().enumerate() {
            let expected = (l / t).exp() / z;
            let freq = got.iter().filter(|&&x| x == i as u32).count() as f32 / n as f32;
            // Binomial standard deviation at n = 40k is below 0.0025; allow 4 of them.
            assert!((freq - expected).abs() < 0.01, "token {i}: {freq} vs {expected}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities ≈ 0.64, 0.24, 0.09, 0.03: top_p 0.8 keeps the first two only.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let got = draws(SamplingConfig { temperature: 1.0, top_p: 0.8, seed: 1 }, &logits, 5000);
        assert!(got.iter().all(|&t| t < 2), "a token outside the nucleus was drawn");
        let second = got.iter().filter(|&&t| t == 1).count() as f32 / got.len() as f32;
        // Renormalised within the nucleus: 0.24 / 0.88 ≈ 0.27.
        assert!((second - 0.269).abs() < 0.03, "{second}");
    }
}
