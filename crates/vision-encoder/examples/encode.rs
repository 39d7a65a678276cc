//! The hidden state LLaVA takes from a CLIP vision tower (`hidden_states[-2]`) for pixels stored
//! as a `pixel_values` tensor `[images, 3, H, W]` in a safetensors file (what
//! `cargo xtask preprocess-image` or Hugging Face's CLIPImageProcessor produce).
//!
//! ```sh
//! cargo run -p llava-vision-encoder --example encode -- ~/models/clip-vit-large-patch14-336 px.safetensors
//! ```

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use llava_checkpoint::{Loader, WeightStore};
use llava_vision_encoder::{ClipVisionConfig, ClipVisionModel};

/// Loads the CLIP folder and returns `hidden_states[select_layer]` `[images, 1 + patches,
/// hidden]` (values, shape) for the `pixel_values` of `pixels_file`.
pub fn run(
    clip_dir: &Path, pixels_file: &Path, select_layer: i64,
) -> Result<(Vec<f32>, [usize; 3]), Box<dyn std::error::Error>> {
    let device = Default::default();
    let config = ClipVisionConfig::from_hf_dir(clip_dir)?;
    let model = ClipVisionModel::<Flex>::load_hf(&config, &Loader::new(&WeightStore::open(clip_dir)?, &device))?;
    let pixels = WeightStore::open(pixels_file)?;
    let shape = pixels.info("pixel_values").ok_or("no `pixel_values` tensor")?.shape.clone();
    let dims: [usize; 4] =
        shape.clone().try_into().map_err(|_| format!("pixel_values must be [images, 3, H, W], not {shape:?}"))?;
    let pixels = Tensor::<Flex, 4>::from_data(TensorData::new(pixels.read_f32("pixel_values", &shape)?, dims), &device);
    let hidden = model.hidden_state(pixels, select_layer);
    let dims = hidden.dims();
    Ok((hidden.into_data().to_vec::<f32>()?, dims))
}

#[allow(dead_code)] // `main` is unused when a test includes this file to call `run`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(clip), Some(pixels)) = (args.next(), args.next()) else {
        return Err("usage: encode CLIP_DIR PIXELS.safetensors".into());
    };
    let (values, dims) = run(Path::new(&clip), Path::new(&pixels), -2)?;
    println!("hidden_states[-2]: {dims:?}, first values {:?}", &values[..values.len().min(4)]);
    Ok(())
}
