//! Live counters of an export, and the status file `helio status` reads.
//!
//! The export holds the store's RocksDB lock, so another process cannot open it; instead the
//! export rewrites `STORE/status/NAME.json` (write, then rename) twice a second.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Counters updated by the export.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Reads that had to wait for a fetch.
    pub demand_fetches: AtomicU64,
    /// Sum of their waits, microseconds.
    pub demand_wait_us: AtomicU64,
    /// Chunks landed by the background copier.
    pub background_chunks: AtomicU64,
    /// Bytes landed by the background copier.
    pub background_bytes: AtomicU64,
    /// Bytes received from the source.
    pub wire_bytes: AtomicU64,
    /// Fetched chunks discarded because a local write got there first.
    pub discarded_stale: AtomicU64,
    /// Recent demand waits (microseconds), for percentiles.
    pub recent_waits: Mutex<Vec<u64>>,
}

impl ExportStats {
    /// Records one demand wait.
    pub fn demand_wait(&self, us: u64) {
        self.demand_fetches.fetch_add(1, Ordering::Relaxed);
        self.demand_wait_us.fetch_add(us, Ordering::Relaxed);
        let mut w = self.recent_waits.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= 4096 {
            w.drain(..2048);
        }
        w.push(us);
    }
}

/// What `helio status --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The disk.
    pub disk: String,
    /// Process id of the export.
    pub pid: u32,
    /// Where it serves.
    pub nbd: String,
    /// The source, if fetching on demand.
    pub source: Option<String>,
    /// Disk size.
    pub size_bytes: u64,
    /// Bytes present locally (fetched, seeded, zero or written).
    pub present_bytes: u64,
    /// Bytes still only at the source.
    pub absent_bytes: u64,
    /// Bytes written locally through NBD.
    pub written_bytes: u64,
    /// Background copy rate over the last interval, bytes/s.
    pub background_rate: f64,
    /// Seconds until complete at that rate (null when idle or complete).
    pub eta_s: Option<f64>,
    /// Reads that waited for an on-demand fetch.
    pub on_demand_fetches: u64,
    /// Their mean wait.
    pub on_demand_mean_ms: f64,
    /// Their median wait.
    pub on_demand_p50_ms: f64,
    /// Their 99th percentile wait.
    pub on_demand_p99_ms: f64,
    /// Bytes received from the source.
    pub wire_bytes: u64,
    /// Why the export stopped acknowledging writes and flushes (a failed commit or sync of
    /// its store), or null. Restart the export to reopen the replica.
    #[serde(default)]
    pub failed: Option<String>,
    /// Every chunk is local; the source has been released.
    pub complete: bool,
    /// Unix time of this snapshot.
    pub updated_unix: f64,
}

/// The status file of disk `name` in `store`.
pub fn path(store: &Path, name: &str) -> PathBuf {
    store.join("status").join(format!("{name}.json"))
}

/// Writes a snapshot atomically.
pub fn write(store: &Path, status: &Status) -> std::io::Result<()> {
    let p = path(store, &status.disk);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(status).unwrap_or_default())?;
    std::fs::rename(tmp, &p)?;
    match p.parent() {
        Some(dir) => blockstore::datafile::fsync_dir(dir),
        None => Ok(()),
    }
}

/// Percentile of microsecond samples, in milliseconds.
pub fn percentile_ms(samples: &[u64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i] as f64 / 1000.0
}
