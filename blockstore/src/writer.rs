//! Landing chunks in a replica so that every record tells the truth after a crash.
//!
//! Two rules keep a record (`Data(hash)` or `Zero`) from vouching for bytes it does not
//! describe, whatever a `kill -9` or a power cut leaves of the page cache:
//! - **Bytes first, record after.** A chunk's bytes are written at once; its record is put
//!   into a batch that is committed only after an `fdatasync` of the data file. A chunk whose
//!   batch did not commit is simply absent after a restart, and fetched again.
//! - **Unvouch before overwriting.** Before bytes are written over a chunk whose vouching
//!   record may be on disk (committed, or in a batch being committed), that record is deleted
//!   ([`ChunkWriter::forget`], one synced batch for many chunks: a seed or sync round calls
//!   it once for the chunks it will replace). Any write path that finds such a chunk not yet
//!   unvouched does it itself, one synced batch per chunk. The NBD export's local writes keep
//!   the record and log the chunk's extent instead ([`ChunkWriter::activate_for_write`], one
//!   synced write per 256 chunks written; see [`crate::activity`]): opening after a crash
//!   re-checks every vouching record in a logged extent, and one whose bytes changed becomes
//!   `Written`, which vouches for no particular content.
//!
//! A failed commit (`fdatasync` or the RocksDB write) is not forgotten: Linux reports a
//! writeback error once, and the next `fdatasync` would succeed over the lost bytes. The
//! writer stops (every later call fails with [`StoreError::Failed`]) until the replica is
//! opened again, which finds only what was durably recorded.

use crate::activity;
use crate::datafile::DataFile;
use crate::direct::DirectWriter;
use crate::error::{io_err, Result, StoreError};
use crate::replica::{copy_range, ChunkState, Replica};
use crate::store::{chunk_key, content_key, CHUNKS, CONTENT};
use protocol::ChunkHash;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Batching thresholds: a commit costs one `fdatasync` and one synced RocksDB write.
const COMMIT_BYTES: u64 = 64 << 20;
const COMMIT_CHUNKS: usize = 2048;
const COMMIT_AGE: Duration = Duration::from_millis(500);
/// Free space kept for RocksDB (WAL, flushes, reopening): a RocksDB that meets ENOSPC may
/// refuse to open again, so the data files must never take the last of the volume.
pub const SPACE_RESERVE: u64 = 32 << 20;
/// Bytes written between free-space checks.
const SPACE_CHECK_EVERY: u64 = 4 << 20;

/// What a writer knows of one chunk.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Slot {
    /// The newest state, the writer's own uncommitted writes included.
    state: Option<ChunkState>,
    /// A record of the chunk may be on disk: read at open, or in a committed or committing
    /// batch. Such a chunk's bytes may only change once the record no longer vouches for them.
    on_disk: bool,
}

/// Chunk states as a writer knows them, its own writes included.
pub(crate) enum Known {
    /// Every chunk's.
    All(Vec<Slot>),
    /// Only those of the chunks the writer was opened for.
    Listed(HashMap<u64, Slot>),
}

impl Known {
    fn slot_of(state: Option<ChunkState>) -> Slot {
        Slot {
            state,
            on_disk: state.is_some(),
        }
    }

    pub(crate) fn all(states: Vec<Option<ChunkState>>) -> Known {
        Known::All(states.into_iter().map(Known::slot_of).collect())
    }

    pub(crate) fn listed(states: HashMap<u64, Option<ChunkState>>) -> Known {
        Known::Listed(
            states
                .into_iter()
                .map(|(i, s)| (i, Known::slot_of(s)))
                .collect(),
        )
    }

    fn get(&self, index: u64) -> Slot {
        match self {
            Known::All(v) => v.get(index as usize).copied().unwrap_or_default(),
            Known::Listed(m) => {
                debug_assert!(m.contains_key(&index), "chunk {index} not listed");
                m.get(&index).copied().unwrap_or_default()
            }
        }
    }

