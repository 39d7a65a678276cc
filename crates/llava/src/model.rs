//! The LLaVA model: vision tower → projector → image tokens spliced into the LLM's input.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use llava_data::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};
use llava_llm::{KvCache, LlamaModel, padded_causal_mask};
use llava_projector::Projector;
use llava_vision_encoder::ClipVisionModel;
use serde::{Deserialize, Serialize};

/// Which vision tokens LLaVA keeps (`mm_vision_select_feature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectFeature {
    /// Drop the class token (`patch`, llava-hf `default`).
    #[default]
    Patch,
    /// Keep it (`cls_patch`, llava-hf `full`).
    ClsPatch,
}

/// Side on which a batch is padded after splicing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PaddingSide {
    /// Training: real tokens first.
    #[default]
    Right,
    /// Batched generation: every row's last token is aligned at the end.
    Left,
}

#[derive(Module, Debug)]
pub struct Llava<B: Backend> {
    pub vision: ClipVisionModel<B>,
    pub projector: Projector<B>,
    pub llm: LlamaModel<B>,
    pub select_layer: i64,
    #[module(skip)]
    pub select_feature: SelectFeature,
}

/// Output of [`Llava::encode_images`].
#[derive(Debug, Clone)]
pub struct ImageFeatures<B: Backend> {
    /// The selected vision layer, CLS handled per `select_feature`: `[images, tokens, vision]`.
    pub vision: Tensor<B, 3>,
    /// After the projector: `[images, tokens, hidden]`.
    pub projected: Tensor<B, 3>,
}

/// A batch after image features have been spliced in and rows padded to one length.
#[derive(Debug, Clone)]
pub struct SplicedBatch<B: Backend> {
    /// `[batch, len, hidden]` (padding rows are zeros).
    pub embeds: Tensor<B, 3>,
    /// `[batch, len]`: -100 on prompts, images and padding (present when labels were given).
    pub labels: Option<Tensor<B, 2, Int>>,
    /// Rotary positions `[batch, len]`: 0.. over each row's real tokens, 0 on padding.
    pub positions: Tensor<B, 2, Int>,
    /// `valid[b][j]`: position `j` of row `b` is a real token.
    pub valid: Vec<Vec<bool>>,
    /// Real length of each row.
    pub lengths: Vec<usize>,
    pub padding: PaddingSide,
}

impl<B: Backend> SplicedBatch<B> {
    /// The attention mask the decoder needs: `None` when no row has left padding (causal
    /// attention alone never lets a real token see right padding).
    pub fn attention_mask(&self) -> Option<Tensor<B, 4, burn::tensor::Bool>> {
        let padded = self.lengths.iter().any(|&l| l != self.valid[0].len());
        (padded && self.padding == PaddingSide::Left)
            .then(|| padded_causal_mask::<B>(&self.valid, self.valid[0].len(), &self.embeds.device()))
    }
}

impl<B: Backend> Llava<B> {
    /// Encodes `[images, 3, H, W]` pixels into vision features and projected image tokens.
    pub fn encode_images(&self, pixels: Tensor<B, 4>) -> ImageFeatures<B> {
        let hidden = self.vision.hidden_state(pixels, self.select_layer);
        let vision = match self.select_feature {
            SelectFeature::Patch => {
                let [n, t, d] = hidden.dims();
                hidden.slice([0..n, 1..t, 0..d])
            }
            SelectFeature::ClsPatch => hidden,
        };
        let projected = self.projector.forward(vision.clone());
        ImageFeatures { vision, projected }
    }

    /// The reference's `prepare_inputs_labels_for_multimodal`: every `-200` in `input_ids` is
    /// replaced by the next image's `[tokens, hidden]` features (images are consumed in order
    /// across the batch), labels there become -100, rows are cut to `max_len` and padded.
    ///
    /// `image_features` must hold exactly one entry per `-200` in the batch.
    pub fn splice(
        &self, input_ids: &[Vec<i64>], labels: Option<&[Vec<i64>]>, image_features: Option<Tensor<B, 3>>,
        max_len: Option<usize>, padding: PaddingSide,
    ) -> SplicedBatch<B> {
        let device = self.llm.embed_tokens.weight.device();
        let hidden = self.llm.hidden_size();
        // Embed every text token of the batch in one call, then cut the pieces out.
        let text_ids: Vec<i64> = input_ids.iter().flatten().copied().filter(|&t| t != IMAGE_TOKEN_INDEX).collect();
        let n_images = input_ids.iter().flatten().filter(|&&t| t == IMAGE_TOKEN_INDEX).count();
        let text_embeds = (!text_ids.is_empty()).then(|| {
            let n = text_ids.len();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(text_ids, [1, n]), &device);
            self.llm.embed(ids).reshape([n, hidden])
        });
        // Image features follow the text embeddings' dtype (they differ only when the vision
        // tower and the LLM were loaded in different dtypes).
        let embeds_dtype = text_embeds.as_ref().map(|e| e.dtype()).unwrap_or_else(|| self.llm.activation_dtype());
        let image_features = image_features.map(|f| f.cast(embeds_dtype));
        let image_tokens = image_features.as_ref().map_or(0, |f| f.dims()[1]);
        if let Some(f) = &image_features {
            assert_eq!(f.dims()[0], n_images, "{} image feature sets for {} <image> positions", f.dims()[0], n_images);
        } else {
            assert_eq!(n_images, 0, "the batch has <image> positions but no images were given");
        }

