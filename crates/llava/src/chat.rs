//! A multi-turn conversation with a loaded model, as the reference CLI (`llava/serve/cli.py`)
//! holds it: the image goes with the first user turn after it is set, every turn is generated from
//! the whole templated history, the reply streams, and EOS or the template's stop string ends it.
//! The command line's `chat` and (later) the server drive this type.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use llava_data::conversation::{Conversation, conv_template, template_for_model_name};
use llava_data::{DEFAULT_IMAGE_TOKEN, StreamDecoder, Tokenizer, tokenizer_image_token};

use crate::LlavaError;
use crate::generate::{GenerationConfig, SamplingConfig, generate};
use crate::load::LoadedLlava;

/// The conversation template: `name` when given, else the reference CLI's choice from the model
/// directory's name. Returns the chosen name with the template.
pub fn choose_template(name: Option<&str>, model_dir: Option<&Path>) -> Result<(String, Conversation), LlavaError> {
    let chosen = match name {
        Some(n) => n.to_string(),
        None => {
            let model_name =
                model_dir.and_then(|m| m.file_name()).map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            template_for_model_name(&model_name).to_string()
        }
    };
    let conv = conv_template(&chosen).ok_or_else(|| LlavaError::UnknownTemplate(chosen.clone()))?;
    Ok((chosen, conv))
}

/// A user message with `images` images, as the reference's chat sends it: one `<image>` and a
/// newline per image before the text.
pub fn with_image_places(text: &str, images: usize) -> String {
    format!("{}{text}", format!("{DEFAULT_IMAGE_TOKEN}\n").repeat(images))
}

/// Streams text and cuts it at the first stop string: what could still be the start of a stop
/// string is held back until the next piece shows whether it is.
#[derive(Debug, Clone, Default)]
pub struct StopStream {
    stops: Vec<String>,
    text: String,
    shown: usize,
    stopped: bool,
}

impl StopStream {
    pub fn new(stop: Option<&str>) -> Self {
        Self::with_stops(stop.map(str::to_string))
    }

    /// Several stop strings (the template's and a request's); empty ones are ignored.
    pub fn with_stops(stops: impl IntoIterator<Item = String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Self::default() }
    }

    /// Where the earliest stop string starts in the text so far.
    fn stop_at(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.text.find(s.as_str())).min()
    }

    /// Adds a piece of decoded text; returns the part that can be shown now (never a part of
    /// a stop string or anything after it, never half a UTF-8 character).
    pub fn push(&mut self, piece: &str) -> &str {
        if self.stopped {
            return "";
        }
        self.text += piece;
        let visible = match self.stop_at() {
            Some(i) => {
                self.stopped = true;
                i
            }
            None => {
                // The longest proper prefix of a stop string that the text ends with (prefixes cut
                // at character boundaries: a stop string may be non-ASCII).
                let held = self
                    .stops
                    .iter()
                    .filter_map(|stop| {
                        (1..stop.len())
                            .rev()
                            .filter(|&k| stop.is_char_boundary(k))
                            .find(|&k| self.text.ends_with(&stop[..k]))
                    })
                    .max()
                    .unwrap_or(0);
                self.text.len() - held
            }
        };
        let start = self.shown;
        self.shown = (start..=visible).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(start);
        &self.text[start..self.shown]
    }

    /// Whether a stop string has appeared.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The whole reply: everything before the stop string (held-back text included when the
    /// stream ended without it), and the part of it not yet shown.
    pub fn finish(&self) -> (&str, &str) {
        let end = self.stop_at().unwrap_or(self.text.len());
        let reply = &self.text[..end];
        (reply, &reply[self.shown.min(end)..])
    }
}

/// A reply as it streams: token ids decoded incrementally, then cut at the stop strings. What
/// [`ChatSession::send`] and the server show of a generation.
pub struct ReplyStream<'t> {
    decoder: StreamDecoder<'t>,
    stop: StopStream,
}

impl<'t> ReplyStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer, stops: impl IntoIterator<Item = String>) -> Self {
        Self { decoder: tokenizer.stream(true), stop: StopStream::with_stops(stops) }
    }

    /// Adds a token; returns the text that can be shown now.
    pub fn push(&mut self, token: u32) -> &str {
        let piece = self.decoder.push(token);
        self.stop.push(&piece)
    }

    /// Whether a stop string has appeared (generation should end).
    pub fn stopped(&self) -> bool {
        self.stop.stopped()
    }

    /// The whole reply and the part of it not yet shown (see [`StopStream::finish`]).
    pub fn finish(&self) -> (&str, &str) {
        self.stop.finish()
    }
}

/// One conversation with a loaded model.
pub struct ChatSession<'a, B: Backend> {
    loaded: &'a LoadedLlava<B>,
    template: Conversation,
    history: Conversation,
    image: Option<PathBuf>,
    pixels: Option<Tensor<B, 4>>,
    image_sent: bool,
    /// Sampling of the next reply; its seed moves on by one after each reply.
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
}

