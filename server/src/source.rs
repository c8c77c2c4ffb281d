//! The replication source: serves each disk's manifest and chunks.
//!
//! Every chunk is read, hashed and compressed when requested, and the hash sent is the hash of
//! the bytes actually read. If the image changed since the manifest was built, the destination
//! sees a chunk whose hash differs from the manifest's, never bytes mislabelled as old content.

use crate::listen::{self, Acceptor};
use crate::planned::{Planned, PlannedChunks};
use crate::tracked::Tracker;
use blockstore::Image;
use bytes::Bytes;
use protocol::codec;
use protocol::conn::Io;
use protocol::{
    ChunkEntry, Conn, ConnError, DiskInfo, Encoding, ErrorKind, Frame, FrameWriter, Geometry,
    Message,
};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

/// Manifest entries per `Manifest` frame (about 1 MiB before compression).
pub const MANIFEST_PAGE: u32 = 32 * 1024;
/// Chunk reads queued per connection (beyond it the session stops reading requests).
const READS_PER_CONN: usize = 32;

/// A disk served by the source.
pub struct SourceDisk {
    /// Its name.
    pub name: String,
    /// The image.
    pub image: Image,
    /// Its geometry.
    pub geometry: Geometry,
    /// Its manifest, kept current for chunks written through the tracked NBD export.
    pub manifest: RwLock<Manifest>,
    /// Write tracking, when the disk is served to its VM through `--nbd`.
    pub tracker: Option<Arc<Tracker>>,
    /// Dirty extents come from the QEMU dirty bitmap of the NBD image instead.
    pub bitmap: bool,
    /// The chunks the latest sync plan read, for that round's requests.
    pub planned: PlannedChunks,
}

/// A manifest and what it is current to.
pub struct Manifest {
    /// One entry per chunk.
    pub entries: Vec<ChunkEntry>,
    /// blake3 over the entries.
    pub digest: protocol::ChunkHash,
    /// Writes stamped with this generation or earlier are reflected in the entries.
    pub generation: u64,
}

impl Manifest {
    /// A manifest of `entries`, current to `generation`.
    pub fn new(entries: Vec<ChunkEntry>, generation: u64) -> Manifest {
        let digest = blockstore::scan::digest(&entries);
        Manifest {
            entries,
            digest,
            generation,
        }
    }
}

impl SourceDisk {
    /// What destinations are told about it.
    pub fn info(&self) -> DiskInfo {
        DiskInfo {
            name: self.name.clone(),
            geometry: self.geometry,
            manifest_digest: read_lock(&self.manifest).digest,
        }
    }
}

/// The source agent.
pub struct Source {
    /// Disks by name; an agent adds and removes them at run time.
    disks: RwLock<HashMap<String, Arc<SourceDisk>>>,
    /// What was sent to each peer agent (by the name in its hello).
    sent: std::sync::Mutex<HashMap<String, Arc<Sent>>>,
    /// The agent's VM side, when the source is an agent's.
    vm_peer: std::sync::OnceLock<Arc<dyn crate::vmpeer::VmPeer>>,
    agent: String,
    level: i32,
}

impl Source {
    /// A source serving `disks`, compressing at zstd `level`.
    pub fn new(disks: Vec<SourceDisk>, agent: impl Into<String>, level: i32) -> Arc<Source> {
        Arc::new(Source {
            disks: RwLock::new(
                disks
                    .into_iter()
                    .map(|d| (d.name.clone(), Arc::new(d)))
                    .collect(),
            ),
            sent: Default::default(),
            vm_peer: std::sync::OnceLock::new(),
            agent: agent.into(),
            level,
        })
    }

    /// Lets peer agents prepare incoming VMs here and tunnel their migration streams (set once).
    pub fn set_vm_peer(&self, p: Arc<dyn crate::vmpeer::VmPeer>) {
        let _ = self.vm_peer.set(p);
    }

    fn vm_peer(&self) -> Option<Arc<dyn crate::vmpeer::VmPeer>> {
        self.vm_peer.get().cloned()
    }

