//! `helio export`: a replica in the store served as an NBD device, complete or filling in.
//!
//! With a source (`--from`), a read of an absent chunk fetches it at once on a priority
//! connection that the background copier never queues behind; concurrent reads of one chunk
//! share one fetch; sequential readers get read-ahead; the background copier pulls everything
//! else, pausing while reads wait, and releases the source when the replica is complete.
//!
//! Ordering rule (xNBD's, and the classic bug when broken): a local write holds its chunks'
//! stripe locks while it writes the bytes and then marks the chunks written; a fetch lands
//! only under the same lock and only into a chunk still absent, so older source data never
//! overwrites a newer local write. A partial write to an absent chunk fetches the chunk first.
//!
//! Durability ([`blockstore::writer`]): a chunk's mark is recorded only after its bytes are
//! written, in a batch committed after an `fdatasync`, so a crash before the commit leaves an
//! absent chunk (fetched again: its old content) rather than a mark over a hole. A chunk whose
//! record vouches for its bytes (fetched data, or zero) is first recorded `Written`, durably,
//! before a local write changes them. A failed write leaves no mark and returns its error. FLUSH
//! and FUA commit and sync before answering, so an acknowledged write survives `kill -9`; after
//! a failed commit or sync the export acknowledges no write or flush until it is restarted.

#[cfg(test)]
mod crash_model;
mod lowprio;
pub mod status;

use crate::nbd::proto::{STATE_HOLE, STATE_ZERO};
use crate::nbd::{Device, DeviceError, Extent};
use blockstore::datafile::DataFile;
use blockstore::{ChunkState, ChunkWriter, Replica, Store};
use client::fetch::{Fetched, Fetcher};
use client::session::Peer;
use protocol::{ChunkEntry, Geometry};
use status::ExportStats;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wan::{Rate, TokenBucket};

const ABSENT: u8 = 0;
const ZERO: u8 = 1;
const DATA: u8 = 2;
const WRITTEN: u8 = 3;
const STRIPES: usize = 1024;
/// Extents of the activity log (16 MiB each at 64 KiB chunks) a flush lets stand: what a
/// crash makes the next open re-hash, at most.
const ACTIVE_LIMIT: usize = 64;
/// Reads up to this size are served on the async worker itself.
const INLINE_READ: u32 = 64 * 1024;
/// Background fetches in flight.
const BACKGROUND_IN_FLIGHT: usize = 48;

/// How an export behaves.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// How long a read of an absent chunk keeps retrying an unreachable source before EIO.
    pub fetch_timeout: Duration,
    /// Cap on the background copier's WAN rate.
    pub bandwidth: Option<Rate>,
    /// Compress chunks on the wire.
    pub compress: bool,
}

