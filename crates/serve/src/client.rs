//! A small blocking HTTP/1.1 client for this server on loopback (no TLS, one connection per
//! request): what the load benchmark and the tests use to measure time to first token on the raw
//! socket. Any OpenAI client works against the server; this one only exists to measure it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The body, de-chunked.
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| serde_json::json!({"raw": self.body}))
    }
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn request(
    addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration,
) -> io::Result<Response> {
    let mut stream = send(addr, method, path, headers, body, timeout)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

/// `POST /v1/chat/completions` with a JSON body.
pub fn chat(addr: &str, body: &serde_json::Value, timeout: Duration) -> io::Result<Response> {
    let mut stream = send_chat(addr, body, timeout)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

/// Sends `POST /v1/chat/completions` with a JSON body and returns the socket (the caller reads
/// the response, or drops it to leave mid-stream).
pub fn send_chat(addr: &str, body: &serde_json::Value, timeout: Duration) -> io::Result<TcpStream> {
    send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
        timeout,
    )
}

/// Opens a request and returns the socket after sending it (the caller reads the response).
pub fn send(
    addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8], timeout: Duration,
) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    stream.write_all(head.as_bytes())?;
    // A server may answer (413) before reading a large body and close: the answer still counts.
    let _ = stream.write_all(body);
    Ok(stream)
}

/// What a streamed chat completion looked like from the client.
#[derive(Debug, Clone)]
pub struct Streamed {
    pub status: u16,
    /// From sending the request to the first content piece.
    pub first_token: Option<Duration>,
    pub total: Duration,
    /// The content deltas joined.
    pub text: String,
    /// The `usage` chunk's completion tokens (with `stream_options.include_usage`).
    pub completion_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    /// The stream ended with `data: [DONE]`.
    pub done: bool,
}

/// Sends a streaming chat request and reads the stream to its end, timing the first token.
pub fn stream_chat(addr: &str, body: &serde_json::Value, timeout: Duration) -> io::Result<Streamed> {
    let start = Instant::now();
    let mut stream = send_chat(addr, body, timeout)?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut first_token = None;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if first_token.is_none() && has_content(&raw) {
            first_token = Some(start.elapsed());
        }
    }
    let total = start.elapsed();
    let response = parse(&raw)?;
    let mut streamed = Streamed {
        status: response.status,
        first_token,
        total,
        text: String::new(),
        completion_tokens: None,
        finish_reason: None,
        done: false,
    };
    for line in response.body.lines() {
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            streamed.done = true;
            continue;
        }
        let Ok(chunk) = serde_json::from_str::<serde_json::Value>(data) else { continue };
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            streamed.text += piece;
        }
        if let Some(why) = chunk["choices"][0]["finish_reason"].as_str() {
            streamed.finish_reason = Some(why.to_string());
        }
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            streamed.completion_tokens = Some(n);
        }
    }
    Ok(streamed)
}

/// Whether a raw stream so far holds a chunk with reply text (not only the opening chunk, whose
/// content is empty).
pub fn has_content(raw: &[u8]) -> bool {
    let needle = b"\"delta\":{\"content\":\"";
    raw.windows(needle.len() + 1).any(|w| &w[..needle.len()] == needle && w[needle.len()] != b'"')
}

/// Status and de-chunked body of a raw HTTP/1.1 response.
pub fn parse(raw: &[u8]) -> io::Result<Response> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no HTTP response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("no status"))?;
    let mut body = &raw[split + 4..];
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(Response { status, body: String::from_utf8_lossy(body).into_owned() });
    }
    let mut out = Vec::new();
    while let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&body[..line_end]);
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("bad chunk size"))?;
        let start = line_end + 2;
        if n == 0 || start + n > body.len() {
            break;
        }
        out.extend_from_slice(&body[start..start + n]);
        body = &body[(start + n + 2).min(body.len())..];
    }
    Ok(Response { status, body: String::from_utf8_lossy(&out).into_owned() })
}
