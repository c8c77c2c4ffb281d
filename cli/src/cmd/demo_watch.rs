//! What the demo reads from the guest's serial consoles: its 10 ms ticks (the longest pause
//! between two, and whether the sequence runs on from one site to the other) and the disk
//! records it says were acknowledged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The last "tick N" and "disk acked SEQ" numbers on a console.
pub fn console(serial: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let (mut tick, mut acked) = (0, 0);
    for l in text.lines() {
        if let Some(n) = tick_of(l) {
            tick = n;
        }
        if let Some(n) = l.strip_prefix("disk acked ") {
            acked = n.trim().parse().unwrap_or(acked);
        }
    }
    (tick, acked)
}

fn tick_of(line: &str) -> Option<u64> {
    line.strip_prefix("tick ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn ticks(serial: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    text.lines().filter_map(tick_of).collect()
}

/// The guest's tick sequence runs on from `from` (the site it left) to `to`: the tick after
/// the last one printed at `from` is printed at `to`.
pub fn continuous(from: &Path, to: &Path) -> bool {
    let Some(last) = ticks(from).last().copied() else {
        return false;
    };
    ticks(to).contains(&(last + 1))
}

/// Waits until the guest acknowledged `more` records beyond those it had.
pub async fn wait_acked(serial: &Path, more: u64, within: Duration) -> anyhow::Result<()> {
    let start = console(serial).1;
    let deadline = Instant::now() + within;
    while console(serial).1 < start + more {
        if Instant::now() > deadline {
            anyhow::bail!(
                "the guest acknowledged no {more} records within {within:?} ({}): see its console",
                serial.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A thread watching the consoles for the longest time without a tick.
pub struct Ticks {
    worst_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Ticks {
    /// Starts watching `files`.
    pub fn watch(files: [PathBuf; 2]) -> Ticks {
        let worst_us = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (w, s) = (worst_us.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = [0usize; 2];
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                for (i, f) in files.iter().enumerate() {
                    let n = std::fs::metadata(f).map(|m| m.len() as usize).unwrap_or(0);
                    if n > seen[i] {
                        seen[i] = n;
                        let now = Instant::now();
                        w.fetch_max((now - last).as_micros() as u64, Ordering::Relaxed);
                        last = now;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Ticks { worst_us, stop }
    }

    /// The longest pause since the start or the last reset.
    pub fn gap_since_last_reset(&self) -> Duration {
        Duration::from_micros(self.worst_us.load(Ordering::Relaxed))
    }

    /// Forgets the pauses seen so far.
    pub fn reset(&self) {
        self.worst_us.store(0, Ordering::Relaxed);
    }

    /// Stops the thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Ticks {
    fn drop(&mut self) {
        self.stop();
    }
}