    fn set(&mut self, index: u64, slot: Slot) {
        match self {
            Known::All(v) => {
                if let Some(s) = v.get_mut(index as usize) {
                    *s = slot;
                }
            }
            Known::Listed(m) => {
                m.insert(index, slot);
            }
        }
    }
}

enum Direct {
    Unopened,
    Open(Box<DirectWriter>),
    Unavailable,
}

/// Lands chunks in one replica (see the module's documentation for the rules it keeps).
pub struct ChunkWriter {
    replica: Replica,
    known: Known,
    batch: rocksdb::WriteBatch,
    pending: Vec<u64>,
    pending_bytes: u64,
    oldest: Option<Instant>,
    sources: HashMap<u32, Arc<dyn DataFile>>,
    unchecked: u64,
    /// The batch being made durable in the background.
    syncing: Option<std::thread::JoinHandle<Result<usize>>>,
    /// The chunks that batch records as vouching for their bytes (data or zero).
    syncing_vouches: std::collections::HashSet<u64>,
    /// Extents in the activity log ([`crate::activity`]), logged by this writer.
    active: std::collections::HashSet<u64>,
    /// Streamed writes past the page cache ([`ChunkWriter::put_streaming`]).
    direct: Direct,
    /// Why the writer stopped, after a commit failed.
    failed: Option<String>,
}

impl ChunkWriter {
    pub(crate) fn new(replica: Replica, known: Known) -> ChunkWriter {
        ChunkWriter {
            replica,
            known,
            batch: rocksdb::WriteBatch::default(),
            pending: Vec::new(),
            pending_bytes: 0,
            oldest: None,
            sources: HashMap::new(),
            unchecked: u64::MAX,
            syncing: None,
            syncing_vouches: std::collections::HashSet::new(),
            active: std::collections::HashSet::new(),
            direct: Direct::Unopened,
            failed: None,
        }
    }