impl<'a, B: Backend> ChatSession<'a, B> {
    /// A new conversation in `template`; the model must ship a tokenizer.
    pub fn new(
        loaded: &'a LoadedLlava<B>, template: Conversation, sampling: SamplingConfig, max_new_tokens: usize,
    ) -> Result<Self, LlavaError> {
        if loaded.tokenizer.is_none() {
            return Err(LlavaError::NoTokenizer);
        }
        Ok(Self {
            loaded,
            history: template.clone(),
            template,
            image: None,
            pixels: None,
            image_sent: false,
            sampling,
            max_new_tokens,
        })
    }

    /// The roles of the template: (user, assistant).
    pub fn roles(&self) -> [String; 2] {
        self.template.roles.clone()
    }

    /// Forgets the history (the image stays set and goes with the next turn again).
    pub fn reset(&mut self) {
        self.history = self.template.clone();
        self.image_sent = false;
        self.pixels = None;
    }

    /// Sets the image for the next turn, starting a new conversation (a prompt holds one image).
    pub fn set_image(&mut self, path: &Path) -> Result<(), LlavaError> {
        if !self.loaded.has_vision {
            return Err(LlavaError::NoVisionTower { layout: format!("{:?}", self.loaded.layout) });
        }
        if !path.is_file() {
            return Err(LlavaError::config(path, "no such image file"));
        }
        self.image = Some(path.to_path_buf());
        self.reset();
        Ok(())
    }

    /// The conversation so far, as the template renders it.
    pub fn history(&self) -> &Conversation {
        &self.history
    }

    /// Sends one user message and generates the reply; `on_text` receives the reply's text as it
    /// streams (stop string withheld). Returns the whole reply, trimmed as it enters the history.
    pub fn send(&mut self, message: &str, mut on_text: impl FnMut(&str)) -> Result<String, LlavaError> {
        let tokenizer = self.loaded.tokenizer.as_ref().ok_or(LlavaError::NoTokenizer)?;
        let device = self.loaded.model.llm.embed_tokens.weight.device();
        let mut message = message.to_string();
        if let Some(path) = self.image.as_ref().filter(|_| !self.image_sent) {
            self.pixels =
                Some(crate::image_tensor::<B>(path, &self.loaded.processor, self.loaded.config.image_aspect, &device)?);
            message = with_image_places(&message, 1);
        }
        let [user, assistant] = self.template.roles.clone();
        let mut conv = self.history.clone();
        conv.append_message(&user, Some(&message));
        conv.append_message(&assistant, None);
        let ids = tokenizer_image_token(tokenizer, &conv.get_prompt());
        let images = ids.iter().filter(|&&t| t == llava_data::IMAGE_TOKEN_INDEX).count();
        let given = usize::from(self.pixels.is_some());
        if images != given {
            return Err(LlavaError::ImageCount { markers: images, images: given });
        }
        // A conversation that outgrew the context is refused (the history is kept; /reset starts over).
        self.loaded.check_context(&ids)?;
        // The image is sent once it is in a prompt that passed the checks.
        self.image_sent |= images > 0;
        let config = GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling,
            eos_ids: self.loaded.eos_ids(),
        };
        self.sampling.seed = self.sampling.seed.wrapping_add(1);
        let mut stream = ReplyStream::new(tokenizer, self.template.stop_str().map(str::to_string));
        generate(&self.loaded.model, &[ids], self.pixels.clone(), &config, |_, token| {
            on_text(stream.push(token));
            !stream.stopped()
        });
        let (reply, rest) = stream.finish();
        on_text(rest);
        let reply = reply.trim().to_string();
        conv.messages.pop();
        conv.append_message(&assistant, Some(&reply));
        self.history = conv;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::StopStream;

    fn run(stop: Option<&str>, pieces: &[&str]) -> (String, String) {
        let mut s = StopStream::new(stop);
        let mut shown = String::new();
        for p in pieces {
            shown += s.push(p);
        }
        let (reply, rest) = s.finish();
        shown += rest;
        (shown, reply.to_string())
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_shown() {
        let (shown, reply) = run(Some("</s>"), &["Hello", " wor", "ld<", "/", "s>", " more"]);
        assert_eq!(shown, "Hello world");
        assert_eq!(reply, "Hello world");
    }

    #[test]
    fn held_back_text_that_was_not_the_stop_string_is_shown() {
        let mut s = StopStream::new(Some("###"));
        assert_eq!(s.push("a #"), "a ");
        assert_eq!(s.push("#b"), "##b");
        assert!(!s.stopped());
        assert_eq!(run(Some("###"), &["tail #"]).0, "tail #");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_ends_the_reply() {
        let mut s = StopStream::with_stops(["END".to_string(), "\n\n".to_string(), String::new()]);
        assert_eq!(s.push("one E"), "one ");
        assert_eq!(s.push("N\n\nEND"), "EN");
        assert!(s.stopped());
        assert_eq!(s.finish().0, "one EN");
    }

    #[test]
    fn without_a_stop_string_everything_streams_and_utf8_is_never_cut() {
        assert_eq!(run(None, &["a", "b"]), ("ab".into(), "ab".into()));
        let mut s = StopStream::new(Some("\u{e9}\u{e9}x"));
        // "é" could start the stop string: held; then it does not.
        assert_eq!(s.push("\u{e9}"), "");
        assert_eq!(s.push("y"), "\u{e9}y");
    }
}