    /// Chunks and bytes (payloads) sent to each peer agent since the source started.
    pub fn sent(&self) -> Vec<(String, u64, u64)> {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        sent.iter()
            .map(|(k, v)| {
                let (c, b) = (
                    v.chunks.load(Ordering::Relaxed),
                    v.bytes.load(Ordering::Relaxed),
                );
                (k.clone(), c, b)
            })
            .collect()
    }

    /// Serves `disk` too (replacing a disk of the same name; sessions that opened the old one
    /// keep it until they reopen).
    pub fn add_disk(&self, disk: Arc<SourceDisk>) {
        write_lock(&self.disks).insert(disk.name.clone(), disk);
    }

    /// Stops serving disk `name` to new sessions; returns it if it was served.
    pub fn remove_disk(&self, name: &str) -> Option<Arc<SourceDisk>> {
        write_lock(&self.disks).remove(name)
    }

    /// The disk named `name`, if served.
    pub fn disk(&self, name: &str) -> Option<Arc<SourceDisk>> {
        read_lock(&self.disks).get(name).cloned()
    }

    /// Serves connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, acceptor: Acceptor) {
        let acceptor = Arc::new(acceptor);
        let slots = Arc::new(tokio::sync::Semaphore::new(listen::MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = match acceptor.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = listen::admit(&slots, &peer.to_string(), "replication") else {
                continue;
            };
            let this = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let secured =
                    tokio::time::timeout(listen::HANDSHAKE_TIMEOUT, acceptor.secure(tcp, peer));
                let Ok(Some(io)) = secured.await else {
                    tracing::warn!(%peer, "dropped a peer that did not finish TLS in time");
                    return;
                };
                if let Err(e) = this.session(io, peer.to_string()).await {
                    match e {
                        ConnError::Closed { .. } => tracing::debug!(%peer, "peer disconnected"),
                        ConnError::Silent { .. } => {
                            tracing::debug!(%peer, "idle peer disconnected")
                        }
                        e => tracing::warn!(%peer, error = %e, "session ended"),
                    }
                }
            });
        }
    }

    async fn session(self: Arc<Self>, io: Box<dyn Io>, peer: String) -> Result<(), ConnError> {
        let mut conn = Conn::new(io, peer.clone());
        conn.set_timeout(Some(listen::HANDSHAKE_TIMEOUT));
        let hello = conn.server_hello(&self.agent).await?;
        conn.set_timeout(Some(listen::IDLE_TIMEOUT));
        // Peers name themselves; cap the map so that made-up names cannot grow it forever.
        let sent = {
            let mut all = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            let key: String = hello.text.chars().take(64).collect();
            let key = if all.len() >= 1024 && !all.contains_key(&key) {
                "(others)".to_string()
            } else {
                key
            };
            all.entry(key).or_default().clone()
        };
        let (mut reader, writer) = conn.split();
        let (tx, rx) = mpsc::channel::<Frame>(READS_PER_CONN * 2);
        let writer_task = tokio::spawn(write_frames(writer, rx));
        let served = Arc::new(AtomicU64::new(0));
        let reads = spawn_chunk_reader(&peer, tx.clone(), served.clone(), sent)?;
        let mut disk: Option<Arc<SourceDisk>> = None;
        let result = loop {
            let frame = match reader.recv().await {
                Ok(f) => f,
                Err(e) => break Err(e),
            };
            let reply = match frame.msg {
                Message::ListDisks => {
                    let mut list: Vec<_> =
                        read_lock(&self.disks).values().map(|d| d.info()).collect();
                    list.sort_by(|a, b| a.name.cmp(&b.name));
                    Frame::new(Message::Disks(list))
                }
                Message::Open { disk: name } => match self.disk(&name) {
                    Some(d) => {
                        disk = Some(d.clone());
                        Frame::new(Message::Opened(d.info()))
                    }
                    None => {
                        let mut names: Vec<_> = read_lock(&self.disks).keys().cloned().collect();
                        names.sort();
                        error_frame(
                            None,
                            ErrorKind::UnknownDisk,
                            format!(
                                "no disk named {name:?} is served here (served: {})",
                                names.join(", ")
                            ),
                        )
                    }
                },
                Message::GetManifest { id, start, count } => match &disk {
                    None => error_frame(Some(id), ErrorKind::NotOpen, "open a disk first".into()),
                    Some(d) => manifest_page(d, id, start, count),
                },
                Message::GetChunk {
                    id,
                    index,
                    compress,
                    round,
                } => match &disk {
                    None => error_frame(Some(id), ErrorKind::NotOpen, "open a disk first".into()),
                    Some(d) if index >= d.geometry.chunk_count() => error_frame(
                        Some(id),
                        ErrorKind::OutOfRange,
                        format!(
                            "chunk {index} is beyond disk {:?} ({} chunks)",
                            d.name,
                            d.geometry.chunk_count()
                        ),
                    ),
                    Some(d) => {
                        // Bounded: a peer cannot queue unlimited reads.
                        let read = ChunkRead {
                            disk: d.clone(),
                            id,
                            index,
                            level: compress.then_some(self.level),
                            round,
                        };
                        if reads.send(read).await.is_err() {
                            break Ok(());
                        }
                        continue;
                    }
                },
                Message::Ping { id } => Frame::new(Message::Pong { id }),
                Message::VmIncoming { spec } => crate::vmpeer::incoming(self.vm_peer(), spec).await,
                Message::VmIncomingAbort { vm } => {
                    crate::vmpeer::abort_incoming(self.vm_peer(), vm).await
                }
                Message::VmCheck { spec } => crate::vmpeer::check(self.vm_peer(), spec).await,
                Message::VmSwitchover { vm, disks } => {
                    crate::vmpeer::switchover(self.vm_peer(), vm, disks, &frame.payload).await
                }
                msg @ (Message::JobStart { .. }
                | Message::JobQuery { .. }
                | Message::JobCancel { .. }
                | Message::ExportInvalidate { .. }) => {
                    crate::vmpeer::jobs(self.vm_peer(), msg).await
                }
                msg @ (Message::DiskPatch { .. }
                | Message::DiskPatchBatch { .. }
                | Message::PatchCommit { .. }) => {
                    match crate::vmpeer::patch(self.vm_peer(), msg, frame.payload.clone()).await {
                        Some(answer) => answer,
                        None => continue,
                    }
                }
                Message::Tunnel { vm } => {
                    break crate::vmpeer::tunnel(self.vm_peer(), &vm, &mut reader, &tx).await;
                }
                msg @ (Message::Register { .. }
                | Message::SyncBegin { .. }
                | Message::SyncDone { .. }
                | Message::DirtyQuery { .. }) => match &disk {
                    None => error_frame(None, ErrorKind::NotOpen, "open a disk first".into()),
                    Some(d) => {
                        let d = d.clone();
                        tokio::task::spawn_blocking(move || d.sync_request(msg))
                            .await
                            .unwrap_or_else(|e| {
                                error_frame(
                                    None,
                                    ErrorKind::ImageRead,
                                    format!("sync task failed: {e}"),
                                )
                            })
                    }
                },
                other => {
                    tracing::warn!(%peer, message = ?other, "unexpected message; closing");
                    let _ = tx
                        .send(error_frame(
                            None,
                            ErrorKind::BadRequest,
                            "unexpected message".into(),
                        ))
                        .await;
                    break Ok(());
                }
            };
            if tx.send(reply).await.is_err() {
                break Ok(());
            }
        };
        if let Err(ConnError::Malformed { detail, .. }) = &result {
            tracing::warn!(%peer, %detail, "malformed frame; closing the connection");
            let _ = tx
                .send(error_frame(
                    None,
                    ErrorKind::BadRequest,
                    format!("malformed frame: {detail}"),
                ))
                .await;
        }
        drop(tx);
        drop(reads);
        let _ = writer_task.await;
        tracing::info!(
            %peer,
            disk = disk.as_ref().map_or("-", |d| d.name.as_str()),
            served_chunks = served.load(Ordering::Relaxed),
            "session closed"
        );
        result
    }
}

fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Poisoned only if a writer panicked; entries are replaced whole, so still consistent.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl SourceDisk {
    /// Re-reads and re-hashes `chunks`, updating the manifest; returns their new entries.
    /// With `keep`, the hashes are kept for the requests of the round cut at `generation`.
    fn refresh(
        &self,
        chunks: &[u64],
        generation: u64,
        keep: bool,
    ) -> Result<Vec<(u64, ChunkEntry)>, String> {
        let tracker = self.tracker.as_ref().filter(|_| keep);
        // Parallel: a round can list thousands of chunks, and the replica waits for the plan.
        let read: Vec<(u64, ChunkEntry, Option<u64>)> = chunks
            .par_iter()
            .map(|&c| {
                let before = tracker.and_then(|t| t.settled_version(c));
                let data = self
                    .image
                    .read_chunk(&self.geometry, c)
                    .map_err(|e| e.to_string())?;
                let entry = ChunkEntry::of(&data);
                let after = tracker.and_then(|t| t.settled_version(c));
                Ok((c, entry, before.filter(|&v| after == Some(v))))
            })
            .collect::<Result<_, String>>()?;
        {
            let mut m = write_lock(&self.manifest);
            for (c, e, _) in &read {
                m.entries[*c as usize] = *e;
            }
            m.digest = blockstore::scan::digest(&m.entries);
            m.generation = m.generation.max(generation);
        }
        if tracker.is_some() {
            let planned = read.iter().filter_map(|&(c, entry, version)| {
                version.map(|version| (c, Planned { entry, version }))
            });
            self.planned.keep(generation, planned);
        }
        Ok(read.into_iter().map(|(c, e, _)| (c, e)).collect())
    }

    /// Sync requests answered from a QEMU dirty bitmap. QEMU's bitmap is not cleared through
    /// NBD, so every round lists all the extents it marks, freshly hashed; the destination
    /// skips the chunks it already holds with that content.
    fn bitmap_request(&self, msg: Message) -> Frame {
        let fail = |e: String| error_frame(None, ErrorKind::ImageRead, e);
        match msg {
            Message::Register { .. } => Frame::new(Message::Registered { generation: 0 }),
            Message::SyncBegin { .. } => {
                let extents = match self.image.dirty_extents() {
                    Ok(e) => e,
                    Err(e) => return fail(e.to_string()),
                };
                let mut chunks: Vec<u64> = extents
                    .iter()
                    .flat_map(|&(off, len)| self.geometry.chunks_touching(off, len))
                    .collect();
                chunks.sort_unstable();
                chunks.dedup();
                // Not kept: every round of a bitmap source is generation 0, so a request could
                // not tell this plan's bytes from an older one's.
                match self.refresh(&chunks, 0, false) {
                    Ok(fresh) => plan_frame(&fresh, 0, 0),
                    Err(e) => fail(e),
                }
            }
            Message::SyncDone { .. } => Frame::new(Message::SyncDoneOk),
            // QEMU's bitmap holds every write since it was added, not since this replica's
            // last round: what the replica lacks cannot be told from it.
            Message::DirtyQuery { .. } => Frame::new(Message::Dirty {
                chunks: protocol::DIRTY_UNKNOWN,
                bytes: protocol::DIRTY_UNKNOWN,
            }),
            _ => fail("not a sync request".into()),
        }
    }

    /// Handles the sync-related requests of a tracked disk (blocking: reads and hashes).
    fn sync_request(&self, msg: Message) -> Frame {
        if self.bitmap {
            return self.bitmap_request(msg);
        }
        let Some(t) = &self.tracker else {
            // Seeding works without tracking (generation 0); only sync rounds need it.
            if matches!(msg, Message::Register { .. }) {
                return Frame::new(Message::Registered { generation: 0 });
            }
            return error_frame(
                None,
                ErrorKind::NotTracked,
                format!("disk {:?} is served without write tracking: start `helio source` with --nbd and let the VM write through it", self.name),
            );
        };
        let fail = |e: String| error_frame(None, ErrorKind::ImageRead, e);
        let not_registered = || {
            error_frame(
                None,
                ErrorKind::NotRegistered,
                format!("this replica of {:?} is not registered with the source: seed it first (`helio seed`)", self.name),
            )
        };
        match msg {
            Message::Register { replica } => {
                let cut = match t.cut() {
                    Ok(c) => c,
                    Err(e) => return fail(e.message),
                };
                let since = read_lock(&self.manifest).generation;
                if let Err(e) = self.refresh(&t.written_between(since, cut), cut, false) {
                    return fail(e);
                }
                match t.set_synced(&replica, cut) {
                    Ok(()) => Frame::new(Message::Registered { generation: cut }),
                    Err(e) => fail(e.message),
                }
            }
            Message::SyncBegin { replica } => {
                let since = match t.synced(&replica) {
                    Ok(Some(g)) => g,
                    Ok(None) => return not_registered(),
                    Err(e) => return fail(e.message),
                };
                let cut = match t.cut() {
                    Ok(c) => c,
                    Err(e) => return fail(e.message),
                };
                let fresh = match self.refresh(&t.written_between(since, cut), cut, true) {
                    Ok(f) => f,
                    Err(e) => return fail(e),
                };
                plan_frame(&fresh, cut, since)
            }
            Message::SyncDone {
                replica,
                generation,
            } => {
                self.planned.forget(generation);
                let current = t.synced(&replica).ok().flatten().unwrap_or(0);
                match t.set_synced(&replica, generation.max(current)) {
                    Ok(()) => Frame::new(Message::SyncDoneOk),
                    Err(e) => fail(e.message),
                }
            }
            Message::DirtyQuery { replica } => match t.synced(&replica) {
                Ok(Some(g)) => {
                    let chunks = t.written_since(g);
                    Frame::new(Message::Dirty {
                        chunks,
                        bytes: chunks * self.geometry.chunk_size as u64,
                    })
                }
                Ok(None) => not_registered(),
                Err(e) => fail(e.message),
            },
            _ => fail("not a sync request".into()),
        }
    }
}

