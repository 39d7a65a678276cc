//! The HTTP surface (axum): routes, authentication, body limits, streaming.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{self, ApiError, Usage};
use crate::metrics::Metrics;
use crate::prompt::{Limits, ModelInfo, parse_request, prepare};
use crate::scheduler::{Event, Job, Queue};

/// What every handler shares.
pub struct App {
    pub info: ModelInfo,
    pub limits: Limits,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
}

/// The paper's demo page: one static file, no build step, no CDN.
const INDEX_HTML: &str = include_str!("../web/index.html");

pub fn router(app: Arc<App>, max_request_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .with_state(app)
}

/// `Authorization: Bearer KEY` when the server has an `--api-key`.
async fn authenticate(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if given.and_then(|v| v.strip_prefix("Bearer ")) != Some(key.as_str()) {
            app.metrics.request(StatusCode::UNAUTHORIZED.as_u16(), 0);
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer KEY)")
                .with_code("invalid_api_key")
                .into_response();
        }
    }
    next.run(request).await
}

async fn health(State(app): State<Arc<App>>) -> Response {
    axum::Json(serde_json::json!({"status": "ok", "model": app.info.id, "queue": app.queue.len()})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(serde_json::json!({
        "object": "list",
        "data": [{"id": app.info.id, "object": "model", "created": 0, "owned_by": "llava-rs"}],
    }))
    .into_response()
}

async fn chat_completions(State(app): State<Arc<App>>, body: Result<Bytes, BytesRejection>) -> Response {
    match accept(&app, body).await {
        Ok(response) => response,
        Err(error) => {
            app.metrics.request(error.status.as_u16(), 0);
            error.into_response()
        }
    }
}

/// Checks and queues a request; answers as a stream or as one JSON body.
async fn accept(app: &Arc<App>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let received = Instant::now();
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than this server takes (--max-request-bytes)".to_string()
        } else {
            rejection.body_text()
        };
        ApiError::new(status, message)
    })?;
    let request = parse_request(&body)?;
    // Decoding images and tokenizing is CPU work: off the async threads.
    let worker = app.clone();
    let prepared =
        tokio::task::spawn_blocking(move || prepare(request, &worker.info, &worker.limits)).await.map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("preparing the request failed: {e}"))
        })??;
    let (stream, include_usage, prompt_tokens) = (prepared.stream, prepared.include_usage, prepared.prompt_tokens);
    let (events, replies) = mpsc::unbounded_channel();
    app.queue.submit(Job { prepared, events, received })?;
    app.metrics.request(StatusCode::OK.as_u16(), prompt_tokens);

    let id = format!("chatcmpl-{:x}", SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model = app.info.id.clone();
    if stream {
        return Ok(sse(replies, id, created, model, prompt_tokens, include_usage));
    }
    let mut replies = replies;
    let mut text = String::new();
    while let Some(event) = replies.recv().await {
        match event {
            Event::Text(piece) => text += &piece,
            Event::Done { finish, completion_tokens } => {
                let usage = Usage::new(prompt_tokens, completion_tokens);
                let body = api::completion(&id, created, &model, text.trim(), api::finish_reason(finish), usage);
                return Ok(axum::Json(body).into_response());
            }
            Event::Failed(error) => return Err(error),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the scheduler stopped before the reply ended"))
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
fn sse(
    replies: mpsc::UnboundedReceiver<Event>, id: String, created: u64, model: String, prompt_tokens: usize,
    include_usage: bool,
) -> Response {
    let data = |value: serde_json::Value| format!("data: {value}\n\n");
    let first =
        data(api::chunk(&id, created, &model, serde_json::json!({"role": "assistant", "content": ""}), None, None));
    // The reply is trimmed as the non-streamed one is: leading whitespace dropped, trailing
    // whitespace held back until something follows it.
    let mut started = false;
    let mut held = String::new();
    let events = UnboundedReceiverStream::new(replies).map(move |event| {
        let text = match event {
            Event::Text(piece) => {
                held += if started { piece.as_str() } else { piece.trim_start() };
                started |= !held.is_empty();
                let visible = held.trim_end().len();
                let show: String = held.drain(..visible).collect();
                if show.is_empty() {
                    String::new()
                } else {
                    data(api::chunk(&id, created, &model, serde_json::json!({"content": show}), None, None))
                }
            }
            Event::Done { finish, completion_tokens } => {
                let mut end = data(api::chunk(
                    &id,
                    created,
                    &model,
                    serde_json::json!({}),
                    Some(api::finish_reason(finish)),
                    None,
                ));
                if include_usage {
                    let usage = Usage::new(prompt_tokens, completion_tokens);
                    end += &data(api::chunk(&id, created, &model, serde_json::json!({}), None, Some(usage)));
                }
                end + "data: [DONE]\n\n"
            }
            Event::Failed(error) => data(error.body()) + "data: [DONE]\n\n",
        };
        Ok::<_, Infallible>(Bytes::from(text))
    });
    let body = tokio_stream::once(Ok::<_, Infallible>(Bytes::from(first))).chain(events);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("static headers")
}
