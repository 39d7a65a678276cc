//! CLIP preprocessing against Hugging Face's CLIPImageProcessor (transformers 4.37.2, PIL;
//! scripts/fixtures/gen_images.py): real JPEG and PNG photos and synthetic PNGs (grayscale, alpha,
//! palette, 16-bit, smaller than the crop, tall), two processor configs (old and new layout), crop
//! and pad modes. After undoing the normalisation, PNG inputs must be within one 8-bit level and
//! JPEG inputs within 4 levels (0.5 on average): JPEG decoders differ slightly.

use std::path::{Path, PathBuf};

use llava_data::image::{AspectMode, ProcessorConfig, load_and_preprocess};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images")
}

#[test]
fn pixels_match_clip_image_processor() {
    let mut checked = 0;
    for config_name in ["clip224", "edge90crop80"] {
        let config = ProcessorConfig::from_path(&dir().join("configs").join(format!("{config_name}.json"))).unwrap();
        for entry in std::fs::read_dir(dir().join("inputs")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let jpeg = name.ends_with(".jpg");
            for (mode, mode_name) in [(AspectMode::Crop, "crop"), (AspectMode::Pad, "pad")] {
                let ours = load_and_preprocess(&path, &config, mode).unwrap();
                let expected =
                    image::open(dir().join("expected").join(format!("{name}__{config_name}__{mode_name}.png")))
                        .unwrap()
                        .to_rgb8();
                let (w, h) = expected.dimensions();
                assert_eq!(ours.len(), (3 * w * h) as usize, "{name} {config_name} {mode_name}: shape");
                let (mut max, mut sum) = (0f32, 0f64);
                for c in 0..3 {
                    for y in 0..h {
                        for x in 0..w {
                            let v = ours[(c * h * w + y * w + x) as usize];
                            let level = ((v * config.image_std[c as usize] + config.image_mean[c as usize]) * 255.0)
                                .round()
                                .clamp(0.0, 255.0);
                            let d = (level - expected.get_pixel(x, y).0[c as usize] as f32).abs();
                            max = max.max(d);
                            sum += d as f64;
                        }
                    }
                }
                let mean = sum / (3 * w * h) as f64;
                let what = format!("{name} {config_name} {mode_name}: max {max}, mean {mean:.3}");
                if jpeg {
                    assert!(max <= 4.0 && mean <= 0.5, "{what}");
                } else {
                    assert!(max <= 1.0, "{what}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 56);
}

#[test]
fn processor_config_layouts() {
    let old = ProcessorConfig::from_path(&dir().join("configs/clip224.json")).unwrap();
    assert_eq!((old.shortest_edge, old.crop_height, old.crop_width), (224, 224, 224));
    let new = ProcessorConfig::from_path(&dir().join("configs/edge90crop80.json")).unwrap();
    assert_eq!((new.shortest_edge, new.crop_height, new.crop_width), (90, 80, 80));
    let err = ProcessorConfig::from_json(&serde_json::json!({"size": "big"})).unwrap_err();
    assert!(err.contains("size"), "{err}");
}

#[test]
fn unreadable_images_name_the_file() {
    let tmp = std::env::temp_dir().join("llava-data-corrupt.png");
    std::fs::write(&tmp, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let err = load_and_preprocess(&tmp, &ProcessorConfig::clip(224), AspectMode::Crop).unwrap_err().to_string();
    assert!(err.contains("llava-data-corrupt.png"), "{err}");
    let err = load_and_preprocess(Path::new("/no/such/image.jpg"), &ProcessorConfig::clip(224), AspectMode::Crop)
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/image.jpg"), "{err}");
}

#[test]
fn hostile_images_are_errors_naming_the_file_not_exhausted_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ProcessorConfig::clip(224);
    // A valid PNG of a few hundred bytes whose resize would need a 224 × 4,480,000 image.
    let thin = tmp.path().join("thin.png");
    image::RgbImage::from_pixel(1, 20_000, image::Rgb([9, 9, 9])).save(&thin).unwrap();
    for mode in [AspectMode::Crop, AspectMode::Pad] {
        let msg = load_and_preprocess(&thin, &config, mode).unwrap_err().to_string();
        assert!(msg.contains("thin.png") && msg.contains("1x20000") && msg.contains("too extreme"), "{msg}");
    }
    // Not a regular file: never read until memory runs out.
    let msg = load_and_preprocess(Path::new("/dev/zero"), &config, AspectMode::Crop).unwrap_err().to_string();
    assert!(msg.contains("/dev/zero") && msg.contains("not a regular file"), "{msg}");
    // A panorama far from the limits still preprocesses.
    let wide = tmp.path().join("wide.png");
    image::RgbImage::from_pixel(900, 100, image::Rgb([9, 9, 9])).save(&wide).unwrap();
    assert_eq!(load_and_preprocess(&wide, &config, AspectMode::Crop).unwrap().len(), 3 * 224 * 224);
}
