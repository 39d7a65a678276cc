//! What the process is doing, for the one line an out-of-memory failure prints.
//!
//! A failed allocation can name its size but not its purpose; long operations say what they are
//! doing here ("reading tensor `…` from …", "generating: …", "training step …"), and the
//! out-of-memory handler (`llava::oom`) reads it back. Both sides avoid allocating: the text lives
//! in a fixed buffer behind a lock that the handler only *tries* to take. There is one activity
//! per process, set by the thread that drives the work (loading, generating, a training step);
//! worker threads (the data loader's) do not set it, so guards never interleave.

use std::sync::Mutex;

const CAPACITY: usize = 240;

static ACTIVITY: Mutex<([u8; CAPACITY], usize)> = Mutex::new(([0; CAPACITY], 0));

/// Records what the process is doing until the returned guard is dropped, when the previous
/// activity comes back (so nested work reports the innermost, and nothing stale is reported
/// after the work is over).
#[must_use = "the activity lasts as long as the guard"]
pub fn doing(text: &str) -> Doing {
    let mut previous = [0u8; CAPACITY];
    let len = read_into(&mut previous);
    set(text);
    Doing { previous, len }
}

/// Restores the previous activity when dropped (see [`doing`]).
pub struct Doing {
    previous: [u8; CAPACITY],
    len: usize,
}

impl Drop for Doing {
    fn drop(&mut self) {
        set(std::str::from_utf8(&self.previous[..self.len]).unwrap_or(""));
    }
}

/// Records what the process is doing now (cut to 240 bytes at a character boundary).
pub fn set(text: &str) {
    let mut end = text.len().min(CAPACITY);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if let Ok(mut slot) = ACTIVITY.lock() {
        slot.0[..end].copy_from_slice(&text.as_bytes()[..end]);
        slot.1 = end;
    }
}

/// Copies the current activity into `out` and returns its length (0 when nothing was recorded
/// or another thread is recording right now). Allocates nothing.
pub fn read_into(out: &mut [u8]) -> usize {
    match ACTIVITY.try_lock() {
        Ok(slot) => {
            let n = slot.1.min(out.len());
            out[..n].copy_from_slice(&slot.0[..n]);
            n
        }
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_activity_is_kept_cut_at_a_character_boundary() {
        set("reading tensor `a` from model.safetensors");
        let mut buf = [0u8; 64];
        let n = read_into(&mut buf);
        assert_eq!(&buf[..n], b"reading tensor `a` from model.safetensors");
        let long = "é".repeat(200);
        set(&long);
        let mut buf = [0u8; 512];
        let n = read_into(&mut buf);
        assert!(n <= CAPACITY && std::str::from_utf8(&buf[..n]).is_ok());
        set("");
        {
            let _outer = doing("training step 3");
            {
                let _inner = doing("reading tensor `b`");
                assert_eq!(read_into(&mut buf), "reading tensor `b`".len());
            }
            let n = read_into(&mut buf);
            assert_eq!(&buf[..n], b"training step 3");
        }
        assert_eq!(read_into(&mut buf), 0, "nothing stale once the work is over");
    }
}
