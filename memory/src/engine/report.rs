//! What a migration reports (`helio memory demo --json` prints the source's [`Report`]).

use crate::model::Prediction;
use serde::{Deserialize, Serialize};

/// One round as measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number, from 1; the stop-and-copy (or post-copy push) is the last.
    pub round: u32,
    /// What the round was: `live`, `stop-and-copy`, `warm` or `postcopy`.
    pub kind: String,
    /// Pages sent.
    pub pages: u64,
    /// Wire bytes sent.
    pub bytes: u64,
    /// Duration (until the destination acknowledged the round).
    pub elapsed_ms: f64,
    /// Pages the guest dirtied per second during the round.
    pub dirty_rate: f64,
    /// Page bytes delivered per second (what d is compared with).
    pub bandwidth: f64,
    /// Wire bytes per second.
    pub wire_bandwidth: f64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Pages sent as references to content the destination holds.
    pub ref_pages: u64,
    /// Hot pages held back for the stop-and-copy after this round.
    pub held_pages: u64,
    /// Pages dirty when the round ended.
    pub dirty_pages: u64,
    /// Predicted downtime if the engine switched over after this round, ms.
    pub predicted_downtime_ms: f64,
    /// The vCPU throttle during the round.
    pub throttle: f64,
}

/// The model's prediction, as reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Predicted {
    /// Start until the guest runs at the destination, ms.
    pub total_ms: f64,
    /// Stop-and-copy downtime, ms.
    pub downtime_ms: f64,
    /// Live rounds.
    pub rounds: usize,
    /// d/r.
    pub d_over_r: f64,
    /// Why the model stops.
    pub stop_reason: String,
    /// Page bytes per wire byte assumed (measured on a sample before round 1).
    pub compression: f64,
}

impl Predicted {
    /// The model's prediction, made assuming `compression`.
    pub fn new(p: &Prediction, compression: f64) -> Self {
        Predicted {
            total_ms: p.total_ms,
            downtime_ms: p.downtime_ms,
            rounds: p.rounds.len(),
            d_over_r: p.d_over_r,
            stop_reason: p.stop_reason.to_string(),
            compression,
        }
    }
}

/// What the destination found after the move.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DestinationReport {
    /// blake3 of the received memory as of the pause (hex), combined from each page as read
    /// back from guest memory after it was installed (before the switchover; during post-copy
    /// the hash of the buffer UFFDIO_COPY installed, as the guest runs on the page at once).
    pub memory_hash: String,
    /// Whether that equals the source's.
    pub memory_hash_equal: bool,
    /// The guest's write counter when it resumed.
    pub counter_at_resume: u64,
    /// Its counter after running on.
    pub counter_after: u64,
    /// Whether the guest kept running and writing after the move.
    pub guest_ran_on: bool,
    /// Post-copy page faults served.
    pub faults: u64,
    /// Their latency (fault to page installed), median, ms.
    pub fault_p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub fault_p99_ms: Option<f64>,
    /// The longest, ms.
    #[serde(default)]
    pub fault_max_ms: Option<f64>,
    /// Faults still waiting when the source said the push was complete.
    #[serde(default)]
    pub unanswered_faults: u64,
    /// The guest's counter then.
    #[serde(default)]
    pub counter_at_push_end: u64,
    /// Pages whose hash was read from guest memory at the end (see [`Verified::pages_reread`]).
    #[serde(default)]
    pub pages_reread: u64,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// The verdict.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Verified {
    /// Everything checked out.
    pub ok: bool,
    /// The destination's memory equals the source's at the pause.
    pub memory_hash_equal: bool,
    /// The guest ran on at the destination, its counter continuing from the source's.
    pub guest_ran_on: bool,
    /// The source guest's counter at the pause.
    pub counter_at_pause: u64,
    /// The destination's counter when it resumed (equals the pause's when nothing was lost).
    pub counter_at_resume: u64,
    /// The destination's counter after running on.
    pub counter_after: u64,
    /// Pages the destination's hash took from its guest memory itself (read back after the
    /// guest ran, every page it had not written); the rest count as installed.
    #[serde(default)]
    pub pages_reread: u64,
}

/// Post-copy figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PostcopyReport {
    /// Pages the destination faulted on.
    pub faults: u64,
    /// Pages sent because of a fault.
    pub demand_pages: u64,
    /// Pages pushed in the background.
    pub pushed_pages: u64,
    /// Fault latency, median, ms.
    pub fault_p50_ms: Option<f64>,
    /// Fault latency, 99th percentile, ms.
    pub fault_p99_ms: Option<f64>,
    /// The longest stall, ms (every fault counts, also one the push's end resolved).
    #[serde(default)]
    pub fault_max_ms: Option<f64>,
    /// Faults still waiting when the push ended: the source never answered them (0 expected).
    #[serde(default)]
    pub unanswered_faults: u64,
    /// Writes the guest made at the destination while the push ran (it is not blocked).
    #[serde(default)]
    pub guest_writes_during_push: u64,
}

/// A whole migration, as the source saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// `kvm` or `synthetic`.
    pub backend: String,
    /// `precopy`, `warm` or `postcopy` (as asked for).
    pub mode: String,
    /// Guest RAM.
    pub memory_bytes: u64,
    /// `migrated`, `aborted` (by policy; the guest runs at the source) or `failed`.
    pub outcome: String,
    /// Every round, the final one included.
    pub rounds: Vec<RoundReport>,
    /// Guest paused at the source until it ran at the destination, ms.
    pub downtime_ms: f64,
    /// Start until the source could free the guest's memory, ms.
    pub total_ms: f64,
    /// Bytes the source sent.
    pub wire_bytes: u64,
    /// Whether pre-copy reached the downtime target by itself (no policy, no limit).
    pub converged: bool,
    /// The divergence policy applied (`none`, `throttle`, `postcopy`, `stop`, `abort`), or
    /// `limit` when Xen's round or volume limit forced the stop-and-copy.
    pub policy_applied: String,
    /// What the d/r model predicted for this guest and link.
    pub predicted: Option<Predicted>,
    /// The check of the result.
    pub verified: Verified,
    /// Post-copy figures, when pages were pulled.
    pub postcopy: Option<PostcopyReport>,
    /// Measured round-trip time to the destination, ms.
    pub rtt_ms: f64,
    /// Bytes not sent thanks to zero markers, references and compression.
    pub saved: Saved,
    /// Whether the guest still runs at the source afterwards (after an abort or a failure
    /// before the switchover).
    pub source_guest_running: bool,
    /// Why the migration failed, when it did.
    pub error: Option<String>,
}

/// Bytes the wire did not carry, by cause.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    /// Zero pages (never sent, or sent as markers).
    pub zero_pages: u64,
    /// Pages sent as references.
    pub ref_pages: u64,
    /// Page bytes that went into compressed batches.
    pub compressed_input: u64,
    /// What those batches took on the wire.
    pub compressed_output: u64,
    /// Page sends avoided by holding hot pages back (held in a round, sent once at the end).
    pub held_page_sends: u64,
}
