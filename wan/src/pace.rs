//! A token bucket that paces byte streams to a rate, shared by every task of one transfer.

use crate::Rate;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Paces callers to a byte rate. Takers go into debt and sleep it off, so concurrent takers are
/// served in turn and the long-run rate is exact.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket for `rate`, allowing bursts of 50 ms worth of bytes (at least 64 KiB).
    pub fn new(rate: Rate) -> Self {
        let rate = rate.bytes_per_sec().max(1) as f64;
        let burst = (rate * 0.05).max(65536.0);
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// How long to wait before `bytes` may be used; the bytes are taken at once.
    pub fn reserve(&self, bytes: u64) -> Duration {
        // A poisoned lock only means another taker panicked; the counters are still usable.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *s;
        let refilled =
            (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        let left = refilled - bytes as f64;
        *s = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }

    /// How long until `bytes` could be taken without waiting (nothing is taken).
    pub fn wait_for(&self, bytes: u64) -> Duration {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = *s;
        let refilled = (tokens + last.elapsed().as_secs_f64() * self.rate).min(self.burst);
        let short = bytes as f64 - refilled;
        if short <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(short / self.rate)
        }
    }

    /// Corrects an earlier estimate: `delta` more bytes were used than taken (negative: fewer,
    /// and the difference is credited back, up to the burst).
    pub fn settle(&self, delta: i64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = (s.0 - delta as f64).min(self.burst);
    }

    /// Waits until `bytes` may be used.
    pub async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_run_rate_is_the_configured_rate() {
        let bucket = TokenBucket::new(Rate(10_000_000));
        let start = Instant::now();
        // 3 MB at 10 MB/s, less the initial 0.5 MB burst: about 0.25 s.
        for _ in 0..30 {
            bucket.take(100_000).await;
        }
        let secs = start.elapsed().as_secs_f64();
        assert!((0.2..0.5).contains(&secs), "took {secs}s");
    }
}
