//! From an OpenAI request to what the scheduler runs: the conversation rendered with the model's
//! template (as the reference's chat does it), tokenized with `<image>` places, images decoded
//! and preprocessed, limits checked. Every failure is an [`ApiError`] naming the field.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use base64::Engine;
use llava::LlavaConfig;
use llava::generate::SamplingConfig;
use llava_data::conversation::Conversation;
use llava_data::image::{AspectMode, ProcessorConfig};
use llava_data::{DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, Tokenizer, tokenizer_image_token};

use crate::api::{ApiError, ChatCompletionRequest, Content, Part, Role};

/// What the HTTP side knows of the model (the model itself lives on the scheduler's thread).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The id `GET /v1/models` lists and responses carry.
    pub id: String,
    pub tokenizer: Tokenizer,
    pub template: Conversation,
    pub config: LlavaConfig,
    pub processor: ProcessorConfig,
    pub aspect: AspectMode,
    pub has_vision: bool,
    /// The checkpoint layout, for error messages.
    pub layout: String,
}

/// Bounds on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of one image (decoded from base64 or read from disk).
    pub max_image_bytes: usize,
    /// Pixels of one image (width × height, read from its header before decoding).
    pub max_image_pixels: u64,
    /// Images in one request.
    pub max_images: usize,
    /// `max_tokens` when a request gives none (the reference's web UI: 512).
    pub default_max_tokens: usize,
    /// Local image paths (`file://` or plain) are read only inside this folder (canonical).
    pub local_images: Option<PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_image_bytes: 20 << 20,
            max_image_pixels: 50_000_000,
            max_images: 4,
            default_max_tokens: 512,
            local_images: None,
        }
    }
}

/// A request ready for the scheduler.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Token ids, `-200` at each image.
    pub ids: Vec<i64>,
    /// Each image preprocessed, `[3, H, W]` flattened.
    pub images: Vec<Vec<f32>>,
    /// The prompt's length with its images spliced in.
    pub prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// The template's stop string and the request's.
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a request body, naming the field at fault: `messages[0].content: invalid type ...`.
pub fn parse_request(body: &[u8]) -> Result<ChatCompletionRequest, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("the body is not valid JSON: {inner}")
        } else if path == "." {
            format!("invalid request: {inner}")
        } else {
            format!("{path}: {inner}")
        };
        let error = ApiError::bad_request(message);
        if path == "." { error } else { error.with_param(path) }
    })
}

