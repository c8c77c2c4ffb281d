//! The memory hash both sides compare: blake3 over the per-page blake3 hashes in page order.
//! Per-page hashes let the destination keep it up to date as pages arrive in any order.

use crate::page::PAGE_SIZE;
use crate::region::Memory;
use protocol::ChunkHash;
use rayon::prelude::*;

/// Hashes of every page of `memory` (in parallel; the guest must be paused).
pub fn page_hashes(memory: &Memory) -> Vec<ChunkHash> {
    (0..memory.pages() as u64)
        .into_par_iter()
        .map_init(
            || vec![0u8; PAGE_SIZE],
            |buf, p| {
                // Invariant: p < pages, so the read is in range.
                memory.read_page(p, buf).expect("page in range");
                ChunkHash::of(buf)
            },
        )
        .collect()
}

/// The hash of a zero page (computed once: zero pages are the commonest kind).
pub fn zero_page_hash() -> ChunkHash {
    static ZERO: std::sync::OnceLock<ChunkHash> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| ChunkHash::of(&crate::page::ZERO_PAGE))
}

/// A hash in full, as hex (the destination reports its memory hash this way).
pub fn hex(h: &ChunkHash) -> String {
    h.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// Combines per-page hashes.
pub fn combine(hashes: &[ChunkHash]) -> ChunkHash {
    let mut h = blake3::Hasher::new();
    for p in hashes {
        h.update(&p.0);
    }
    ChunkHash(*h.finalize().as_bytes())
}

/// The hash of a paused guest's memory.
pub fn memory_hash(memory: &Memory) -> ChunkHash {
    combine(&page_hashes(memory))
}
