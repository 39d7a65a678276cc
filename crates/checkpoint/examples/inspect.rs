//! Lists the tensors of a checkpoint (a folder or one file: safetensors, sharded, PyTorch `.bin`)
//! with their stored dtype and shape, without reading their data.
//!
//! ```sh
//! cargo run -p llava-checkpoint --example inspect -- ~/models/llava-1.5-7b-hf
//! ```

use std::path::Path;

use llava_checkpoint::WeightStore;

/// One line per tensor, sorted by name: `name dtype [shape]`.
pub fn run(path: &Path) -> Result<Vec<String>, llava_checkpoint::WeightsError> {
    let store = WeightStore::open(path)?;
    let mut lines: Vec<String> = store
        .names()
        .map(|name| {
            let info = store.info(name).expect("listed");
            format!("{name} {} {:?}", info.dtype.name(), info.shape)
        })
        .collect();
    lines.sort();
    Ok(lines)
}

#[allow(dead_code)] // `main` is unused when a test includes this file to call `run`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: inspect CHECKPOINT")?;
    for line in run(Path::new(&path))? {
        println!("{line}");
    }
    Ok(())
}
