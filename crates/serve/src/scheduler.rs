//! The one thread that owns the model: continuous batching over [`DecodeBatch`].
//!
//! Requests wait in a bounded queue; between two decoding steps the scheduler takes as many as
//! the batch has room for (`max_batch`), runs their prefill together and adds them to the running
//! batch; every step then samples one token for every sequence and streams the text to its client.
//! A sequence leaves the batch when it ends, and at once when its client goes away (its channel
//! closed), freeing its rows of the KV cache.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use burn::tensor::backend::Backend;
use llava::LoadedLlava;
use llava::chat::ReplyStream;
use llava::generate::{DecodeBatch, FinishReason, SequenceId, SequenceRequest};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::ApiError;
use crate::metrics::Metrics;
use crate::prompt::Prepared;

/// What a request's handler hears from the scheduler.
#[derive(Debug)]
pub enum Event {
    /// The next piece of the reply's text (stop strings withheld).
    Text(String),
    /// The reply ended.
    Done { finish: FinishReason, completion_tokens: usize },
    /// The request failed after it was accepted (the model failed, or the server shut down).
    Failed(ApiError),
}

/// A request waiting for a place in the batch.
pub struct Job {
    pub prepared: Prepared,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
}

/// The waiting requests, bounded: a full queue refuses at once (429).
pub struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    capacity: usize,
    /// Set by a shutdown: no new requests; the running ones get `grace` to finish.
    closing: AtomicBool,
    deadline: Mutex<Option<Instant>>,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            capacity,
            closing: AtomicBool::new(false),
            deadline: Mutex::new(None),
        }
    }

    /// Queues a job, or refuses it: 429 when the queue is full, 503 while shutting down.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.len() >= self.capacity {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the queue is full ({} requests waiting, --max-queue); retry later", jobs.len()),
            )
            .with_code("queue_full"));
        }
        jobs.push_back(job);
        self.ready.notify_one();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops taking requests; what runs may finish within `grace`, then it is cancelled.
    pub fn close(&self, grace: Duration) {
        self.closing.store(true, Ordering::SeqCst);
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + grace);
        self.ready.notify_all();
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn past_deadline(&self) -> bool {
        self.deadline.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|d| Instant::now() >= d)
    }

    /// Up to `room` jobs; waits for one when `wait` (nothing is running) until one comes or the
    /// queue closes.
    fn take(&self, room: usize, wait: bool) -> Vec<Job> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        while wait && jobs.is_empty() && !self.closing() {
            jobs = self.ready.wait_timeout(jobs, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
        }
        let n = room.min(jobs.len());
        jobs.drain(..n).collect()
    }
}

/// One sequence in the batch, as the scheduler follows it.
struct Running<'t> {
    events: UnboundedSender<Event>,
    reply: ReplyStream<'t>,
    tokens: usize,
    received: Instant,
    first_token: bool,
}