/// A `SyncPlan` listing `fresh` chunks.
fn plan_frame(fresh: &[(u64, ChunkEntry)], generation: u64, since: u64) -> Frame {
    let mut raw = Vec::with_capacity(fresh.len() * (8 + ChunkEntry::ENCODED_LEN));
    for (c, e) in fresh {
        raw.extend_from_slice(&c.to_be_bytes());
        e.encode(&mut raw);
    }
    match zstd::bulk::compress(&raw, 1) {
        Ok(z) => Frame::with_payload(
            Message::SyncPlan {
                generation,
                since,
                count: fresh.len() as u32,
            },
            Bytes::from(z),
        ),
        Err(e) => error_frame(
            None,
            ErrorKind::ImageRead,
            format!("cannot compress the sync plan: {e}"),
        ),
    }
}

fn error_frame(id: Option<u64>, kind: ErrorKind, message: String) -> Frame {
    Frame::new(Message::Error { id, kind, message })
}

fn manifest_page(d: &SourceDisk, id: u64, start: u64, count: u32) -> Frame {
    let m = read_lock(&d.manifest);
    let n = m.entries.len() as u64;
    let count = count.min(MANIFEST_PAGE) as u64;
    if start > n {
        return error_frame(
            Some(id),
            ErrorKind::OutOfRange,
            format!(
                "manifest of {:?} has {n} entries, asked from {start}",
                d.name
            ),
        );
    }
    let end = (start + count).min(n);
    let mut raw = Vec::with_capacity((end - start) as usize * ChunkEntry::ENCODED_LEN);
    for e in &m.entries[start as usize..end as usize] {
        e.encode(&mut raw);
    }
    let payload = match zstd::bulk::compress(&raw, 1) {
        Ok(z) => z,
        Err(e) => {
            return error_frame(
                Some(id),
                ErrorKind::ImageRead,
                format!("cannot compress manifest: {e}"),
            )
        }
    };
    Frame::with_payload(
        Message::Manifest {
            id,
            start,
            count: (end - start) as u32,
        },
        Bytes::from(payload),
    )
}

