//! `cargo xtask serve` end to end: the OpenAI-compatible API over real sockets, continuous
//! batching against `cargo xtask generate`, bad input, cancelled clients, shutdown, and (where the
//! test venv and Chromium are installed, as `.ci/run` does) the official `openai` Python client
//! and the web page in a headless browser.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use llava_data::conversation::conv_template;
use llava_serve::client;

const TEMPLATE: &str = "llava_v1";

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).env("NO_COLOR", "1").output().expect("run xtask")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "xtask failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn image() -> PathBuf {
    repo().join("datasets/demo-images/extreme_ironing.jpg")
}

fn data_url(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The demo checkpoint (tiny, random weights) in `dir`.
fn demo_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    ok(&xtask(&["demo-model", "--out", model.to_str().unwrap()]));
    model
}

/// A running `cargo xtask serve`, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        Server::launch(model, &[&["--template", TEMPLATE], extra].concat())
    }

    /// Without the tests' `--template`.
    fn launch(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start xtask serve");
        let stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("http://").unwrap_or_else(|| panic!("no address printed: {line:?}"));
        Server { addr: addr.to_string(), child, stderr: Some(stderr) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One HTTP/1.1 exchange: the status and the (de-chunked) body.
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let r = client::request(&self.addr, method, path, headers, body, Duration::from_secs(120)).unwrap();
        (r.status, r.body)
    }

    fn post(&self, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let (status, text) = self.post_raw(body.to_string().as_bytes(), &[]);
        (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({"raw": text})))
    }

    fn post_raw(&self, body: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        self.request("POST", "/v1/chat/completions", &all, body)
    }

    fn metrics(&self) -> String {
        self.request("GET", "/metrics", &[], b"").1
    }

    fn metric(&self, name: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
            .parse()
            .unwrap()
    }

    fn log(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().map(|h| h.join().unwrap()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The prompt the server renders for one user turn (the template's own rendering).
fn rendered_prompt(question: &str, with_image: bool) -> String {
    let mut conv = conv_template(TEMPLATE).unwrap();
    let [user, assistant] = conv.roles.clone();
    let text = if with_image { format!("<image>\n{question}") } else { question.to_string() };
    conv.append_message(&user, Some(&text));
    conv.append_message(&assistant, None);
    conv.get_prompt()
}

/// `cargo xtask generate`'s greedy reply for the same prompt, as the server shows it: cut at the
/// template's stop string and trimmed.
fn generated(model: &Path, question: &str, with_image: bool, max_tokens: usize) -> String {
    let prompt = rendered_prompt(question, with_image);
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.to_str().unwrap().into(),
        "--prompt".into(),
        prompt,
        "--max-new-tokens".into(),
        max_tokens.to_string(),
    ];
    if with_image {
        args.extend(["--image".into(), image().to_str().unwrap().into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = ok(&xtask(&args));
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let stop = conv_template(TEMPLATE).unwrap().stop_str().map(str::to_string).unwrap_or_default();
    let cut = if stop.is_empty() { text } else { text.split(stop.as_str()).next().unwrap() };
    cut.trim().to_string()
}

fn chat_request(question: &str, with_image: bool, max_tokens: usize, stream: bool) -> serde_json::Value {
    let content = if with_image {
        serde_json::json!([
            {"type": "image_url", "image_url": {"url": data_url(&image())}},
            {"type": "text", "text": question},
        ])
    } else {
        serde_json::json!(question)
    };
    serde_json::json!({
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

const QUESTIONS: [&str; 8] = [
    "What is unusual about this image?",
    "Describe the image.",
    "What colour is the taxi, and what is the man on its back doing with the ironing board and the clothes?",
    "Hi",
    "Is it safe?",
    "Count the vehicles you can see in the picture, then say which one is closest to the camera and why.",
    "Where is this?",
    "Tell me a story about the man, the taxi, the iron, the shirt and the city around them, in three sentences.",
];

#[test]
fn greedy_answers_equal_generate_also_when_eight_requests_arrive_together() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    // Eight requests: prompts of different lengths, with and without the image, reply limits
    // from 6 to 34 tokens, so rows join and leave the batch at different steps.
    let cases: Vec<(&str, bool, usize)> =
        QUESTIONS.iter().enumerate().map(|(i, q)| (*q, i % 3 != 1, 6 + 4 * i)).collect();
    let expected: Vec<String> = cases.iter().map(|&(q, img, n)| generated(&model, q, img, n)).collect();

    let server = Server::start(&model, &["--max-batch", "8"]);
    // One at a time, then streamed, then all eight at once.
    let (status, body) = server.post(&chat_request(cases[0].0, cases[0].1, cases[0].2, false));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], expected[0]);
    assert_eq!(body["object"], "chat.completion");
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let streamed = client::stream_chat(
        &server.addr,
        &chat_request(cases[2].0, cases[2].1, cases[2].2, true),
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(streamed.status, 200);
    assert!(streamed.done, "the stream ends with [DONE]: {streamed:?}");
    assert_eq!(streamed.text, expected[2]);
    assert!(streamed.finish_reason.is_some() && streamed.first_token.is_some(), "{streamed:?}");
    assert!(streamed.completion_tokens.unwrap() > 0, "{streamed:?}");

    let steps_before = server.metric("llava_decode_steps_total");
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|&(q, img, n)| {
                let server = &server;
                s.spawn(move || {
                    let (status, body) = server.post(&chat_request(q, img, n, false));
                    assert_eq!(status, 200, "{body}");
                    body["choices"][0]["message"]["content"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (got, want)) in answers.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "request {i} ({:?}) changed in the batch", cases[i].0);
    }
    // They were decoded together: fewer steps than tokens.
    let steps = server.metric("llava_decode_steps_total") - steps_before;
    let tokens: usize = cases.iter().map(|c| c.2).sum();
    assert!(steps < tokens as f64 * 0.9, "{steps} decoding steps for up to {tokens} tokens: not batched");

    // The OpenAI Python client, streaming and not (where the test venv is installed).
    if let Some(python) = test_python("openai") {
        let out = Command::new(python)
            .arg(repo().join("scripts/serve/openai_client_check.py"))
            .args(["--base-url", &format!("{}/v1", server.url()), "--image", image().to_str().unwrap()])
            .args(["--question", cases[0].0, "--max-tokens", &cases[0].2.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "openai client: {}", String::from_utf8_lossy(&out.stderr));
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(result["text"], expected[0], "{result}");
        assert_eq!(result["streamed"], expected[0], "{result}");
        assert_eq!(result["models"][0], "model");
    }
    let log = server.log();
    assert!(log.contains("serving model"), "{log}");
}

/// The Python with the test packages (`.venv-test`, made by `.ci/run`), when `module` imports.
/// Without it the part of a test that needs it is skipped with a note, unless
/// `LLAVA_REQUIRE_EXTERNAL_TESTS=1` (CI) makes that a failure.
fn test_python(module: &str) -> Option<PathBuf> {
    let python = std::env::var_os("LLAVA_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv-test/bin/python"));
    let works =
        Command::new(&python).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if works {
        return Some(python);
    }
    let required = std::env::var("LLAVA_REQUIRE_EXTERNAL_TESTS").is_ok_and(|v| v == "1");
    assert!(!required, "{} cannot import {module} (run .ci/run's setup of .venv-test)", python.display());
    eprintln!("note: skipped the {module} part: {} cannot import it (see .ci/run)", python.display());
    None
}

#[test]
fn bad_input_gets_openai_errors_and_the_server_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let server = Server::start(&model, &["--max-image-bytes", "200000", "--max-request-bytes", "400000"]);
    let good = chat_request("Hi", false, 4, false);
    let check = |label: &str, (status, text): (u16, String), want: u16, needle: &str| {
        assert_eq!(status, want, "{label}: {text}");
        let body: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{label}: not JSON: {text}"));
        let message = body["error"]["message"].as_str().unwrap_or_else(|| panic!("{label}: {body}"));
        assert!(message.contains(needle), "{label}: {message:?} lacks {needle:?}");
        assert!(body["error"]["type"].is_string(), "{label}: {body}");
        // The next request still works.
        assert_eq!(server.post(&good).0, 200, "after {label}");
    };
    let post = |v: serde_json::Value| server.post_raw(v.to_string().as_bytes(), &[]);
    check("malformed JSON", server.post_raw(b"{\"messages\": [", &[]), 400, "not valid JSON");
    check(
        "a field of the wrong type",
        post(serde_json::json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"})),
        400,
        "temperature",
    );
    check("no messages", post(serde_json::json!({"model": "m"})), 400, "messages");
    check("empty messages", post(serde_json::json!({"messages": []})), 400, "messages is empty");
    check(
        "n = 2",
        post(serde_json::json!({"messages": [{"role": "user", "content": "x"}], "n": 2})),
        400,
        "only one choice",
    );
    check(
        "negative temperature",
        post(serde_json::json!({"messages": [{"role": "user", "content": "x"}], "temperature": -1})),
        400,
        "temperature",
    );
    let with_image = |url: &str, text: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]})
    };
    let garbage =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"not an image"));
    check("an undecodable image", post(with_image(&garbage, "x")), 400, "cannot be decoded");
    check("bad base64", post(with_image("data:image/png;base64,@@@", "x")), 400, "base64");
    let big =
        format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(vec![0u8; 250_000]));
    check("an image over --max-image-bytes", post(with_image(&big, "x")), 413, "--max-image-bytes");
    check("a body over --max-request-bytes", server.post_raw(&vec![b' '; 500_000], &[]), 413, "--max-request-bytes");
    check(
        "an image of too many pixels",
        post(with_image(
            &format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(png_header(20_000, 20_000))
            ),
            "x",
        )),
        413,
        "20000x20000",
    );
    check("a remote URL", post(with_image("https://example.com/a.jpg", "x")), 400, "not fetched");
    check(
        "a local path without --allow-local-images",
        post(with_image("/etc/passwd", "x")),
        400,
        "--allow-local-images",
    );
    check(
        "two images for one <image>",
        post(serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(&image())}},
            {"type": "image_url", "image_url": {"url": data_url(&image())}},
            {"type": "text", "text": "<image> compare"}]}]})),
        400,
        "2 image(s) for 1 `<image>`",
    );
    let long = "word ".repeat(2000);
    check(
        "a prompt longer than the context",
        post(serde_json::json!({"messages": [{"role": "user", "content": long}]})),
        400,
        "longer than the model's context of 512",
    );
    check(
        "the last message is the assistant's",
        post(
            serde_json::json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        ),
        400,
        "last message",
    );
    let (status, text) = server.request("GET", "/nowhere", &[], b"");
    assert_eq!(status, 404, "{text}");
    assert!(server.metric("llava_requests_total{status=\"400\"}") >= 10.0);

    // A text-only model refuses images; an API key is checked.
    drop(server);
    let llm = tmp.path().join("towers");
    ok(&xtask(&["demo-towers", "--out", llm.to_str().unwrap()]));
    let server = Server::start(&llm.join("llm"), &["--api-key", "sesame"]);
    let (status, text) = server.post_raw(good.to_string().as_bytes(), &[]);
    assert_eq!(status, 401, "{text}");
    let auth = [("Authorization", "Bearer sesame")];
    let (status, text) = server.post_raw(with_image(&data_url(&image()), "x").to_string().as_bytes(), &auth);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("text-only model"), "{text}");
    let (status, text) = server.post_raw(good.to_string().as_bytes(), &auth);
    assert_eq!(status, 200, "{text}");
}

