//! The destination store (`--store DIR`).
//!
//! Layout, version 1:
//! - `DIR/meta/`: RocksDB. `disks`: name -> [`DiskRecord`]. `chunks`: disk id, chunk index ->
//!   [`ChunkState`]. `content`: hash, disk id, chunk index -> (): where each content lives, so a
//!   chunk held by any disk is copied locally instead of crossing the WAN.
//! - `DIR/data/<id>.raw`: each disk's bytes, a sparse file of the disk's size.
//! - `DIR/id`: the store's id (16 bytes), copied from `meta/` so that a sync round can name
//!   the replica to its source before RocksDB is open. A hint only: `meta/`'s copy wins.
//!
//! A chunk is recorded in `chunks` and `content` only after its bytes are durable, and a
//! record is withdrawn before its bytes change ([`crate::writer`]), so every record can be
//! trusted after a crash. Data files are opened through a [`FileLayer`] (plain files, or a
//! crash model in tests).

use crate::datafile::{fsync_dir, FileLayer, OsFiles};
use crate::db::Db;
use crate::error::{io_err, Result, StoreError};
use crate::replica::Replica;
use protocol::{ChunkHash, Geometry};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const LAYOUT_VERSION: u32 = 1;
pub(crate) const DISKS: &str = "disks";
pub(crate) const CHUNKS: &str = "chunks";
pub(crate) const CONTENT: &str = "content";
const NEXT_ID: &[u8] = b"next_disk_id";
const STORE_ID: &[u8] = b"store_id";
const ID_HINT: &str = "id";

/// A disk held in the store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Internal id (names the data file and prefixes chunk keys).
    pub id: u32,
    /// The disk's name, as the source serves it.
    pub name: String,
    /// Size and chunk size.
    pub geometry: Geometry,
    /// Digest of the source manifest last seeded completely, if any.
    pub seeded_digest: Option<ChunkHash>,
}

pub(crate) struct Inner {
    pub(crate) db: Db,
    id: [u8; 16],
    pub(crate) dir: PathBuf,
    id_lock: Mutex<()>,
    files: Arc<dyn FileLayer>,
}

/// An open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn chunk_key(id: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&id.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

pub(crate) fn content_key(hash: &ChunkHash, id: u32, index: u64) -> [u8; 44] {
    let mut k = [0u8; 44];
    k[..32].copy_from_slice(&hash.0);
    k[32..].copy_from_slice(&chunk_key(id, index));
    k
}

