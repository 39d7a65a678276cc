//! CLIP image preprocessing, equal to Hugging Face's `CLIPImageProcessor` (transformers 4.37):
//! convert to RGB, resize the shortest edge with PIL's bicubic filter (reproduced exactly,
//! including its fixed-point rounding), center crop (zero padding when too small), rescale by
//! 1/255 and normalise. The reference's `pad` aspect mode first pastes the image centred on a
//! square canvas of the mean colour (`expand2square`).

use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: cannot read image: {reason}")]
    Decode { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
}

/// How a non-square image becomes square (`image_aspect_ratio` in LLaVA configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AspectMode {
    /// Resize the shortest edge, then center crop (`square`, the paper and LLaVA v1.0).
    #[default]
    #[serde(alias = "square", alias = "crop")]
    Crop,
    /// `expand2square` with the mean colour, then resize (LLaVA-1.5).
    Pad,
}

impl std::str::FromStr for AspectMode {
    type Err = String;

    /// The names LLaVA's configs and command lines use: `square` (or `crop`) and `pad`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "square" | "crop" => Ok(AspectMode::Crop),
            "pad" => Ok(AspectMode::Pad),
            other => Err(format!("unknown image aspect `{other}` (square/crop or pad)")),
        }
    }
}

/// The fields of `preprocessor_config.json` that matter.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    pub shortest_edge: usize,
    pub crop_height: usize,
    pub crop_width: usize,
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ProcessorConfig {
    /// CLIP's processor at `size` pixels (224 for ViT-L/14, 336 for -336).
    pub fn clip(size: usize) -> Self {
        Self {
            shortest_edge: size,
            crop_height: size,
            crop_width: size,
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            do_normalize: true,
            rescale_factor: 1.0 / 255.0,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }

    /// Reads a `preprocessor_config.json` (or the directory holding it), in the old layout
    /// (`size: 224`, `crop_size: 224`) or the new (`size: {shortest_edge}`, `crop_size: {height, width}`).
    pub fn from_path(path: &Path) -> Result<Self, ImageError> {
        let file = if path.is_dir() { path.join("preprocessor_config.json") } else { path.to_path_buf() };
        let err = |reason: String| ImageError::Config { path: file.clone(), reason };
        let text = std::fs::read_to_string(&file).map_err(|e| err(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        Self::from_json(&json).map_err(err)
    }

    pub fn from_json(json: &serde_json::Value) -> Result<Self, String> {
        let mut c = Self::clip(224);
        let edge = match json.get("size") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::Object(o)) => o.get("shortest_edge").and_then(|v| v.as_u64()),
            None => Some(224),
            Some(_) => None,
        };
        c.shortest_edge = edge.ok_or("field `size` must be a number or {\"shortest_edge\": N}")? as usize;
        match json.get("crop_size") {
            Some(serde_json::Value::Number(n)) => {
                c.crop_height = n.as_u64().unwrap_or(224) as usize;
                c.crop_width = c.crop_height;
            }
            Some(serde_json::Value::Object(o)) => {
                c.crop_height = o.get("height").and_then(|v| v.as_u64()).ok_or("crop_size.height missing")? as usize;
                c.crop_width = o.get("width").and_then(|v| v.as_u64()).ok_or("crop_size.width missing")? as usize;
            }
            None => {
                c.crop_height = c.shortest_edge;
                c.crop_width = c.shortest_edge;
            }
            Some(_) => return Err("field `crop_size` must be a number or {height, width}".into()),
        }
        let flag = |name: &str, default: bool| json.get(name).and_then(|v| v.as_bool()).unwrap_or(default);
        c.do_resize = flag("do_resize", true);
        c.do_center_crop = flag("do_center_crop", true);
        c.do_rescale = flag("do_rescale", true);
        c.do_normalize = flag("do_normalize", true);
        if let Some(f) = json.get("rescale_factor").and_then(|v| v.as_f64()) {
            c.rescale_factor = f;
        }
        let triple = |name: &str| -> Result<Option<[f32; 3]>, String> {
            match json.get(name) {
                None => Ok(None),
                Some(v) => {
                    let a: Vec<f32> = serde_json::from_value(v.clone()).map_err(|e| format!("`{name}`: {e}"))?;
                    <[f32; 3]>::try_from(a).map(Some).map_err(|_| format!("`{name}` must have 3 values"))
                }
            }
        };
        if let Some(m) = triple("image_mean")? {
            c.image_mean = m;
        }
        if let Some(s) = triple("image_std")? {
            c.image_std = s;
        }
        c.validate()?;
        Ok(c)
    }

    /// Values preprocessing cannot use: a zero or non-finite standard deviation (every pixel
    /// would be NaN or infinite), a non-finite mean or rescale factor, and sizes of zero or past
    /// [`MAX_RESIZED_SIDE`] (a crop of 10⁹ pixels would be allocated before any image is read).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = self.image_std.iter().find(|s| !(s.is_finite() && **s != 0.0)) {
            return Err(format!("image_std holds {s}: every value must be finite and not 0"));
        }
        if let Some(m) = self.image_mean.iter().find(|m| !m.is_finite()) {
            return Err(format!("image_mean holds {m}: every value must be finite"));
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return Err(format!("rescale_factor = {} must be finite and positive", self.rescale_factor));
        }
        for (field, value) in [
            ("size.shortest_edge", self.shortest_edge),
            ("crop_size.height", self.crop_height),
            ("crop_size.width", self.crop_width),
        ] {
            if value == 0 || value as u64 > MAX_RESIZED_SIDE {
                return Err(format!("{field} = {value} must be between 1 and {MAX_RESIZED_SIDE}"));
            }
        }
        Ok(())
    }

    /// Side length of the model input (`[3, crop_height, crop_width]`).
    pub fn output_shape(&self) -> [usize; 3] {
        [3, self.crop_height, self.crop_width]
    }
}

