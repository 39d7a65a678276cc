//! A global allocator that counts: how the hostile-input tests prove that no input reaches an
//! allocation it has not bounded first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static MEASURING: Mutex<()> = Mutex::new(());

/// The system allocator, keeping the bytes live now and their peak. Install it in a test binary
/// with `#[global_allocator] static A: llava_io::CountingAllocator = llava_io::CountingAllocator;`
/// and measure with [`peak_during`](Self::peak_during).
pub struct CountingAllocator;

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed) + new_size - layout.size();
                // A moving realloc briefly holds both blocks.
                PEAK.fetch_max(now + layout.size().min(new_size), Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

impl CountingAllocator {
    /// A lock for a test to hold for its whole length: the counter sees every thread of the
    /// process, so another test building its inputs would count in this one's peak. With it
    /// held by every test of a binary, only the measured test allocates.
    pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
        static ALONE: Mutex<()> = Mutex::new(());
        ALONE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` and returns its result with the most heap bytes live at once during it, above
    /// what was live when it started. Measurements are serialised, but any other thread's
    /// allocations meanwhile count too: tests that measure hold [`exclusive`](Self::exclusive).
    pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
        let _one_at_a_time = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
        let start = CURRENT.load(Ordering::Relaxed);
        PEAK.store(start, Ordering::Relaxed);
        let out = f();
        (out, PEAK.load(Ordering::Relaxed).saturating_sub(start))
    }
}