/// Runs the scheduler until the queue is closed and everything running has ended.
pub fn run<B: Backend>(loaded: &LoadedLlava<B>, queue: &Queue, metrics: &Metrics, max_batch: usize) {
    let tokenizer = loaded.tokenizer.as_ref().expect("the server checks for a tokenizer before starting");
    let device = loaded.model.llm.embed_tokens.weight.device();
    let image_shape = loaded.processor.output_shape();
    let eos_ids = loaded.eos_ids();
    let mut batch = DecodeBatch::new(&loaded.model);
    let mut running: HashMap<SequenceId, Running<'_>> = HashMap::new();
    loop {
        // Join: as many waiting requests as there is room for (a client that left is skipped).
        let jobs: Vec<Job> = queue
            .take(max_batch - batch.len(), batch.is_empty())
            .into_iter()
            .filter(|j| !j.events.is_closed())
            .collect();
        metrics.set_queue(queue.len());
        if !jobs.is_empty() {
            let images: Vec<f32> = jobs.iter().flat_map(|j| j.prepared.images.iter().flatten().copied()).collect();
            let pixels = llava::images_tensor::<B>(images, image_shape, &device);
            let requests: Vec<SequenceRequest> = jobs
                .iter()
                .map(|j| SequenceRequest {
                    prompt: j.prepared.ids.clone(),
                    max_new_tokens: j.prepared.max_new_tokens,
                    sampling: j.prepared.sampling,
                    eos_ids: eos_ids.clone(),
                })
                .collect();
            let started = Instant::now();
            match std::panic::catch_unwind(AssertUnwindSafe(|| batch.join(requests, pixels))) {
                Ok(ids) => {
                    metrics.prefill(started.elapsed());
                    for (id, job) in ids.into_iter().zip(jobs) {
                        let reply = ReplyStream::new(tokenizer, job.prepared.stops.clone());
                        running.insert(
                            id,
                            Running { events: job.events, reply, tokens: 0, received: job.received, first_token: true },
                        );
                    }
                }
                Err(panic) => {
                    let error = model_failure("prefill", &panic);
                    for job in jobs {
                        let _ = job.events.send(Event::Failed(error.clone()));
                    }
                    fail_all(&mut batch, &mut running, &error, &loaded.model);
                }
            }
        }

        // Leave: clients that went away, and everything once a shutdown's grace has passed.
        let gone: Vec<SequenceId> = running.iter().filter(|(_, r)| r.events.is_closed()).map(|(&id, _)| id).collect();
        if !gone.is_empty() {
            batch.cancel(&gone);
            gone.iter().for_each(|id| drop(running.remove(id)));
            metrics.cancelled(gone.len());
        }
        if queue.closing() && queue.past_deadline() && !running.is_empty() {
            let error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server shut down before the reply ended");
            metrics.cancelled(running.len());
            fail_all(&mut batch, &mut running, &error, &loaded.model);
        }
        if batch.is_empty() {
            metrics.set_batch(0);
            if queue.closing() && queue.is_empty() {
                return;
            }
            continue;
        }

        // One token for every sequence.
        metrics.set_batch(batch.len());
        let started = Instant::now();
        let step = std::panic::catch_unwind(AssertUnwindSafe(|| {
            batch.step(|id, token| {
                let Some(seq) = running.get_mut(&id) else { return false };
                seq.tokens += 1;
                if seq.first_token {
                    seq.first_token = false;
                    metrics.first_token(seq.received.elapsed());
                }
                let text = seq.reply.push(token);
                let delivered = text.is_empty() || seq.events.send(Event::Text(text.to_string())).is_ok();
                delivered && !seq.reply.stopped()
            })
        }));
        match step {
            Ok(ended) => {
                let tokens = batch.len() + ended.len();
                metrics.step(tokens, started.elapsed());
                for (id, finish) in ended {
                    let Some(seq) = running.remove(&id) else { continue };
                    let (_, rest) = seq.reply.finish();
                    if !rest.is_empty() {
                        let _ = seq.events.send(Event::Text(rest.to_string()));
                    }
                    metrics.finished(seq.tokens);
                    let _ = seq.events.send(Event::Done { finish, completion_tokens: seq.tokens });
                }
                metrics.set_batch(batch.len());
            }
            Err(panic) => {
                let error = model_failure("decoding", &panic);
                fail_all(&mut batch, &mut running, &error, &loaded.model);
            }
        }
    }
}

/// Ends every running sequence with `error` and starts an empty batch.
fn fail_all<'m, B: Backend>(
    batch: &mut DecodeBatch<'m, B>, running: &mut HashMap<SequenceId, Running<'_>>, error: &ApiError,
    model: &'m llava::Llava<B>,
) {
    for (_, seq) in running.drain() {
        let _ = seq.events.send(Event::Failed(error.clone()));
    }
    *batch = DecodeBatch::new(model);
}

/// A model failure (a panic inside the model's code) as a 500: the server goes on.
fn model_failure(during: &str, panic: &Box<dyn std::any::Any + Send>) -> ApiError {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown failure");
    tracing::error!("the model failed during {during}: {what}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the model failed during {during}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> (Job, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (events, replies) = tokio::sync::mpsc::unbounded_channel();
        let prepared = Prepared {
            ids: vec![1],
            images: Vec::new(),
            prompt_tokens: 1,
            max_new_tokens: 1,
            sampling: Default::default(),
            stops: Vec::new(),
            stream: false,
            include_usage: false,
        };
        (Job { prepared, events, received: Instant::now() }, replies)
    }

    #[test]
    fn a_full_queue_refuses_with_429_and_a_closed_one_with_503() {
        let queue = Queue::new(2);
        let (a, _ra) = job();
        let (b, _rb) = job();
        let (c, _rc) = job();
        queue.submit(a).unwrap();
        queue.submit(b).unwrap();
        let refused = queue.submit(c).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.code, Some("queue_full"));
        // Taking makes room again, in arrival order.
        assert_eq!(queue.take(1, false).len(), 1);
        let (d, _rd) = job();
        queue.submit(d).unwrap();
        queue.close(Duration::ZERO);
        let (e, _re) = job();
        assert_eq!(queue.submit(e).unwrap_err().status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(queue.take(8, true).len(), 2, "a closed queue still hands out what waits");
        assert!(queue.take(8, true).is_empty(), "and then returns at once");
    }
}
