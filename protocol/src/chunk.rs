//! Chunks: fixed-size pieces of a disk, named by the blake3 hash of their bytes.
//!
//! An all-zero chunk is a [`ChunkEntry::Zero`]: it is never stored or sent, whatever its size.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Smallest chunk size a disk may use.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size a disk may use.
pub const MAX_CHUNK_SIZE: u32 = 1024 * 1024;
/// Chunk size used when the operator does not choose one.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// The blake3 hash of a chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What one chunk of a manifest holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkEntry {
    /// Every byte is zero.
    Zero,
    /// Data with this hash.
    Data(ChunkHash),
}

impl ChunkEntry {
    /// Bytes of one entry in its compact encoding ([`ChunkEntry::encode`]).
    pub const ENCODED_LEN: usize = 33;

    /// Classifies and hashes a chunk's bytes.
    pub fn of(data: &[u8]) -> Self {
        if is_zero(data) {
            ChunkEntry::Zero
        } else {
            ChunkEntry::Data(ChunkHash::of(data))
        }
    }

    /// Appends the compact 33-byte form (tag, hash) used in manifests on the wire and on disk.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ChunkEntry::Zero => {
                out.push(0);
                out.extend_from_slice(&[0u8; 32]);
            }
            ChunkEntry::Data(h) => {
                out.push(1);
                out.extend_from_slice(&h.0);
            }
        }
    }

    /// Parses the compact form; `None` for a malformed entry.
    pub fn decode(raw: &[u8]) -> Option<Self> {
        if raw.len() != Self::ENCODED_LEN {
            return None;
        }
        match raw[0] {
            0 => Some(ChunkEntry::Zero),
            1 => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&raw[1..]);
                Some(ChunkEntry::Data(ChunkHash(h)))
            }
            _ => None,
        }
    }
}

/// True when every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // OR-ing 64-byte blocks lets the compiler vectorise; this runs on every chunk read.
    let mut blocks = data.chunks_exact(64);
    let whole = blocks.by_ref().all(|block| {
        block.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_ne_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    });
    whole && blocks.remainder().iter().all(|&b| b == 0)
}

/// The most chunks a disk may have: 8 TiB at the default 64 KiB, 128 TiB at 1 MiB. Every
/// chunk costs memory on both sides (a write stamp, a presence bit, a manifest entry), so a
/// geometry sent by a peer must not size those without a bound.
pub const MAX_CHUNKS: u64 = 1 << 27;

/// How a disk is cut into chunks. Built by [`Geometry::new`] only, deserialisation included:
/// a geometry from a peer or from disk is checked before it sizes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "GeometryFields")]
pub struct Geometry {
    /// Size of the disk in bytes.
    pub size: u64,
    /// Size of every chunk but possibly the last, a power of two.
    pub chunk_size: u32,
}

/// A geometry as it arrives, before [`Geometry::new`] checks it.
#[derive(Deserialize)]
struct GeometryFields {
    size: u64,
    // As `Geometry` writes it: the wire format stays.
    chunk_size: u32,
}

impl TryFrom<GeometryFields> for Geometry {
    type Error = BadChunkSize;

    fn try_from(f: GeometryFields) -> Result<Self, BadChunkSize> {
        Geometry::new(f.size, f.chunk_size as u64)
    }
}

/// A geometry outside what heliotrope supports.
#[derive(Debug, thiserror::Error)]
pub enum BadChunkSize {
    /// The chunk size.
    #[error("chunk size {0} is not a power of two between 4 KiB and 1 MiB")]
    ChunkSize(u64),
    /// Too many chunks.
    #[error("a disk of {size} bytes in chunks of {chunk_size} bytes has more than {MAX_CHUNKS} chunks: use larger chunks")]
    TooManyChunks {
        /// The disk's size.
        size: u64,
        /// The chunk size.
        chunk_size: u64,
    },
}

impl Geometry {
    /// Checks the chunk size and the number of chunks, and builds the geometry.
    pub fn new(size: u64, chunk_size: u64) -> Result<Self, BadChunkSize> {
        if !chunk_size.is_power_of_two()
            || chunk_size < MIN_CHUNK_SIZE as u64
            || chunk_size > MAX_CHUNK_SIZE as u64
        {
            return Err(BadChunkSize::ChunkSize(chunk_size));
        }
        if size.div_ceil(chunk_size) > MAX_CHUNKS {
            return Err(BadChunkSize::TooManyChunks { size, chunk_size });
        }
        Ok(Geometry {
            size,
            chunk_size: chunk_size as u32,
        })
    }

    /// Number of chunks, the last one possibly short.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    /// Byte offset of chunk `index`.
    pub fn offset(&self, index: u64) -> u64 {
        index * self.chunk_size as u64
    }

    /// Length of chunk `index` (the last may be shorter than `chunk_size`).
    pub fn len(&self, index: u64) -> usize {
        let start = self.offset(index);
        (self.size.saturating_sub(start)).min(self.chunk_size as u64) as usize
    }

    /// True for a disk of zero bytes.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The chunks that bytes `[offset, offset + len)` touch.
    pub fn chunks_touching(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let cs = self.chunk_size as u64;
        offset / cs..(offset + len).div_ceil(cs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_through_compact_form() {
        let mut buf = Vec::new();
        let data = ChunkEntry::of(b"hello");
        data.encode(&mut buf);
        ChunkEntry::Zero.encode(&mut buf);
        assert_eq!(ChunkEntry::decode(&buf[..33]), Some(data));
        assert_eq!(ChunkEntry::decode(&buf[33..]), Some(ChunkEntry::Zero));
        assert_eq!(ChunkEntry::decode(&buf[..32]), None);
        let mut bad = buf[..33].to_vec();
        bad[0] = 7;
        assert_eq!(ChunkEntry::decode(&bad), None);
    }

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        for len in [0usize, 1, 7, 8, 9, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            if len > 0 {
                v[len - 1] = 1;
                assert!(!is_zero(&v), "len {len}");
            }
        }
    }

    #[test]
    fn geometry_cuts_a_short_last_chunk() {
        let g = Geometry::new(10 * 4096 + 100, 4096).unwrap();
        assert_eq!(g.chunk_count(), 11);
        assert_eq!(g.len(10), 100);
        assert_eq!(g.len(3), 4096);
        assert_eq!(g.chunks_touching(4095, 2), 0..2);
        assert!(Geometry::new(1, 3000).is_err());
        assert!(Geometry::new(1, 2 * 1024 * 1024).is_err());
        assert!(Geometry::new(MAX_CHUNKS * 4096, 4096).is_ok());
        assert!(Geometry::new(MAX_CHUNKS * 4096 + 1, 4096).is_err());
        assert!(Geometry::new(u64::MAX, 1 << 20).is_err());
    }
}
