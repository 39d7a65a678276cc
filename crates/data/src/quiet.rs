//! Panics of third-party parsers turned into errors, without printing them.
//!
//! Two libraries we call report bad input by unwinding: libjpeg's error handler (through
//! `mozjpeg`'s `unwinding` feature) and, for some malformed `tokenizer.json` files, the
//! `tokenizers` crate's deserializer (an `expect` in its decoder helper). Their panics are caught
//! here and become the caller's error naming the file.

use std::cell::{Cell, RefCell};
use std::sync::Once;

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic into its message. The panic hook stays silent for it on this thread
/// only (data loaders decode on several threads at once, so the global hook is wrapped once, not
/// swapped per call).
pub(crate) fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static WRAP_HOOK: Once = Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let text = info
                    .payload()
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()));
                MESSAGE.with(|m| *m.borrow_mut() = text);
            } else {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    result.map_err(|_| {
        MESSAGE.with(|m| m.borrow_mut().take()).unwrap_or_else(|| "corrupt JPEG data".into()).trim().to_string()
    })
}
