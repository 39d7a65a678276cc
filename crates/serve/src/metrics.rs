//! Counters and gauges for `GET /metrics`, in Prometheus' text format.

use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token histogram.
const TTFT_BUCKETS: [f64; 12] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0];

#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Answered requests by HTTP status.
    requests: Vec<(u16, u64)>,
    prompt_tokens: u64,
    completion_tokens: u64,
    cancelled: u64,
    queue: usize,
    batch: usize,
    max_batch: usize,
    steps: u64,
    /// Prefills run (one per group of requests joining the batch) and their time.
    prefills: u64,
    prefill_seconds: f64,
    /// Sequences summed over steps (mean occupancy = this / steps).
    step_rows: u64,
    step_seconds: f64,
    ttft_counts: [u64; TTFT_BUCKETS.len()],
    ttft_sum: f64,
    ttft_count: u64,
    /// Decoding speed over the last steps (tokens per second, exponentially smoothed).
    tokens_per_second: f64,
}

impl Metrics {
    pub fn new(max_batch: usize) -> Self {
        let metrics = Self::default();
        metrics.with(|s| s.max_batch = max_batch);
        metrics
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn request(&self, status: u16, prompt_tokens: usize) {
        self.with(|s| {
            match s.requests.iter_mut().find(|(code, _)| *code == status) {
                Some((_, n)) => *n += 1,
                None => s.requests.push((status, 1)),
            }
            s.prompt_tokens += prompt_tokens as u64;
        });
    }

    pub fn set_queue(&self, waiting: usize) {
        self.with(|s| s.queue = waiting);
    }

    pub fn set_batch(&self, running: usize) {
        self.with(|s| s.batch = running);
    }

    pub fn cancelled(&self, n: usize) {
        self.with(|s| s.cancelled += n as u64);
    }

    pub fn finished(&self, completion_tokens: usize) {
        self.with(|s| s.completion_tokens += completion_tokens as u64);
    }

    pub fn first_token(&self, after: Duration) {
        let t = after.as_secs_f64();
        self.with(|s| {
            for (count, bound) in s.ttft_counts.iter_mut().zip(TTFT_BUCKETS) {
                if t <= bound {
                    *count += 1;
                }
            }
            s.ttft_sum += t;
            s.ttft_count += 1;
        });
    }

    pub fn prefill(&self, took: Duration) {
        self.with(|s| {
            s.prefills += 1;
            s.prefill_seconds += took.as_secs_f64();
        });
    }

    pub fn step(&self, rows: usize, took: Duration) {
        self.with(|s| {
            s.steps += 1;
            s.step_rows += rows as u64;
            s.step_seconds += took.as_secs_f64();
            let now = rows as f64 / took.as_secs_f64().max(1e-9);
            s.tokens_per_second = if s.steps == 1 { now } else { 0.9 * s.tokens_per_second + 0.1 * now };
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|s| {
            let mut out = String::new();
            let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, String)]| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for (labels, value) in lines {
                    let _ = writeln!(out, "{name}{labels} {value}");
                }
            };
            let one = |v: String| vec![(String::new(), v)];
            let requests: Vec<(String, String)> =
                s.requests.iter().map(|(code, n)| (format!("{{status=\"{code}\"}}"), n.to_string())).collect();
            metric("llava_requests_total", "counter", "Chat completion requests answered, by HTTP status.", &requests);
            metric(
                "llava_prompt_tokens_total",
                "counter",
                "Prompt tokens of accepted requests (images spliced in).",
                &one(s.prompt_tokens.to_string()),
            );
            metric(
                "llava_generation_tokens_total",
                "counter",
                "Tokens generated for finished requests.",
                &one(s.completion_tokens.to_string()),
            );
            metric(
                "llava_cancelled_total",
                "counter",
                "Sequences cancelled (client gone or shutdown).",
                &one(s.cancelled.to_string()),
            );
            metric(
                "llava_queue_length",
                "gauge",
                "Requests waiting for a place in the batch.",
                &one(s.queue.to_string()),
            );
            metric("llava_batch_size", "gauge", "Sequences decoding now.", &one(s.batch.to_string()));
            metric(
                "llava_batch_capacity",
                "gauge",
                "The most sequences decoding at once (--max-batch).",
                &one(s.max_batch.to_string()),
            );
            let occupancy =
                if s.steps == 0 { 0.0 } else { s.step_rows as f64 / s.steps as f64 / s.max_batch.max(1) as f64 };
            metric(
                "llava_batch_occupancy",
                "gauge",
                "Mean fraction of the batch in use over all decoding steps.",
                &one(format!("{occupancy:.4}")),
            );
            metric("llava_decode_steps_total", "counter", "Decoding steps run.", &one(s.steps.to_string()));
            metric(
                "llava_decode_seconds_total",
                "counter",
                "Time spent in decoding steps.",
                &one(format!("{:.6}", s.step_seconds)),
            );
            metric(
                "llava_prefills_total",
                "counter",
                "Prefills run (one per group of requests joining the batch).",
                &one(s.prefills.to_string()),
            );
            metric(
                "llava_prefill_seconds_total",
                "counter",
                "Time spent in prefills (the running rows wait meanwhile).",
                &one(format!("{:.6}", s.prefill_seconds)),
            );
            metric(
                "llava_tokens_per_second",
                "gauge",
                "Recent decoding speed, all sequences together.",
                &one(format!("{:.2}", s.tokens_per_second)),
            );
            let mut ttft: Vec<(String, String)> = TTFT_BUCKETS
                .iter()
                .zip(s.ttft_counts)
                .map(|(bound, n)| (format!("_bucket{{le=\"{bound}\"}}"), n.to_string()))
                .collect();
            ttft.push(("_bucket{le=\"+Inf\"}".into(), s.ttft_count.to_string()));
            ttft.push(("_sum".into(), format!("{:.6}", s.ttft_sum)));
            ttft.push(("_count".into(), s.ttft_count.to_string()));
            metric(
                "llava_time_to_first_token_seconds",
                "histogram",
                "From a request's arrival to its first token.",
                &ttft,
            );
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_counts_what_happened() {
        let m = Metrics::new(4);
        m.request(200, 10);
        m.request(200, 5);
        m.request(429, 0);
        m.first_token(Duration::from_millis(300));
        m.step(2, Duration::from_millis(10));
        m.finished(7);
        m.prefill(Duration::from_millis(20));
        let text = m.render();
        assert!(text.contains("llava_requests_total{status=\"200\"} 2"), "{text}");
        assert!(text.contains("llava_requests_total{status=\"429\"} 1"));
        assert!(text.contains("llava_prompt_tokens_total 15"));
        assert!(text.contains("llava_generation_tokens_total 7"));
        assert!(text.contains("llava_time_to_first_token_seconds_bucket{le=\"0.25\"} 0"));
        assert!(text.contains("llava_time_to_first_token_seconds_bucket{le=\"0.5\"} 1"));
        assert!(text.contains("llava_batch_occupancy 0.5000"));
        assert!(text.contains("llava_prefills_total 1") && text.contains("llava_prefill_seconds_total 0.020000"));
    }
}