    /// Fails once a commit has failed: nothing more may be acknowledged.
    fn check(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(detail) => Err(StoreError::Failed {
                path: self.replica.data_path().clone(),
                detail: detail.clone(),
            }),
        }
    }

    /// Stops the writer for good with `e`'s reason, and returns `e`.
    fn fail(&mut self, e: StoreError) -> StoreError {
        if self.failed.is_none() {
            tracing::error!(path = %self.replica.data_path().display(), error = %e,
                "a commit of the replica failed: it stops acknowledging writes until reopened");
            self.failed = Some(e.to_string());
        }
        e
    }

    /// The reason the writer stopped, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Fails with [`StoreError::Full`] before `len` more bytes would eat into the reserve.
    /// Every writer of the data file calls it (the NBD export for its clients' writes too).
    pub fn reserve(&mut self, len: u64) -> Result<()> {
        self.unchecked = self.unchecked.saturating_add(len);
        if self.unchecked < SPACE_CHECK_EVERY {
            return Ok(());
        }
        self.unchecked = 0;
        let dir = self.replica.store().dir();
        let st = nix::sys::statvfs::statvfs(dir).map_err(|e| StoreError::Io {
            what: "cannot check free space of",
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        let free = st.blocks_available() as u64 * st.fragment_size() as u64;
        if free < SPACE_RESERVE + SPACE_CHECK_EVERY {
            // Checked again on the next write: space may have been freed meanwhile.
            self.unchecked = SPACE_CHECK_EVERY;
            return Err(StoreError::Full {
                path: dir.to_path_buf(),
                free,
                reserve: SPACE_RESERVE,
            });
        }
        Ok(())
    }

    /// The replica written to.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// The state of chunk `index` as this writer knows it (including uncommitted chunks).
    pub fn state(&self, index: u64) -> Option<ChunkState> {
        self.known.get(index).state
    }

    fn record(&mut self, index: u64, state: ChunkState, bytes: u64) {
        let db = self.replica.store().db();
        let id = self.replica.record().id;
        let old = self.known.get(index);
        if let Some(ChunkState::Data(h)) = old.state {
            self.batch
                .delete_cf(db.cf(CONTENT), content_key(&h, id, index));
        }
        self.batch
            .put_cf(db.cf(CHUNKS), chunk_key(id, index), state.encode());
        if let ChunkState::Data(h) = &state {
            self.batch
                .put_cf(db.cf(CONTENT), content_key(h, id, index), []);
        }
        self.known.set(
            index,
            Slot {
                state: Some(state),
                on_disk: old.on_disk,
            },
        );
        self.pending.push(index);
        self.pending_bytes += bytes;
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// The chunks of `indexes` whose vouching records may be on disk.
    fn vouched(&self, indexes: &[u64]) -> Vec<(u64, ChunkState)> {
        indexes
            .iter()
            .filter_map(|&i| {
                let s = self.known.get(i);
                s.state
                    .filter(|st| s.on_disk && st.vouches())
                    .map(|st| (i, st))
            })
            .collect()
    }

    /// Deletes, durably and at once, the records of `indexes` that vouch for their bytes (the
    /// chunks are absent, fetched again after a crash). Waits for a commit in flight first
    /// when it may be writing those records.
    fn unvouch(&mut self, indexes: &[u64]) -> Result<()> {
        self.check()?;
        let doomed = self.vouched(indexes);
        if doomed.is_empty() {
            return Ok(());
        }
        self.settle()?;
        // A batch in flight that records one of these chunks as vouching could commit after
        // the withdrawal below: wait for it then, and only then (waiting means its fdatasync,
        // which cost the export's first writes to fetched chunks a third of their rate).
        if doomed.iter().any(|(i, _)| self.syncing_vouches.contains(i)) {
            self.wait_for_sync()?;
        }
        let db = self.replica.store().db();
        let id = self.replica.record().id;
        let mut batch = rocksdb::WriteBatch::default();
        for &(i, st) in &doomed {
            if let ChunkState::Data(h) = st {
                batch.delete_cf(db.cf(CONTENT), content_key(&h, id, i));
            }
            batch.delete_cf(db.cf(CHUNKS), chunk_key(id, i));
        }
        if let Err(e) = db.write_sync(batch) {
            return Err(self.fail(e));
        }
        for &(i, _) in &doomed {
            self.known.set(i, Slot::default());
        }
        Ok(())
    }

    /// Makes the chunks `indexes` absent, durably, before their bytes are replaced (a seed or
    /// sync round calls it once for every chunk whose content it will change).
    pub fn forget(&mut self, indexes: &[u64]) -> Result<()> {
        self.unvouch(indexes)
    }

    /// Before a local write (the NBD export) changes chunks `indexes`: logs durably the
    /// extents of those whose records vouch for their bytes, committed or pending (see
    /// [`crate::activity`]: opening after a crash re-checks them), and records them `Written`
    /// in the pending batch. Chunks already written or absent need nothing; a chunk whose
    /// extent is logged already costs no synced write.
    pub fn activate_for_write(&mut self, indexes: &[u64]) -> Result<()> {
        self.check()?;
        let vouching: Vec<u64> = indexes
            .iter()
            .copied()
            .filter(|&i| self.state(i).is_some_and(|s| s.vouches()))
            .collect();
        let mut fresh: Vec<u64> = vouching
            .iter()
            .map(|&i| activity::extent_of(i))
            .filter(|e| !self.active.contains(e))
            .collect();
        fresh.sort_unstable();
        fresh.dedup();
        if !fresh.is_empty() {
            let logged =
                activity::activate(self.replica.store().db(), self.replica.record().id, &fresh);
            logged.map_err(|e| self.fail(e))?;
            self.active.extend(fresh);
        }
        for i in vouching {
            self.record(i, ChunkState::Written, 0);
        }
        Ok(())
    }

    /// Extents in the activity log.
    pub fn active_extents(&self) -> usize {
        self.active.len()
    }

    /// Clears the activity log: makes every completed write and its record durable
    /// ([`ChunkWriter::flush`]), then retires the extents. The caller must hold off local
    /// writes meanwhile: one between its activation and its record would lose its cover.
    pub fn retire_active(&mut self) -> Result<()> {
        if self.active.is_empty() {
            return Ok(());
        }
        self.flush()?;
        let extents: Vec<u64> = self.active.drain().collect();
        let retired = activity::retire(
            self.replica.store().db(),
            self.replica.record().id,
            &extents,
        );
        retired.map_err(|e| self.fail(e))
    }

    /// Before bytes land over chunk `index`.
    fn before_overwrite(&mut self, index: u64) -> Result<()> {
        self.unvouch(&[index])
    }

    /// Writes chunk `index` with `data`, whose hash the caller has verified to be `hash`.
    pub fn put(&mut self, index: u64, hash: ChunkHash, data: &[u8]) -> Result<()> {
        self.check()?;
        self.settle()?;
        self.before_overwrite(index)?;
        self.reserve(data.len() as u64)?;
        self.write_cached(data, self.replica.geometry().offset(index))?;
        self.record(index, ChunkState::Data(hash), data.len() as u64);
        Ok(())
    }

    fn write_cached(&self, data: &[u8], offset: u64) -> Result<()> {
        self.replica.note_write();
        self.replica
            .file()
            .write_all_at(data, offset)
            .map_err(io_err("cannot write replica", self.replica.data_path()))
    }

    /// Like [`ChunkWriter::put`], for bulk transfers (seeding, sync rounds): a chunk that
    /// overwrites data goes to the device directly ([`crate::direct`]), several writes at a
    /// time, and may still be in flight when this returns. Every other method of the writer
    /// waits for them first, so the writer itself (as [`ChunkWriter::copy_local`]) reads them
    /// back; readers of the file elsewhere see them after the next commit.
    pub fn put_streaming(&mut self, index: u64, hash: ChunkHash, data: &[u8]) -> Result<()> {
        // Only overwrites go direct. Filling a hole is cheaper through the page cache: ext4
        // allocates whole runs at writeback, while a direct write into a hole must allocate
        // as it goes, and io_uring hands such writes to worker threads (a loopback seed of a
        // fresh disk measured 4.3-6.2 s direct against 3.7-4.1 s through the cache).
        let overwrite = matches!(
            self.state(index),
            Some(ChunkState::Data(_) | ChunkState::Written)
        );
        if !overwrite {
            return self.put(index, hash, data);
        }
        self.check()?;
        if !self.vouched(&[index]).is_empty() {
            self.before_overwrite(index)?;
        }
        self.reserve(data.len() as u64)?;
        let offset = self.replica.geometry().offset(index);
        let path = self.replica.data_path().clone();
        self.replica.note_write();
        let started = match self.direct_writer() {
            Some(d) => d.submit(data, offset),
            None => Ok(false),
        }
        .map_err(io_err("cannot write replica", &path))?;
        if !started {
            // Declined (no direct I/O here, or a short last chunk): through the page cache.
            self.write_cached(data, offset)?;
        }
        self.record(index, ChunkState::Data(hash), data.len() as u64);
        Ok(())
    }

    /// The direct writer, opened on first use; `None` where direct I/O is unavailable.
    fn direct_writer(&mut self) -> Option<&mut DirectWriter> {
        if let Direct::Unopened = self.direct {
            let chunk = self.replica.geometry().chunk_size as usize;
            let opened = self
                .replica
                .file()
                .os_file()
                .and_then(|f| DirectWriter::open(self.replica.data_path(), f, chunk));
            self.direct = match opened {
                Some(d) => Direct::Open(Box::new(d)),
                None => Direct::Unavailable,
            };
        }
        match &mut self.direct {
            Direct::Open(d) => Some(d),
            _ => None,
        }
    }

    /// Starts streamed writes gathered so far; call before waiting for more chunks.
    pub fn kick(&mut self) -> Result<()> {
        let path = self.replica.data_path().clone();
        match &mut self.direct {
            Direct::Open(d) => d.kick().map_err(io_err("cannot write replica", &path)),
            _ => Ok(()),
        }
    }

    /// Waits for streamed writes still in flight.
    fn settle(&mut self) -> Result<()> {
        let path = self.replica.data_path().clone();
        match &mut self.direct {
            Direct::Open(d) => d.drain().map_err(io_err("cannot write replica", &path)),
            _ => Ok(()),
        }
    }

    /// The `mark_*` methods record what the caller wrote itself (the NBD export, which never
    /// streams): a streamed write still in flight to the same chunk could land after it.
    fn assert_not_streaming(&self) {
        debug_assert!(
            !matches!(self.direct, Direct::Open(_)),
            "mark_* on a writer that streams"
        );
    }

    /// Records that chunk `index` was written locally. The caller wrote its bytes already,
    /// after [`ChunkWriter::record_written_now`] if the chunk had a vouching record.
    pub fn mark_written(&mut self, index: u64) -> Result<()> {
        self.check()?;
        self.assert_not_streaming();
        if self.state(index) != Some(ChunkState::Written) {
            self.record(index, ChunkState::Written, 0);
        }
        Ok(())
    }

    /// Records chunk `index`, written locally, as holding data of `hash`: the caller read its
    /// bytes back and hashed them, with nothing writing the chunk meanwhile. The record then
    /// vouches for the bytes like a fetched chunk's (a later sync may replace them).
    pub fn vouch(&mut self, index: u64, hash: ChunkHash) -> Result<()> {
        self.check()?;
        self.assert_not_streaming();
        self.record(index, ChunkState::Data(hash), 0);
        Ok(())
    }

    /// Records chunk `index` as zeros; the caller punched or zeroed it already (after
    /// [`ChunkWriter::record_written_now`] if the chunk had a vouching record).
    pub fn mark_zero(&mut self, index: u64) -> Result<()> {
        self.check()?;
        self.assert_not_streaming();
        self.record(index, ChunkState::Zero, 0);
        Ok(())
    }

    /// Records chunk `index` as zeros, punching out whatever it held.
    pub fn put_zero(&mut self, index: u64) -> Result<()> {
        self.check()?;
        self.settle()?;
        let state = self.state(index);
        if state == Some(ChunkState::Zero) {
            return Ok(());
        }
        // A chunk without a record may still hold bytes (written, never committed, before a
        // crash); only in a data file this open created is it surely a hole.
        if state.is_some() || !self.replica.is_fresh() {
            self.before_overwrite(index)?;
            let g = self.replica.geometry();
            self.replica
                .file()
                .punch_hole(g.offset(index), g.len(index) as u64)
                .map_err(io_err(
                    "cannot punch a hole in replica",
                    self.replica.data_path(),
                ))?;
        }
        self.record(index, ChunkState::Zero, 0);
        Ok(())
    }

    /// The data file of disk `src_id` of the same store.
    fn source_file(&mut self, src_id: u32) -> Result<Arc<dyn DataFile>> {
        if src_id == self.replica.record().id {
            return Ok(self.replica.file().clone());
        }
        if let Some(f) = self.sources.get(&src_id) {
            return Ok(f.clone());
        }
        let path = self.replica.store().data_path(src_id);
        let f = self
            .replica
            .store()
            .files()
            .open(&path, false)
            .map_err(io_err("cannot open replica data file", &path))?;
        self.sources.insert(src_id, f.clone());
        Ok(f)
    }

    /// Copies content `hash` held at (`src_id`, `src_index`) into chunk `index` without the WAN.
    /// Returns `false` (and copies nothing) if the held bytes no longer match `hash`.
    pub fn copy_local(
        &mut self,
        src_id: u32,
        src_index: u64,
        index: u64,
        hash: ChunkHash,
    ) -> Result<bool> {
        self.check()?;
        self.settle()?;
        let src = self.source_file(src_id)?;
        let g = self.replica.geometry();
        let len = g.len(index);
        // Source chunks may have other geometry; the content hash fixes the length.
        let src_offset = src_index * self.chunk_size_of(src_id)? as u64;
        let mut buf = vec![0u8; len];
        if src.read_exact_at(&mut buf, src_offset).is_err() || ChunkHash::of(&buf) != hash {
            tracing::warn!(
                src_id,
                src_index,
                "held content no longer matches its hash; fetching instead"
            );
            return Ok(false);
        }
        self.before_overwrite(index)?;
        self.reserve(len as u64)?;
        let dst = self.replica.file();
        self.replica.note_write();
        let copied = match (src.os_file(), dst.os_file()) {
            (Some(s), Some(d)) => copy_range(s, src_offset, d, g.offset(index), len),
            _ => dst.write_all_at(&buf, g.offset(index)),
        };
        copied.map_err(io_err("cannot copy into replica", self.replica.data_path()))?;
        self.record(index, ChunkState::Data(hash), len as u64);
        Ok(true)
    }

    fn chunk_size_of(&self, id: u32) -> Result<u32> {
        if id == self.replica.record().id {
            return Ok(self.replica.geometry().chunk_size);
        }
        let disks = self.replica.store().disks()?;
        disks
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.geometry.chunk_size)
            .ok_or_else(|| StoreError::Corrupt {
                path: self.replica.store().dir().to_path_buf(),
                detail: format!("content index names disk id {id}, which the store does not hold"),
            })
    }

    /// Chunks recorded and not yet handed to a commit.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// True when enough is pending that a commit is due.
    pub fn commit_due(&self) -> bool {
        self.pending_bytes >= COMMIT_BYTES
            || self.pending.len() >= COMMIT_CHUNKS
            || self.oldest.is_some_and(|t| t.elapsed() >= COMMIT_AGE)
    }

    /// Makes pending chunks durable and records them, waiting until it is done; returns how
    /// many chunks were committed since the last wait.
    pub fn commit(&mut self) -> Result<usize> {
        self.commit_in_background()?;
        self.wait_for_sync()
    }

    /// Makes every completed write durable: commits what is pending and syncs the data file
    /// (local writes over chunks already recorded leave nothing pending). A failure stops the
    /// writer, as a failed commit does: a later `fdatasync` could succeed over lost bytes.
    pub fn flush(&mut self) -> Result<()> {
        self.commit()?;
        let synced = self.replica.file().sync_data();
        synced.map_err(|e| self.fail(io_err("cannot sync replica", self.replica.data_path())(e)))
    }

    /// Starts making pending chunks durable on another thread, so writing goes on meanwhile.
    /// At most one batch is in flight: this first waits for the previous one.
    pub fn commit_in_background(&mut self) -> Result<usize> {
        self.check()?;
        // Streamed bytes must be written before the fdatasync that makes them durable.
        self.settle()?;
        let done = self.wait_for_sync()?;
        if self.pending.is_empty() {
            return Ok(done);
        }
        let batch = std::mem::take(&mut self.batch);
        let n = self.pending.len();
        for i in std::mem::take(&mut self.pending) {
            let mut slot = self.known.get(i);
            slot.on_disk = true;
            if slot.state.is_some_and(|s| s.vouches()) {
                self.syncing_vouches.insert(i);
            }
            self.known.set(i, slot);
        }
        self.pending_bytes = 0;
        self.oldest = None;
        let (file, path, store) = (
            self.replica.file().clone(),
            self.replica.data_path().clone(),
            self.replica.store().clone(),
        );
        self.syncing = Some(std::thread::spawn(move || {
            // Order matters: bytes durable first, then the records that vouch for them. Bytes
            // written meanwhile for the next batch may be synced too, which is harmless: no
            // chunk of this batch is overwritten before it commits (see `unvouch`).
            file.sync_data()
                .map_err(io_err("cannot sync replica", &path))?;
            store.db().write_sync(batch)?;
            Ok(n)
        }));
        Ok(done)
    }

    fn wait_for_sync(&mut self) -> Result<usize> {
        self.syncing_vouches.clear();
        let outcome = match self.syncing.take() {
            None => return Ok(0),
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(StoreError::Corrupt {
                    path: self.replica.data_path().clone(),
                    detail: "commit thread panicked".into(),
                })
            }),
        };
        outcome.map_err(|e| self.fail(e))
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        // A commit in flight finishes (or fails) before the writer's files are released; what
        // is pending is dropped, as a crash would drop it.
        if let Some(h) = self.syncing.take() {
            let _ = h.join();
        }
    }
}
