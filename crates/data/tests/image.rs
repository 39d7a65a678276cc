//! CLIP preprocessing against Hugging Face's CLIPImageProcessor (transformers 4.37.2, PIL;
//! scripts/fixtures/gen_images.py): real JPEG and PNG photos and synthetic PNGs (grayscale, alpha,
//! palette, 16-bit, smaller than the crop, tall), two processor configs (old and new layout), crop
//! and pad modes. After undoing the normalisation, every input must be within one 8-bit level
//! (JPEGs too: they decode to PIL's exact pixels, see `jpegs_decode_to_exactly_the_pixels_pil_gives`).

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
                // JPEGs decode to PIL's exact pixels, so they are held to the PNGs' bound (the one
                // level is the normalisation's float rounding, undone above).
                assert!(max <= 1.0, "{what}");
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

/// JPEG decoding equals PIL's `Image.open(p).convert("RGB")` exactly (scripts/fixtures/gen_jpeg_decode.py,
/// Pillow 13.0.0 with libjpeg-turbo 3.2.0): chroma 4:2:0, 4:2:2 and 4:4:4, progressive,
/// grayscale, CMYK, an EXIF orientation tag (not applied, as PIL does not), odd sizes, and the
/// real photos of the preprocessing fixtures.
#[test]
fn jpegs_decode_to_exactly_the_pixels_pil_gives() {
    let jpeg = dir().join("jpeg");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&jpeg).unwrap() {
        let expected_path = entry.unwrap().path();
        let name = expected_path.file_name().unwrap().to_str().unwrap().to_string();
        let Some(source_name) = name.strip_suffix(".png") else { continue };
        let source = [jpeg.join(source_name), dir().join("inputs").join(source_name)]
            .into_iter()
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{source_name}: no source"));
        let ours = llava_data::image::load_rgb(&source).unwrap();
        let expected = image::open(&expected_path).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), expected.dimensions(), "{source_name}");
        let differing = ours.pixels().zip(expected.pixels()).filter(|(a, b)| a != b).count();
        let max =
            ours.as_raw().iter().zip(expected.as_raw()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap_or(0);
        assert_eq!(differing, 0, "{source_name}: {differing} pixels differ from PIL's (max {max} levels)");
        checked.push(source_name.to_string());
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "cc3m_GCC_train_001097070.jpg",
            "cmyk.jpg",
            "exif_rotated.jpg",
            "extreme_ironing.jpg",
            "gray.jpg",
            "lcs_000010012.jpg",
            "lcs_000015270.jpg",
            "progressive.jpg",
            "q40_s420.jpg",
            "s420.jpg",
            "s422.jpg",
            "s444.jpg"
        ]
    );
}
