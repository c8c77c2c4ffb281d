//! Sizing a stream's in-flight window from what the link shows.
//!
//! To keep a link of bandwidth B and round-trip time RTT full, B x RTT bytes must be in flight.
//! Neither is known up front, so the window starts at a few MiB and doubles while the round trip
//! stays near its minimum (the link is not yet queueing), like TCP slow start with a delay signal.

use std::time::Duration;

/// Smallest window.
pub const MIN_WINDOW: u64 = 4 << 20;
/// Largest window, per stream.
pub const MAX_WINDOW: u64 = 64 << 20;

/// A stream's window state.
#[derive(Debug, Clone)]
pub struct Window {
    bytes: u64,
    min_rtt: Option<Duration>,
    recent_rtt: Option<Duration>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            bytes: MIN_WINDOW,
            min_rtt: None,
            recent_rtt: None,
        }
    }
}

impl Window {
    /// Bytes that may be in flight now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Free room worth refilling: requests go out a quarter window at a time, so one write
    /// (and one wake-up of the source) carries many of them instead of one per reply.
    pub fn refill_batch(&self) -> u64 {
        self.bytes / 4
    }

    /// Records the round trip of one request.
    pub fn sample(&mut self, rtt: Duration) {
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.recent_rtt = Some(match self.recent_rtt {
            None => rtt,
            // Smoothed like TCP's SRTT (gain 1/8).
            Some(s) => (s * 7 + rtt) / 8,
        });
    }

    /// Called once per window's worth of replies: grow while the link is not queueing.
    pub fn adapt(&mut self) {
        let (Some(min), Some(recent)) = (self.min_rtt, self.recent_rtt) else {
            return;
        };
        // Queueing delay under half the base RTT (plus 2 ms of jitter) means room to grow.
        if recent <= min + min / 2 + Duration::from_millis(2) {
            self.bytes = (self.bytes * 2).min(MAX_WINDOW);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_while_rtt_is_flat_and_stops_when_it_queues() {
        let mut w = Window::default();
        for _ in 0..3 {
            w.sample(Duration::from_millis(50));
            w.adapt();
        }
        assert_eq!(w.bytes(), MIN_WINDOW * 8);
        for _ in 0..40 {
            w.sample(Duration::from_millis(200));
        }
        let before = w.bytes();
        w.adapt();
        assert_eq!(w.bytes(), before);
        for _ in 0..10 {
            w.adapt();
        }
        assert!(w.bytes() <= MAX_WINDOW);
    }
}
