//! Kill points for fault-injection tests: the process kills itself (SIGKILL, as `kill -9`
//! would) at a named moment of a file write, so that tests can stop a run exactly *during* each
//! write instead of hoping a timer lands there.
//!
//! `LLAVA_KILL_AT=<text>[@<n>]` kills the process at the `n`-th (default first) point whose name
//! contains `<text>`. Points are named `write:<file>` (a temporary file written, not yet renamed
//! over its target), `commit:<folder>:manifest` (a folder's files written, its manifest not),
//! `commit:<folder>:rename` (between the two renames that replace an old folder), and
//! `append:<file>` (half of a log line written). Without the variable a point costs one check of
//! a cached value (its name is not even formatted).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The environment variable that arms a kill point.
pub const KILL_AT: &str = "LLAVA_KILL_AT";

static SPEC: OnceLock<Option<(String, usize)>> = OnceLock::new();
static HITS: AtomicUsize = AtomicUsize::new(0);

fn spec() -> &'static Option<(String, usize)> {
    SPEC.get_or_init(|| {
        let value = std::env::var(KILL_AT).ok()?;
        let (text, nth) = match value.rsplit_once('@') {
            Some((text, n)) => (text.to_string(), n.parse().unwrap_or(1)),
            None => (value, 1),
        };
        Some((text, nth.max(1)))
    })
}

/// Whether the point named by `parts` (joined with `:`, e.g. `["append", "metrics.jsonl"]`) is
/// the armed one, counting hits; the caller then does what a kill at that moment would
/// interrupt and calls [`kill`]. The name is only built when a point is armed.
pub fn armed(parts: &[&str]) -> Option<String> {
    let (text, nth) = spec().as_ref()?;
    let name = parts.join(":");
    (name.contains(text.as_str()) && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth).then_some(name)
}

/// Kills the process at the point named by `parts` when it is armed.
pub fn point(parts: &[&str]) {
    if let Some(name) = armed(parts) {
        kill(&name);
    }
}

/// Ends the process at once with SIGKILL: no destructor, no buffer flush, no temporary-file
/// cleanup, as an out-of-memory killer or a power cut would.
pub fn kill(name: &str) -> ! {
    eprintln!("{KILL_AT}: killed at {name}");
    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so this does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}
