//! Input ids and labels equal the reference's (llava-torch 1.2.2.post1 with transformers 4.37.2,
//! scripts/fixtures/gen_preprocess.py) for every template, both tokenizer modes, on real samples:
//! LCS-558K captions, LLaVA-Bench instructions (single/multi-turn, image first or last,
//! text-only) and ScienceQA questions, including the samples the mismatch rule masks entirely.

use std::path::Path;

use llava_data::Tokenizer;
use llava_data::conversation::conv_template;
use llava_data::preprocess::{PreprocessOptions, Turn, preprocess, preprocess_multimodal};

#[test]
fn ids_and_labels_equal_the_reference_for_every_template() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("tests/fixtures/preprocess/cases.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let samples = json["samples"].as_array().unwrap();
    let base = Tokenizer::from_path(&root.join("datasets/tokenizers/llama/tokenizer.model")).unwrap();
    let (mut checked, mut mismatches, mut truncated) = (0, 0, 0);
    for case in json["results"].as_array().unwrap() {
        let template_name = case["template"].as_str().unwrap();
        let template = conv_template(template_name).unwrap();
        let tokenizer = base.clone().with_legacy(case["legacy"].as_bool().unwrap());
        let sample = &samples[case["sample"].as_u64().unwrap() as usize];
        let has_image = sample.get("image").is_some();
        let options =
            PreprocessOptions { model_max_length: case["max_length"].as_u64().unwrap() as usize, ..Default::default() };
        let mut turns: Vec<Turn> = serde_json::from_value(sample["conversations"].clone()).unwrap();
        if has_image {
            preprocess_multimodal(&mut turns, &template, &options);
        }
        let what = format!(
            "template {template_name}, legacy {}, sample {} ({})",
            case["legacy"], case["sample"], sample["id"]
        );
        let result = preprocess(&turns, &tokenizer, &template, has_image, &options);
        if case.get("error").is_some() {
            assert!(result.is_err(), "{what}: the reference fails ({}), we did not", case["error"]);
            continue;
        }
        let result = result.unwrap_or_else(|e| panic!("{what}: {e}"));
        let ids: Vec<i64> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(case["labels"].clone()).unwrap();
        assert_eq!(result.input_ids, ids, "{what}: input ids\n{}", result.prompt);
        assert_eq!(result.labels, labels, "{what}: labels\n{}", result.prompt);
        assert_eq!(result.mismatch.is_some(), case["mismatch"].as_bool().unwrap(), "{what}: mismatch flag");
        mismatches += usize::from(result.mismatch.is_some());
        truncated +=
            usize::from(!has_image && ids.len() == options.model_max_length && options.model_max_length < 2048);
        checked += 1;
    }
    assert!(
        checked > 700 && mismatches > 0 && truncated > 0,
        "{checked} cases, {mismatches} mismatches, {truncated} truncated"
    );
}
