//! Hostile data files: mutated JPEGs and PNGs, LLaVA dataset JSON, SentencePiece models and
//! preprocessor configs. Each mutated input must give a value or an error naming the file,
//! never a panic, and never an allocation past the bound the parser sets before allocating
//! (a small multiple of the file's size, or for images the pixel limit PIL also enforces).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use llava_data::Tokenizer;
use llava_data::dataset::{LlavaDataset, OnError};
use llava_data::image::{MAX_IMAGE_PIXELS, ProcessorConfig, load_rgb};
use llava_io::CountingAllocator;
use llava_io::mutations::mutations;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes each of `count` mutations of `seed` as `name` and runs `parse` on it: no panic, a peak
/// heap within `bound(file bytes)`, and an error that names the file. Returns how many were errors.
fn survive(
    seed: &[u8], name: &str, count: usize, rng: u64, bound: impl Fn(usize) -> usize,
    parse: impl Fn(&Path) -> Result<(), String>,
) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let mut errors = 0;
    for (i, input) in mutations(seed, count, rng).into_iter().enumerate() {
        std::fs::write(&path, &input).unwrap();
        let (outcome, peak) = CountingAllocator::peak_during(|| catch_unwind(AssertUnwindSafe(|| parse(&path))));
        let result = outcome.unwrap_or_else(|_| panic!("mutation {i} of {name}: the parser panicked"));
        assert!(peak <= bound(input.len()), "mutation {i} of {name}: {peak} bytes allocated for {} bytes", input.len());
        if let Err(e) = result {
            assert!(e.contains(name), "mutation {i} of {name}: the error names no file: {e}");
            errors += 1;
        }
    }
    errors
}

#[test]
fn mutated_jpegs_and_pngs_decode_or_are_errors_within_the_pixel_limit() {
    let _alone = CountingAllocator::exclusive();
    // The most a header may make the decoder allocate: the pixel limit's RGB buffer (and a
    // component plane beside it), plus the file.
    let bound = |bytes: usize| bytes * 8 + 5 * MAX_IMAGE_PIXELS as usize + (16 << 20);
    let decode = |p: &Path| load_rgb(p).map(|_| ()).map_err(|e| e.to_string());
    let mut tried = 0;
    for (file, rng) in [
        ("tests/fixtures/images/jpeg/s420.jpg", 1),
        ("tests/fixtures/images/jpeg/progressive.jpg", 2),
        ("tests/fixtures/images/jpeg/cmyk.jpg", 3),
        ("tests/fixtures/images/jpeg/gray.jpg", 4),
        ("tests/fixtures/images/inputs/tiny.png", 5),
        ("tests/fixtures/images/inputs/palette.png", 6),
        ("tests/fixtures/images/inputs/gray16.png", 7),
    ] {
        let seed = std::fs::read(repo().join(file)).unwrap();
        let name = Path::new(file).file_name().unwrap().to_str().unwrap();
        survive(&seed, name, 60, rng, bound, decode);
        tried += 60;
    }
    assert_eq!(tried, 420);
}

#[test]
fn mutated_dataset_files_are_read_or_named_errors() {
    let _alone = CountingAllocator::exclusive();
    let seed = std::fs::read(repo().join("datasets/lcs558k-sample/blip_laion_cc_sbu_16.json")).unwrap();
    let images = repo().join("datasets/lcs558k-sample/images");
    let errors = survive(
        &seed,
        "data.json",
        300,
        11,
        |b| b * 64 + (4 << 20),
        |p| LlavaDataset::open(p, &images, OnError::Skip).map(|_| ()).map_err(|e| e.to_string()),
    );
    assert!(errors > 0 && errors < 300, "{errors}");
}

#[test]
fn mutated_sentencepiece_models_load_or_are_named_errors() {
    let _alone = CountingAllocator::exclusive();
    let seed = std::fs::read(repo().join("datasets/tokenizers/llama/tokenizer.model")).unwrap();
    let errors = survive(
        &seed,
        "tokenizer.model",
        80,
        12,
        |b| b * 64 + (16 << 20),
        |p| {
            let tokenizer = Tokenizer::from_path(p).map_err(|e| e.to_string())?;
            // A model that loads must also encode and decode without a panic.
            let ids = tokenizer.encode("A photo of <image> two cats.", true);
            let _ = tokenizer.decode(&ids, true);
            Ok(())
        },
    );
    assert!(errors > 0, "{errors}");
}

#[test]
fn mutated_preprocessor_configs_are_read_or_named_errors() {
    let _alone = CountingAllocator::exclusive();
    let seed = std::fs::read(repo().join("tests/fixtures/images/configs/clip224.json")).unwrap();
    survive(
        &seed,
        "preprocessor_config.json",
        300,
        13,
        |b| b * 64 + (1 << 20),
        |p| ProcessorConfig::from_path(p).map(|_| ()).map_err(|e| e.to_string()),
    );
    // Values that cannot preprocess are refused, naming the field.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    for (json, field) in [
        (r#"{"image_std": [0.26, 0.0, 0.27]}"#, "image_std"),
        (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
        (r#"{"size": 0}"#, "size.shortest_edge"),
        (r#"{"crop_size": {"height": 1000000000, "width": 3}}"#, "crop_size.height"),
        (r#"{"rescale_factor": -1.0}"#, "rescale_factor"),
    ] {
        std::fs::write(&path, json).unwrap();
        let e = ProcessorConfig::from_path(&path).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains("preprocessor_config.json"), "{json}: {e}");
    }
}

/// A small tokenizer.json in the layout Hugging Face writes for LLaMA (BPE with byte fallback,
/// `▁` normalisation, special tokens): the seed of the mutations below.
const TOKENIZER_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[
 {"id":0,"content":"<unk>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
 {"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
 {"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},{"type":"Replace","pattern":{"String":" "},"content":"▁"}]},
"pre_tokenizer":null,"post_processor":null,
"decoder":{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"▁"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]},
"model":{"type":"BPE","dropout":null,"unk_token":"<unk>","continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":true,"byte_fallback":true,
 "vocab":{"<unk>":0,"<s>":1,"</s>":2,"▁":3,"a":4,"b":5,"c":6,"t":7,"▁a":8,"ab":9,"ca":10,"cat":11,"▁cat":12},
 "merges":["▁ a","a b","c a","ca t","▁ cat"]}}"#;

#[test]
fn mutated_tokenizer_json_files_load_or_are_named_errors() {
    let _alone = CountingAllocator::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("tokenizer.json");
    std::fs::write(&seed_path, TOKENIZER_JSON).unwrap();
    let seed = Tokenizer::from_path(&seed_path).unwrap();
    assert_eq!(seed.decode(&seed.encode("a cat", false), true), "a cat", "the seed itself is a working tokenizer");
    let errors = survive(
        TOKENIZER_JSON.as_bytes(),
        "tokenizer.json",
        300,
        14,
        |b| b * 256 + (16 << 20),
        |p| {
            let tokenizer = Tokenizer::from_path(p).map_err(|e| e.to_string())?;
            let ids = tokenizer.encode("a cat <s> ab", true);
            let _ = tokenizer.decode(&ids, true);
            Ok(())
        },
    );
    assert!(errors > 0 && errors < 300, "{errors}");
}
