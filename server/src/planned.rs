//! The hashes a sync round's plan computed, kept so that the round's own requests skip
//! hashing again.
//!
//! A plan reads and hashes every chunk the round ships, and the destination then asks for
//! nearly all of them. Each kept hash comes with the chunk's write version
//! ([`crate::tracked::Tracker::settled_version`]) from before and after the plan's read; when
//! the chunk is read again to be sent and the version has not moved, the bytes are the ones
//! hashed and the hash is reused. Any write in between changes the version and the chunk is
//! hashed afresh. Only the bytes are kept out of memory: keeping them too cost more (faulting in
//! fresh memory for a round's 82 MB took longer here than hashing it) and would compete with
//! the VM beside the source.

use protocol::ChunkEntry;
use std::collections::HashMap;
use std::sync::Mutex;

/// Most chunks kept for one round (a 64 GiB round of 64 KiB chunks): ~40 MB of map. Later
/// chunks of a larger round are hashed again when sent.
pub const KEEP_LIMIT: usize = 1 << 20;

/// The hashes one round's plan computed: one round per disk at a time (a newer plan of any
/// replica replaces it; the older round's requests then hash what they send, as without it).
pub struct PlannedChunks {
    round: Mutex<Option<Round>>,
    limit: usize,
}

struct Round {
    generation: u64,
    chunks: HashMap<u64, Planned>,
}

/// A chunk's entry as the plan hashed it, and its write version while it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The entry (hash, or zero) of the bytes read.
    pub entry: ChunkEntry,
    /// The chunk's settled write version before and after the read.
    pub version: u64,
}

impl Default for PlannedChunks {
    fn default() -> Self {
        PlannedChunks::with_limit(KEEP_LIMIT)
    }
}

impl PlannedChunks {
    /// Keeping at most `limit` chunks per round.
    pub fn with_limit(limit: usize) -> Self {
        PlannedChunks {
            round: Mutex::new(None),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Round>> {
        // Poisoned only if a holder panicked; the map is replaced or taken from whole.
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `planned` (chunk index and what the plan saw) for the round cut at `generation`,
    /// in place of any earlier round.
    pub fn keep(&self, generation: u64, planned: impl IntoIterator<Item = (u64, Planned)>) {
        let chunks = planned.into_iter().take(self.limit).collect();
        *self.lock() = Some(Round { generation, chunks });
    }

    /// What the plan of round `generation` saw of chunk `index`, once.
    pub fn take(&self, generation: u64, index: u64) -> Option<Planned> {
        match self.lock().as_mut() {
            Some(r) if r.generation == generation => r.chunks.remove(&index),
            _ => None,
        }
    }

    /// Drops what round `generation` kept (it is done, or was abandoned).
    pub fn forget(&self, generation: u64) {
        let mut round = self.lock();
        if round.as_ref().is_some_and(|r| r.generation == generation) {
            *round = None;
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.lock().as_ref().map_or(0, |r| r.chunks.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::ChunkHash;

    fn planned(i: u64) -> (u64, Planned) {
        let entry = ChunkEntry::Data(ChunkHash::of(&[i as u8; 16]));
        (i, Planned { entry, version: i })
    }

    #[test]
    fn only_the_planned_round_gets_its_chunks_and_only_once() {
        let p = PlannedChunks::default();
        p.keep(7, [planned(1), planned(2)]);
        assert!(
            p.take(6, 1).is_none(),
            "another round must hash what it sends"
        );
        assert_eq!(p.take(7, 1), Some(planned(1).1));
        assert!(p.take(7, 1).is_none(), "a chunk is given once");
        p.keep(8, [planned(3)]);
        assert!(
            p.take(7, 2).is_none(),
            "a newer plan replaces the older round"
        );
        p.forget(7);
        assert_eq!(p.kept(), 1, "forgetting an older round keeps the newer");
        p.forget(8);
        assert_eq!(p.kept(), 0);
    }

    #[test]
    fn keeps_at_most_the_limit() {
        let p = PlannedChunks::with_limit(2);
        p.keep(1, (0..5).map(planned));
        assert_eq!(p.kept(), 2);
        assert!(p.take(1, 1).is_some());
        assert!(
            p.take(1, 2).is_none(),
            "beyond the limit: hashed again when sent"
        );
    }
}
