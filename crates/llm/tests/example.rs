//! The `generate` example runs on a LLaMA folder written the way Hugging Face writes one
//! (safetensors + config.json) and gives the same greedy tokens as re-running the whole sequence
//! without the cache.

#[path = "../examples/generate.rs"]
mod example;

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use llava_checkpoint::{Exporter, SaveDtype};
use llava_llm::LlamaConfig;

#[test]
fn the_example_loads_a_llama_folder_and_generates_greedily() {
    let dir = tempfile::tempdir().unwrap();
    let device = Default::default();
    let config = LlamaConfig {
        vocab_size: 97,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        eos_token_id: None,
        ..Default::default()
    };
    Flex::seed(&device, 5);
    let model = config.init::<Flex>(&device);
    let mut e = Exporter::new();
    model.export(&mut e, "model", "lm_head");
    e.save(&dir.path().join("model.safetensors"), SaveDtype::F32, &[("format", "pt")]).unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_hf_json().to_string()).unwrap();

    let prompt = [1i64, 17, 42, 5];
    let generated = example::run(dir.path(), &prompt, 6).unwrap();
    assert_eq!(generated.len(), 6);

    // The same tokens from full forward passes, no cache.
    let mut ids = prompt.to_vec();
    for &token in &generated {
        let t = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device);
        let logits = model.forward_ids(t, None);
        let [_, len, vocab] = logits.dims();
        let last = logits.slice([0..1, len - 1..len, 0..vocab]).into_data().to_vec::<f32>().unwrap();
        assert_eq!(llava_kernels::argmax(&last) as i64, token);
        ids.push(token);
    }
}
