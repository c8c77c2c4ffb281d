//! The migration engine: the source side drives rounds and decides when to switch over
//! ([`source`]), the destination installs pages, resumes the guest and checks the result
//! ([`dest`]). They speak `protocol`'s `Mem*` messages over the same framed (TLS) connection as
//! disk replication, so the WAN emulator, TLS and zstd are shared with the disks.

pub mod dest;
mod hashes;
mod policy;
pub mod report;
pub mod source;

use crate::guest::Backend;
use crate::workload::Workload;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

pub use hashes::memory_hash;

/// How memory moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Live rounds of dirty pages, then a short stop-and-copy.
    Precopy,
    /// Pause, copy everything, resume at the destination (downtime ≈ m/r).
    Warm,
    /// Resume at the destination at once and pull pages on demand behind a background push.
    Postcopy,
}

/// What to do when pre-copy does not converge (d/r ≥ 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Slow the vCPU (QEMU's auto-converge: 20%, then +10% a round) until it converges.
    Throttle,
    /// Switch to post-copy.
    Postcopy,
    /// Stop and copy now, accepting the long downtime.
    Stop,
    /// Give up; the guest keeps running at the source.
    Abort,
}

macro_rules! names {
    ($t:ty { $($v:ident = $s:literal),* }) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(<$t>::$v => $s),* })
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(<$t>::$v),)*
                    _ => Err(format!("unknown value {s:?}: use one of {}", [$($s),*].join(", "))),
                }
            }
        }
    };
}
names!(Mode { Precopy = "precopy", Warm = "warm", Postcopy = "postcopy" });
names!(Policy { Throttle = "throttle", Postcopy = "postcopy", Stop = "stop", Abort = "abort" });

/// What the source tells the destination about the guest (the `MemStart` message).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationSpec {
    /// The guest's backend.
    pub backend: Backend,
    /// The guest's workload (its shape: memory size, regions).
    pub workload: Workload,
    /// How long the destination lets the resumed guest run before it reports.
    pub run_after_ms: u64,
}

/// Round number of pages sent because the destination faulted on them.
pub const DEMAND_ROUND: u32 = 0;

/// A migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The connection failed.
    #[error(transparent)]
    Conn(#[from] protocol::ConnError),
    /// The guest failed.
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] crate::uffd::UffdError),
    /// The peer broke the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The peer gave up.
    #[error("the peer aborted the migration: {0}")]
    Aborted(String),
}

/// The current Unix time in nanoseconds (downtime spans two processes, so it is measured on
/// the clock they share).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
