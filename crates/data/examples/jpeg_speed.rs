//! JPEG decode time per image: libjpeg-turbo's decoder (`llava_data::jpeg`, what the pipeline
//! uses, PIL's exact pixels) against the `image` crate's pure-Rust decoder (zune-jpeg, used
//! before), on the same files in the same run. `scripts/bench/jpeg_speed_ref.py` times PIL on
//! the same files.
//!
//! ```sh
//! cargo run -p llava-data --example jpeg_speed -- datasets/lcs558k-sample/images 20
//! ```

use std::path::PathBuf;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: jpeg_speed DIR [PASSES]")?);
    let passes: usize = args.next().map(|p| p.parse()).transpose()?.unwrap_or(20);
    let mut files = Vec::new();
    let mut pending = vec![dir];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "jpg" || e == "jpeg") {
                files.push(std::fs::read(&path)?);
            }
        }
    }
    let images = files.len() * passes;
    let time = |decode: &dyn Fn(&[u8]) -> usize| {
        let start = Instant::now();
        let mut pixels = 0;
        for _ in 0..passes {
            for bytes in &files {
                pixels += decode(bytes);
            }
        }
        (start.elapsed().as_secs_f64() * 1e3 / images as f64, pixels)
    };
    let (ours, a) = time(&|b| llava_data::jpeg::decode(b, u64::MAX).map(|i| i.len()).unwrap_or(0));
    let (zune, b) = time(&|b| image::load_from_memory(b).map(|i| i.to_rgb8().len()).unwrap_or(0));
    assert_eq!(a, b, "both decoders give the same number of pixels");
    println!(
        "{} JPEGs x {passes}: libjpeg-turbo decoder {ours:.3} ms/image, image crate (zune-jpeg) {zune:.3} ms/image",
        files.len()
    );
    Ok(())
}