/// Decodes an image file as 8-bit RGB the way PIL's `.convert("RGB")` does for common modes
/// (alpha dropped without compositing; grayscale and palette expanded). JPEGs are decoded by
/// libjpeg-turbo's algorithms ([`crate::jpeg`]): the same pixels as PIL, exactly.
///
/// Bounded: a file must be a regular file of at most [`MAX_IMAGE_FILE_BYTES`], and decode to at
/// most [`max_image_pixels`] pixels (PIL's decompression-bomb limit, where the reference raises
/// `DecompressionBombError`); anything else is an error naming the file, never an exhausted memory.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    use std::io::Read;
    let err = |reason: String| ImageError::Decode { path: path.to_path_buf(), reason };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(err(format!("{} bytes, more than the {MAX_IMAGE_FILE_BYTES} an image may have", meta.len())));
    }
    // One read (bounded even if the file grows meanwhile), then decode from memory with the format
    // sniffed from the bytes (not the extension): a mislabelled file still decodes.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_IMAGE_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| err(e.to_string()))?;
    decode_rgb(&bytes, path)
}

/// [`load_rgb`] on bytes already in memory (an upload); `label` names them in errors. The
/// format is sniffed from the bytes; the pixel limit is [`max_image_pixels`].
pub fn decode_rgb(bytes: &[u8], label: &Path) -> Result<RgbImage, ImageError> {
    let err = |reason: String| ImageError::Decode { path: label.to_path_buf(), reason };
    if crate::jpeg::is_jpeg(bytes) {
        return crate::jpeg::decode(bytes, max_image_pixels()).map_err(err);
    }
    let (w, h) = image_dimensions(bytes).map_err(err)?;
    let limit = max_image_pixels();
    if w as u64 * h as u64 > limit {
        return Err(err(format!(
            "{w}x{h} pixels, more than the {limit} allowed (PIL's decompression-bomb limit; raise it with --max-image-pixels)"
        )));
    }
    let mut reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| err(e.to_string()))?;
    reader.no_limits();
    let img = reader.decode().map_err(|e| err(e.to_string()))?;
    Ok(to_rgb(img))
}

