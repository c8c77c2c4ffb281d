//! The d/r model of iterative pre-copy (Clark et al., NSDI 2005; Xen's and QEMU's stop rules):
//! round 1 sends the memory `m` at bandwidth `r`; each later round sends what was dirtied
//! during the previous one, so with dirty rate `d` round times decay geometrically by d/r, and
//! when d/r ≥ 1 they do not decay at all. The engine stops when the predicted downtime is
//! within the target, or at Xen's limits (30 rounds, 3× memory sent).
//!
//! The workload's shape is modelled as the guests write: a hot set of `H` pages receiving a
//! fraction of the writes uniformly (distinct pages dirtied in `t` seconds: H(1 − e^(−d_h·t/H)))
//! and a sequential sweep over the rest (min(C, d_c·t)).

use crate::page::PAGE_SIZE;
use serde::Serialize;

/// Xen's round limit.
pub const MAX_ROUNDS: u32 = 30;
/// Xen's limit on bytes sent, as a multiple of memory.
pub const MAX_SENT_FACTOR: f64 = 3.0;

/// What the model is told.
#[derive(Clone, Debug)]
pub struct ModelInput {
    /// Bytes the first round sends (the guest's non-zero memory).
    pub memory_bytes: u64,
    /// Pages of the whole guest (the sweep wraps around them).
    pub total_pages: u64,
    /// Page writes per second.
    pub dirty_rate: f64,
    /// Link bandwidth, bytes per second on the wire.
    pub bandwidth: f64,
    /// Page bytes per wire byte (compression, zero and duplicate pages); 1 for none.
    pub compression: f64,
    /// Hot set size in pages (0: none).
    pub hot_pages: u64,
    /// Fraction of writes that go to the hot set.
    pub hot_fraction: f64,
    /// Round-trip time, seconds (half of it is part of the downtime).
    pub rtt: f64,
    /// Downtime target, seconds.
    pub downtime_target: f64,
    /// Whether hot pages are held back for the stop-and-copy.
    pub hold_hot: bool,
}

/// One predicted round.
#[derive(Clone, Debug, Serialize)]
pub struct PredictedRound {
    /// Round number, from 1.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Page bytes sent.
    pub bytes: u64,
    /// Duration.
    pub elapsed_ms: f64,
}

/// What the model predicts.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    /// Dirty rate over bandwidth, in page bytes.
    pub d_over_r: f64,
    /// Whether pre-copy converges to the downtime target.
    pub converges: bool,
    /// The live rounds.
    pub rounds: Vec<PredictedRound>,
    /// Downtime of the final stop-and-copy, ms.
    pub downtime_ms: f64,
    /// Start until the destination runs the guest, ms.
    pub total_ms: f64,
    /// Why the rounds stop: `target`, `max-rounds`, `max-sent` or `diverges`.
    pub stop_reason: &'static str,
}

impl ModelInput {
    fn page_rate(&self) -> f64 {
        self.bandwidth * self.compression.max(1e-9) / PAGE_SIZE as f64
    }

    /// Distinct pages dirtied in `t` seconds: (hot, cold).
    pub fn dirtied(&self, t: f64) -> (f64, f64) {
        let (hot_rate, cold_rate) = if self.hot_pages > 0 {
            (
                self.dirty_rate * self.hot_fraction,
                self.dirty_rate * (1.0 - self.hot_fraction),
            )
        } else {
            (0.0, self.dirty_rate)
        };
        let h = self.hot_pages as f64;
        let hot = if h > 0.0 {
            h * (1.0 - (-hot_rate * t / h).exp())
        } else {
            0.0
        };
        let cold_pages = self.total_pages.saturating_sub(self.hot_pages) as f64;
        (hot, (cold_rate * t).min(cold_pages))
    }