/// One chunk a peer asked for.
struct ChunkRead {
    disk: Arc<SourceDisk>,
    id: u64,
    index: u64,
    level: Option<i32>,
    round: Option<u64>,
}

/// What a source sent one peer.
#[derive(Default)]
pub struct Sent {
    chunks: AtomicU64,
    bytes: AtomicU64,
}

/// Starts a session's chunk reader: reads, hashes and compresses the chunks asked for, in
/// order, on a thread of its own, and queues their replies. Reads used to go one by one to the
/// blocking pool: on two cores the wake-up of a pool thread per 64 KiB chunk cost more CPU than
/// reading and hashing it (a third of the source's time in a loopback seed).
fn spawn_chunk_reader(
    peer: &str,
    replies: mpsc::Sender<Frame>,
    served: Arc<AtomicU64>,
    sent: Arc<Sent>,
) -> Result<mpsc::Sender<ChunkRead>, ConnError> {
    let (tx, mut rx) = mpsc::channel::<ChunkRead>(READS_PER_CONN);
    std::thread::Builder::new()
        .name("chunk-reader".into())
        .spawn(move || {
            while let Some(r) = rx.blocking_recv() {
                let frame = read_chunk(&r);
                let bytes = frame.payload.len() as u64;
                if replies.blocking_send(frame).is_err() {
                    return;
                }
                served.fetch_add(1, Ordering::Relaxed);
                sent.chunks.fetch_add(1, Ordering::Relaxed);
                sent.bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        })
        .map_err(|source| ConnError::Io {
            peer: peer.to_string(),
            source,
        })?;
    Ok(tx)
}

fn read_chunk(r: &ChunkRead) -> Frame {
    let (d, id, index) = (&r.disk, r.id, r.index);
    let planned = r.round.and_then(|g| d.planned.take(g, index));
    let data = match read_image(d, id, index) {
        Ok(data) => data,
        Err(frame) => return frame,
    };
    // The plan's hash holds if no write to the chunk began since the plan read it.
    let unchanged = |p: &Planned| {
        let now = d.tracker.as_ref().and_then(|t| t.settled_version(index));
        now == Some(p.version)
    };
    let entry = match planned {
        Some(p) if unchanged(&p) => p.entry,
        _ => ChunkEntry::of(&data),
    };
    chunk_frame(id, index, entry, Bytes::from(data), r.level)
}

/// The reply carrying chunk `index` (`data`, whose entry is `entry`), compressed at `level`.
fn chunk_frame(id: u64, index: u64, entry: ChunkEntry, data: Bytes, level: Option<i32>) -> Frame {
    let (hash, encoding, payload) = match entry {
        ChunkEntry::Zero => (protocol::ChunkHash::of(&data), Encoding::Zero, Bytes::new()),
        ChunkEntry::Data(hash) => match level.and_then(|l| codec::compress(&data, l)) {
            Some(z) => (hash, Encoding::Zstd, Bytes::from(z)),
            None => (hash, Encoding::Raw, data),
        },
    };
    Frame::with_payload(
        Message::Chunk {
            id,
            index,
            hash,
            encoding,
        },
        payload,
    )
}

fn read_image(d: &SourceDisk, id: u64, index: u64) -> Result<Vec<u8>, Frame> {
    d.image.read_chunk(&d.geometry, index).map_err(|e| match e {
        blockstore::StoreError::Truncated { detail, .. } => {
            tracing::error!(disk = %d.name, index, %detail, "image is shorter than its manifest");
            error_frame(
                Some(id),
                ErrorKind::ImageTruncated,
                format!("image of disk {:?} is shorter than its manifest ({detail}); restart the source to rescan it", d.name),
            )
        }
        e => error_frame(Some(id), ErrorKind::ImageRead, e.to_string()),
    })
}

async fn write_frames(mut writer: FrameWriter, mut rx: mpsc::Receiver<Frame>) {
    while let Some(frame) = rx.recv().await {
        if writer.feed(&frame).await.is_err() {
            return;
        }
        // Flush once the queue is drained, so bursts leave in few syscalls.
        while let Ok(more) = rx.try_recv() {
            if writer.feed(&more).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}
