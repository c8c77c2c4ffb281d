//! Write tracking at the source: the NBD device a running VM writes through, and the tracker
//! that remembers, durably, which chunks each write touched.
//!
//! Ordering: the activity log covers an extent *before* a write touches it (crash safety), and
//! chunks are stamped with the current generation *after* the write lands. A sync round cuts
//! the generation and then reads: a write that lands before the cut is read by that round, and
//! one stamped after the cut carries the next generation, so no write is ever marked synced
//! before its bytes were shipped.

use crate::nbd::{Device, DeviceError, Extent};
use blockstore::dirty::EXTENT_CHUNKS;
use blockstore::Catalog;
use protocol::Geometry;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Activity-log extents kept hot across flushes before the log is trimmed.
const HOT_LIMIT: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which chunks of one disk were written, in which generation.
pub struct Tracker {
    catalog: Arc<Catalog>,
    disk: String,
    geometry: Geometry,
    generation: AtomicU64,
    stamps: Vec<AtomicU64>,
    /// Per chunk, writes begun (high 32 bits) and ended (low 32 bits): equal halves mean no
    /// write is in flight, and an unchanged value means no write began in between (see
    /// [`Tracker::settled_version`]).
    versions: Vec<AtomicU64>,
    hot: Mutex<HashSet<u64>>,
    unflushed: Mutex<HashMap<u64, u64>>,
    /// Serialises generation cuts (and their catalog writes).
    cut: Mutex<()>,
    /// Held (shared) by a write from its activity-log check to its stamp, and (exclusive) by a
    /// flush while it drains stamps and retires extents: a flush never retires an extent under
    /// a write that has checked it but not yet stamped its chunks.
    gate: std::sync::RwLock<()>,
}

