//! The pre-copy engine's decisions as plain functions of what a round measured: when to switch
//! over, when pre-copy does not converge, how hard to throttle, which pages to hold back. The
//! rounds call them; unit tests drive them without a guest or a link.

use crate::model::{MAX_ROUNDS, MAX_SENT_FACTOR};
use crate::page::PageSet;
use std::time::Duration;

/// A round whose dirty set shrinks by less than this fraction does not converge.
const MIN_SHRINK: f64 = 0.9;
/// Measured d/r at which pre-copy is taken not to converge. Just under 1: a guest that rewrites
/// all of memory within a round saturates the dirty log, and then measures as d/r ≈ 1.
const DIVERGING: f64 = 0.95;
/// Once throttled, the throttle steps up each round whose d/r stays above this (QEMU's
/// `throttle-trigger-threshold`, 50%): at d/r 0.9 the dirty set shrinks only 10% a round and
/// Xen's limits end the migration before it converges; at 0.5 it halves each round.
const THROTTLE_TRIGGER: f64 = 0.5;

/// What a live round's figures say to do next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Next {
    /// The rest fits the downtime target: pause and copy it.
    Switch,
    /// Xen's limits (rounds, or bytes sent against memory size) are reached.
    Limit,
    /// Pre-copy does not converge (`stuck`: the dirty set stopped shrinking).
    Diverging {
        /// True when detected by the dirty set's shrinking, not by d/r.
        stuck: bool,
    },
    /// Throttled, but still converging too slowly.
    TooSlow,
    /// Another round.
    Continue,
}

/// One live round's figures.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    /// Seconds the pages left dirty would take to copy, plus half a round trip.
    pub predicted_downtime: f64,
    /// Dirty rate over copy rate, in pages.
    pub d_over_r: f64,
    /// The throttle in force (0: none).
    pub throttle: f64,
    /// Rounds since the limits last counted afresh.
    pub rounds: u32,
    /// Bytes sent since then, as a multiple of memory size.
    pub sent_factor: f64,
}

/// Decides after a live round. `dirty_history` holds the dirty set's size after each round
/// since the throttle last changed.
pub fn next(m: &Measured, target: Duration, dirty_history: &[usize]) -> Next {
    if m.predicted_downtime <= target.as_secs_f64() {
        return Next::Switch;
    }
    if m.rounds >= MAX_ROUNDS || m.sent_factor >= MAX_SENT_FACTOR {
        return Next::Limit;
    }
    let stuck = stuck(dirty_history);
    if m.d_over_r >= DIVERGING || stuck {
        return Next::Diverging { stuck };
    }
    if m.throttle > 0.0 && m.d_over_r > THROTTLE_TRIGGER {
        return Next::TooSlow;
    }
    Next::Continue
}

/// True when the dirty set shrank by less than [`MIN_SHRINK`] twice in a row.
pub fn stuck(history: &[usize]) -> bool {
    let n = history.len();
    n >= 3
        && history[n - 1] as f64 > MIN_SHRINK * history[n - 2] as f64
        && history[n - 2] as f64 > MIN_SHRINK * history[n - 3] as f64
}

/// The throttle after `current`: 20% first, then 10% more a step, at most 99% (QEMU's
/// auto-converge).
pub fn next_throttle(current: f64) -> f64 {
    if current == 0.0 {
        0.2
    } else {
        (current + 0.1).min(0.99)
    }
}

/// How many hot pages the stop-and-copy can take on top of the rest: half of what the
/// downtime target leaves after half a round trip, at `page_rate` pages a second.
pub fn hot_budget(target: Duration, rtt: Duration, page_rate: f64) -> usize {
    ((target.as_secs_f64() - rtt.as_secs_f64() / 2.0).max(0.0) * page_rate / 2.0) as usize
}

/// The pages of `pending` to hold back for the stop-and-copy: those dirtied in each of the
/// last two rounds or more (`streak`), at most `budget`.
pub fn hot_pages(pending: &PageSet, streak: &[u8], budget: usize) -> PageSet {
    let mut held = PageSet::new(streak.len());
    for p in pending.iter() {
        if held.len() >= budget {
            break;
        }
        if streak.get(p as usize).is_some_and(|&s| s >= 2) {
            held.insert(p);
        }
    }
    held
}

/// Counts each page's run of consecutive rounds in `dirty`.
pub fn update_streaks(streak: &mut [u8], dirty: &PageSet) {
    for (p, s) in streak.iter_mut().enumerate() {
        *s = if dirty.contains(p as u64) {
            s.saturating_add(1)
        } else {
            0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(downtime: f64, d_over_r: f64, throttle: f64) -> Measured {
        Measured {
            predicted_downtime: downtime,
            d_over_r,
            throttle,
            rounds: 1,
            sent_factor: 1.0,
        }
    }

    const TARGET: Duration = Duration::from_millis(300);

    #[test]
    fn a_rest_within_the_target_switches_over() {
        assert_eq!(next(&measured(0.2, 2.0, 0.0), TARGET, &[]), Next::Switch);
    }

    #[test]
    fn high_d_over_r_or_a_dirty_set_that_stops_shrinking_diverges() {
        assert_eq!(
            next(&measured(1.0, 0.96, 0.0), TARGET, &[]),
            Next::Diverging { stuck: false }
        );
        let history = [1000, 950, 920];
        assert_eq!(
            next(&measured(1.0, 0.3, 0.0), TARGET, &history),
            Next::Diverging { stuck: true }
        );
        assert_eq!(
            next(&measured(1.0, 0.3, 0.0), TARGET, &[1000, 500, 250]),
            Next::Continue
        );
    }

    #[test]
    fn a_throttled_guest_still_above_half_the_rate_is_too_slow() {
        assert_eq!(next(&measured(1.0, 0.6, 0.2), TARGET, &[]), Next::TooSlow);
        assert_eq!(next(&measured(1.0, 0.4, 0.2), TARGET, &[]), Next::Continue);
    }

    #[test]
    fn xens_limits_end_the_rounds() {
        let mut m = measured(1.0, 0.3, 0.0);
        m.rounds = MAX_ROUNDS;
        assert_eq!(next(&m, TARGET, &[]), Next::Limit);
        m.rounds = 1;
        m.sent_factor = MAX_SENT_FACTOR;
        assert_eq!(next(&m, TARGET, &[]), Next::Limit);
    }

    #[test]
    fn the_throttle_steps_as_auto_converge() {
        assert_eq!(next_throttle(0.0), 0.2);
        assert!((next_throttle(0.2) - 0.3).abs() < 1e-9);
        assert_eq!(next_throttle(0.95), 0.99);
    }

    #[test]
    fn only_pages_dirty_two_rounds_running_are_held_within_the_budget() {
        let mut streak = vec![0u8; 8];
        let mut dirty = PageSet::new(8);
        for p in [1, 2, 3] {
            dirty.insert(p);
        }
        update_streaks(&mut streak, &dirty);
        dirty.remove(3);
        update_streaks(&mut streak, &dirty);
        assert_eq!(streak[..4], [0, 2, 2, 0]);
        let held = hot_pages(&dirty, &streak, 1);
        assert_eq!(held.to_vec(), vec![1]);
        assert_eq!(hot_pages(&dirty, &streak, 10).to_vec(), vec![1, 2]);
        // 300 ms target, 20 ms RTT, 1000 pages/s: (0.3 - 0.01) * 1000 / 2.
        assert_eq!(hot_budget(TARGET, Duration::from_millis(20), 1000.0), 145);
    }
}
