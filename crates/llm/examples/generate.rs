//! Greedy generation from a LLaMA / Vicuna checkpoint folder using only `llava-checkpoint` and
//! `llava-llm`: token ids in, token ids out (a tokenizer is `llava-data`'s business).
//!
//! ```sh
//! cargo run -p llava-llm --example generate -- ~/models/vicuna-7b-v1.5 1 15043 3186 --max-new-tokens 16
//! ```

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use llava_checkpoint::{Loader, WeightStore};
use llava_llm::{KvCache, LlamaConfig, LlamaModel};

/// Loads the folder and continues `prompt` greedily for up to `max_new_tokens` tokens (stopping
/// at the config's EOS), with the KV cache; returns the new ids.
pub fn run(dir: &Path, prompt: &[i64], max_new_tokens: usize) -> Result<Vec<i64>, Box<dyn std::error::Error>> {
    let device = Default::default();
    let config = LlamaConfig::from_hf_dir(dir)?;
    let store = WeightStore::open(dir)?;
    let model = LlamaModel::<Flex>::load_hf(&config, &Loader::new(&store, &device))?;
    let eos = config.eos_ids();
    let mut cache = KvCache::with_capacity(config.num_hidden_layers, prompt.len() + max_new_tokens);
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new_tokens {
        let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(next.clone(), [1, next.len()]), &device);
        let logits = model.forward_ids(ids, Some(&mut cache)); // [1, len, vocab]
        let [_, len, vocab] = logits.dims();
        let last = logits.slice([0..1, len - 1..len, 0..vocab]).into_data().to_vec::<f32>()?;
        let token = llava_kernels::argmax(&last);
        if eos.contains(&token) {
            break;
        }
        out.push(token as i64);
        next = vec![token as i64];
    }
    Ok(out)
}

#[allow(dead_code)] // `main` is unused when a test includes this file to call `run`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: generate DIR [PROMPT IDS...] [--max-new-tokens N]")?;
    let (mut prompt, mut max_new_tokens) = (Vec::new(), 32);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--max-new-tokens" => max_new_tokens = args.next().ok_or("--max-new-tokens needs a number")?.parse()?,
            id => prompt.push(id.parse()?),
        }
    }
    if prompt.is_empty() {
        prompt.push(1); // BOS
    }
    let ids = run(Path::new(&dir), &prompt, max_new_tokens)?;
    println!("{}", ids.iter().map(i64::to_string).collect::<Vec<_>>().join(" "));
    Ok(())
}
