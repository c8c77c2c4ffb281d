//! The replica's activity log (DRBD's idea): extents of chunks that local writes may be
//! changing. Before a local write changes a chunk whose record vouches for its bytes (data of
//! a hash, or zeros), the chunk's extent is logged, durably; the record stays. After a crash,
//! opening re-checks every vouching record inside a logged extent: one whose bytes no longer
//! match was overwritten by a write, and becomes `Written`. A flush retires extents once every
//! write in them is marked durably. So a sequential writer pays one synced write per extent
//! instead of one per request (which cost an upload through the export 40% of its rate).
//!
//! Stored in the store's default column family as `al` ‖ disk id ‖ extent (big-endian): older
//! builds ignore those keys.

use crate::db::Db;
use crate::error::Result;

/// Chunks per extent (16 MiB at the default 64 KiB chunk size).
pub const EXTENT_CHUNKS: u64 = 256;

const PREFIX: &[u8] = b"al";

fn key(id: u32, extent: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(PREFIX.len() + 12);
    k.extend_from_slice(PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&extent.to_be_bytes());
    k
}

/// The extent holding chunk `index`.
pub fn extent_of(index: u64) -> u64 {
    index / EXTENT_CHUNKS
}

/// Logs `extents` of disk `id`, durably.
pub fn activate(db: &Db, id: u32, extents: &[u64]) -> Result<()> {
    let mut batch = rocksdb::WriteBatch::default();
    for &e in extents {
        batch.put(key(id, e), []);
    }
    db.write_sync(batch)
}

/// Removes `extents` of disk `id` from the log, durably.
pub fn retire(db: &Db, id: u32, extents: &[u64]) -> Result<()> {
    let mut batch = rocksdb::WriteBatch::default();
    retire_in(&mut batch, id, extents);
    db.write_sync(batch)
}

/// Adds the removal of `extents` of disk `id` to `batch`.
pub fn retire_in(batch: &mut rocksdb::WriteBatch, id: u32, extents: &[u64]) {
    for &e in extents {
        batch.delete(key(id, e));
    }
}

/// The extents of disk `id` in the log.
pub fn load(db: &Db, id: u32) -> Result<Vec<u64>> {
    let mut start = PREFIX.to_vec();
    start.extend_from_slice(&id.to_be_bytes());
    let mut out = Vec::new();
    let iter = db.db.iterator(rocksdb::IteratorMode::From(
        &start,
        rocksdb::Direction::Forward,
    ));
    for item in iter {
        let (k, _) = item.map_err(|e| db.err(e))?;
        if !k.starts_with(&start) {
            break;
        }
        // Invariant: keys under this prefix are written by `key`, 8 bytes after it.
        if let Ok(b) = <[u8; 8]>::try_from(&k[start.len()..]) {
            out.push(u64::from_be_bytes(b));
        }
    }
    Ok(out)
}
