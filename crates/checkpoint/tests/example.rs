//! The `inspect` example lists every tensor of a sharded checkpoint, as its index names them.

#[path = "../examples/inspect.rs"]
mod example;

use std::path::Path;

#[test]
fn the_example_lists_every_tensor_of_a_sharded_checkpoint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/hf-mlp");
    let lines = example::run(&dir).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let mut names: Vec<&str> = index["weight_map"].as_object().unwrap().keys().map(String::as_str).collect();
    names.sort();
    let listed: Vec<&str> = lines.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(listed, names);
    let embed = lines.iter().find(|l| l.starts_with("language_model.model.embed_tokens.weight ")).unwrap();
    assert!(embed.ends_with("F32 [300, 64]"), "{embed}");
}
