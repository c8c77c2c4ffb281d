//! A low-priority worker thread for the background copier's CPU work (decompress, blake3, land).
//!
//! On a small host the copier's verification competes with the VM's reads for the same cores;
//! at nice 10 the scheduler gives reads the CPU first, which keeps read latency near idle while
//! the copy runs.

use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

/// One worker thread at lowered priority.
pub struct LowPriority {
    tx: std::sync::Mutex<mpsc::Sender<Job>>,
}

impl LowPriority {
    /// Starts the worker.
    pub fn start(name: &str) -> std::io::Result<LowPriority> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                lower_priority();
                for job in rx {
                    job();
                }
            })?;
        Ok(LowPriority {
            tx: std::sync::Mutex::new(tx),
        })
    }

    /// Runs `f` on the worker; `None` if the worker is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .ok()?;
        rx.await.ok()
    }
}

fn lower_priority() {
    // SAFETY: setpriority takes only integers and touches no memory of ours. On Linux,
    // PRIO_PROCESS with who = 0 applies to the calling thread alone.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if rc != 0 {
        tracing::debug!("could not lower the background copier's priority");
    }
}
