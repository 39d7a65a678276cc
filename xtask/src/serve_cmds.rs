//! `serve`: the OpenAI-compatible server and web chat (llava-serve).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use llava::plan::GenerationShape;
use llava_serve::{Limits, ServeOptions, serve as run_server, termination_signal};

use crate::model_cmds::ModelArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on: loopback unless you mean to expose the server.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: a free one, printed on standard output).
    #[arg(long, default_value_t = ServeOptions::PORT)]
    pub port: u16,
    /// Sequences decoded together (continuous batching); 1 answers one request at a time.
    #[arg(long, default_value_t = ServeOptions::MAX_BATCH)]
    pub max_batch: usize,
    /// Requests waiting for a place in the batch; more are answered 429.
    #[arg(long, default_value_t = ServeOptions::MAX_QUEUE)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: $LLAVA_API_KEY, which keeps the key
    /// out of the process list).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Serve local image paths (`file://` or plain) from inside this folder only.
    #[arg(long, value_name = "DIR")]
    pub allow_local_images: Option<PathBuf>,
    /// The largest image (bytes) a request may carry.
    #[arg(long, default_value_t = Limits::default().max_image_bytes)]
    pub max_image_bytes: usize,
    /// The most pixels (width × height) an uploaded image may have.
    #[arg(long, default_value_t = Limits::default().max_image_pixels)]
    pub max_upload_pixels: u64,
    /// Images per request.
    #[arg(long, default_value_t = Limits::default().max_images)]
    pub max_images: usize,
    /// The largest request body (bytes).
    #[arg(long, default_value_t = ServeOptions::MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Reply length when a request gives no max_tokens (the reference's web UI: 512).
    #[arg(long, default_value_t = Limits::default().default_max_tokens)]
    pub max_tokens: usize,
    /// Conversation template (default: chosen from the model's name, as the reference CLI).
    #[arg(long)]
    pub template: Option<String>,
    /// The model name clients see (default: the model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds running replies may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = ServeOptions::SHUTDOWN_GRACE_SECS)]
    pub shutdown_grace: u64,
}

impl ServeArgs {
    /// A full batch of context-long sequences: the KV cache at its largest.
    fn shape(&self, config: &llava::LlavaConfig) -> GenerationShape {
        let context = config.text.max_position_embeddings.max(config.image_tokens() + 1);
        let max_new_tokens = self.max_tokens.min(context / 2);
        GenerationShape {
            command: "serve",
            batch: self.max_batch.max(1),
            text_tokens: context.saturating_sub(config.image_tokens() + max_new_tokens).max(1),
            images: 1,
            max_new_tokens,
        }
    }
}

pub fn serve(args: ServeArgs) -> Result<()> {
    llava::with_backend!(args.model.backend, serve_on(&args))
}

fn serve_on<B: Backend>(device: &B::Device, args: &ServeArgs) -> Result<()> {
    let (loaded, _plan) = args.model.load_planned::<B>(device, &|c| args.shape(c), Some("--max-batch"))?;
    // The template follows the model folder's name (as chat's does), whatever clients call it.
    let dir = args.model.model.as_deref().or(args.model.llm.as_deref());
    let id = args.served_model_name.clone().unwrap_or_else(|| {
        dir.and_then(|d| d.file_name()).map_or("llava".into(), |n| n.to_string_lossy().into_owned())
    });
    let mut options = ServeOptions::for_model(&loaded, &id, args.template.as_deref(), dir)?;
    options.host = args.host.clone();
    options.port = args.port;
    options.max_batch = args.max_batch;
    options.max_queue = args.max_queue;
    options.api_key = args.api_key.clone().or_else(|| std::env::var("LLAVA_API_KEY").ok().filter(|k| !k.is_empty()));
    options.max_request_bytes = args.max_request_bytes;
    options.shutdown_grace = Duration::from_secs(args.shutdown_grace);
    options.limits.local_images = args.allow_local_images.clone();
    options.limits.max_image_bytes = args.max_image_bytes;
    options.limits.max_image_pixels = args.max_upload_pixels;
    options.limits.max_images = args.max_images;
    options.limits.default_max_tokens = args.max_tokens;
    run_server(loaded, options, termination_signal(), |addr| {
        // The address on standard output (the only thing there), for scripts and tests.
        println!("http://{addr}");
    })
    .context("serving")
}