/// The width and height an encoded image declares, read from its header only (nothing is
/// decoded): lets a server refuse a too-large upload before decoding it.
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), String> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map_err(|e| e.to_string())
}

/// Decodes and preprocesses an image held in memory (see [`decode_rgb`], [`preprocess`]).
pub fn preprocess_bytes(
    bytes: &[u8], label: &Path, config: &ProcessorConfig, mode: AspectMode,
) -> Result<Vec<f32>, ImageError> {
    let img = decode_rgb(bytes, label)?;
    check_preprocessable(label, img.width(), img.height(), config, mode)?;
    Ok(preprocess(&img, config, mode))
}

/// The largest image file read (bytes).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// The most pixels an image may decode to by default: PIL's `Image.MAX_IMAGE_PIXELS` × 2, where
/// PIL refuses. [`set_max_image_pixels`] changes it for the process, as PIL's is a global too.
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

static IMAGE_PIXEL_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(MAX_IMAGE_PIXELS);

/// Sets the most pixels an image may decode to, for every later read in this process (the
/// equivalent of assigning PIL's `Image.MAX_IMAGE_PIXELS`; `cargo xtask --max-image-pixels`).
pub fn set_max_image_pixels(pixels: u64) {
    IMAGE_PIXEL_LIMIT.store(pixels, std::sync::atomic::Ordering::Relaxed);
}

/// The pixel limit in force ([`MAX_IMAGE_PIXELS`] unless [`set_max_image_pixels`] changed it).
pub fn max_image_pixels() -> u64 {
    IMAGE_PIXEL_LIMIT.load(std::sync::atomic::Ordering::Relaxed)
}

/// The longest side a resized or padded image may have: far beyond any model's input, and small
/// enough that the resampling tables of a 1 × 10,000,000 image cannot exhaust memory.
pub const MAX_RESIZED_SIDE: u64 = 1 << 16;

/// Checks that preprocessing `w × h` under `mode` stays bounded (the shortest edge resized to
/// `config.shortest_edge` scales the other side by the aspect ratio; padding squares the longest).
pub fn check_preprocessable(
    path: &Path, w: u32, h: u32, config: &ProcessorConfig, mode: AspectMode,
) -> Result<(), ImageError> {
    let (w, h) = (w as u64, h as u64);
    let (short, long) = (w.min(h).max(1), w.max(h));
    let resized_long = match mode {
        AspectMode::Crop if config.do_resize => long * config.shortest_edge as u64 / short,
        AspectMode::Crop => long,
        AspectMode::Pad => long.max(config.shortest_edge as u64),
    };
    if resized_long > MAX_RESIZED_SIDE || (mode == AspectMode::Pad && long * long > max_image_pixels()) {
        return Err(ImageError::Decode {
            path: path.to_path_buf(),
            reason: format!(
                "{w}x{h} pixels: preprocessing would make a side of {resized_long} pixels (at most {MAX_RESIZED_SIDE}); \
                 the aspect ratio is too extreme for a {:?} image",
                mode
            ),
        });
    }
    Ok(())
}

/// Conversion to RGB as PIL's `Image.open(p).convert("RGB")`: alpha is dropped (not composited),
/// gray is replicated, 16-bit colour keeps the high byte (PIL decodes it that way), and 16-bit gray
/// saturates at 255 (PIL's `I;16` → `RGB` clips instead of scaling).
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageLuma16(i) => RgbImage::from_fn(w, h, |x, y| {
            let v = i.get_pixel(x, y).0[0].min(255) as u8;
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageLumaA16(i) => RgbImage::from_fn(w, h, |x, y| {
            let v = (i.get_pixel(x, y).0[0] >> 8) as u8;
            image::Rgb([v, v, v])
        }),
        DynamicImage::ImageRgb16(i) => {
            RgbImage::from_fn(w, h, |x, y| image::Rgb(i.get_pixel(x, y).0.map(|v| (v >> 8) as u8)))
        }
        DynamicImage::ImageRgba16(i) => RgbImage::from_fn(w, h, |x, y| {
            let [r, g, b, _] = i.get_pixel(x, y).0;
            image::Rgb([r, g, b].map(|v| (v >> 8) as u8))
        }),
        other => other.to_rgb8(),
    }
}

