//! LLaVA JSON datasets: samples as the reference builds them, errors that name the file, index
//! and id (skip-and-count or stop), the prefetching loader, and the reference's samplers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use llava_data::Tokenizer;
use llava_data::conversation::conv_template;
use llava_data::dataset::{
    LlavaDataset, OnError, Prefetcher, SampleConfig, brief_description_turns, modality_length_grouped_indices,
    shuffled_indices,
};
use llava_data::image::{AspectMode, ProcessorConfig};
use llava_data::preprocess::PreprocessOptions;
use rand::SeedableRng;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn lcs() -> (PathBuf, PathBuf) {
    let d = root().join("datasets/lcs558k-sample");
    (d.join("blip_laion_cc_sbu_16.json"), d.join("images"))
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_path(&root().join("datasets/tokenizers/llama/tokenizer.model")).unwrap()
}

fn config(template: &str) -> SampleConfig {
    SampleConfig {
        template: conv_template(template).unwrap(),
        processor: ProcessorConfig::clip(224),
        aspect: AspectMode::Crop,
        options: PreprocessOptions::default(),
    }
}

#[test]
fn stage1_samples_mask_bos_and_image_only() {
    let (json, images) = lcs();
    let ds = LlavaDataset::open(&json, &images, OnError::Stop).unwrap();
    assert_eq!(ds.len(), 16);
    let tok = tokenizer();
    let s = ds.sample(0, &tok, &config("plain")).unwrap();
    assert_eq!(&s.input_ids[..2], &[1, -200]);
    assert_eq!(&s.labels[..2], &[-100, -100]);
    assert_eq!(&s.labels[2..], &s.input_ids[2..]);
    assert_eq!(*s.input_ids.last().unwrap(), 13, "the caption ends with the plain separator `\\n`");
    assert_eq!(s.pixel_values.as_ref().unwrap().len(), 3 * 224 * 224);
}

#[test]
fn bad_records_are_reported_with_file_index_and_id() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("data.json");
    let good = r#"{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}"#;
    let bad_from = r#"{"id": "b", "conversations": [{"from": "robot", "value": "hi"}]}"#;
    let no_conv = r#"{"id": "c"}"#;
    let missing_image = r#"{"id": "d", "image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}"#;
    std::fs::write(&json, format!("[{good}, {bad_from}, {no_conv}, {missing_image}]")).unwrap();

    let err = LlavaDataset::open(&json, tmp.path(), OnError::Stop).unwrap_err().to_string();
    assert!(
        err.contains("data.json") && err.contains("record 1") && err.contains("id b") && err.contains("robot"),
        "{err}"
    );

    let ds = LlavaDataset::open(&json, tmp.path(), OnError::Skip).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.skipped.len(), 2);
    assert!(ds.skipped[1].to_string().contains("record 2"), "{}", ds.skipped[1]);
    let err = ds.sample(1, &tokenizer(), &config("plain")).unwrap_err().to_string();
    assert!(err.contains("record 3") && err.contains("id d") && err.contains("nope.jpg"), "{err}");

    std::fs::write(&json, "[{\"id\": 1,").unwrap();
    let err = LlavaDataset::open(&json, tmp.path(), OnError::Skip).unwrap_err().to_string();
    assert!(err.contains("data.json") && err.contains("JSON"), "{err}");
}

#[test]
fn prefetcher_yields_in_order_what_sequential_processing_gives() {
    let (json, images) = lcs();
    let ds = Arc::new(LlavaDataset::open(&json, &images, OnError::Stop).unwrap());
    let tok = Arc::new(tokenizer());
    let cfg = Arc::new(config("plain"));
    let order = shuffled_indices(ds.len(), 7);
    let sequential: Vec<_> = order.iter().map(|&i| ds.sample(i, &tok, &cfg).unwrap()).collect();
    let prefetched: Vec<_> = Prefetcher::new(ds.clone(), tok, cfg, order.clone(), 3, 4).map(Result::unwrap).collect();
    assert_eq!(prefetched, sequential);
    assert_eq!(shuffled_indices(16, 7), order, "shuffling is seeded");
    assert_ne!(shuffled_indices(16, 8), order);
}

#[test]
fn modality_grouping_keeps_full_megabatches_single_modality() {
    // 23 image samples and 13 text-only ones, varied lengths.
    let lengths: Vec<i64> =
        (0..36).map(|i| if i % 3 == 2 && i < 39 && i != 35 { -(5 + i * 7 % 11) } else { 3 + i * 13 % 17 }).collect();
    let (batch, world) = (2, 2);
    let order = modality_length_grouped_indices(&lengths, batch, world, 0);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..36).collect::<Vec<_>>(), "a permutation");
    let megabatches: Vec<&[usize]> = order.chunks(batch * world).collect();
    let n_mm = lengths.iter().filter(|&&l| l > 0).count();
    let n_lang = lengths.len() - n_mm;
    let full = n_mm / 4 + n_lang / 4 - usize::from(n_mm % 4 == 0) - usize::from(n_lang.is_multiple_of(4));
    for mb in &megabatches[..full] {
        let image = mb.iter().filter(|&&i| lengths[i] > 0).count();
        assert!(image == 0 || image == mb.len(), "mixed megabatch {mb:?}");
    }
    // The leftovers come last, sorted by index.
    let tail: Vec<usize> = order[full * 4..].to_vec();
    assert!(tail.windows(2).all(|w| w[0] < w[1]), "{tail:?}");
    assert_eq!(modality_length_grouped_indices(&lengths, batch, world, 0), order, "seeded");
}

#[test]
fn brief_instructions_put_the_image_before_or_after() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let turns: Vec<_> = (0..40).map(|_| brief_description_turns("a cat", &mut rng)).collect();
    assert!(turns.iter().any(|t| t[0].value.starts_with("<image>\n")));
    assert!(turns.iter().any(|t| t[0].value.ends_with("\n<image>")));
    assert!(turns.iter().all(|t| t[1].value == "a cat"));
}

#[test]
fn the_longest_text_is_the_longest_sample_without_its_image() {
    // What memory plans pad a batch to: the longest sample, found without reading any image.
    let (json, images) = lcs();
    let dataset = LlavaDataset::open(&json, &images, OnError::Stop).unwrap();
    let tokenizer = tokenizer();
    for template in ["plain", "v1"] {
        let config = config(template);
        let longest = (0..dataset.len())
            .map(|i| dataset.sample(i, &tokenizer, &config).unwrap().input_ids.iter().filter(|&&t| t != -200).count())
            .max()
            .unwrap();
        let (with_image, without) = dataset.longest_text_tokens(&tokenizer, &config, dataset.len());
        assert_eq!((with_image, without), (longest, 0), "{template}");
    }
}