impl Tracker {
    /// Loads the disk's tracking state (recovering from a crash if the log says so).
    pub fn load(
        catalog: Arc<Catalog>,
        disk: &str,
        geometry: Geometry,
    ) -> blockstore::error::Result<Tracker> {
        let loaded = catalog.dirty(disk).load(geometry.chunk_count())?;
        Ok(Tracker {
            disk: disk.to_string(),
            geometry,
            generation: AtomicU64::new(loaded.generation),
            versions: (0..loaded.stamps.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            stamps: loaded.stamps.into_iter().map(AtomicU64::new).collect(),
            hot: Mutex::new(HashSet::new()),
            unflushed: Mutex::new(HashMap::new()),
            cut: Mutex::new(()),
            gate: std::sync::RwLock::new(()),
            catalog,
        })
    }

    fn store_err(e: blockstore::StoreError) -> DeviceError {
        DeviceError::io(format!("dirty tracking failed: {e}"))
    }

    /// Extents of `chunks` not yet in the activity log (empty: the write may go ahead).
    pub fn cold_extents(&self, chunks: &std::ops::Range<u64>) -> Vec<u64> {
        let hot = lock(&self.hot);
        let first = chunks.start / EXTENT_CHUNKS;
        let last = chunks.end.saturating_sub(1) / EXTENT_CHUNKS;
        (first..=last).filter(|e| !hot.contains(e)).collect()
    }

    /// Before a write: makes sure the activity log covers the chunks (synced when it grows),
    /// then marks the write in flight in the chunks' versions until [`Tracker::after_write`].
    pub fn before_write(&self, chunks: std::ops::Range<u64>) -> Result<(), DeviceError> {
        let extents = self.cold_extents(&chunks);
        if !extents.is_empty() {
            self.catalog
                .dirty(&self.disk)
                .activate(&extents)
                .map_err(Self::store_err)?;
            lock(&self.hot).extend(extents);
        }
        for c in chunks {
            if let Some(v) = self.versions.get(c as usize) {
                v.fetch_add(1 << 32, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// After a write returned, landed or not (part of a failed one may have landed): ends it
    /// in the chunks' versions and stamps the chunks with the current generation.
    pub fn after_write(&self, chunks: std::ops::Range<u64>) {
        for c in chunks.clone() {
            if let Some(v) = self.versions.get(c as usize) {
                // After 2^32 writes to one chunk the carry reaches the high half: the halves
                // never match again and the chunk is simply always read and hashed afresh.
                v.fetch_add(1, Ordering::SeqCst);
            }
        }
        let g = self.generation.load(Ordering::SeqCst);
        let mut unflushed = lock(&self.unflushed);
        for c in chunks {
            if let Some(s) = self.stamps.get(c as usize) {
                s.fetch_max(g, Ordering::SeqCst);
                unflushed.insert(c, s.load(Ordering::SeqCst));
            }
        }
    }

    /// Chunk `c`'s write version if no write to it is in flight. Bytes read between two
    /// loads that both return the same settled version are the chunk's bytes for as long as
    /// the version stays unchanged: every write to the chunk changes it before it starts.
    pub fn settled_version(&self, c: u64) -> Option<u64> {
        let v = self.versions.get(c as usize)?.load(Ordering::SeqCst);
        (v >> 32 == v & 0xffff_ffff).then_some(v)
    }

    /// Shared side of the write gate: hold it from the activity-log check to the stamp.
    pub fn write_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// At FLUSH: persists exact stamps; trims the activity log when it has grown large.
    pub fn flush(&self) -> Result<(), DeviceError> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let stamps: Vec<(u64, u64)> = lock(&self.unflushed).drain().collect();
        let retire: Vec<u64> = {
            let mut hot = lock(&self.hot);
            if hot.len() > HOT_LIMIT {
                hot.drain().collect()
            } else {
                Vec::new()
            }
        };
        if stamps.is_empty() && retire.is_empty() {
            return Ok(());
        }
        self.catalog
            .dirty(&self.disk)
            .persist(&stamps, &retire)
            .map_err(Self::store_err)
    }

    /// Cuts a generation: returns the generation that closes (writes stamped with it or
    /// earlier belong to this round); later writes get the next one.
    pub fn cut(&self) -> Result<u64, DeviceError> {
        let _g = lock(&self.cut);
        let closing = self.generation.load(Ordering::SeqCst);
        // Persisted first: after a crash, stamps must keep growing past every cut taken.
        self.catalog
            .dirty(&self.disk)
            .set_generation(closing + 1)
            .map_err(Self::store_err)?;
        self.generation.store(closing + 1, Ordering::SeqCst);
        Ok(closing)
    }

    /// Chunks written after generation `since` up to and including `until`.
    pub fn written_between(&self, since: u64, until: u64) -> Vec<u64> {
        (0..self.geometry.chunk_count())
            .filter(|&c| {
                let s = self.stamps[c as usize].load(Ordering::SeqCst);
                s > since && s <= until
            })
            .collect()
    }

    /// Chunks written after generation `since` (as of now).
    pub fn written_since(&self, since: u64) -> u64 {
        self.stamps
            .iter()
            .filter(|s| s.load(Ordering::SeqCst) > since)
            .count() as u64
    }

    /// The generation new writes get.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The replica's synced generation, if registered.
    pub fn synced(&self, replica: &[u8; 16]) -> Result<Option<u64>, DeviceError> {
        self.catalog
            .dirty(&self.disk)
            .synced(replica)
            .map_err(Self::store_err)
    }

    /// Records a replica's synced generation.
    pub fn set_synced(&self, replica: &[u8; 16], generation: u64) -> Result<(), DeviceError> {
        self.catalog
            .dirty(&self.disk)
            .set_synced(replica, generation)
            .map_err(Self::store_err)
    }
}

/// The source image served to its own VM over NBD, with every write tracked.
pub struct TrackedImage {
    file: File,
    size: u64,
    geometry: Geometry,
    tracker: Arc<Tracker>,
}

impl TrackedImage {
    /// Opens `path` for writing.
    pub fn open(
        path: &std::path::Path,
        geometry: Geometry,
        tracker: Arc<Tracker>,
    ) -> std::io::Result<TrackedImage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(TrackedImage {
            file,
            size: geometry.size,
            geometry,
            tracker,
        })
    }

    fn io(what: &'static str) -> impl Fn(std::io::Error) -> DeviceError {
        move |e| DeviceError::io(format!("{what}: {e}"))
    }

    fn sync(&self) -> Result<(), DeviceError> {
        // Image bytes first, then the stamps that say they changed.
        self.file
            .sync_data()
            .map_err(Self::io("cannot sync image"))?;
        self.tracker.flush()
    }

    /// Runs `write` on the image, tracked, on the calling worker thread (it blocks: image I/O,
    /// and a synced activity-log write when it touches a new extent).
    fn tracked_write(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        write: impl FnOnce(&File) -> std::io::Result<()>,
    ) -> Result<(), DeviceError> {
        let chunks = self.geometry.chunks_touching(offset, len);
        tokio::task::block_in_place(|| {
            {
                let _gate = self.tracker.write_gate();
                self.tracker.before_write(chunks.clone())?;
                let written = write(&self.file);
                self.tracker.after_write(chunks);
                written.map_err(Self::io("cannot write image"))?;
            }
            if fua {
                self.sync()?;
            }
            Ok(())
        })
    }
}

impl Device for TrackedImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        false
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(Self::io("cannot read image"))?;
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.tracked_write(offset, data.len() as u64, fua, |f| {
            f.write_all_at(&data, offset)
        })
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        // Zeroed ranges stay allocated, which NO_HOLE asks for and costs nothing otherwise:
        // the VM wrote zeros, it did not give the space back (that is TRIM).
        self.tracked_write(offset, len as u64, fua, |f| {
            blockstore::datafile::zero_range(f, offset, len as u64)
        })
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.tracked_write(offset, len as u64, fua, |f| {
            blockstore::datafile::punch_hole(f, offset, len as u64)
        })
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        tokio::task::block_in_place(|| self.sync())
    }

    async fn cache(&self, _offset: u64, _len: u32) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn block_status(&self, _offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        // The source's allocation is not tracked; everything is reported as data.
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
}