/// Builds the prompt and reads the images of a request.
pub fn prepare(request: ChatCompletionRequest, info: &ModelInfo, limits: &Limits) -> Result<Prepared, ApiError> {
    if let Some(n) = request.n.filter(|&n| n != 1) {
        return Err(ApiError::bad_request(format!("n = {n}: only one choice per request is supported")).with_param("n"));
    }
    if request.messages.is_empty() {
        return Err(ApiError::bad_request("messages is empty: give at least one user message").with_param("messages"));
    }
    let sampling = SamplingConfig {
        temperature: request.temperature.unwrap_or(1.0),
        top_p: request.top_p.unwrap_or(1.0),
        seed: request.seed.unwrap_or_else(random_seed),
    };
    if let Err(e) = sampling.validate() {
        let param = if e.starts_with("temperature") { "temperature" } else { "top_p" };
        return Err(ApiError::bad_request(e).with_param(param));
    }
    let stops = request.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::bad_request(format!("stop has {} strings; at most 4", stops.len())).with_param("stop"));
    }
    let asked = match (request.max_completion_tokens, request.max_tokens) {
        (Some(n), _) => Some((n, "max_completion_tokens")),
        (None, Some(n)) => Some((n, "max_tokens")),
        (None, None) => None,
    };
    if let Some((0, field)) = asked {
        return Err(ApiError::bad_request(format!("{field} must be at least 1")).with_param(field));
    }

    // The conversation, as the reference's chat builds it: each image of a user message goes
    // before its text as `<image>\n`, unless the text marks the places itself.
    let mut conv = info.template.clone();
    let [user, assistant] = info.template.roles.clone();
    let mut images = Vec::new();
    let last = request.messages.len() - 1;
    for (i, message) in request.messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let (text, urls) = split_content(message.content.as_ref(), &field)?;
        match message.role {
            Role::System | Role::Developer => {
                if !urls.is_empty() {
                    return Err(ApiError::bad_request(format!("{field}: a system message cannot hold images"))
                        .with_param(field));
                }
                conv.system = text;
            }
            Role::Assistant => {
                if !urls.is_empty() {
                    return Err(ApiError::bad_request(format!("{field}: an assistant message cannot hold images"))
                        .with_param(field));
                }
                conv.append_message(&assistant, Some(&text));
            }
            Role::User => {
                let markers = text.matches(DEFAULT_IMAGE_TOKEN).count();
                let text = if markers == 0 {
                    llava::chat::with_image_places(&text, urls.len())
                } else if markers == urls.len() {
                    text
                } else {
                    return Err(ApiError::bad_request(format!(
                        "{field}: {} image(s) for {markers} `<image>` place(s) in the text: each image needs exactly one \
                         `<image>`, or none at all (then the images go before the text)",
                        urls.len()
                    ))
                    .with_param(field));
                };
                for (j, url) in &urls {
                    images.push((format!("{field}.content[{j}].image_url"), url.clone()));
                }
                conv.append_message(&user, Some(&text));
            }
        }
        if i == last && message.role != Role::User {
            return Err(
                ApiError::bad_request(format!("{field}: the last message must be the user's")).with_param("messages")
            );
        }
    }
    conv.append_message(&assistant, None);

    if !images.is_empty() && !info.has_vision {
        return Err(ApiError::bad_request(format!(
            "the request has {} image(s), but the {} checkpoint is a text-only model",
            images.len(),
            info.layout
        ))
        .with_code("no_vision_tower"));
    }
    if images.len() > limits.max_images {
        return Err(ApiError::bad_request(format!(
            "{} images in one request; this server takes at most {} (--max-images)",
            images.len(),
            limits.max_images
        ))
        .with_param("messages"));
    }
    let ids = tokenizer_image_token(&info.tokenizer, &conv.get_prompt());
    let places = ids.iter().filter(|&&t| t == IMAGE_TOKEN_INDEX).count();
    if places != images.len() {
        // `<image>` typed into a system or assistant message.
        return Err(ApiError::bad_request(format!(
            "the conversation has {places} `<image>` place(s) for {} image(s)",
            images.len()
        ))
        .with_param("messages"));
    }
    let prompt_tokens = info.config.prompt_length(&ids).map_err(|e| {
        ApiError::bad_request(e.to_string()).with_param("messages").with_code("context_length_exceeded")
    })?;
    let context = info.config.text.max_position_embeddings;
    let room = context - prompt_tokens;
    if room == 0 {
        return Err(ApiError::bad_request(format!(
            "the prompt is {prompt_tokens} tokens, the whole context of {context}: no room for a reply"
        ))
        .with_param("messages")
        .with_code("context_length_exceeded"));
    }
    // As the reference's model worker: the reply is cut to what the context has room for.
    let max_new_tokens = asked.map_or(limits.default_max_tokens, |(n, _)| n as usize).min(room);

    let mut pixels = Vec::with_capacity(images.len());
    for (field, url) in &images {
        let bytes = image_bytes(url, field, limits)?;
        pixels.push(decode_image(&bytes, field, info, limits)?);
    }
    let mut all_stops: Vec<String> = info.template.stop_str().map(str::to_string).into_iter().collect();
    all_stops.extend(stops);
    Ok(Prepared {
        ids,
        images: pixels,
        prompt_tokens,
        max_new_tokens,
        sampling,
        stops: all_stops,
        stream: request.stream.unwrap_or(false),
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// A message's text (parts joined by newlines) and its image URLs with their part index.
fn split_content(content: Option<&Content>, field: &str) -> Result<(String, Vec<(usize, String)>), ApiError> {
    match content {
        None => {
            Err(ApiError::bad_request(format!("{field}.content is missing")).with_param(format!("{field}.content")))
        }
        Some(Content::Text(text)) => Ok((text.clone(), Vec::new())),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::new();
            let mut urls = Vec::new();
            for (j, part) in parts.iter().enumerate() {
                match part {
                    Part::Text { text } => texts.push(text.as_str()),
                    Part::ImageUrl { image_url } => urls.push((j, image_url.url.clone())),
                }
            }
            Ok((texts.join("\n"), urls))
        }
    }
}

/// The bytes an image URL names: a `data:` URL (base64), or a local file when the server allows
/// a folder of them.
fn image_bytes(url: &str, field: &str, limits: &Limits) -> Result<Vec<u8>, ApiError> {
    let too_large = |bytes: usize| {
        ApiError::too_large(format!(
            "{field}: the image is {bytes} bytes, more than the {} this server takes (--max-image-bytes)",
            limits.max_image_bytes
        ))
        .with_param(field)
    };
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(
                ApiError::bad_request(format!("{field}: a data URL needs a comma before its data")).with_param(field)
            );
        };
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad_request(format!(
                "{field}: only base64 data URLs are read (data:image/...;base64,...)"
            ))
            .with_param(field));
        }
        // Base64 is 4 characters per 3 bytes: refuse before decoding.
        if data.len() / 4 * 3 > limits.max_image_bytes + 3 {
            return Err(too_large(data.len() / 4 * 3));
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|e| {
            ApiError::bad_request(format!("{field}: the data URL is not valid base64: {e}")).with_param(field)
        })?;
        if bytes.len() > limits.max_image_bytes {
            return Err(too_large(bytes.len()));
        }
        return Ok(bytes);
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad_request(format!(
            "{field}: images are not fetched from the network; send the image as a data:image/...;base64 URL"
        ))
        .with_param(field));
    }
    let Some(root) = &limits.local_images else {
        return Err(ApiError::bad_request(format!(
            "{field}: local image paths are read only when the server is started with --allow-local-images DIR; \
             send the image as a data:image/...;base64 URL"
        ))
        .with_param(field));
    };
    let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
    let full = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    // Canonical paths: neither `..` nor a symbolic link leads out of the folder.
    let outside = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            format!("{field}: {} is not inside the allowed image folder", path.display()),
        )
        .with_param(field)
    };
    let canonical = full.canonicalize().map_err(|_| outside())?;
    if !canonical.starts_with(root) || !canonical.is_file() {
        return Err(outside());
    }
    let size = std::fs::metadata(&canonical).map(|m| m.len()).unwrap_or(0);
    if size > limits.max_image_bytes as u64 {
        return Err(too_large(size as usize));
    }
    std::fs::read(&canonical).map_err(|e| ApiError::bad_request(format!("{field}: {e}")).with_param(field))
}

/// Decodes and preprocesses one image, refusing too many pixels (413) before decoding.
fn decode_image(bytes: &[u8], field: &str, info: &ModelInfo, limits: &Limits) -> Result<Vec<f32>, ApiError> {
    let undecodable = |reason: String| {
        ApiError::bad_request(format!("{field}: the image cannot be decoded: {reason}")).with_param(field)
    };
    let (w, h) = llava_data::image::image_dimensions(bytes).map_err(undecodable)?;
    if w as u64 * h as u64 > limits.max_image_pixels {
        return Err(ApiError::too_large(format!(
            "{field}: the image is {w}x{h} pixels, more than the {} this server takes (--max-image-pixels)",
            limits.max_image_pixels
        ))
        .with_param(field));
    }
    llava_data::image::preprocess_bytes(bytes, Path::new(field), &info.processor, info.aspect).map_err(|e| match e {
        llava_data::image::ImageError::Decode { reason, .. } => undecodable(reason),
        other => undecodable(other.to_string()),
    })
}

/// A seed for a sampled request that gives none.
fn random_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    (nanos as u64) ^ ((nanos >> 64) as u64)
}
