//! Serve a LLaVA (or plain LLaMA) folder with the library alone: OpenAI-compatible chat
//! completions with continuous batching, `/metrics`, and the web chat at `/`, until Ctrl-C.
//!
//! ```sh
//! cargo run -p llava-serve --example serve -- ~/models/llava-1.5-7b-hf 8080
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;

use llava::backend::Cpu;
use llava::load::{LoadOptions, load_dir};
use llava_serve::{ServeOptions, serve, termination_signal};

/// Loads `dir` on the CPU and serves it on loopback `port` (0: a free one) until `shutdown`;
/// `ready` gets the address once connections are accepted.
pub fn run(
    dir: &Path, port: u16, shutdown: impl Future<Output = ()> + Send + 'static, ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn std::error::Error>> {
    let loaded = load_dir::<Cpu>(dir, &LoadOptions::default(), &Default::default())?;
    let name = dir.file_name().map_or("llava".into(), |n| n.to_string_lossy().into_owned());
    let mut options = ServeOptions::for_model(&loaded, &name, None, Some(dir))?;
    options.port = port;
    serve(loaded, options, shutdown, ready)?;
    Ok(())
}

#[allow(dead_code)] // `main` is unused when a test includes this file to call `run`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: serve MODEL_DIR [PORT]")?;
    let port = args.next().map(|p| p.parse()).transpose()?.unwrap_or(8080);
    run(Path::new(&dir), port, termination_signal(), |addr| println!("http://{addr}"))
}