    /// Runs the model.
    pub fn predict(&self) -> Prediction {
        let pr = self.page_rate();
        let memory_pages = self.memory_bytes as f64 / PAGE_SIZE as f64;
        let d_over_r = self.dirty_rate / pr;
        let mut rounds = Vec::new();
        let mut pages = memory_pages;
        let mut sent = 0.0;
        let mut held = 0.0;
        let mut total = 0.0;
        let budget = ((self.downtime_target - self.rtt / 2.0).max(0.0) * pr) / 2.0;
        let stop_reason = loop {
            // Rounds follow each other without waiting for acknowledgements.
            let t = pages / pr;
            rounds.push(PredictedRound {
                round: rounds.len() as u32 + 1,
                pages: pages.round() as u64,
                bytes: (pages * PAGE_SIZE as f64).round() as u64,
                elapsed_ms: t * 1000.0,
            });
            total += t;
            sent += pages;
            // Every page dirtied during a round is resent. (Some went out with their new content
            // in the same round and are skipped by the engine: for uniformly placed writes half
            // of round 1's, for a sweep that the sender overtakes almost none. The model takes
            // the upper bound.)
            let (hot, cold) = self.dirtied(t);
            let distinct_rate = (hot + cold) / t;
            let dirty = hot + cold;
            if dirty / pr + self.rtt / 2.0 <= self.downtime_target {
                pages = dirty;
                break "target";
            }
            // A guest that rewrites all of memory within a round dirties at least as fast as
            // the link drains (to rounding).
            if distinct_rate >= pr * 0.999 {
                pages = dirty;
                break "diverges";
            }
            if rounds.len() as u32 >= MAX_ROUNDS {
                pages = dirty;
                break "max-rounds";
            }
            if sent >= MAX_SENT_FACTOR * memory_pages {
                pages = dirty;
                break "max-sent";
            }
            held = if self.hold_hot && rounds.len() >= 2 {
                hot.min(budget)
            } else {
                0.0
            };
            pages = dirty - held;
        };
        let _ = held;
        let downtime = pages / pr + self.rtt / 2.0;
        Prediction {
            d_over_r,
            converges: stop_reason == "target",
            rounds,
            downtime_ms: downtime * 1000.0,
            total_ms: (total + downtime) * 1000.0,
            stop_reason,
        }
    }
}

impl ModelInput {
    /// Warm migration: everything is copied with the guest paused.
    pub fn predict_warm(&self) -> Prediction {
        let downtime =
            self.memory_bytes as f64 / PAGE_SIZE as f64 / self.page_rate() + self.rtt / 2.0;
        Prediction {
            d_over_r: self.dirty_rate / self.page_rate(),
            converges: true,
            rounds: Vec::new(),
            downtime_ms: downtime * 1000.0,
            total_ms: downtime * 1000.0,
            stop_reason: "warm",
        }
    }

    /// Post-copy: the guest resumes after the vCPU state crosses (half an RTT); the memory
    /// follows at the push's share of the link.
    pub fn predict_postcopy(&self, push_share: f64) -> Prediction {
        let push = self.memory_bytes as f64 / PAGE_SIZE as f64 / (self.page_rate() * push_share);
        Prediction {
            d_over_r: self.dirty_rate / self.page_rate(),
            converges: true,
            rounds: Vec::new(),
            downtime_ms: self.rtt / 2.0 * 1000.0,
            total_ms: (push + self.rtt) * 1000.0,
            stop_reason: "postcopy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(dirty_rate: f64) -> ModelInput {
        ModelInput {
            memory_bytes: 512 << 20,
            total_pages: 131072,
            dirty_rate,
            bandwidth: 125e6,
            compression: 1.0,
            hot_pages: 0,
            hot_fraction: 0.9,
            rtt: 0.0,
            downtime_target: 0.05,
            hold_hot: false,
        }
    }

    #[test]
    fn rounds_decay_geometrically_by_d_over_r() {
        // d/r = 0.5: 512 MiB at 125 MB/s is 4.29 s, then halves each round until under 50 ms.
        let p = input(0.5 * 125e6 / 4096.0).predict();
        assert!((p.d_over_r - 0.5).abs() < 1e-9);
        assert!(p.converges);
        let t: Vec<f64> = p.rounds.iter().map(|r| r.elapsed_ms).collect();
        assert!((t[0] - 4294.97).abs() < 1.0, "{t:?}");
        for w in t.windows(2) {
            assert!((w[1] / w[0] - 0.5).abs() < 1e-6, "{t:?}");
        }
        // The stop-and-copy follows the first round whose dirty pages take ≤ 50 ms to send, i.e.
        // the first round shorter than 100 ms: 4295, 2147, 1074, 537, 268, 134, 67 ms.
        assert_eq!(p.rounds.len(), 7);
        assert!(p.downtime_ms <= 50.0);
    }

    #[test]
    fn d_over_r_at_least_one_diverges() {
        let p = input(1.2 * 125e6 / 4096.0).predict();
        assert!(!p.converges);
        assert_eq!(p.stop_reason, "diverges");
        assert!(p.rounds.len() <= 3, "{:?}", p.rounds);
    }

    #[test]
    fn a_hot_set_saturates() {
        let mut i = input(100_000.0);
        i.hot_pages = 1000;
        i.hot_fraction = 1.0;
        let (hot, cold) = i.dirtied(10.0);
        assert!((hot - 1000.0).abs() < 1.0 && cold == 0.0);
    }
}
