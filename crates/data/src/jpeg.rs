//! JPEG decoding with the pixels PIL gives.
//!
//! The reference opens images with `PIL.Image.open(path).convert("RGB")`, and PIL decodes JPEG
//! with libjpeg-turbo at its defaults: the accurate integer IDCT ("islow"), fancy (triangular)
//! chroma upsampling, libjpeg's YCbCr → RGB tables, and no EXIF rotation. A pure-Rust decoder
//! computes the IDCT and upsampling differently (up to 4 levels apart), which moves a model's
//! logits; so JPEGs go through libjpeg's own code (MozJPEG, a libjpeg-turbo fork whose decoder
//! is libjpeg-turbo's, built from source by `mozjpeg-sys` with no system library and no
//! assembler: its C paths give the same values as libjpeg-turbo's SIMD ones). Grayscale is
//! replicated as PIL's `L → RGB`; CMYK is read as PIL reads it (Adobe's inverted convention,
//! `CMYK;I`) and converted with PIL's `cmyk2rgb` integer formula.

use image::RgbImage;
use mozjpeg::decompress::Format;

/// Whether `bytes` start like a JPEG file (SOI marker then another marker).
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decodes a JPEG held in memory to 8-bit RGB as PIL's `Image.open(..).convert("RGB")`, refusing
/// (before decoding any pixel) an image of more than `max_pixels` pixels. Corrupt data is an
/// error with libjpeg's message, never a panic.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    crate::quiet::catch_quietly(|| decode_unchecked(bytes, max_pixels)).and_then(|r| r)
}

fn decode_unchecked(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, String> {
    let jpeg = mozjpeg::Decompress::new_mem(bytes).map_err(|e| e.to_string())?;
    let (w, h) = jpeg.size();
    if w as u64 * h as u64 > max_pixels {
        return Err(format!(
            "{w}x{h} pixels, more than the {max_pixels} allowed (PIL's decompression-bomb limit; raise it with --max-image-pixels)"
        ));
    }
    // Scanlines are read as plain bytes (3 per RGB pixel, 1 per gray, 4 per CMYK): RGB needs no
    // copy; gray and CMYK are converted once.
    let rgb: Vec<u8> = match jpeg.image().map_err(|e| e.to_string())? {
        Format::RGB(mut started) => {
            let rgb = started.read_scanlines::<u8>().map_err(|e| e.to_string())?;
            started.finish().map_err(|e| e.to_string())?;
            rgb
        }
        Format::Gray(mut started) => {
            let gray = started.read_scanlines::<u8>().map_err(|e| e.to_string())?;
            started.finish().map_err(|e| e.to_string())?;
            gray.into_iter().flat_map(|v| [v, v, v]).collect()
        }
        Format::CMYK(mut started) => {
            let cmyk = started.read_scanlines::<u8>().map_err(|e| e.to_string())?;
            started.finish().map_err(|e| e.to_string())?;
            cmyk.chunks_exact(4).flat_map(|p| cmyk_to_rgb([p[0], p[1], p[2], p[3]].map(|v| 255 - v))).collect()
        }
    };
    RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| "the decoder returned too few pixels".to_string())
}

/// PIL's `cmyk2rgb` (libImaging/Convert.c): `nk - nk·c/255` per channel with `nk = 255 - k`,
/// in its rounding integer form.
fn cmyk_to_rgb([c, m, y, k]: [u8; 4]) -> [u8; 3] {
    let nk = 255 - k as i32;
    let muldiv255 = |a: i32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v as i32)).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_and_truncated_jpegs_are_errors_not_panics() {
        let good = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images/jpeg/s420.jpg"),
        )
        .unwrap();
        assert!(is_jpeg(&good));
        assert_eq!(decode(&good, 1 << 30).unwrap().dimensions(), (67, 45));
        assert!(decode(&good, 100).unwrap_err().contains("decompression-bomb limit"));
        for cut in [3, 20, 200, good.len() / 2] {
            // A truncated file decodes (libjpeg pads the missing rows, as PIL's libjpeg does
            // before PIL itself notices) or is an error; it never panics.
            let _ = decode(&good[..cut], 1 << 30);
        }
        let mut garbage = good.clone();
        for b in garbage.iter_mut().skip(2).step_by(7) {
            *b = b.wrapping_mul(31).wrapping_add(7);
        }
        let _ = decode(&garbage, 1 << 30);
    }
}