/// The reference's `expand2square`: a `max(w, h)` square of `background`, the image pasted
/// centred along the short axis at offset `(max - min) / 2`.
pub fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(background));
    let (x0, y0) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    image::imageops::replace(&mut out, img, x0 as i64, y0 as i64);
    out
}

/// The mean colour used for padding: `tuple(int(x * 255) for x in image_mean)`.
pub fn mean_color(mean: [f32; 3]) -> [u8; 3] {
    mean.map(|m| (m as f64 * 255.0) as u8)
}

/// Preprocesses an RGB image into a `[3, H, W]` channel-first f32 buffer.
pub fn preprocess(img: &RgbImage, config: &ProcessorConfig, mode: AspectMode) -> Vec<f32> {
    let padded;
    let img = match mode {
        AspectMode::Pad => {
            padded = expand_to_square(img, mean_color(config.image_mean));
            &padded
        }
        AspectMode::Crop => img,
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = if config.do_resize {
        let s = config.shortest_edge;
        if w <= h {
            (s, (s as f64 * h as f64 / w as f64) as usize)
        } else {
            ((s as f64 * w as f64 / h as f64) as usize, s)
        }
    } else {
        (w, h)
    };
    let (ch, cw) = if config.do_center_crop { (config.crop_height, config.crop_width) } else { (nh, nw) };
    // transformers' `center_crop`: origin `(size - crop) / 2`; when the crop is larger than the
    // image, the image is first zero-padded, centred, by `ceil((crop - size) / 2)`.
    let top_pad = if ch > nh { (ch - nh).div_ceil(2) } else { 0 };
    let left_pad = if cw > nw { (cw - nw).div_ceil(2) } else { 0 };
    let top = if ch > nh { 0 } else { (nh - ch) / 2 };
    let left = if cw > nw { 0 } else { (nw - cw) / 2 };
    // Only the part of the resized image that survives the crop is computed.
    let (ys, xs) = (top..top + ch.min(nh), left..left + cw.min(nw));
    let window = if config.do_resize {
        resize_bicubic_window(img.as_raw(), w, h, nw, nh, xs.clone(), ys.clone())
    } else {
        let mut out = Vec::with_capacity(xs.len() * ys.len() * 3);
        for y in ys.clone() {
            out.extend_from_slice(&img.as_raw()[(y * w + xs.start) * 3..(y * w + xs.end) * 3]);
        }
        out
    };
    let (win_w, win_h) = (xs.len(), ys.len());
    let scale = if config.do_rescale { config.rescale_factor } else { 1.0 };
    // Per channel and 8-bit level, the final value (rescale in f64 then f32, as numpy does).
    let table: Vec<[f32; 256]> = (0..3)
        .map(|c| {
            std::array::from_fn(|v| {
                let f = (v as f64 * scale) as f32;
                if config.do_normalize { (f - config.image_mean[c]) / config.image_std[c] } else { f }
            })
        })
        .collect();
    let mut out = vec![0f32; 3 * ch * cw];
    for (c, plane) in out.chunks_mut(ch * cw).enumerate() {
        plane.fill(table[c][0]); // zero padding
        for y in 0..win_h {
            let dst = &mut plane[(y + top_pad) * cw + left_pad..(y + top_pad) * cw + left_pad + win_w];
            let src = &window[y * win_w * 3..(y + 1) * win_w * 3];
            for (d, px) in dst.iter_mut().zip(src.chunks_exact(3)) {
                *d = table[c][px[c] as usize];
            }
        }
    }
    out
}

/// Loads and preprocesses an image file.
pub fn load_and_preprocess(path: &Path, config: &ProcessorConfig, mode: AspectMode) -> Result<Vec<f32>, ImageError> {
    let img = load_rgb(path)?;
    check_preprocessable(path, img.width(), img.height(), config, mode)?;
    Ok(preprocess(&img, config, mode))
}

// ---- PIL's bicubic resampling (libImaging/Resample.c), 8 bits per channel -----------------

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index and fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|k| {
                    let k = if total != 0.0 { k / total } else { *k };
                    let scaled = k * (1u64 << PRECISION_BITS) as f64;
                    if k < 0.0 { (scaled - 0.5) as i32 } else { (scaled + 0.5) as i32 }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL `Image.resize((out_w, out_h), BICUBIC)` on packed RGB: a horizontal pass, then a
/// vertical pass, each rounded back to 8 bits; a pass whose size does not change is skipped.
pub fn resize_bicubic(src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    resize_bicubic_window(src, w, h, out_w, out_h, 0..out_w, 0..out_h)
}

/// Like [`resize_bicubic`], but computes only the output window `xs` × `ys` (what a center crop
/// keeps): each output pixel depends only on its own filter support, so the window equals the
/// same window of the full resize. Returns `xs.len() × ys.len()` packed RGB.
pub fn resize_bicubic_window(
    src: &[u8], w: usize, h: usize, out_w: usize, out_h: usize, xs: std::ops::Range<usize>, ys: std::ops::Range<usize>,
) -> Vec<u8> {
    // Sums fit in i32 by construction (PIL's PRECISION_BITS leaves 2 bits of headroom).
    let half = 1i32 << (PRECISION_BITS - 1);
    let (win_w, win_h) = (xs.len(), ys.len());
    // Input rows the vertical pass will read.
    let vcoeffs = (out_h != h).then(|| coefficients(h, out_h));
    let (row0, row1) = match &vcoeffs {
        Some(c) => {
            let lo = ys.clone().map(|y| c[y].0).min().unwrap_or(0);
            let hi = ys.clone().map(|y| c[y].0 + c[y].1.len()).max().unwrap_or(0);
            (lo, hi)
        }
        None => (ys.start, ys.end),
    };
    // Horizontal pass over the needed rows and output columns.
    let mut horizontal = vec![0u8; (row1 - row0) * win_w * 3];
    if out_w != w {
        let coeffs = coefficients(w, out_w);
        for y in row0..row1 {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            let out = &mut horizontal[(y - row0) * win_w * 3..(y - row0 + 1) * win_w * 3];
            for (ox, x) in xs.clone().enumerate() {
                let (xmin, k) = &coeffs[x];
                let (mut r, mut g, mut b) = (half, half, half);
                let taps = &row[xmin * 3..(xmin + k.len()) * 3];
                for (px, &kk) in taps.chunks_exact(3).zip(k) {
                    r += px[0] as i32 * kk;
                    g += px[1] as i32 * kk;
                    b += px[2] as i32 * kk;
                }
                out[ox * 3] = clip8(r);
                out[ox * 3 + 1] = clip8(g);
                out[ox * 3 + 2] = clip8(b);
            }
        }
    } else {
        for y in row0..row1 {
            horizontal[(y - row0) * win_w * 3..(y - row0 + 1) * win_w * 3]
                .copy_from_slice(&src[(y * w + xs.start) * 3..(y * w + xs.end) * 3]);
        }
    }
    let Some(vcoeffs) = vcoeffs else { return horizontal };
    // Vertical pass: accumulate whole rows (contiguous memory) per tap.
    let stride = win_w * 3;
    let mut out = vec![0u8; win_h * stride];
    let mut acc = vec![0i32; stride];
    for (oy, y) in ys.enumerate() {
        let (ymin, k) = &vcoeffs[y];
        acc.fill(half);
        for (i, &kk) in k.iter().enumerate() {
            let row = &horizontal[(ymin + i - row0) * stride..(ymin + i - row0 + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * kk;
            }
        }
        for (o, &a) in out[oy * stride..(oy + 1) * stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}
