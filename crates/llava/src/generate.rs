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
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self { max_new_tokens: 64, sampling: SamplingConfig::default(), eos_ids: vec![2] }
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
/// row, EOS excluded. Row `r` samples with seed `config.sampling.seed + r`. All rows join one
/// [`DecodeBatch`] at once and leave it as they finish.
pub fn generate<B: Backend>(
    model: &Llava<B>, prompts: &[Vec<i64>], pixels: Option<Tensor<B, 4>>, config: &GenerationConfig,
    mut on_token: impl FnMut(usize, u32) -> bool,
) -> Vec<Vec<u32>> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let _doing = llava_io::activity::doing(&format!(
        "generating for {} prompt(s) of up to {longest} tokens with up to {} new tokens",
        prompts.len(),
        config.max_new_tokens
    ));
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    if config.max_new_tokens == 0 || prompts.is_empty() {
        return out;
    }
    let mut batch = DecodeBatch::new(model);
    let requests = prompts.iter().enumerate().map(|(row, prompt)| SequenceRequest {
        prompt: prompt.clone(),
        max_new_tokens: config.max_new_tokens,
        sampling: SamplingConfig { seed: config.sampling.seed.wrapping_add(row as u64), ..config.sampling },
        eos_ids: config.eos_ids.clone(),
    });
    let ids = batch.join(requests.collect(), pixels);
    let first = ids[0];
    while !batch.is_empty() {
        batch.step(|id, token| {
            let row = (id - first) as usize;
            out[row].push(token);
            on_token(row, token)
        });
    }
    out
}

/// Names a sequence of a [`DecodeBatch`] (unique for the batch's lifetime).
pub type SequenceId = u64;

/// A sequence to generate: its prompt (token ids, `-200` where an image goes) and how to
/// continue it.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceRequest {
    pub prompt: Vec<i64>,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// The sequence ends after sampling any of these (not reported as a token).
    pub eos_ids: Vec<u32>,
}

/// Why a sequence left the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It sampled an end-of-sequence id.
    Eos,
    /// The caller's `on_token` returned `false` (a stop string appeared).
    Stopped,
    /// It produced `max_new_tokens`.
    Length,
}

/// Sequences being decoded together, which join and leave between steps (continuous batching).
///
/// The rows share one [`KvCache`], aligned at their last position: a row that joined with a
/// shorter history is padded at the front, and the attention mask hides the padding, so a row's
/// tokens do not depend on who else is in the batch. Joining runs the newcomers' prefill (as one
/// left-padded batch) and stacks their cache under the running rows'; leaving keeps the other
/// rows and drops the front positions only the leavers needed. Each row has its own sampler.
pub struct DecodeBatch<'m, B: Backend> {
    model: &'m Llava<B>,
    rows: Vec<Row>,
    cache: Option<KvCache<B>>,
    /// `valid[r][j]`: cache position `j` of row `r` is a real token (not front padding).
    valid: Vec<Vec<bool>>,
    /// Next-token logits of every row, `[rows, vocab]`, from the last prefill or step.
    logits: Option<Tensor<B, 2>>,
    next_id: SequenceId,
}

struct Row {
    id: SequenceId,
    sampler: Sampler,
    /// Rotary position of the row's next token.
    next_position: i64,
    produced: usize,
    max_new_tokens: usize,
    eos_ids: Vec<u32>,
}

