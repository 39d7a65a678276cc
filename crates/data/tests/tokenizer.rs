//! Token ids against the reference tokenizers (scripts/fixtures/gen_tokenizer.py): SentencePiece
//! itself, and Hugging Face's slow LlamaTokenizer in legacy mode (which also splits `<s>`/`</s>`
//! written in the text), on the bundled LLaMA tokenizer.model.

use std::path::{Path, PathBuf};

use llava_data::Tokenizer;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn llama() -> Tokenizer {
    Tokenizer::from_path(&root().join("datasets/tokenizers/llama/tokenizer.model")).unwrap()
}

fn cases() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join("tests/fixtures/tokenizer/llama_ids.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cases"].as_array().unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn ids_equal_sentencepiece_where_no_special_tokens_are_written() {
    let tok = llama();
    let mut checked = 0;
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        if text.contains("<s>") || text.contains("</s>") {
            continue;
        }
        assert_eq!(tok.encode(text, false), ids(&case["sp"]), "text {text:?}");
        checked += 1;
    }
    assert!(checked > 15);
}

#[test]
fn ids_equal_hf_slow_llama_tokenizer_legacy() {
    let tok = llama();
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false), ids(&case["hf"]), "text {text:?}");
    }
}

#[test]
fn ids_equal_hf_slow_llama_tokenizer_non_legacy() {
    let tok = llama().with_legacy(false);
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false), ids(&case["hf_nonlegacy"]), "text {text:?}");
    }
}

#[test]
fn bos_is_prepended_only_when_asked() {
    let tok = llama();
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.encode("", true), vec![1]);
    assert_eq!(tok.encode("Hi", true)[0], 1);
    assert_ne!(tok.encode("Hi", false)[0], 1);
}

#[test]
fn decoding_round_trips_and_matches_hf() {
    let tok = llama();
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        let hf = ids(&case["hf"]);
        assert_eq!(tok.decode(&hf, false), case["decoded"].as_str().unwrap(), "decode of {text:?}");
        if !text.contains("<s>") && !text.contains("</s>") && !text.starts_with(' ') {
            assert_eq!(tok.decode(&hf, false), text, "round trip of {text:?}");
        }
    }
}

#[test]
fn streamed_decoding_equals_whole_decoding() {
    let tok = llama();
    for case in cases() {
        let hf = ids(&case["hf"]);
        // Generation streams with special tokens skipped (Hugging Face's legacy decoding inserts
        // a space *before* earlier text when a special token follows, which no stream can undo).
        let mut stream = tok.stream(true);
        let streamed: String = hf.iter().map(|&id| stream.push(id)).collect();
        assert_eq!(streamed, tok.decode(&hf, true), "stream of {:?}", case["text"]);
        assert!(!streamed.contains('\u{FFFD}'), "a split character leaked: {streamed:?}");
    }
}

#[test]
fn tokenizer_image_token_keeps_one_bos_and_one_sentinel_per_image() {
    let tok = llama();
    let ids = llava_data::tokenizer_image_token(&tok, "<image>");
    assert_eq!(ids, vec![1, -200]);
    let prompt = "USER: <image>\nWhat? ASSISTANT:";
    let ids = llava_data::tokenizer_image_token(&tok, prompt);
    let before: Vec<i64> = tok.encode("USER: ", true).iter().map(|&t| t as i64).collect();
    let after: Vec<i64> = tok.encode("\nWhat? ASSISTANT:", false).iter().map(|&t| t as i64).collect();
    let expected: Vec<i64> = before.into_iter().chain([-200]).chain(after).collect();
    assert_eq!(ids, expected);
    // The chunk after the image starts with its own dummy-prefix `▁` (29871) before the newline.
    assert_eq!(ids[ids.iter().position(|&t| t == -200).unwrap() + 1], 29871);
}
