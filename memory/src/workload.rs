//! What a guest does while it is migrated: how it fills its memory, how fast it dirties pages
//! and where (a hot set rewritten often, the rest swept slowly), and the pacing that holds it
//! to that rate.

use crate::page::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The guest's behaviour; both backends follow it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    /// Guest RAM in bytes (a multiple of 2 MiB).
    pub memory_bytes: u64,
    /// Page writes per second while running.
    pub dirty_rate: u64,
    /// Bytes of the hot set (the writable working set); 0 for none.
    pub hot_set_bytes: u64,
    /// Fraction of writes that go to the hot set (when there is one).
    pub hot_fraction: f64,
    /// Fraction of pages left zero by the fill.
    pub zero_fraction: f64,
    /// Fraction of pages filled with random bytes (incompressible).
    pub random_fraction: f64,
    /// Fraction of pages that are copies of one of 16 templates (same content, other places).
    pub duplicate_fraction: f64,
    /// Seeds the fill and the choice of pages.
    pub seed: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            memory_bytes: 64 << 20,
            dirty_rate: 1000,
            hot_set_bytes: 0,
            hot_fraction: 0.9,
            zero_fraction: 0.2,
            random_fraction: 0.4,
            duplicate_fraction: 0.1,
            seed: 0x5eed,
        }
    }
}

/// Guest-physical address where the working memory starts; below it live the page tables,
/// the parameter and status pages and the guest's code (see `kvm::boot`).
pub const WORK_BASE: u64 = 1 << 20;
/// Guest-physical address of the status page: the running write counter and checksum.
pub const STATUS_ADDR: u64 = 0x9000;

/// Where the hot set and the cold sweep lie, in pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// First page of the hot set.
    pub hot_base: u64,
    /// Pages in the hot set (at least 1 so that the guest never divides by zero).
    pub hot_pages: u64,
    /// First page of the cold region.
    pub cold_base: u64,
    /// Pages in the cold region.
    pub cold_pages: u64,
    /// Writes per 1000 that go to the hot set.
    pub hot_per_mille: u64,
}

/// A workload that cannot run.
#[derive(Debug, thiserror::Error)]
#[error("invalid guest workload: {0}")]
pub struct WorkloadError(pub String);

impl Workload {
    /// Pages of guest RAM.
    pub fn pages(&self) -> usize {
        (self.memory_bytes / PAGE_SIZE as u64) as usize
    }

    /// Checks the workload and works out where its regions lie.
    pub fn layout(&self) -> Result<Layout, WorkloadError> {
        if self.memory_bytes < 4 << 20 || self.memory_bytes % (2 << 20) != 0 {
            return Err(WorkloadError(format!(
                "memory must be a multiple of 2 MiB and at least 4 MiB, not {} bytes",
                self.memory_bytes
            )));
        }
        if self.memory_bytes > 4 << 30 {
            return Err(WorkloadError(
                "memory above 4 GiB is not supported by the built-in guest".into(),
            ));
        }
        let fractions = [
            self.hot_fraction,
            self.zero_fraction,
            self.random_fraction,
            self.duplicate_fraction,
        ];
        if fractions.iter().any(|f| !(0.0..=1.0).contains(f))
            || self.zero_fraction + self.random_fraction + self.duplicate_fraction > 1.0
        {
            return Err(WorkloadError(
                "fractions must lie in 0..=1 and the fill's add up to at most 1".into(),
            ));
        }
        let base = WORK_BASE / PAGE_SIZE as u64;
        let work = self.pages() as u64 - base;
        let hot = (self.hot_set_bytes / PAGE_SIZE as u64).min(work / 2);
        let hot_per_mille = if hot == 0 {
            0
        } else {
            per_mille(self.hot_fraction)
        };
        Ok(Layout {
            hot_base: base,
            hot_pages: hot.max(1),
            cold_base: base + hot,
            cold_pages: work - hot,
            hot_per_mille,
        })
    }
}

/// Holds a writer to `rate` writes per second, slowed further by a throttle (QEMU's
/// auto-converge: the fraction of time the vCPU is kept from running).
pub struct Pacer {
    rate: u64,
    next: Instant,
}

impl Pacer {
    /// A pacer starting now.
    pub fn new(rate: u64) -> Self {
        Pacer {
            rate,
            next: Instant::now(),
        }
    }

    /// Writes to do per batch: about a millisecond's worth, so that pacing and pausing stay
    /// fine-grained without an exit per write.
    pub fn batch(&self) -> u64 {
        (self.rate / 1000).clamp(1, 4096)
    }

    /// Accounts `writes` done; returns how long to wait before the next batch.
    pub fn after(&mut self, writes: u64, throttle: f64) -> Duration {
        let now = Instant::now();
        let rate = self.rate as f64 * (1.0 - throttle.clamp(0.0, 0.99));
        if rate <= 0.0 {
            return Duration::from_millis(100);
        }
        // A writer that fell far behind (it was paused) starts afresh rather than bursting.
        if self.next + Duration::from_millis(50) < now {
            self.next = now;
        }
        self.next += Duration::from_secs_f64(writes as f64 / rate);
        self.next.saturating_duration_since(now)
    }

    /// Restarts the schedule (after a pause).
    pub fn restart(&mut self) {
        self.next = Instant::now();
    }
}

/// A fraction in thousandths, as the built-in guest takes its parameters.
pub fn per_mille(f: f64) -> u64 {
    (f * 1000.0).round() as u64
}

/// splitmix64: the page-choice hash both backends use.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 27)
}

/// One step of xorshift64.
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

impl Workload {
    /// The fill content of the page at guest-physical `addr` (as the built-in KVM guest writes
    /// it); `false` when the page stays zero.
    pub fn fill_page(&self, addr: u64, page: &mut [u8]) -> bool {
        let h = mix(addr ^ self.seed);
        let sel = h % 1000;
        let zero = per_mille(self.zero_fraction);
        let random = zero + per_mille(self.random_fraction);
        let dup = random + per_mille(self.duplicate_fraction);
        let words = page.chunks_exact_mut(8);
        if sel < zero {
            return false;
        }
        if sel < dup {
            let mut x = if sel < random {
                h | 1
            } else {
                ((h >> 20) % 16 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            };
            for w in words {
                x = xorshift(x);
                w.copy_from_slice(&x.to_le_bytes());
            }
        } else {
            for (i, w) in words.enumerate() {
                let v = if i == 0 {
                    addr
                } else {
                    (i as u64 & 7)
                        .wrapping_mul(0x0101_0101_0101_0101)
                        .wrapping_add(0x6568_7420_6567_6170)
                };
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_hot_set_first_and_rejects_bad_sizes() {
        let w = Workload {
            memory_bytes: 64 << 20,
            hot_set_bytes: 4 << 20,
            ..Workload::default()
        };
        let l = w.layout().unwrap();
        assert_eq!(l.hot_base, 256);
        assert_eq!(l.hot_pages, 1024);
        assert_eq!(l.cold_base, 1280);
        assert_eq!(l.cold_pages, 16384 - 1280);
        assert_eq!(l.hot_per_mille, 900);
        let bad = Workload {
            memory_bytes: 3 << 20,
            ..Workload::default()
        };
        assert!(bad.layout().is_err());
        let bad = Workload {
            random_fraction: 0.9,
            zero_fraction: 0.5,
            ..Workload::default()
        };
        assert!(bad.layout().is_err());
    }
}