impl<'m, B: Backend> DecodeBatch<'m, B> {
    pub fn new(model: &'m Llava<B>) -> Self {
        Self { model, rows: Vec::new(), cache: None, valid: Vec::new(), logits: None, next_id: 0 }
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The ids of the sequences in the batch, in row order.
    pub fn ids(&self) -> Vec<SequenceId> {
        self.rows.iter().map(|r| r.id).collect()
    }

    /// Cache positions per row (the longest history in the batch, padding included).
    pub fn positions(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    /// Adds sequences: their prompts run through the model now (one prefill for the group);
    /// their first tokens are sampled by the next [`DecodeBatch::step`]. `pixels` holds the
    /// images of the group's `-200` places, in order. Returns their ids, in order.
    ///
    /// # Panics
    /// When the number of images does not match the `-200` places (check prompts first, as
    /// [`crate::LoadedLlava::prompt_inputs`] does).
    pub fn join(&mut self, requests: Vec<SequenceRequest>, pixels: Option<Tensor<B, 4>>) -> Vec<SequenceId> {
        if requests.is_empty() {
            return Vec::new();
        }
        let prompts: Vec<Vec<i64>> = requests.iter().map(|r| r.prompt.clone()).collect();
        let features = pixels.map(|p| self.model.encode_images(p).projected);
        let spliced = self.model.splice(&prompts, None, features, None, PaddingSide::Left);
        let room = requests.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
        let mut cache = KvCache::with_capacity(self.model.llm.layers.len(), spliced.valid[0].len() + room);
        let logits = self.model.prefill(&spliced, &mut cache);

        let ids: Vec<SequenceId> = (self.next_id..self.next_id + requests.len() as u64).collect();
        self.next_id += requests.len() as u64;
        for ((request, &id), &length) in requests.into_iter().zip(&ids).zip(&spliced.lengths) {
            self.rows.push(Row {
                id,
                sampler: Sampler::new(request.sampling),
                next_position: length as i64,
                produced: 0,
                max_new_tokens: request.max_new_tokens,
                eos_ids: request.eos_ids,
            });
        }
        // Align the two groups' histories at their last position.
        let (old, new) = (self.positions(), spliced.valid[0].len());
        let total = old.max(new);
        let pad = |v: Vec<bool>, len: usize| std::iter::repeat_n(false, total - len).chain(v).collect::<Vec<_>>();
        let mut valid: Vec<Vec<bool>> = std::mem::take(&mut self.valid).into_iter().map(|v| pad(v, old)).collect();
        valid.extend(spliced.valid.into_iter().map(|v| pad(v, new)));
        self.valid = valid;
        let room = self.rows.iter().map(|r| r.max_new_tokens - r.produced).max().unwrap_or(0);
        self.cache = Some(match self.cache.take() {
            Some(running) => running.stack(cache, room),
            None => cache,
        });
        self.logits = Some(match self.logits.take() {
            Some(running) => Tensor::cat(vec![running, logits], 0),
            None => logits,
        });
        ids
    }

    /// One token for every sequence: samples from the pending logits, reports each token with
    /// `on_token(id, token)` (`false` = stop this sequence), removes the sequences that ended,
    /// and runs the others one position further. Returns the ones that ended, with why.
    pub fn step(&mut self, mut on_token: impl FnMut(SequenceId, u32) -> bool) -> Vec<(SequenceId, FinishReason)> {
        let Some(logits) = self.logits.take() else { return Vec::new() };
        let vocab = self.model.llm.vocab_size();
        let host = logits.into_data().convert::<f32>().into_vec::<f32>().expect("f32 logits");
        let mut next = Vec::with_capacity(self.rows.len());
        let mut ended = Vec::new();
        for (r, row) in self.rows.iter_mut().enumerate() {
            let why = if row.produced >= row.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                let token = row.sampler.sample(&host[r * vocab..(r + 1) * vocab]);
                if row.eos_ids.contains(&token) {
                    Some(FinishReason::Eos)
                } else {
                    row.produced += 1;
                    if !on_token(row.id, token) {
                        Some(FinishReason::Stopped)
                    } else if row.produced == row.max_new_tokens {
                        Some(FinishReason::Length)
                    } else {
                        next.push(token);
                        None
                    }
                }
            };
            if let Some(why) = why {
                ended.push((row.id, why));
            }
        }
        self.remove(&ended.iter().map(|e| e.0).collect::<Vec<_>>());
        if !self.rows.is_empty() {
            self.decode(&next);
        }
        ended
    }

    /// Removes sequences (a cancelled request) at once; unknown ids are ignored.
    pub fn cancel(&mut self, ids: &[SequenceId]) {
        self.remove(ids);
    }

    fn remove(&mut self, ids: &[SequenceId]) {
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&r| !ids.contains(&self.rows[r].id)).collect();
        if keep.len() == self.rows.len() {
            return;
        }
        let mut rows = std::mem::take(&mut self.rows).into_iter().map(Some).collect::<Vec<_>>();
        self.rows = keep.iter().map(|&r| rows[r].take().expect("each row kept once")).collect();
        if self.rows.is_empty() {
            (self.cache, self.valid, self.logits) = (None, Vec::new(), None);
            return;
        }
        // Front positions that are padding in every remaining row go.
        let valid: Vec<&Vec<bool>> = keep.iter().map(|&r| &self.valid[r]).collect();
        let drop_front = valid.iter().map(|v| v.iter().take_while(|x| !**x).count()).min().unwrap_or(0);
        self.valid = valid.into_iter().map(|v| v[drop_front..].to_vec()).collect();
        if let Some(cache) = &mut self.cache {
            cache.retain(&keep, drop_front);
        }
        if let Some(logits) = self.logits.take() {
            let index = Tensor::<B, 1, Int>::from_data(
                TensorData::new(keep.iter().map(|&r| r as i64).collect::<Vec<_>>(), [keep.len()]),
                &logits.device(),
            );
            self.logits = Some(logits.select(0, index));
        }
    }

    /// Feeds each row its token: one position further, the next logits pending.
    fn decode(&mut self, tokens: &[u32]) {
        let model = self.model;
        let device = model.llm.embed_tokens.weight.device();
        let b = self.rows.len();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [b, 1]),
            &device,
        );
        let positions = Tensor::<B, 2, Int>::from_data(
            TensorData::new(self.rows.iter().map(|r| r.next_position).collect::<Vec<_>>(), [b, 1]),
            &device,
        );
        self.rows.iter_mut().for_each(|r| r.next_position += 1);
        self.valid.iter_mut().for_each(|v| v.push(true));
        let padded = self.valid.iter().any(|v| !v[0]);
        let mask = padded.then(|| padded_causal_mask::<B>(&self.valid, 1, &device));
        let hidden = model.llm.forward_embeds(model.llm.embed(ids), positions, mask, self.cache.as_mut());
        self.logits = Some(model.llm.logits(hidden).reshape([b, model.llm.vocab_size()]));
    }
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
