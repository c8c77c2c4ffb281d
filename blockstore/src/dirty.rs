//! The source's persistent dirty tracking: write generations per chunk, an activity log, and
//! each destination replica's synced generation. Lives in the source's `--state` RocksDB.
//!
//! Every write is stamped with the current generation. A sync round *cuts* a generation: chunks
//! stamped at or before the cut and after the replica's synced generation are shipped; writes
//! during the round carry the next generation and wait for the next round.
//!
//! Durability follows DRBD's activity log instead of a sync per write: before a write touches
//! an extent (16 MiB) not yet in the log, the extent is logged with a synced write; exact chunk
//! stamps are persisted at FLUSH. After a crash every chunk of a logged extent counts as
//! written, a superset of what really changed, so no acknowledged write is ever missed.

use crate::db::Db;
use crate::error::Result;

/// Chunks per activity-log extent.
pub const EXTENT_CHUNKS: u64 = 256;

pub(crate) const STAMPS: &str = "dirty_stamps";
pub(crate) const ACTIVITY: &str = "dirty_activity";
pub(crate) const REPLICAS: &str = "dirty_replicas";
pub(crate) const GENS: &str = "dirty_generations";

fn key(disk: &str, tail: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(disk.len() + 1 + tail.len());
    k.extend_from_slice(disk.as_bytes());
    k.push(0);
    k.extend_from_slice(tail);
    k
}

fn be(v: &[u8]) -> Option<u64> {
    v.try_into().ok().map(u64::from_be_bytes)
}

/// Persistent dirty state of one disk.
pub struct DirtyLog<'a> {
    pub(crate) db: &'a Db,
    pub(crate) disk: String,
}

/// What is loaded at start: per-chunk stamps, with logged extents folded in, and the
/// generation to continue from.
pub struct Loaded {
    /// Last write generation per chunk (0: not written since tracking began).
    pub stamps: Vec<u64>,
    /// The generation new writes get.
    pub generation: u64,
}

impl DirtyLog<'_> {
    fn prefix(&self) -> Vec<u8> {
        key(&self.disk, &[])
    }

    fn scan(&self, cf: &str, mut f: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<()> {
        let prefix = self.prefix();
        let iter = self.db.db.iterator_cf(
            self.db.cf(cf),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| self.db.err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            f(&k[prefix.len()..], &v)?;
        }
        Ok(())
    }

    /// Loads stamps for `chunks` chunks. Extents left in the activity log by a crash are
    /// stamped with a fresh generation (their writes may not have been recorded), then the
    /// log is cleared; the next generation starts above everything seen.
    pub fn load(&self, chunks: u64) -> Result<Loaded> {
        let mut stamps = vec![0u64; chunks as usize];
        let mut max = 0u64;
        self.scan(STAMPS, |k, v| {
            if let (Some(i), Some(g)) = (be(k), be(v)) {
                if let Some(s) = stamps.get_mut(i as usize) {
                    *s = g;
                    max = max.max(g);
                }
            }
            Ok(())
        })?;
        let stored_gen = self
            .db
            .db
            .get_cf(self.db.cf(GENS), self.prefix())
            .map_err(|e| self.db.err(e))?
            .and_then(|v| be(&v))
            .unwrap_or(1);
        let crash_gen = stored_gen.max(max) + 1;
        let mut hot = Vec::new();
        self.scan(ACTIVITY, |k, _| {
            if let Some(e) = be(k) {
                hot.push(e);
            }
            Ok(())
        })?;
        let mut batch = rocksdb::WriteBatch::default();
        for e in &hot {
            for c in e * EXTENT_CHUNKS..((e + 1) * EXTENT_CHUNKS).min(chunks) {
                stamps[c as usize] = crash_gen;
                batch.put_cf(
                    self.db.cf(STAMPS),
                    key(&self.disk, &c.to_be_bytes()),
                    crash_gen.to_be_bytes(),
                );
            }
            batch.delete_cf(self.db.cf(ACTIVITY), key(&self.disk, &e.to_be_bytes()));
        }
        if !hot.is_empty() {
            tracing::warn!(disk = %self.disk, extents = hot.len(), "activity log not empty: the source stopped uncleanly; treating those extents as written");
        }
        let generation = crash_gen + 1;
        batch.put_cf(self.db.cf(GENS), self.prefix(), generation.to_be_bytes());
        self.db.write_sync(batch)?;
        Ok(Loaded { stamps, generation })
    }

    /// Logs extents as active before writes touch them (synced).
    pub fn activate(&self, extents: &[u64]) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        for e in extents {
            batch.put_cf(self.db.cf(ACTIVITY), key(&self.disk, &e.to_be_bytes()), []);
        }
        self.db.write_sync(batch)
    }

    /// Persists exact stamps and retires the given extents from the activity log (synced).
    pub fn persist(&self, stamps: &[(u64, u64)], retire: &[u64]) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        for (c, g) in stamps {
            batch.put_cf(
                self.db.cf(STAMPS),
                key(&self.disk, &c.to_be_bytes()),
                g.to_be_bytes(),
            );
        }
        for e in retire {
            batch.delete_cf(self.db.cf(ACTIVITY), key(&self.disk, &e.to_be_bytes()));
        }
        self.db.write_sync(batch)
    }

    /// Records the generation new writes get from now on (synced).
    pub fn set_generation(&self, generation: u64) -> Result<()> {
        self.db
            .put_cf_sync(GENS, &self.prefix(), &generation.to_be_bytes())
    }

    /// The generation replica `replica` has synced up to, if it is registered.
    pub fn synced(&self, replica: &[u8; 16]) -> Result<Option<u64>> {
        Ok(self
            .db
            .db
            .get_cf(self.db.cf(REPLICAS), key(&self.disk, replica))
            .map_err(|e| self.db.err(e))?
            .and_then(|v| be(&v)))
    }

    /// Records that `replica` holds everything up to `generation` (synced).
    pub fn set_synced(&self, replica: &[u8; 16], generation: u64) -> Result<()> {
        self.db.put_cf_sync(
            REPLICAS,
            &key(&self.disk, replica),
            &generation.to_be_bytes(),
        )
    }
}
