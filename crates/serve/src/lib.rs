//! An OpenAI-compatible HTTP server for LLaVA, with continuous batching and the paper's web chat.
//!
//! * `POST /v1/chat/completions` (OpenAI's chat API: text and `image_url` parts, streaming as
//!   server-sent events), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus), and the
//!   demo page at `/`.
//! * One thread owns the model and runs [`llava::generate::DecodeBatch`]: requests join the running
//!   batch between decoding steps and leave it as soon as they end or their client goes away.
//! * The HTTP side is tokio + axum (see docs/SERVING.md for why); it parses, checks and prepares
//!   requests (templates, tokenizing, image decoding) and never touches the model.
//!
//! ```no_run
//! use llava::{backend::Cpu, load::{load_dir, LoadOptions}};
//! use llava_serve::{ServeOptions, serve, termination_signal};
//!
//! let loaded = load_dir::<Cpu>("llava-1.5-7b-hf".as_ref(), &LoadOptions::default(), &Default::default())?;
//! let options = ServeOptions::for_model(&loaded, "llava-1.5-7b-hf", None, Some("llava-1.5-7b-hf".as_ref()))?;
//! serve(loaded, options, termination_signal(), |addr| println!("listening on http://{addr}"))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod client;
mod http;
pub mod metrics;
pub mod prompt;
pub mod scheduler;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::backend::Backend;
use llava::LoadedLlava;
use llava::chat::choose_template;

pub use prompt::{Limits, ModelInfo};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Model(#[from] llava::LlavaError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen (`127.0.0.1` unless told otherwise: loopback only).
    pub host: String,
    /// 0 picks a free port (the `ready` callback gets the address).
    pub port: u16,
    /// Sequences decoded together (1 = one request at a time, as the reference's model worker).
    pub max_batch: usize,
    /// Requests waiting for a place; one more is answered 429 at once.
    pub max_queue: usize,
    /// Required as `Authorization: Bearer KEY` on `/v1/*` when set.
    pub api_key: Option<String>,
    pub limits: Limits,
    /// The largest request body (bytes); a larger one is answered 413.
    pub max_request_bytes: usize,
    /// After SIGTERM/SIGINT: how long running replies may take to finish before they are cancelled.
    pub shutdown_grace: Duration,
    pub info: ModelInfo,
}

impl ServeOptions {
    /// The default port.
    pub const PORT: u16 = 8080;
    /// The default `max_batch`.
    pub const MAX_BATCH: usize = 16;
    /// The default `max_queue`.
    pub const MAX_QUEUE: usize = 64;
    /// The default `max_request_bytes`.
    pub const MAX_REQUEST_BYTES: usize = 32 << 20;
    /// The default `shutdown_grace`, in seconds.
    pub const SHUTDOWN_GRACE_SECS: u64 = 30;

    /// Defaults for a loaded model: its template (`template`, else chosen from `model_dir`'s
    /// name as the reference CLI does) and tokenizer; `id` is the model name clients see.
    pub fn for_model<B: Backend>(
        loaded: &LoadedLlava<B>, id: &str, template: Option<&str>, model_dir: Option<&std::path::Path>,
    ) -> Result<Self, ServeError> {
        let tokenizer = loaded.tokenizer.clone().ok_or(llava::LlavaError::NoTokenizer)?;
        let (_, conversation) = choose_template(template, model_dir)?;
        Ok(Self {
            host: "127.0.0.1".into(),
            port: Self::PORT,
            max_batch: Self::MAX_BATCH,
            max_queue: Self::MAX_QUEUE,
            api_key: None,
            limits: Limits::default(),
            max_request_bytes: Self::MAX_REQUEST_BYTES,
            shutdown_grace: Duration::from_secs(Self::SHUTDOWN_GRACE_SECS),
            info: ModelInfo {
                id: id.to_string(),
                tokenizer,
                template: conversation,
                config: loaded.config.clone(),
                processor: loaded.processor.clone(),
                aspect: loaded.config.image_aspect,
                has_vision: loaded.has_vision,
                layout: format!("{:?}", loaded.layout),
            },
        })
    }
}

/// Serves `loaded` until `shutdown` completes, then stops taking requests, lets running replies
/// finish (up to `shutdown_grace`) and returns. `ready` is called with the bound address once
/// the server accepts connections.
///
/// The model stays on the calling thread (it runs the scheduler); the HTTP server runs on a
/// tokio runtime of its own threads.
pub fn serve<B: Backend>(
    loaded: LoadedLlava<B>, options: ServeOptions, shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    if options.max_batch == 0 || options.max_queue == 0 {
        return Err(ServeError::Invalid("--max-batch and --max-queue must be at least 1".into()));
    }
    if let Some(root) = &options.limits.local_images
        && !root.is_dir()
    {
        return Err(ServeError::Invalid(format!("--allow-local-images {}: not a directory", root.display())));
    }
    let mut limits = options.limits.clone();
    limits.local_images = limits.local_images.map(|r| r.canonicalize().unwrap_or(r));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("llava-http")
        .enable_all()
        .build()
        .map_err(ServeError::Http)?;
    let addr = format!("{}:{}", options.host, options.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
    let bound = listener.local_addr().map_err(ServeError::Http)?;

    let queue = Arc::new(scheduler::Queue::new(options.max_queue));
    let metrics = Arc::new(metrics::Metrics::new(options.max_batch));
    let app = Arc::new(http::App {
        info: options.info.clone(),
        limits,
        queue: queue.clone(),
        metrics: metrics.clone(),
        api_key: options.api_key.clone(),
    });
    let router = http::router(app, options.max_request_bytes);
    let closing = queue.clone();
    let grace = options.shutdown_grace;
    let server = runtime.spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down: no new requests; running replies have {grace:?} to finish");
                closing.close(grace);
            })
            .await
    });
    tracing::info!(
        "serving {} on http://{bound} (batch {}, queue {})",
        options.info.id,
        options.max_batch,
        options.max_queue
    );
    ready(bound);
    scheduler::run(&loaded, &queue, &metrics, options.max_batch);
    // The scheduler returns once the queue is closed and empty; the HTTP side then finishes the
    // responses it is still writing.
    match runtime.block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await }) {
        Ok(Ok(result)) => result.map_err(ServeError::Http),
        _ => Ok(()),
    }
}

/// Completes at SIGINT (Ctrl-C) or SIGTERM.
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