        let mut rows: Vec<Tensor<B, 2>> = Vec::with_capacity(input_ids.len());
        let mut row_labels: Vec<Vec<i64>> = Vec::with_capacity(input_ids.len());
        let (mut text_at, mut image_at) = (0usize, 0usize);
        for (b, ids) in input_ids.iter().enumerate() {
            let mut pieces = Vec::new();
            let mut lab = Vec::new();
            let mut run = 0usize;
            let flush = |run: &mut usize, text_at: &mut usize, pieces: &mut Vec<Tensor<B, 2>>| {
                if *run > 0 {
                    let e = text_embeds.as_ref().expect("text embeddings");
                    pieces.push(e.clone().slice([*text_at..*text_at + *run, 0..hidden]));
                    *text_at += *run;
                    *run = 0;
                }
            };
            for (j, &t) in ids.iter().enumerate() {
                if t == IMAGE_TOKEN_INDEX {
                    flush(&mut run, &mut text_at, &mut pieces);
                    let f = image_features.as_ref().expect("image features");
                    pieces.push(
                        f.clone()
                            .slice([image_at..image_at + 1, 0..image_tokens, 0..hidden])
                            .reshape([image_tokens, hidden]),
                    );
                    image_at += 1;
                    lab.extend(std::iter::repeat_n(IGNORE_INDEX, image_tokens));
                } else {
                    run += 1;
                    lab.push(labels.map_or(IGNORE_INDEX, |l| l[b][j]));
                }
            }
            flush(&mut run, &mut text_at, &mut pieces);
            let mut row = Tensor::cat(pieces, 0);
            let len = row.dims()[0];
            if let Some(max) = max_len.filter(|m| len > *m) {
                row = row.slice([0..max, 0..hidden]);
                lab.truncate(max);
            }
            rows.push(row);
            row_labels.push(lab);
        }

        let lengths: Vec<usize> = rows.iter().map(|r| r.dims()[0]).collect();
        let max = lengths.iter().copied().max().unwrap_or(0);
        let mut valid = Vec::with_capacity(rows.len());
        let mut positions = Vec::with_capacity(rows.len() * max);
        let mut padded_labels = Vec::with_capacity(rows.len() * max);
        let padded_rows: Vec<Tensor<B, 3>> = rows
            .into_iter()
            .zip(&row_labels)
            .map(|(row, lab)| {
                let len = row.dims()[0];
                let pad = max - len;
                let (v, p, l): (Vec<bool>, Vec<i64>, Vec<i64>) = match padding {
                    PaddingSide::Right => (
                        (0..max).map(|j| j < len).collect(),
                        (0..max).map(|j| if j < len { j as i64 } else { 0 }).collect(),
                        lab.iter().copied().chain(std::iter::repeat_n(IGNORE_INDEX, pad)).collect(),
                    ),
                    PaddingSide::Left => (
                        (0..max).map(|j| j >= pad).collect(),
                        (0..max).map(|j| if j >= pad { (j - pad) as i64 } else { 0 }).collect(),
                        std::iter::repeat_n(IGNORE_INDEX, pad).chain(lab.iter().copied()).collect(),
                    ),
                };
                valid.push(v);
                positions.extend(p);
                padded_labels.extend(l);
                let row = if pad == 0 {
                    row
                } else {
                    let zeros = Tensor::<B, 2>::zeros([pad, hidden], (&device, row.dtype()));
                    match padding {
                        PaddingSide::Right => Tensor::cat(vec![row, zeros], 0),
                        PaddingSide::Left => Tensor::cat(vec![zeros, row], 0),
                    }
                };
                row.unsqueeze::<3>()
            })
            .collect();
        let b = padded_rows.len();
        SplicedBatch {
            embeds: Tensor::cat(padded_rows, 0),
            labels: labels.map(|_| Tensor::from_data(TensorData::new(padded_labels, [b, max]), &device)),
            positions: Tensor::from_data(TensorData::new(positions, [b, max]), &device),
            valid,
            lengths,
            padding,
        }
    }

    /// Final-normed decoder states `[batch, len, hidden]` for a spliced batch (no cache).
    pub fn hidden(&self, batch: &SplicedBatch<B>) -> Tensor<B, 3> {
        self.llm.forward_embeds(batch.embeds.clone(), batch.positions.clone(), batch.attention_mask(), None)
    }

    /// Logits `[batch, len, vocab]` for a spliced batch (no cache).
    pub fn forward(&self, batch: &SplicedBatch<B>) -> Tensor<B, 3> {
        self.llm.logits(self.hidden(batch))
    }

    /// Runs the prompt through the decoder, filling `cache`; returns the logits of each row's
    /// last position `[batch, vocab]`.
    pub fn prefill(&self, batch: &SplicedBatch<B>, cache: &mut KvCache<B>) -> Tensor<B, 2> {
        let hidden =
            self.llm.forward_embeds(batch.embeds.clone(), batch.positions.clone(), batch.attention_mask(), Some(cache));
        let [b, len, d] = hidden.dims();
        let last = match batch.padding {
            PaddingSide::Left => hidden.slice([0..b, len - 1..len, 0..d]),
            PaddingSide::Right => {
                let idx: Vec<i64> = batch.lengths.iter().map(|&l| (l.max(1) - 1) as i64).collect();
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [b]), &hidden.device());
                let idx = idx.reshape([b, 1, 1]).expand([b, 1, d]);
                hidden.gather(1, idx)
            }
        };
        self.llm.logits(last).reshape([b, self.llm.vocab_size()])
    }
}
