//! The `serve` example serves the demo checkpoint: a chat completion over loopback, then a
//! clean shutdown.

#[path = "../examples/serve.rs"]
mod example;

use std::path::Path;
use std::time::Duration;

use llava_serve::client;

#[test]
fn the_example_serves_a_model_folder_and_stops_when_told() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/tokenizers/llama");
    llava_demo::write_demo_model(&model, &tokenizer, 1).unwrap();
    let (address, ready) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let shutdown = async move {
            let _ = stopped.await;
        };
        example::run(&model, 0, shutdown, move |addr| address.send(addr).unwrap()).map_err(|e| e.to_string())
    });
    let addr = ready.recv_timeout(Duration::from_secs(120)).expect("the server started").to_string();
    let request =
        serde_json::json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0});
    let reply = client::chat(&addr, &request, Duration::from_secs(60)).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    let tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=3).contains(&tokens), "{body}");
    assert_eq!(body["model"], "model");
    stop.send(()).unwrap();
    server.join().unwrap().expect("a clean shutdown");
}
