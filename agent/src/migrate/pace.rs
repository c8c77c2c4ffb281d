//! When a migration runs: `not_before` (it waits in `scheduled`), and `deadline` (the disk jobs
//! are paced to fill the window, leaving the link to others, and a window too short is said at
//! `checking` rather than found out at the end). The prediction's disk part lives here too: the
//! bytes the destination lacks, from its replicas and this agent's dirty tracking.

use super::{Migration, Migrations};
use std::time::{Duration, SystemTime};

/// Share of the window the paced disk transfer may use (the rest absorbs misprediction).
const WINDOW_SHARE: f64 = 0.8;
/// Slowest pace worth setting (below it a paced job would crawl for no one's benefit).
const MIN_PACE: u64 = 1 << 20;

/// Parses an RFC 3339 time of field `what`.
pub fn parse_time(what: &str, v: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(v)
        .map_err(|e| format!("{what} {v:?}: {e} (use RFC 3339, e.g. 2026-12-03T06:00:00Z)"))
}

impl Migrations {
    /// `scheduled`: waits until `not_before` (cancellable like every phase).
    pub(super) async fn wait_not_before(&self, m: &mut Migration) -> Result<(), String> {
        let Some(at) = m.spec.not_before.clone().filter(|_| !m.spec.dry_run) else {
            return Ok(()); // a dry run reports now
        };
        let when = parse_time("not_before", &at)?;
        let Ok(wait) = when.duration_since(SystemTime::now()) else {
            return Ok(());
        };
        let why = format!("waits until {at} (not_before)");
        self.set_phase(m, "scheduled", &why)
            .map_err(|e| e.to_string())?;
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// The bytes of `disks` the destination lacks (before compression): a disk it holds a
    /// seeded replica of costs the chunks written since that replica's last sync; one it does
    /// not, every chunk holding data.
    pub(super) fn disk_delta(
        &self,
        disks: &[String],
        found: &serde_json::Value,
        store_id: Option<[u8; 16]>,
    ) -> u64 {
        let mut total = 0;
        for d in disks {
            let seeded = found["replicas"][d]["seeded"].as_bool().unwrap_or(false);
            let written = match (seeded, store_id) {
                (true, Some(id)) => self.disks.dirty_since(d, &id).ok().map(|c| {
                    let chunk = self
                        .disks
                        .show(d)
                        .map(|x| x.size / x.chunks.max(1))
                        .unwrap_or(0);
                    c.len() as u64 * chunk
                }),
                _ => None,
            };
            total += written.unwrap_or_else(|| self.disks.data_bytes(d).unwrap_or(0));
        }
        total
    }

    /// At the end of `checking`: with a deadline, whether the prediction fits the window, and
    /// the disk jobs' pace (`figures.deadline`); said on the event stream either way.
    pub(super) fn plan_deadline(&self, m: &mut Migration) -> Result<(), String> {
        let Some(at) = m.spec.deadline.clone() else {
            return Ok(());
        };
        let left = parse_time("deadline", &at)?
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        let p = &m.figures["prediction"];
        let disk_bytes = p["disk_bytes"].as_f64().unwrap_or(0.0);
        let bandwidth = p["bandwidth_bytes_per_s"].as_f64().unwrap_or(1.0).max(1.0);
        let memory_s = p["memory_ms"].as_f64().unwrap_or(0.0) / 1000.0;
        let predicted = disk_bytes / bandwidth + memory_s;
        let feasible = predicted <= left;
        // Pace the disk to finish within its share of what the memory leaves of the window.
        let disk_window = (left - memory_s) * WINDOW_SHARE;
        let pace = (feasible && disk_window > 0.0 && disk_bytes > 0.0)
            .then(|| (disk_bytes / disk_window) as u64)
            .filter(|r| (*r as f64) < bandwidth)
            .map(|r| r.max(MIN_PACE));
        m.figures["deadline"] = serde_json::json!({
            "deadline": at, "left_s": left, "predicted_s": predicted,
            "feasible": feasible, "disk_pace_bytes_per_s": pace,
        });
        self.events
            .emit("migration.deadline", &m.id, m.figures["deadline"].clone());
        if !feasible {
            tracing::warn!(migration = %m.id, left_s = left, predicted_s = predicted, "the deadline cannot be met at the predicted rate; the migration goes on");
        }
        Ok(())
    }

    /// The bandwidth the disk jobs get: the deadline's pace, else the migration's cap.
    pub(super) fn disk_bandwidth(&self, m: &Migration) -> Option<String> {
        match m.figures["deadline"]["disk_pace_bytes_per_s"].as_u64() {
            Some(pace) => Some(format!("{pace}B")),
            None => m.spec.bandwidth.clone(),
        }
    }
}
