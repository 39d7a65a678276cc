//! The `encode` example on the tiny CLIP tower of the parity fixtures gives the reference's
//! vision features (Hugging Face transformers, scripts/fixtures/gen_model_parity.py) once the
//! class token is dropped, as LLaVA does.

#[path = "../examples/encode.rs"]
mod example;

use std::path::Path;

use llava_checkpoint::WeightStore;

#[test]
fn the_example_gives_the_reference_vision_features() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/orig-linear");
    let (values, [n, t, d]) = example::run(&fixture.join("clip"), &fixture.join("expected.safetensors"), -2).unwrap();
    let expected = WeightStore::open(&fixture.join("expected.safetensors")).unwrap();
    let shape = expected.info("vision_features").unwrap().shape.clone();
    assert_eq!(shape, vec![n, t - 1, d]);
    let reference = expected.read_f32("vision_features", &shape).unwrap();
    let ours: Vec<f32> = values.chunks_exact(t * d).flat_map(|image| image[d..].iter().copied()).collect();
    let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "vision features differ by {diff}");
}