impl Store {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with(dir, Arc::new(OsFiles))
    }

    /// Opens (creating) the store in `dir`, its data files through `files`.
    pub fn open_with(dir: &Path, files: Arc<dyn FileLayer>) -> Result<Store> {
        let data = dir.join("data");
        if !data.is_dir() {
            std::fs::create_dir_all(&data).map_err(io_err("cannot create store directory", dir))?;
            // The new directories' names must be durable before anything in them is.
            for d in [dir, data.as_path()] {
                if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fsync_dir(parent).map_err(io_err("cannot sync directory", parent))?;
                }
            }
        }
        let db = Db::open_with_prefixes(
            &dir.join("meta"),
            &[DISKS, CHUNKS, CONTENT],
            &[(CONTENT, 32)],
            LAYOUT_VERSION,
        )?;
        // A random id names this store to sources, which track what each replica lacks.
        let id = match db.db.get(STORE_ID).map_err(|e| db.err(e))? {
            Some(v) => v
                .as_slice()
                .try_into()
                .map_err(|_| db.corrupt("store id is not 16 bytes"))?,
            None => {
                let id: [u8; 16] = rand::random();
                db.put_sync(STORE_ID, &id)?;
                id
            }
        };
        let hint = dir.join(ID_HINT);
        if Store::peek_id(dir) != Some(id) {
            // Written whole or not at all (rename); a store without it only loses the head start.
            let tmp = dir.join(format!("{ID_HINT}.tmp"));
            let written = std::fs::write(&tmp, id)
                .and_then(|()| std::fs::rename(&tmp, &hint))
                .and_then(|()| fsync_dir(dir));
            if let Err(e) = written {
                tracing::debug!(path = %hint.display(), error = %e, "cannot write the store id hint");
            }
        }
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                id,
                dir: dir.to_path_buf(),
                id_lock: Mutex::new(()),
                files,
            }),
        })
    }

    /// The id of the store in `dir` as its hint file says, without opening it: `None` for a
    /// store without one (or none at all). [`Store::open`] tells the real id.
    pub fn peek_id(dir: &Path) -> Option<[u8; 16]> {
        std::fs::read(dir.join(ID_HINT)).ok()?.try_into().ok()
    }

    /// Writes RocksDB's memtables out, so the next open does not replay a long log (called
    /// after a seed, which records a record per chunk of the disk).
    pub fn flush_metadata(&self) -> Result<()> {
        let db = self.db();
        for cf in [DISKS, CHUNKS, CONTENT] {
            db.db.flush_cf(db.cf(cf)).map_err(|e| db.err(e))?;
        }
        Ok(())
    }

    /// The store's id, as sources know this replica.
    pub fn id(&self) -> [u8; 16] {
        self.inner.id
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// How data files are opened.
    pub(crate) fn files(&self) -> &dyn FileLayer {
        self.inner.files.as_ref()
    }

    /// Path of disk `id`'s data file.
    pub fn data_path(&self, id: u32) -> PathBuf {
        self.inner.dir.join("data").join(format!("{id:08}.raw"))
    }

    /// The record of disk `name`, if held.
    pub fn disk(&self, name: &str) -> Result<Option<DiskRecord>> {
        let db = self.db();
        match db.db.get_cf(db.cf(DISKS), name).map_err(|e| db.err(e))? {
            None => Ok(None),
            Some(raw) => bincode::deserialize(&raw)
                .map(Some)
                .map_err(|e| db.corrupt(format!("disk record {name:?}: {e}"))),
        }
    }

    /// Every disk held.
    pub fn disks(&self) -> Result<Vec<DiskRecord>> {
        let db = self.db();
        let mut out = Vec::new();
        for item in db
            .db
            .iterator_cf(db.cf(DISKS), rocksdb::IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| db.err(e))?;
            let rec = bincode::deserialize(&v).map_err(|e| {
                db.corrupt(format!(
                    "disk record {:?}: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    pub(crate) fn put_disk(&self, rec: &DiskRecord) -> Result<()> {
        let db = self.db();
        let mut b = rocksdb::WriteBatch::default();
        // Invariant: DiskRecord holds only plain data, which bincode always serialises.
        b.put_cf(
            db.cf(DISKS),
            &rec.name,
            bincode::serialize(rec).expect("record serialises"),
        );
        db.write_sync(b)
    }

    /// Opens disk `name`, creating it with `geometry` if the store does not hold it yet.
    pub fn open_or_create(&self, name: &str, geometry: Geometry) -> Result<Replica> {
        let _guard = self.inner.id_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (rec, created) = match self.disk(name)? {
            Some(rec) => {
                if rec.geometry != geometry {
                    return Err(StoreError::Geometry {
                        name: name.to_string(),
                        detail: format!(
                            "the store holds it as {} bytes in {} byte chunks, the source now serves {} bytes in {} byte chunks; \
                             seed it under another name or into another store",
                            rec.geometry.size, rec.geometry.chunk_size, geometry.size, geometry.chunk_size
                        ),
                    });
                }
                (rec, false)
            }
            None => {
                let db = self.db();
                let id = match db.db.get(NEXT_ID).map_err(|e| db.err(e))? {
                    None => 1,
                    Some(v) => v
                        .as_slice()
                        .try_into()
                        .map(u32::from_be_bytes)
                        .map_err(|_| db.corrupt("next disk id is not 4 bytes"))?,
                };
                db.put_sync(NEXT_ID, &(id + 1).to_be_bytes())?;
                let rec = DiskRecord {
                    id,
                    name: name.to_string(),
                    geometry,
                    seeded_digest: None,
                };
                self.put_disk(&rec)?;
                (rec, true)
            }
        };
        Replica::open(self.clone(), rec, created)
    }

    /// Opens disk `name`, which must exist.
    pub fn replica(&self, name: &str) -> Result<Replica> {
        let rec = self.disk(name)?.ok_or_else(|| StoreError::UnknownDisk {
            name: name.to_string(),
            path: self.inner.dir.clone(),
        })?;
        Replica::open(self.clone(), rec, false)
    }

    /// Where content `hash` is held durably, if anywhere.
    pub fn find_content(&self, hash: &ChunkHash) -> Result<Option<(u32, u64)>> {
        self.content_lookup().find(hash)
    }

    /// A cursor for many [`Store::find_content`] lookups in a row: one RocksDB iterator, sought
    /// again for each hash, instead of one created per lookup (a sync round's 1250 lookups took
    /// 10 ms that way). It sees the index as it was when made.
    pub fn content_lookup(&self) -> ContentLookup<'_> {
        let db = self.db();
        ContentLookup {
            db,
            iter: db
                .db
                .raw_iterator_cf_opt(db.cf(CONTENT), Db::prefix_reads()),
        }
    }
}

/// See [`Store::content_lookup`].
pub struct ContentLookup<'a> {
    db: &'a Db,
    iter: rocksdb::DBRawIteratorWithThreadMode<'a, rocksdb::DB>,
}

impl ContentLookup<'_> {
    /// Where content `hash` is held, if anywhere: (disk id, chunk index).
    pub fn find(&mut self, hash: &ChunkHash) -> Result<Option<(u32, u64)>> {
        self.iter.seek(hash.0);
        let Some(k) = self.iter.key() else {
            return self
                .iter
                .status()
                .map(|()| None)
                .map_err(|e| self.db.err(e));
        };
        if k.len() != 44 || k[..32] != hash.0 {
            return Ok(None);
        }
        // Invariant: the slices are exactly 4 and 8 bytes (length checked above).
        let id = u32::from_be_bytes(k[32..36].try_into().expect("4 bytes"));
        let index = u64::from_be_bytes(k[36..44].try_into().expect("8 bytes"));
        Ok(Some((id, index)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_hint_follows_the_store_and_is_rewritten_when_lost_or_wrong() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Store::peek_id(dir.path()), None, "no store yet");
        let id = Store::open(dir.path()).unwrap().id();
        assert_eq!(Store::peek_id(dir.path()), Some(id));
        std::fs::write(dir.path().join(ID_HINT), [9u8; 16]).unwrap();
        assert_eq!(
            Store::open(dir.path()).unwrap().id(),
            id,
            "RocksDB's id wins"
        );
        assert_eq!(
            Store::peek_id(dir.path()),
            Some(id),
            "and the hint is corrected"
        );
        std::fs::remove_file(dir.path().join(ID_HINT)).unwrap();
        assert_eq!(Store::open(dir.path()).unwrap().id(), id);
        assert_eq!(
            Store::peek_id(dir.path()),
            Some(id),
            "a lost hint is written again"
        );
    }
}