/// Why an export cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] blockstore::StoreError),
    /// The source failed.
    #[error(transparent)]
    Session(#[from] client::session::SessionError),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a task panicked mid-operation; the state it guards is still sound
    // (chunk states are only advanced after their bytes are written).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Outcome = Option<Result<(), DeviceError>>;

struct Remote {
    addr: String,
    demand: Fetcher,
    background: Fetcher,
    inflight: Mutex<HashMap<u64, watch::Sender<Outcome>>>,
    timeout: Duration,
    bucket: Option<TokenBucket>,
    waiting_reads: AtomicUsize,
    released: AtomicBool,
    /// Bytes the background copier's fetches took on the wire, to settle its bandwidth cap
    /// with what really crossed (compression varies chunk to chunk).
    background_wire: AtomicU64,
    /// Where background chunks are verified and landed, below the reads' priority.
    low: lowprio::LowPriority,
}

/// A replica served over NBD.
pub struct ReplicaDevice {
    name: String,
    replica: Replica,
    file: Arc<dyn DataFile>,
    g: Geometry,
    read_only: bool,
    states: Vec<AtomicU8>,
    absent: AtomicU64,
    written: AtomicU64,
    stripes: Vec<Mutex<()>>,
    records: Mutex<ChunkWriter>,
    /// Held (shared) by a local write from its activation to its marks, and (exclusive) while
    /// the activity log is retired: no write may be between the two then.
    gate: std::sync::RwLock<()>,
    remote: Option<Remote>,
    last_read_end: AtomicU64,
    /// Live counters.
    pub stats: ExportStats,
    /// Generation of local writes (see [`ReplicaDevice::cut`]), and per chunk the generation
    /// of its last local write since this open (0: none).
    generation: AtomicU64,
    stamps: Vec<AtomicU64>,
    /// Chunks were written locally before this open: their generations are unknown.
    written_before_open: bool,
}

fn encode_state(s: Option<ChunkState>) -> u8 {
    match s {
        None => ABSENT,
        Some(ChunkState::Zero) => ZERO,
        Some(ChunkState::Data(_)) => DATA,
        Some(ChunkState::Written) => WRITTEN,
    }
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> DeviceError + '_ {
    move |e| {
        if e.raw_os_error() == Some(libc_enospc()) {
            DeviceError::nospc(format!("{what}: {e}"))
        } else {
            DeviceError::io(format!("{what}: {e}"))
        }
    }
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}

fn store_err(e: blockstore::StoreError) -> DeviceError {
    match e {
        blockstore::StoreError::Full { .. } => DeviceError::nospc(e.to_string()),
        e => DeviceError::io(e.to_string()),
    }
}

/// The chunk states to serve from, given what the replica records and the manifest the
/// source serves now: a chunk recorded with other content than the manifest's (the replica
/// was seeded or synced from an older image) is made absent, durably, so it is fetched again;
/// zero chunks of the manifest are recorded at once (they need no transfer). Chunks the guest
/// wrote keep its bytes.
fn reconcile(
    replica: &Replica,
    records: &mut ChunkWriter,
    recorded: Vec<Option<ChunkState>>,
    manifest: &[ChunkEntry],
    source: &str,
) -> Result<Vec<u8>, blockstore::StoreError> {
    let g = replica.geometry();
    let stale: Vec<u64> = recorded
        .iter()
        .zip(manifest)
        .enumerate()
        .filter(|(_, (state, entry))| state.is_some_and(|s| s.contradicts(entry)))
        .map(|(i, _)| i as u64)
        .collect();
    let mut states: Vec<u8> = recorded.into_iter().map(encode_state).collect();
    if !stale.is_empty() {
        let seeded = replica.record().seeded_digest;
        tracing::warn!(
            disk = %replica.record().name, %source, stale = stale.len(),
            seeded_from = %seeded.map_or("-".to_string(), |d| d.to_string()),
            "the replica holds chunks the source no longer serves (seeded or synced from an older image): fetching them again"
        );
        records.forget(&stale)?;
        for &i in &stale {
            states[i as usize] = ABSENT;
        }
    }
    for (i, e) in manifest.iter().enumerate() {
        if states[i] == ABSENT && *e == ChunkEntry::Zero {
            // The chunk may hold bytes written but never recorded before a crash.
            replica
                .file()
                .punch_hole(g.offset(i as u64), g.len(i as u64) as u64)
                .map_err(|e| blockstore::StoreError::Io {
                    what: "cannot punch",
                    path: replica.data_path().clone(),
                    source: e,
                })?;
            records.mark_zero(i as u64)?;
            states[i] = ZERO;
        }
    }
    records.commit()?;
    Ok(states)
}

impl ReplicaDevice {
    /// Opens disk `name` of `store`; with `source`, absent chunks come from that agent.
    pub async fn open(
        store: &Store,
        name: &str,
        source: Option<Peer>,
        opts: &ExportOptions,
    ) -> Result<Arc<ReplicaDevice>, ExportError> {
        let (replica, remote, manifest) = match source {
            None => (store.replica(name)?, None, None),
            Some(peer) => {
                let (mut conn, info) = peer.open(name).await?;
                let manifest = client::session::fetch_manifest(&mut conn, &info).await?;
                drop(conn);
                let replica = store.open_or_create(name, info.geometry)?;
                let remote = Remote {
                    addr: peer.addr.clone(),
                    demand: Fetcher::new(peer.clone(), info.clone(), opts.compress),
                    background: Fetcher::new(peer, info, opts.compress),
                    inflight: Mutex::new(HashMap::new()),
                    timeout: opts.fetch_timeout,
                    bucket: opts.bandwidth.map(TokenBucket::new),
                    waiting_reads: AtomicUsize::new(0),
                    released: AtomicBool::new(false),
                    background_wire: AtomicU64::new(0),
                    low: lowprio::LowPriority::start("helio-copier").map_err(|e| {
                        blockstore::StoreError::Io {
                            what: "cannot start the copier thread for",
                            path: store.dir().to_path_buf(),
                            source: e,
                        }
                    })?,
                };
                (replica, Some(remote), Some(manifest))
            }
        };
        let g = replica.geometry();
        let mut records = replica.writer()?;
        let recorded = replica.states()?;
        let states = match (&manifest, &remote) {
            (Some(manifest), Some(remote)) => {
                reconcile(&replica, &mut records, recorded, manifest, &remote.addr)?
            }
            _ => recorded.into_iter().map(encode_state).collect(),
        };
        let absent = states.iter().filter(|&&s| s == ABSENT).count() as u64;
        let written = states.iter().filter(|&&s| s == WRITTEN).count() as u64;
        Ok(Arc::new(ReplicaDevice {
            name: name.to_string(),
            file: replica.file().clone(),
            replica,
            g,
            read_only: opts.read_only,
            states: states.into_iter().map(AtomicU8::new).collect(),
            absent: AtomicU64::new(absent),
            written: AtomicU64::new(written),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            records: Mutex::new(records),
            gate: std::sync::RwLock::new(()),
            remote,
            last_read_end: AtomicU64::new(u64::MAX),
            stats: ExportStats::default(),
            generation: AtomicU64::new(1),
            stamps: (0..g.chunk_count()).map(|_| AtomicU64::new(0)).collect(),
            written_before_open: written > 0,
        }))
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Chunks not yet local.
    pub fn absent_chunks(&self) -> u64 {
        self.absent.load(Ordering::SeqCst)
    }

    /// Makes `chunks` absent again: the source wrote them after the replica got them (a
    /// migration's switchover says which). Their records are forgotten durably first; then
    /// reads fetch them. Chunks written here keep the local bytes. How many became absent.
    pub fn invalidate(&self, chunks: &[u64]) -> Result<u64, DeviceError> {
        let n = self.g.chunk_count();
        if let Some(bad) = chunks.iter().find(|&&c| c >= n) {
            return Err(DeviceError::io(format!(
                "chunk {bad} is beyond disk {:?} ({n} chunks)",
                self.name
            )));
        }
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<u64> = chunks
            .iter()
            .copied()
            .filter(|&c| !matches!(self.state(c), ABSENT | WRITTEN))
            .collect();
        {
            let mut rec = lock(&self.records);
            rec.forget(&stale).map_err(store_err)?;
            rec.commit().map_err(store_err)?;
        }
        for &c in &stale {
            let _stripe = lock(&self.stripes[self.stripe(c)]);
            if self.states[c as usize].swap(ABSENT, Ordering::SeqCst) != ABSENT {
                self.absent.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(stale.len() as u64)
    }

    /// The disk's geometry.
    pub fn geometry(&self) -> Geometry {
        self.g
    }

    /// Cuts the generation of local writes: every write acknowledged before the cut is stamped
    /// with a generation up to the one returned, later ones with a later one (writes are
    /// stamped after their bytes land, so a round that cuts and then reads misses none).
    pub fn cut(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst)
    }

    /// The chunks written locally in generations `since + 1 ..= until`.
    pub fn written_between(&self, since: u64, until: u64) -> Vec<u64> {
        (0..self.g.chunk_count())
            .filter(|&i| {
                let s = self.stamps[i as usize].load(Ordering::SeqCst);
                s > since && s <= until
            })
            .collect()
    }

    /// Every chunk the guest may have changed here up to generation `until`: those stamped
    /// since this open or, when local writes predate it (an agent restart), every chunk
    /// recorded written or zero (a superset: zero chunks cost a marker).
    pub fn changed_until(&self, until: u64) -> Vec<u64> {
        if !self.written_before_open {
            return self.written_between(0, until);
        }
        (0..self.g.chunk_count())
            .filter(|&i| matches!(self.state(i), WRITTEN | ZERO))
            .collect()
    }

    /// Chunk `i`'s local bytes, or `None` for a zero chunk; an absent chunk is an error (it
    /// holds the source's bytes, which the caller did not ask for).
    pub fn local_chunk(&self, i: u64) -> Result<Option<Vec<u8>>, DeviceError> {
        if i >= self.g.chunk_count() {
            return Err(DeviceError::io(format!(
                "chunk {i} is beyond disk {:?} ({} chunks)",
                self.name,
                self.g.chunk_count()
            )));
        }
        match self.state(i) {
            ZERO => Ok(None),
            ABSENT => Err(DeviceError::io(format!(
                "chunk {i} of disk {:?} is not local",
                self.name
            ))),
            _ => {
                let mut buf = vec![0u8; self.g.len(i)];
                self.file
                    .read_exact_at(&mut buf, self.g.offset(i))
                    .map_err(io_err("cannot read replica"))?;
                Ok(Some(buf))
            }
        }
    }

    /// Once nothing writes here any more (the VM left, its writes flushed): every chunk
    /// written locally is recorded with the hash of its bytes (or as zeros), so that a later
    /// seed or sync compares it like a fetched chunk, and replaces it if the source's differs
    /// (a `Written` chunk is the guest's and never replaced). How many.
    pub fn settle_written(&self) -> Result<u64, DeviceError> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let mut settled = 0;
        for i in 0..self.g.chunk_count() {
            if self.state(i) != WRITTEN {
                continue;
            }
            let mut buf = vec![0u8; self.g.len(i)];
            self.file
                .read_exact_at(&mut buf, self.g.offset(i))
                .map_err(io_err("cannot read replica"))?;
            let mut rec = lock(&self.records);
            match ChunkEntry::of(&buf) {
                ChunkEntry::Zero => {
                    rec.mark_zero(i).map_err(store_err)?;
                    self.set_state(i, ZERO);
                }
                ChunkEntry::Data(h) => {
                    rec.vouch(i, h).map_err(store_err)?;
                    self.set_state(i, DATA);
                }
            }
            settled += 1;
        }
        let mut rec = lock(&self.records);
        rec.commit().map_err(store_err)?;
        rec.flush().map_err(store_err)?;
        Ok(settled)
    }

    fn stamp(&self, range: std::ops::Range<u64>) {
        let generation = self.generation.load(Ordering::SeqCst);
        for i in range {
            self.stamps[i as usize].store(generation, Ordering::SeqCst);
        }
    }

    /// True when every chunk is local.
    pub fn is_complete(&self) -> bool {
        self.absent_chunks() == 0
    }

    /// The store holding the replica.
    pub fn store(&self) -> &Store {
        self.replica.store()
    }

    fn state(&self, i: u64) -> u8 {
        self.states[i as usize].load(Ordering::SeqCst)
    }

    fn stripe(&self, i: u64) -> usize {
        (i as usize) % STRIPES
    }

    /// Lands a fetched chunk unless the chunk was written (or landed) meanwhile.
    fn land(&self, index: u64, f: &Fetched) -> Result<bool, DeviceError> {
        let _guard = lock(&self.stripes[self.stripe(index)]);
        if self.state(index) != ABSENT {
            if self.state(index) == WRITTEN {
                self.stats.discarded_stale.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(false);
        }
        let mut rec = lock(&self.records);
        if f.zero {
            self.file
                .punch_hole(self.g.offset(index), f.data.len() as u64)
                .map_err(io_err("cannot punch replica"))?;
            rec.mark_zero(index).map_err(store_err)?;
            self.set_state(index, ZERO);
        } else {
            rec.put(index, f.hash, &f.data).map_err(store_err)?;
            self.set_state(index, DATA);
        }
        if rec.commit_due() {
            rec.commit_in_background().map_err(store_err)?;
        }
        Ok(true)
    }

    /// Makes every completed write durable, with its records.
    pub fn sync(&self) -> Result<(), DeviceError> {
        if lock(&self.records).active_extents() <= ACTIVE_LIMIT {
            return lock(&self.records).flush().map_err(store_err);
        }
        // Past the limit, this flush also clears the activity log (what a crash would make
        // the next open re-check), with local writes held off.
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        lock(&self.records).retire_active().map_err(store_err)
    }

    /// Why the export stopped acknowledging writes, if it did (a failed commit or sync).
    pub fn failure(&self) -> Option<String> {
        lock(&self.records).failure().map(str::to_string)
    }

    /// True when a write of `len` bytes at `offset` replaces all of chunk `i`.
    fn covers(&self, i: u64, offset: u64, len: u64) -> bool {
        let (cs, ce) = (self.g.offset(i), self.g.offset(i) + self.g.len(i) as u64);
        offset <= cs && offset + len >= ce
    }

    /// Ensures chunks `range` are local, fetching absent ones (all at once) on the priority path.
    async fn ensure(
        self: &Arc<Self>,
        range: std::ops::Range<u64>,
        only_partial: Option<(u64, u64)>,
    ) -> Result<(), DeviceError> {
        let mut need = Vec::new();
        for i in range {
            if self.state(i) != ABSENT {
                continue;
            }
            if let Some((off, len)) = only_partial {
                if self.covers(i, off, len) {
                    continue; // fully overwritten: no need for the old bytes
                }
            }
            need.push(i);
        }
        if need.is_empty() {
            return Ok(());
        }
        let Some(remote) = &self.remote else {
            return Err(DeviceError::io(format!(
                "chunk {} of {:?} is absent and this export has no source (--from)",
                need[0], self.name
            )));
        };
        remote.waiting_reads.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        let deadline = start + remote.timeout;
        let results = futures::future::join_all(
            need.iter()
                .map(|&i| self.clone().demand(i, true, Some(deadline))),
        )
        .await;
        remote.waiting_reads.fetch_sub(1, Ordering::SeqCst);
        self.stats.demand_wait(start.elapsed().as_micros() as u64);
        results.into_iter().collect()
    }

    /// Fetches chunk `index` unless already local, sharing a fetch in flight.
    async fn demand(
        self: Arc<Self>,
        index: u64,
        priority: bool,
        deadline: Option<Instant>,
    ) -> Result<(), DeviceError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        loop {
            if self.state(index) != ABSENT {
                return Ok(());
            }
            let mut rx = {
                let mut m = lock(&remote.inflight);
                match m.get(&index) {
                    Some(tx) => tx.subscribe(),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        m.insert(index, tx);
                        tokio::spawn(self.clone().fetch_once(index, priority));
                        rx
                    }
                }
            };
            // A read waits no longer than its deadline, even on a fetch that never ends (a
            // source that went silent: the fetcher notices only after its own timeout).
            let wait = async {
                match rx.wait_for(|o| o.is_some()).await {
                    Ok(v) => v.clone().unwrap_or(Ok(())),
                    Err(_) => Err(DeviceError::io("fetch task vanished")),
                }
            };
            let outcome = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), wait)
                    .await
                    .unwrap_or_else(|_| Err(DeviceError::io("the source sent nothing in time"))),
                None => wait.await,
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) => match deadline {
                    Some(d) if Instant::now() < d => {
                        tokio::time::sleep(Duration::from_millis(100).min(d - Instant::now())).await;
                    }
                    _ => {
                        return Err(DeviceError::io(format!(
                            "chunk {index} of {:?} is not local and the source {} cannot provide it: {}",
                            self.name, remote.addr, e.message
                        )))
                    }
                },
            }
        }
    }

    async fn fetch_once(self: Arc<Self>, index: u64, priority: bool) {
        // Invariant: only called when remote is set.
        let Some(remote) = &self.remote else { return };
        let fetcher = if priority {
            &remote.demand
        } else {
            &remote.background
        };
        let result = match fetcher.request(index).await {
            Err(e) => Err(DeviceError::io(e.to_string())),
            Ok(frame) => {
                let this = self.clone();
                // Decode, verify and land: for a waiting read at once, for the background copy
                // on the low-priority thread so that it never delays reads.
                let work = move || -> Result<(bool, u64, u64), DeviceError> {
                    let Some(remote) = &this.remote else {
                        return Err(DeviceError::io("no source"));
                    };
                    let fetcher = if priority {
                        &remote.demand
                    } else {
                        &remote.background
                    };
                    let f = fetcher
                        .verify(index, frame)
                        .map_err(|e| DeviceError::io(e.to_string()))?;
                    let landed = this.land(index, &f)?;
                    Ok((landed, f.data.len() as u64, f.wire_bytes))
                };
                let out = if priority {
                    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
                        Err(DeviceError::io(format!("landing task failed: {e}")))
                    })
                } else {
                    remote
                        .low
                        .run(work)
                        .await
                        .unwrap_or_else(|| Err(DeviceError::io("copier thread is gone")))
                };
                out.map(|(landed, len, wire)| {
                    self.stats.wire_bytes.fetch_add(wire, Ordering::Relaxed);
                    if !priority {
                        remote.background_wire.fetch_add(wire, Ordering::Relaxed);
                    }
                    if landed && !priority {
                        self.stats.background_chunks.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .background_bytes
                            .fetch_add(len, Ordering::Relaxed);
                    }
                })
            }
        };
        if let Some(tx) = lock(&remote.inflight).remove(&index) {
            let _ = tx.send(Some(result));
        }
    }

    /// Pulls every absent chunk, yielding to reads, until the replica is complete; then
    /// releases the source. Retries forever while the source is away.
    pub async fn background_copy(self: Arc<Self>) {
        let Some(remote) = &self.remote else { return };
        let slots = Arc::new(tokio::sync::Semaphore::new(BACKGROUND_IN_FLIGHT));
        let mut pause = Duration::from_millis(200);
        let (mut charged, mut done_chunks) = (0u64, 0u64);
        while !self.is_complete() {
            let failures = Arc::new(AtomicU64::new(0));
            for index in 0..self.g.chunk_count() {
                if self.state(index) != ABSENT {
                    continue;
                }
                // Reads waiting on the source go first.
                while remote.waiting_reads.load(Ordering::SeqCst) > 0 {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
                if let Some(bucket) = &remote.bucket {
                    // Charged an estimate before asking, settled with the real wire bytes.
                    let used = remote.background_wire.load(Ordering::Relaxed);
                    bucket.settle(used as i64 - charged as i64);
                    done_chunks += 1;
                    let estimate = match used {
                        0 => self.g.chunk_size as u64,
                        _ => used / done_chunks,
                    };
                    bucket.take(estimate).await;
                    charged = used + estimate;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (this, failed) = (self.clone(), failures.clone());
                tokio::spawn(async move {
                    if this.demand(index, false, None).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
                if failures.load(Ordering::Relaxed) > 0 {
                    break; // the source is away: wait, then start a new pass
                }
            }
            let _ = slots
                .acquire_many(BACKGROUND_IN_FLIGHT as u32)
                .await
                .map(drop);
            if failures.load(Ordering::Relaxed) > 0 {
                tracing::warn!(disk = %self.name, source = %remote.addr, retry_in = ?pause, "background copy cannot reach the source; will retry");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            } else {
                pause = Duration::from_millis(200);
            }
        }
        if let Err(e) = tokio::task::spawn_blocking({
            let this = self.clone();
            move || this.sync()
        })
        .await
        .unwrap_or_else(|e| Err(DeviceError::io(e.to_string())))
        {
            tracing::error!(disk = %self.name, error = %e, "cannot sync the completed replica");
        }
        remote.demand.close().await;
        remote.background.close().await;
        remote.released.store(true, Ordering::SeqCst);
        tracing::info!(disk = %self.name, source = %remote.addr, "replica complete; source connections released");
    }

    /// A status snapshot.
    pub fn status(&self, nbd: &str, background_rate: f64) -> status::Status {
        let mut absent_bytes = 0;
        for i in 0..self.g.chunk_count() {
            if self.state(i) == ABSENT {
                absent_bytes += self.g.len(i) as u64;
            }
        }
        let waits = lock(&self.stats.recent_waits).clone();
        let fetches = self.stats.demand_fetches.load(Ordering::Relaxed);
        let complete = absent_bytes == 0;
        status::Status {
            disk: self.name.clone(),
            pid: std::process::id(),
            nbd: nbd.to_string(),
            source: self.remote.as_ref().map(|r| r.addr.clone()),
            size_bytes: self.g.size,
            present_bytes: self.g.size - absent_bytes,
            absent_bytes,
            written_bytes: self.written.load(Ordering::Relaxed) * self.g.chunk_size as u64,
            background_rate,
            eta_s: (!complete && background_rate > 0.0)
                .then(|| absent_bytes as f64 / background_rate),
            on_demand_fetches: fetches,
            on_demand_mean_ms: if fetches > 0 {
                self.stats.demand_wait_us.load(Ordering::Relaxed) as f64 / fetches as f64 / 1000.0
            } else {
                0.0
            },
            on_demand_p50_ms: status::percentile_ms(&waits, 0.5),
            on_demand_p99_ms: status::percentile_ms(&waits, 0.99),
            wire_bytes: self.stats.wire_bytes.load(Ordering::Relaxed),
            failed: self.failure(),
            complete: complete
                && self
                    .remote
                    .as_ref()
                    .is_none_or(|r| r.released.load(Ordering::SeqCst)),
            updated_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }

    fn lock_stripes(&self, range: std::ops::Range<u64>) -> Vec<std::sync::MutexGuard<'_, ()>> {
        let mut ids: Vec<usize> = range.map(|i| self.stripe(i)).collect();
        ids.sort_unstable();
        ids.dedup();
        // Sorted order: two writers never wait on each other's stripes in a cycle.
        ids.into_iter().map(|s| lock(&self.stripes[s])).collect()
    }

    /// Moves chunk `i` to state `new`, keeping the counters.
    fn set_state(&self, i: u64, new: u8) {
        let old = self.states[i as usize].swap(new, Ordering::SeqCst);
        if old == ABSENT && new != ABSENT {
            self.absent.fetch_sub(1, Ordering::SeqCst);
        }
        if old != WRITTEN && new == WRITTEN {
            self.written.fetch_add(1, Ordering::Relaxed);
        }
        if old == WRITTEN && new != WRITTEN {
            self.written.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Records chunk `i`, whose bytes the caller has written, as `new` (ZERO or WRITTEN).
    fn mark(&self, i: u64, new: u8) -> Result<(), DeviceError> {
        let mut rec = lock(&self.records);
        match new {
            ZERO => rec.mark_zero(i),
            _ => rec.mark_written(i),
        }
        .map_err(store_err)?;
        self.set_state(i, new);
        Ok(())
    }

    /// Before a local write changes chunks `range` (their stripes and the gate held):
    /// refuses once the store has failed, keeps the space reserve for `len` bytes that may
    /// allocate, and covers the chunks whose records vouch for their bytes with the activity
    /// log (durably; they are recorded `Written`).
    fn before_local_write(&self, range: std::ops::Range<u64>, len: u64) -> Result<(), DeviceError> {
        let vouching: Vec<u64> = range
            .filter(|&i| matches!(self.state(i), DATA | ZERO))
            .collect();
        let mut rec = lock(&self.records);
        rec.activate_for_write(&vouching).map_err(store_err)?;
        self.replica.note_write();
        for i in vouching {
            self.set_state(i, WRITTEN);
        }
        rec.reserve(len).map_err(store_err)
    }

    fn apply_write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let range = self.g.chunks_touching(offset, data.len() as u64);
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let _guards = self.lock_stripes(range.clone());
        self.before_local_write(range.clone(), data.len() as u64)?;
        // Bytes first, marks after: a chunk marked over bytes that never landed would read
        // as a hole after a crash.
        self.file
            .write_all_at(data, offset)
            .map_err(io_err("cannot write replica"))?;
        for i in range.clone() {
            if self.state(i) != WRITTEN {
                self.mark(i, WRITTEN)?;
            }
        }
        self.stamp(range);
        Ok(())
    }

    fn apply_zero(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), DeviceError> {
        let range = self.g.chunks_touching(offset, len);
        let _gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let _guards = self.lock_stripes(range.clone());
        // Punching frees space; only ranges kept allocated may need it.
        self.before_local_write(range.clone(), if no_hole { len } else { 0 })?;
        // Whole chunks are punched (unless NO_HOLE), partial ones zeroed in place and kept
        // allocated, as their state reports; each run of either is one fallocate (one per
        // chunk made concurrent requests queue on the inode's lock: an upload with zero
        // regions lost a third of its rate).
        let punch = |i: u64| self.covers(i, offset, len) && !no_hole;
        let mut i = range.start;
        while i < range.end {
            let kind = punch(i);
            let mut j = i + 1;
            while j < range.end && punch(j) == kind {
                j += 1;
            }
            let s = offset.max(self.g.offset(i));
            let e = (offset + len).min(self.g.offset(j - 1) + self.g.len(j - 1) as u64);
            if kind {
                self.file
                    .punch_hole(s, e - s)
                    .map_err(io_err("cannot punch replica"))?;
            } else {
                self.file
                    .zero_range(s, e - s)
                    .map_err(io_err("cannot zero replica"))?;
            }
            for c in i..j {
                match kind {
                    true => self.mark(c, ZERO)?,
                    false if self.state(c) != WRITTEN => self.mark(c, WRITTEN)?,
                    false => {}
                }
            }
            i = j;
        }
        self.stamp(range);
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ReplicaDevice) -> Result<T, DeviceError> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .unwrap_or_else(|e| Err(DeviceError::io(format!("I/O task failed: {e}"))))
    }
}

/// The NBD face of a replica. Wrapped in a newtype so the device methods can take `Arc<Self>`.
pub struct Exported(pub Arc<ReplicaDevice>);

impl Device for Exported {
    fn size(&self) -> u64 {
        self.0.g.size
    }

    fn read_only(&self) -> bool {
        self.0.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        let dev = &self.0;
        let range = dev.g.chunks_touching(offset, len as u64);
        if dev.remote.is_some() {
            // Sequential reader: fetch ahead of it while it consumes this request.
            if dev
                .last_read_end
                .swap(offset + len as u64, Ordering::Relaxed)
                == offset
            {
                let ahead = (range.end - range.start).clamp(4, 32) * 2;
                for i in range.end..(range.end + ahead).min(dev.g.chunk_count()) {
                    if dev.state(i) == ABSENT {
                        tokio::spawn(dev.clone().demand(i, true, None));
                    }
                }
            }
            dev.ensure(range, None).await?;
        } else if range.clone().any(|i| dev.state(i) == ABSENT) {
            dev.ensure(range, None).await?;
        }
        if len <= INLINE_READ {
            // Small reads are page-cache hits in the common case (a microsecond): a hop to the
            // blocking pool would cost more than the read itself.
            let mut buf = vec![0u8; len as usize];
            dev.file
                .read_exact_at(&mut buf, offset)
                .map_err(io_err("cannot read replica"))?;
            return Ok(buf);
        }
        dev.blocking(move |d| {
            let mut buf = vec![0u8; len as usize];
            d.file
                .read_exact_at(&mut buf, offset)
                .map_err(io_err("cannot read replica"))?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        let dev = &self.0;
        let len = data.len() as u64;
        dev.ensure(dev.g.chunks_touching(offset, len), Some((offset, len)))
            .await?;
        dev.blocking(move |d| {
            d.apply_write(offset, &data)?;
            if fua {
                d.sync()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let dev = &self.0;
        dev.ensure(
            dev.g.chunks_touching(offset, len as u64),
            Some((offset, len as u64)),
        )
        .await?;
        dev.blocking(move |d| {
            d.apply_zero(offset, len as u64, no_hole)?;
            if fua {
                d.sync()?;
            }
            Ok(())
        })
        .await
    }

    fn zeroing_is_fast(&self, offset: u64, len: u32) -> bool {
        // An absent chunk zeroed only in part needs its other bytes from the source first.
        let dev = &self.0;
        dev.g
            .chunks_touching(offset, len as u64)
            .all(|i| dev.state(i) != ABSENT || dev.covers(i, offset, len as u64))
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len, false, fua).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.0.blocking(|d| d.sync()).await
    }

    async fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        let dev = &self.0;
        dev.ensure(dev.g.chunks_touching(offset, len as u64), None)
            .await
    }

    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        let dev = &self.0;
        let end = offset + len as u64;
        let mut out: Vec<Extent> = Vec::new();
        for i in dev.g.chunks_touching(offset, len as u64) {
            let s = offset.max(dev.g.offset(i));
            let e = end.min(dev.g.offset(i) + dev.g.len(i) as u64);
            let flags = if dev.state(i) == ZERO {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            match out.last_mut() {
                Some(last)
                    if last.flags == flags && last.length as u64 + (e - s) <= u32::MAX as u64 =>
                {
                    last.length += (e - s) as u32
                }
                _ => out.push(Extent {
                    length: (e - s) as u32,
                    flags,
                }),
            }
        }
        Ok(out)
    }
}