/// A PNG whose header declares `w × h` pixels, with an empty image-data chunk.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut typed = kind.to_vec();
        typed.extend(data);
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend(&typed);
        out.extend(crc32(&typed).to_be_bytes());
        out
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[]));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Sends a streaming request and reads until its first content chunk arrives.
fn open_stream(server: &Server, request: &serde_json::Value) -> TcpStream {
    let mut stream = client::send_chat(&server.addr, request, Duration::from_secs(60)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !client::has_content(&seen) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

#[test]
fn a_client_that_leaves_mid_stream_frees_its_place_and_sigterm_lets_replies_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let server = Server::start(&model, &["--max-batch", "1", "--max-tokens", "400"]);
    // A long reply, abandoned after its first piece: its place in the batch (of one) is freed.
    let long = serde_json::json!({"messages": [{"role": "user", "content": "Go on forever."}], "temperature": 0, "stream": true});
    let stream = open_stream(&server, &long);
    drop(stream);
    let start = Instant::now();
    while server.metric("llava_cancelled_total") < 1.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the abandoned sequence was never cancelled");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = server.post(&chat_request("Hi", false, 4, false));
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.metric("llava_batch_size"), 0.0);
    drop(server);

    // A full queue answers 429 at once: one request decoding, one waiting, the rest refused.
    // (Rounds of 32 requests at once, until one finds the queue full: on a loaded machine the
    // server may finish a reply before the next request arrives.)
    let server = Server::start(&model, &["--max-batch", "1", "--max-queue", "1"]);
    let mut refused = 0;
    for _round in 0..5 {
        let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32)
                .map(|_| {
                    s.spawn(|| server.post_raw(chat_request("Go on.", false, 400, false).to_string().as_bytes(), &[]))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
        for (status, body) in &statuses {
            assert!(*status == 200 || (*status == 429 && body.contains("queue_full")), "{status}: {body}");
        }
        refused += statuses.iter().filter(|(status, _)| *status == 429).count();
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "32 requests at once never found the queue of one full");
    assert_eq!(server.post(&chat_request("Hi", false, 4, false)).0, 200, "after the queue was full");

    // SIGTERM while a reply streams: it finishes, then the server exits cleanly.
    let mut stream = open_stream(
        &server,
        &serde_json::json!({"messages": [{"role": "user", "content": "Go on."}],
        "temperature": 0, "stream": true, "max_tokens": 60}),
    );
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "the reply in flight was cut: {rest}");
    assert!(rest.contains("\"finish_reason\":\"length\"") || rest.contains("\"finish_reason\":\"stop\""), "{rest}");
    let mut server = server;
    let status = server.child.wait().unwrap();
    assert!(status.success(), "the server exited with {status}");
    let log = server.stderr.take().unwrap().join().unwrap();
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn the_web_page_streams_the_same_answer_as_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let server = Server::start(&model, &[]);
    let (status, page) = server.request("GET", "/", &[], b"");
    assert_eq!(status, 200);
    assert!(page.contains("v1/chat/completions") && page.contains("<textarea id=\"prompt\""), "{page}");
    let Some(python) = test_python("selenium") else { return };
    let question = "What is unusual about this image?";
    let screenshot = tmp.path().join("page.png");
    let out = Command::new(python)
        .arg(repo().join("scripts/serve/browser_check.py"))
        .args(["--url", &server.url(), "--image", image().to_str().unwrap(), "--question", question])
        .args(["--max-tokens", "24", "--screenshot", screenshot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "browser: {}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The page's request: the image as a data URL, temperature 0 (set by the script), top_p 0.7.
    let mut request = chat_request(question, true, 24, false);
    request["top_p"] = serde_json::json!(0.7);
    let (status, body) = server.post(&request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(shown["answer"], body["choices"][0]["message"]["content"], "{shown}");
    assert!(!shown["answer"].as_str().unwrap().is_empty());
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 1000), "no screenshot");
    if let Ok(dir) = std::env::var("LLAVA_SCREENSHOT_DIR") {
        std::fs::copy(&screenshot, Path::new(&dir).join("serve-page.png")).unwrap();
    }
}

#[test]
fn the_template_follows_the_model_folder_not_the_name_clients_see() {
    let tmp = tempfile::tempdir().unwrap();
    let model = demo_model(tmp.path());
    let prompt_tokens = |server: &Server| {
        let (status, body) = server.post(&chat_request("Hi", false, 2, false));
        assert_eq!(status, 200, "{body}");
        body["usage"]["prompt_tokens"].as_u64().unwrap()
    };
    // The folder is `model`: the reference CLI's rule gives llava_v0; a served name with "v1"
    // in it must not switch the template to llava_v1.
    let by_folder = Server::launch(&model, &["--served-model-name", "demo-v1"]);
    let named = Server::launch(&model, &["--template", "llava_v0"]);
    let other = Server::launch(&model, &["--template", "llava_v1"]);
    assert_eq!(prompt_tokens(&by_folder), prompt_tokens(&named));
    assert_ne!(prompt_tokens(&by_folder), prompt_tokens(&other), "the two templates must differ for this check");
    let (_, models) = by_folder.request("GET", "/v1/models", &[], b"");
    assert!(models.contains("\"demo-v1\""), "{models}");
}
