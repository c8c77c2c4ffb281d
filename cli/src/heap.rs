//! When the process gives freed memory back to the kernel (glibc's malloc).
//!
//! By default glibc unmaps the free top of a heap once more than 128 KiB of it is free. A sync
//! round allocates tens of megabytes of chunk buffers at once and frees them; the next round
//! then faults every page in again. At the source that was ~20,000 page faults per round of
//! 82 MB, a third of its CPU on these virtual machines, where a fault costs 3-12 µs. Agents
//! keep freed memory mapped instead, and a long-running one gives it back once it is idle.

use std::time::Duration;

/// Free memory kept mapped up to this much; above it glibc trims as usual.
const KEEP: i32 = 1 << 30;
/// Allocations this large or larger get their own mapping (glibc's upper bound on 64-bit);
/// smaller ones, chunk buffers and receive buffers, reuse freed heap memory.
const OWN_MAPPING: i32 = 32 << 20;
/// An agent that served nothing for this long gives freed memory back.
const IDLE: Duration = Duration::from_secs(60);

/// Keeps freed memory for reuse instead of returning it to the kernel at once.
pub fn keep_freed() {
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called first thing in
    // main, before any other thread exists, and the values are within glibc's documented
    // ranges. Its result only says whether the setting was taken: failing leaves the defaults.
    let taken = unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_MAPPING) == 1
    };
    if !taken {
        tracing::debug!("malloc kept its default trimming");
    }
}

/// Gives freed memory back whenever `activity` (a count of requests served) has not moved for
/// [`IDLE`]. Runs until the task is dropped.
pub async fn trim_when_idle(activity: impl Fn() -> u64) {
    let mut seen = activity();
    let mut trimmed = true;
    loop {
        tokio::time::sleep(IDLE).await;
        let now = activity();
        if now != seen {
            seen = now;
            trimmed = false;
        } else if !trimmed {
            // SAFETY: malloc_trim only returns free memory of malloc's own arenas to the
            // kernel; it takes the arenas' locks itself and is safe from any thread.
            unsafe { libc::malloc_trim(0) };
            trimmed = true;
            tracing::debug!("idle: freed memory given back");
        }
    }
}
