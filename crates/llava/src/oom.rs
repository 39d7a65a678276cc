//! Out of memory as an error message, not an abort.
//!
//! Rust's default reaction to a failed allocation is `memory allocation of N bytes failed`
//! followed by an abort (SIGABRT, a core dump, and under `RUST_BACKTRACE` a backtrace). A
//! program that sets [`ReportingAllocator`] as its global allocator ends instead with one line
//! naming the size that failed and what to do, and exit status [`EXIT_CODE`]. It forwards
//! everything to the system allocator (so `tune_allocator`'s settings apply); only the failure
//! path differs, and it allocates nothing (the message is formatted on the stack). Files written
//! through `llava_io::write_atomically` keep their previous contents: the process ends
//! before any rename.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: llava::oom::ReportingAllocator = llava::oom::ReportingAllocator;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write;

/// The exit status after a failed allocation.
pub const EXIT_CODE: i32 = 12; // ENOMEM

/// The system allocator, with a failed allocation reported as an error message (see the module).
pub struct ReportingAllocator;

// SAFETY: every call is forwarded to `System` unchanged; a null result (failure) never returns.
unsafe impl GlobalAlloc for ReportingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }
}

/// A fixed buffer `fmt::Write` fills without allocating (longer text is cut).
struct StackText {
    buf: [u8; 768],
    len: usize,
}

impl Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The message a failed allocation of `bytes` prints, with what the process was doing
/// (`llava_io::activity`) when it is known.
fn message(bytes: usize, activity: &str, out: &mut impl Write) {
    let (value, unit) = match bytes {
        b if b >= 1 << 30 => (b as f64 / (1u64 << 30) as f64, "GiB"),
        b if b >= 1 << 20 => (b as f64 / (1u64 << 20) as f64, "MiB"),
        b => (b as f64 / 1024.0, "KiB"),
    };
    let _ = write!(out, "error: out of memory: an allocation of {value:.1} {unit} ({bytes} bytes) failed");
    if !activity.is_empty() {
        let _ = write!(out, " while {activity}");
    }
    let _ = writeln!(
        out,
        ". \
         `cargo xtask plan` with the same arguments shows what the run needs; a smaller batch, \
         fewer new tokens, half-precision weights (--dtype bf16) or gradient checkpointing need less."
    );
}

#[cold]
fn out_of_memory(bytes: usize) -> ! {
    let mut text = StackText { buf: [0; 768], len: 0 };
    let mut doing = [0u8; 256];
    let n = llava_io::activity::read_into(&mut doing);
    message(bytes, std::str::from_utf8(&doing[..n]).unwrap_or(""), &mut text);
    #[cfg(unix)]
    // SAFETY: write(2) and _exit(2) on a valid stack buffer; neither allocates.
    unsafe {
        libc::write(2, text.buf.as_ptr().cast(), text.len);
        libc::_exit(EXIT_CODE);
    }
    #[cfg(not(unix))]
    {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), &text.buf[..text.len]);
        std::process::exit(EXIT_CODE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_size_and_fits_the_stack_buffer() {
        let mut text = StackText { buf: [0; 768], len: 0 };
        message(3 << 30, "", &mut text);
        let s = std::str::from_utf8(&text.buf[..text.len]).unwrap();
        assert!(s.starts_with("error: out of memory: an allocation of 3.0 GiB (3221225472 bytes) failed."), "{s}");
        assert!(s.ends_with('\n'), "the whole message fits: {s}");
        // With the longest activity the buffer holds, the advice still fits.
        let mut text = StackText { buf: [0; 768], len: 0 };
        message(3 << 30, &"x".repeat(240), &mut text);
        let s = std::str::from_utf8(&text.buf[..text.len]).unwrap();
        assert!(s.contains(&format!(" while {}. ", "x".repeat(240))) && s.ends_with('\n'), "{s}");
    }
}
