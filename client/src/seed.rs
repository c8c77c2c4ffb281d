//! `helio seed`: replicate a disk from a source agent into the local store.
//!
//! 1. Plan against the store: zero chunks are recorded without a transfer, chunks already present
//!    with the right content are kept, content held by any disk of the store is copied locally,
//!    and each distinct remaining content is fetched once (its duplicates are copied after it lands).
//! 2. Fetch over `streams` connections, each keeping a window of requests in flight.
//! 3. Verify every chunk (blake3 of the decoded bytes against the hash the source read) and hand it
//!    to one writer thread, which makes chunks durable in batches ([`blockstore::ChunkWriter`]).
//!
//! Anything not committed when the process dies is simply fetched by the next run.

use crate::session::{fetch_manifest, Peer, SessionError};
use crate::window::Window;
use blockstore::{ChunkState, ChunkWriter, Replica, Store, StoreError};
use protocol::{codec, ChunkEntry, ChunkHash, ConnError, Encoding, Frame, Geometry, Message};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wan::{Rate, TokenBucket};

/// A chunk that fails verification this many times ends the seed.
const MAX_MISMATCHES: u32 = 3;

/// What to seed and how.
#[derive(Clone)]
pub struct SeedOptions {
    /// The source agent.
    pub peer: Peer,
    /// The disk's name.
    pub name: String,
    /// Cap on the WAN rate.
    pub bandwidth: Option<Rate>,
    /// Parallel connections.
    pub streams: usize,
    /// Reconnection attempts per stream before giving up on the source.
    pub retries: u32,
    /// When chunks travel compressed.
    pub compress: Compress,
}

/// When chunk payloads are compressed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compress {
    /// On a WAN (round trip of 2 ms or more, or a bandwidth cap): there the link is the
    /// bottleneck and zstd multiplies it; on a LAN the CPU is, and compression only costs.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl std::str::FromStr for Compress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compress::Auto),
            "always" => Ok(Compress::Always),
            "never" => Ok(Compress::Never),
            _ => Err(format!("{s:?}: expected auto, always or never")),
        }
    }
}

/// Round trips at or above this mean a WAN, where compression pays.
pub const WAN_RTT: Duration = Duration::from_millis(2);

/// Live counters, for a progress bar.
#[derive(Debug, Default)]
pub struct SeedProgress {
    /// Disk size.
    pub logical_total: AtomicU64,
    /// Bytes accounted for (present, zero, copied or fetched).
    pub logical_done: AtomicU64,
    /// Bytes received from the network (payloads and headers).
    pub wire_bytes: AtomicU64,
    /// Chunks in the disk.
    pub chunks_total: AtomicU64,
    /// Chunks fetched over the network.
    pub chunks_fetched: AtomicU64,
    /// Chunks copied from content already in the store.
    pub chunks_deduplicated: AtomicU64,
    /// Zero chunks.
    pub chunks_zero: AtomicU64,
    /// Chunks already present from an earlier run.
    pub chunks_present: AtomicU64,
    /// Chunks fetched again after failing verification.
    pub chunks_refetched: AtomicU64,
    /// Chunks whose content differed from the manifest (image written during the seed).
    pub chunks_changed: AtomicU64,
}

/// The outcome of a seed; `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    /// The disk's name.
    pub disk: String,
    /// Disk size in bytes.
    pub logical_bytes: u64,
    /// Bytes received over the network.
    pub wire_bytes: u64,
    /// Chunks in the disk.
    pub chunks_total: u64,
    /// Chunks fetched over the network.
    pub chunks_fetched: u64,
    /// Chunks copied locally from content already held.
    pub chunks_deduplicated: u64,
    /// Zero chunks (never stored, never sent).
    pub chunks_zero: u64,
    /// Chunks already present from an earlier run.
    pub chunks_present: u64,
    /// Chunks fetched again after failing verification.
    pub chunks_refetched: u64,
    /// Chunks whose content changed at the source since its manifest was built.
    pub chunks_changed: u64,
    /// Wall time.
    pub elapsed_s: f64,
}

/// Why a seed failed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Talking to the source failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source stayed unreachable.
    #[error("lost the source: {0} (progress is kept; run the same command again to resume)")]
    SourceLost(ConnError),
    /// A chunk kept failing verification.
    #[error("chunk {index} of {disk:?} failed verification {attempts} times: the link or the source corrupts data")]
    Corrupt {
        /// The disk.
        disk: String,
        /// The chunk.
        index: u64,
        /// How many times.
        attempts: u32,
    },
    /// The source's manifest changed under us.
    #[error("the source's manifest of {0:?} changed during the seed (its image was modified or rescanned); run the seed again")]
    ManifestChanged(String),
    /// Interrupted by the operator.
    #[error("interrupted; progress is kept, run the same command again to resume")]
    Interrupted,
}

enum Landing {
    Data {
        index: u64,
        hash: ChunkHash,
        data: bytes::Bytes,
        dups: Vec<u64>,
    },
    Zero {
        index: u64,
    },
}

struct Shared {
    name: String,
    geometry: Geometry,
    /// The manifest digest streams must find, when the transfer depends on it.
    digest: Option<ChunkHash>,
    /// The sync round fetched, if any (the source may answer from what its plan read).
    round: Option<u64>,
    manifest: Arc<Entries>,
    queue: Mutex<VecDeque<u64>>,
    remaining: AtomicUsize,
    dups: Mutex<HashMap<u64, Vec<u64>>>,
    mismatches: Mutex<HashMap<u64, u32>>,
    progress: Arc<SeedProgress>,
    bucket: Option<TokenBucket>,
    compress: Compress,
    /// Average wire bytes per fetched chunk, to charge the bandwidth cap before asking.
    wire_per_chunk: AtomicU64,
    /// The smallest round trip any stream measured (ns), for `--compress auto`.
    best_rtt_ns: AtomicU64,
    landing: mpsc::Sender<Landing>,
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a stream task panicked; its state is still consistent for us.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Seeds `opts.name` into `store`. `progress` is updated as it goes; `cancel` stops it cleanly.
pub async fn seed(
    store: &Store,
    opts: SeedOptions,
    progress: Arc<SeedProgress>,
    cancel: CancellationToken,
) -> Result<SeedReport, SeedError> {
    let started = Instant::now();
    let (info, manifest) = manifest_with_retries(&opts, store.id()).await?;
    let scope = Scope::Seed(manifest);
    let mut report = transfer(store, &opts, &info, scope, progress, cancel).await?;
    store
        .replica(&opts.name)?
        .mark_seeded(info.manifest_digest)?;
    store.flush_metadata()?;
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What a transfer fetches.
pub(crate) enum Scope {
    /// Every chunk of the manifest (one entry per chunk). Streams refuse a source whose
    /// manifest changed meanwhile.
    Seed(Vec<ChunkEntry>),
    /// A sync round: only `chunks`, with the entries the plan of the round cut at `generation`
    /// gave them (a live disk's manifest changes all the time; the round carries its own).
    Round {
        chunks: HashMap<u64, ChunkEntry>,
        generation: u64,
    },
}

/// The manifest entries a transfer works from: a round keeps only its own chunks', so its
/// memory follows the round's size, not the disk's (33 bytes a chunk: ~550 MB for 1 TiB).
enum Entries {
    All(Vec<ChunkEntry>),
    Listed(HashMap<u64, ChunkEntry>),
}

impl Entries {
    /// Chunk `index`'s entry; `None` for a chunk a round did not list (never asked for).
    fn get(&self, index: u64) -> Option<ChunkEntry> {
        match self {
            Entries::All(v) => v.get(index as usize).copied(),
            Entries::Listed(m) => m.get(&index).copied(),
        }
    }
}

/// Plans and fetches chunks of `opts.name` into `store`, as much as `scope` says.
pub(crate) async fn transfer(
    store: &Store,
    opts: &SeedOptions,
    info: &protocol::DiskInfo,
    scope: Scope,
    progress: Arc<SeedProgress>,
    cancel: CancellationToken,
) -> Result<SeedReport, SeedError> {
    let started = Instant::now();
    let g = info.geometry;
    let (entries, only, round) = match scope {
        Scope::Seed(manifest) => (Entries::All(manifest), None, None),
        Scope::Round { chunks, generation } => {
            let mut list: Vec<u64> = chunks.keys().copied().collect();
            list.sort_unstable();
            (Entries::Listed(chunks), Some(list), Some(generation))
        }
    };
    let entries = Arc::new(entries);
    let (total, count) = match &only {
        None => (g.size, g.chunk_count()),
        Some(list) => (
            list.iter().map(|&i| g.len(i) as u64).sum(),
            list.len() as u64,
        ),
    };
    progress.logical_total.store(total, Ordering::Relaxed);
    progress.chunks_total.store(count, Ordering::Relaxed);

    let replica = store.open_or_create(&opts.name, g)?;
    let (writer, fetch, dups) = {
        let (replica, entries, progress) = (replica.clone(), entries.clone(), progress.clone());
        let only = only.clone();
        tokio::task::spawn_blocking(move || plan(&replica, &entries, only.as_deref(), &progress))
            .await
            .map_err(|e| StoreError::Corrupt {
                path: store.dir().to_path_buf(),
                detail: format!("planning task failed: {e}"),
            })??
    };
    tracing::info!(disk = %opts.name, to_fetch = fetch.len(), "plan ready");

    let (landing_tx, landing_rx) = mpsc::channel(64);
    let writer_thread = {
        let progress = progress.clone();
        std::thread::spawn(move || land(writer, landing_rx, &progress))
    };
    let shared = Arc::new(Shared {
        name: opts.name.clone(),
        geometry: g,
        digest: round.is_none().then_some(info.manifest_digest),
        round,
        manifest: entries,
        remaining: AtomicUsize::new(fetch.len()),
        queue: Mutex::new(fetch.into()),
        dups: Mutex::new(dups),
        mismatches: Mutex::new(HashMap::new()),
        progress: progress.clone(),
        bucket: opts.bandwidth.map(TokenBucket::new),
        compress: opts.compress,
        wire_per_chunk: AtomicU64::new(g.chunk_size as u64),
        best_rtt_ns: AtomicU64::new(u64::MAX),
        landing: landing_tx,
        cancel: cancel.child_token(),
    });

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..opts.streams.max(1) {
        let (shared, peer, retries) = (shared.clone(), opts.peer.clone(), opts.retries);
        tasks.spawn(async move { run_stream(&shared, &peer, retries, n).await });
    }
    let mut failure: Option<SeedError> = None;
    while let Some(res) = tasks.join_next().await {
        let res = res.unwrap_or_else(|e| {
            Err(SeedError::SourceLost(ConnError::Closed {
                peer: format!("stream task: {e}"),
            }))
        });
        if let Err(e) = res {
            // A fatal error stops the other streams, which then report Interrupted: keep the
            // cause, not the echo.
            let fatal = !matches!(e, SeedError::SourceLost(_) | SeedError::Interrupted);
            if fatal {
                shared.cancel.cancel();
            }
            let replaces = match &failure {
                None => true,
                Some(SeedError::Interrupted) | Some(SeedError::SourceLost(_)) => fatal,
                Some(_) => false,
            };
            if replaces {
                failure = Some(e);
            }
        }
    }
    let remaining = shared.remaining.load(Ordering::SeqCst);
    drop(shared); // closes the landing channel: the writer commits and ends
    let writer_result = writer_thread.join().unwrap_or_else(|_| {
        Err(StoreError::Corrupt {
            path: store.dir().to_path_buf(),
            detail: "writer thread panicked".into(),
        })
    });
    writer_result?;
    if remaining > 0 || cancel.is_cancelled() {
        return Err(failure.unwrap_or(SeedError::Interrupted));
    }
    let p = &progress;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(SeedReport {
        disk: opts.name.clone(),
        logical_bytes: total,
        wire_bytes: get(&p.wire_bytes),
        chunks_total: count,
        chunks_fetched: get(&p.chunks_fetched),
        chunks_deduplicated: get(&p.chunks_deduplicated),
        chunks_zero: get(&p.chunks_zero),
        chunks_present: get(&p.chunks_present),
        chunks_refetched: get(&p.chunks_refetched),
        chunks_changed: get(&p.chunks_changed),
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

async fn manifest_with_retries(
    opts: &SeedOptions,
    replica: [u8; 16],
) -> Result<(protocol::DiskInfo, Vec<ChunkEntry>), SeedError> {
    let mut attempt = 0;
    loop {
        let got = match opts.peer.open(&opts.name).await {
            Ok((mut conn, _)) => {
                async {
                    // Registering first makes a tracking source bring the manifest up to date and
                    // remember this replica's starting point for later sync rounds.
                    crate::session::register(&mut conn, replica).await?;
                    let info = crate::session::reopen_info(&mut conn, &opts.name).await?;
                    fetch_manifest(&mut conn, &info).await.map(|m| (info, m))
                }
                .await
            }
            Err(e) => Err(e),
        };
        match got {
            Ok(x) => return Ok(x),
            Err(e) if e.is_transient() && attempt < opts.retries.max(MAX_MISMATCHES) => {
                attempt += 1;
                tracing::warn!(error = %e, attempt, "cannot get the manifest; trying again");
                tokio::time::sleep(Duration::from_millis(250 << attempt.min(4))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

type Plan = (ChunkWriter, Vec<u64>, HashMap<u64, Vec<u64>>);

fn plan(
    replica: &Replica,
    manifest: &Entries,
    only: Option<&[u64]>,
    progress: &SeedProgress,
) -> Result<Plan, StoreError> {
    let g = replica.geometry();
    let mut w = match only {
        Some(list) => replica.writer_for(list)?,
        None => replica.writer()?,
    };
    let store = replica.store().clone();
    let mut lookup = store.content_lookup();
    let mut fetch = Vec::new();
    let mut first_of: HashMap<ChunkHash, u64> = HashMap::new();
    let mut dups: HashMap<u64, Vec<u64>> = HashMap::new();
    let add = |a: &AtomicU64, n: u64| a.fetch_add(n, Ordering::Relaxed);
    let all: Vec<u64>;
    let indexes = match only {
        Some(list) => list,
        None => {
            all = (0..g.chunk_count()).collect();
            &all
        }
    };
    // Records of chunks whose content will change are withdrawn first, in one synced batch:
    // after a crash mid-transfer they are absent and fetched again, never trusted over new or
    // torn bytes.
    let stale: Vec<u64> = indexes
        .iter()
        .copied()
        .filter(|&i| match (manifest.get(i), w.state(i)) {
            (Some(entry), Some(state)) => state.contradicts(&entry),
            _ => false,
        })
        .collect();
    w.forget(&stale)?;
    for &index in indexes {
        let Some(entry) = manifest.get(index) else {
            continue;
        };
        let len = g.len(index) as u64;
        match (entry, w.state(index)) {
            (ChunkEntry::Zero, Some(ChunkState::Zero)) | (ChunkEntry::Zero, None) => {
                // A fresh replica file is sparse: recording the zero is all it takes.
                if w.state(index).is_none() {
                    w.put_zero(index)?;
                }
                add(&progress.chunks_zero, 1);
                add(&progress.logical_done, len);
            }
            (ChunkEntry::Zero, Some(ChunkState::Data(_) | ChunkState::Written)) => {
                w.put_zero(index)?;
                add(&progress.chunks_zero, 1);
                add(&progress.logical_done, len);
            }
            (ChunkEntry::Data(h), Some(ChunkState::Data(have))) if h == have => {
                add(&progress.chunks_present, 1);
                add(&progress.logical_done, len);
            }
            (ChunkEntry::Data(h), _) => {
                if let Some(&first) = first_of.get(&h) {
                    dups.entry(first).or_default().push(index);
                    continue;
                }
                let copied = match lookup.find(&h)? {
                    Some((src_id, src_index)) => w.copy_local(src_id, src_index, index, h)?,
                    None => false,
                };
                if copied {
                    add(&progress.chunks_deduplicated, 1);
                    add(&progress.logical_done, len);
                    first_of.insert(h, index);
                } else {
                    first_of.insert(h, index);
                    fetch.push(index);
                }
            }
        }
        if w.commit_due() {
            w.commit()?;
        }
    }
    // Duplicates of content copied locally can be copied now too. Chunks that cannot be
    // copied join the fetch list after the pass: `fetched` is what the plan fetched before
    // it, so each distinct content is fetched once.
    let own = replica.record().id;
    let fetched: std::collections::HashSet<u64> = fetch.iter().copied().collect();
    let mut refetch = Vec::new();
    dups.retain(|first, list| {
        if fetched.contains(first) {
            return true;
        }
        list.retain(|&j| {
            let Some(ChunkEntry::Data(h)) = manifest.get(j) else {
                return false;
            };
            match w.copy_local(own, *first, j, h) {
                Ok(true) => {
                    add(&progress.chunks_deduplicated, 1);
                    add(&progress.logical_done, g.len(j) as u64);
                    false
                }
                _ => true,
            }
        });
        // Could not copy (the local bytes failed their hash): fetch the content once, for
        // the first of them, and copy it to the others when it lands.
        if !list.is_empty() {
            let head = list.remove(0);
            refetch.push((head, std::mem::take(list)));
        }
        false
    });
    for (head, rest) in refetch {
        fetch.push(head);
        if !rest.is_empty() {
            dups.insert(head, rest);
        }
    }
    w.commit()?;
    Ok((w, fetch, dups))
}

fn land(
    mut w: ChunkWriter,
    mut rx: mpsc::Receiver<Landing>,
    progress: &SeedProgress,
) -> Result<Replica, StoreError> {
    let add = |a: &AtomicU64, n: u64| a.fetch_add(n, Ordering::Relaxed);
    let mut own: Option<u32> = None;
    loop {
        let landing = match rx.try_recv() {
            Ok(l) => l,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Nothing else to gather: start the writes held back so far, then wait.
                w.kick()?;
                match rx.blocking_recv() {
                    Some(l) => l,
                    None => break,
                }
            }
        };
        match landing {
            Landing::Zero { index } => w.put_zero(index)?,
            Landing::Data {
                index,
                hash,
                data,
                dups,
            } => {
                w.put_streaming(index, hash, &data)?;
                let id = *own.get_or_insert_with(|| w.replica().record().id);
                for j in dups {
                    if !w.copy_local(id, index, j, hash)? {
                        return Err(StoreError::Corrupt {
                            path: w.replica().data_path().clone(),
                            detail: format!("chunk {index} did not read back as written"),
                        });
                    }
                    add(&progress.chunks_deduplicated, 1);
                    add(&progress.logical_done, data.len() as u64);
                }
            }
        }
        if w.commit_due() {
            w.commit_in_background()?;
        }
    }
    w.commit()?;
    Ok(w.replica().clone())
}

enum PumpEnd {
    Done,
    Transient(ConnError, bool),
    Fatal(SeedError),
}

async fn run_stream(shared: &Shared, peer: &Peer, retries: u32, n: usize) -> Result<(), SeedError> {
    let mut failures = 0u32;
    loop {
        if shared.remaining.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let end = match peer.open(&shared.name).await {
            Ok((conn, info)) => {
                if shared.digest.is_some_and(|d| d != info.manifest_digest) {
                    return Err(SeedError::ManifestChanged(shared.name.clone()));
                }
                pump(shared, conn).await
            }
            Err(SessionError::Conn(e))
                if e.is_transient() || matches!(e, ConnError::Malformed { .. }) =>
            {
                PumpEnd::Transient(e, false)
            }
            Err(e) => return Err(e.into()),
        };
        match end {
            PumpEnd::Done => return Ok(()),
            PumpEnd::Fatal(e) => return Err(e),
            // Silence is not retried: the peer's timeout already waited as long as allowed.
            PumpEnd::Transient(e @ ConnError::Silent { .. }, _) => {
                return Err(SeedError::SourceLost(e))
            }
            PumpEnd::Transient(e, progressed) => {
                failures = if progressed { 1 } else { failures + 1 };
                if failures > retries {
                    return Err(SeedError::SourceLost(e));
                }
                let backoff = Duration::from_millis(250 << failures.min(4));
                tracing::warn!(stream = n, error = %e, retry_in = ?backoff, "stream lost the source; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.cancel.cancelled() => return Err(SeedError::Interrupted),
                }
            }
        }
    }
}

/// Decides compression for a stream: a few pings tell a LAN from a WAN.
async fn wants_compression(shared: &Shared, conn: &mut protocol::Conn) -> Result<bool, ConnError> {
    match shared.compress {
        Compress::Always => return Ok(true),
        Compress::Never => return Ok(false),
        Compress::Auto if shared.bucket.is_some() => return Ok(true),
        Compress::Auto => {}
    }
    let best = crate::session::round_trip(conn)
        .await
        .map_err(|e| match e {
            SessionError::Conn(c) => c,
            other => ConnError::Malformed {
                peer: conn.peer().to_string(),
                detail: other.to_string(),
            },
        })?;
    // The link is as fast as the fastest stream saw it: a slow ping from a stream that asked
    // while the source was busy serving the others says nothing about the network (on
    // loopback it turned compression on for random data, costing a sync round up to 40%).
    let ns = best.as_nanos().min(u64::MAX as u128) as u64;
    let seen = shared.best_rtt_ns.fetch_min(ns, Ordering::SeqCst).min(ns);
    Ok(Duration::from_nanos(seen) >= WAN_RTT)
}

async fn pump(shared: &Shared, mut conn: protocol::Conn) -> PumpEnd {
    let compress = match wants_compression(shared, &mut conn).await {
        Ok(c) => c,
        Err(e) => return PumpEnd::Transient(e, false),
    };
    let (mut reader, mut writer) = conn.split();
    let cs = shared.geometry.chunk_size as u64;
    // id -> (chunk index, when asked, wire bytes charged to the cap)
    let mut inflight: HashMap<u64, (u64, Instant, u64)> = HashMap::new();
    let mut window = Window::default();
    let mut next_id = 0u64;
    let mut since_adapt = 0u64;
    let mut progressed = false;
    let requeue = |inflight: &mut HashMap<u64, (u64, Instant, u64)>| {
        let mut q = lock(&shared.queue);
        for (_, (index, _, charged)) in inflight.drain() {
            q.push_front(index);
            if let Some(bucket) = &shared.bucket {
                bucket.settle(-(charged as i64));
            }
        }
    };
    loop {
        // Ask for as much as the window and the bandwidth cap allow. The cap is charged when
        // asking, so the source never sends faster than it allows (pacing reads instead would
        // let socket buffers carry bursts across the link).
        let mut sent = false;
        let mut paced: Option<tokio::time::Instant> = None;
        let free = window.bytes().saturating_sub(inflight.len() as u64 * cs);
        let refill = inflight.is_empty() || free >= window.refill_batch();
        while refill && (inflight.len() as u64 + 1) * cs <= window.bytes() {
            let charge = shared.wire_per_chunk.load(Ordering::Relaxed);
            if let Some(bucket) = &shared.bucket {
                let wait = bucket.wait_for(charge);
                if !wait.is_zero() {
                    paced = Some(tokio::time::Instant::now() + wait);
                    break;
                }
            }
            let Some(index) = lock(&shared.queue).pop_front() else {
                break;
            };
            if let Some(bucket) = &shared.bucket {
                bucket.settle(charge as i64);
            }
            next_id += 1;
            inflight.insert(next_id, (index, Instant::now(), charge));
            sent = true;
            if let Err(e) = writer
                .feed(&Frame::new(Message::GetChunk {
                    id: next_id,
                    index,
                    compress,
                    round: shared.round,
                }))
                .await
            {
                requeue(&mut inflight);
                return PumpEnd::Transient(e, progressed);
            }
        }
        if sent {
            if let Err(e) = writer.flush().await {
                requeue(&mut inflight);
                return PumpEnd::Transient(e, progressed);
            }
        }
        if inflight.is_empty() && paced.is_none() {
            if shared.remaining.load(Ordering::SeqCst) == 0 {
                return PumpEnd::Done;
            }
            // Another stream holds the last chunks; it may fail and hand them back.
            paced = Some(tokio::time::Instant::now() + Duration::from_millis(20));
        }
        let wake = paced.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let frame = tokio::select! {
            f = reader.recv(), if !inflight.is_empty() => f,
            _ = tokio::time::sleep_until(wake), if paced.is_some() => continue,
            _ = shared.cancel.cancelled() => {
                requeue(&mut inflight);
                return PumpEnd::Fatal(SeedError::Interrupted);
            }
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                requeue(&mut inflight);
                return PumpEnd::Transient(e, progressed);
            }
        };
        let wire = frame.payload.len() as u64 + 48;
        shared
            .progress
            .wire_bytes
            .fetch_add(wire, Ordering::Relaxed);
        match frame.msg {
            Message::Chunk {
                id,
                index,
                hash,
                encoding,
            } => {
                let Some((want, sent_at, charged)) = inflight.remove(&id) else {
                    requeue(&mut inflight);
                    let detail = format!("reply to unknown request {id}");
                    return PumpEnd::Transient(
                        ConnError::Malformed {
                            peer: reader.peer().to_string(),
                            detail,
                        },
                        progressed,
                    );
                };
                window.sample(sent_at.elapsed());
                since_adapt += cs;
                if since_adapt >= window.bytes() {
                    window.adapt();
                    since_adapt = 0;
                }
                if let Some(bucket) = &shared.bucket {
                    bucket.settle(wire as i64 - charged as i64);
                }
                // Smoothed (gain 1/16) so one incompressible chunk does not swing the charge.
                let avg = shared.wire_per_chunk.load(Ordering::Relaxed);
                shared
                    .wire_per_chunk
                    .store((avg * 15 + wire) / 16, Ordering::Relaxed);
                if want != index {
                    // The id was ours but the index is not what we asked: corruption in flight.
                    if let Err(e) = mismatch(shared, want) {
                        return PumpEnd::Fatal(e);
                    }
                    continue;
                }
                match deliver(shared, index, hash, encoding, &frame.payload).await {
                    Ok(true) => progressed = true,
                    Ok(false) => {}
                    Err(e) => return PumpEnd::Fatal(e),
                }
            }
            Message::Error { message, kind, .. } => {
                let peer = reader.peer().to_string();
                return PumpEnd::Fatal(SeedError::Session(SessionError::Refused {
                    peer,
                    kind,
                    message,
                }));
            }
            other => {
                return PumpEnd::Fatal(SeedError::Session(SessionError::from_reply(
                    reader.peer(),
                    other,
                )));
            }
        }
    }
}

fn mismatch(shared: &Shared, index: u64) -> Result<(), SeedError> {
    shared
        .progress
        .chunks_refetched
        .fetch_add(1, Ordering::Relaxed);
    let attempts = {
        let mut m = lock(&shared.mismatches);
        let a = m.entry(index).or_default();
        *a += 1;
        *a
    };
    tracing::warn!(disk = %shared.name, index, attempts, "chunk failed verification; fetching it again");
    if attempts >= MAX_MISMATCHES {
        return Err(SeedError::Corrupt {
            disk: shared.name.clone(),
            index,
            attempts,
        });
    }
    lock(&shared.queue).push_front(index);
    Ok(())
}

/// Verifies and lands one chunk; `Ok(false)` when it failed verification and was requeued.
async fn deliver(
    shared: &Shared,
    index: u64,
    hash: ChunkHash,
    encoding: Encoding,
    payload: &bytes::Bytes,
) -> Result<bool, SeedError> {
    let len = shared.geometry.len(index);
    let data = match codec::decompress(encoding, payload, len) {
        Ok(d) if encoding == Encoding::Zero || ChunkHash::of(&d) == hash => d,
        _ => {
            mismatch(shared, index)?;
            return Ok(false);
        }
    };
    let changed = match shared.manifest.get(index) {
        Some(ChunkEntry::Data(h)) => h != hash || encoding == Encoding::Zero,
        Some(ChunkEntry::Zero) => encoding != Encoding::Zero,
        None => true,
    };
    let mut dups = lock(&shared.dups).remove(&index).unwrap_or_default();
    if changed {
        shared
            .progress
            .chunks_changed
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(disk = %shared.name, index, "chunk changed at the source since its manifest; a later sync will catch up");
        if !dups.is_empty() {
            // Its duplicates were promised the manifest's content: fetch them themselves.
            shared.remaining.fetch_add(dups.len(), Ordering::SeqCst);
            lock(&shared.queue).extend(dups.drain(..));
        }
    }
    let landing = if encoding == Encoding::Zero {
        Landing::Zero { index }
    } else {
        Landing::Data {
            index,
            hash,
            data,
            dups,
        }
    };
    if shared.landing.send(landing).await.is_err() {
        // The writer stopped: its own error is reported by `seed`.
        return Err(SeedError::Interrupted);
    }
    shared
        .progress
        .chunks_fetched
        .fetch_add(1, Ordering::Relaxed);
    shared
        .progress
        .logical_done
        .fetch_add(len as u64, Ordering::Relaxed);
    shared.remaining.fetch_sub(1, Ordering::SeqCst);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockstore::crashsim::{CrashSim, Fault};

    #[test]
    fn duplicates_whose_local_copy_fails_fetch_their_content_once() {
        let dir = tempfile::tempdir().unwrap();
        let sim = CrashSim::new();
        let store = Store::open_with(dir.path(), Arc::new(sim.clone())).unwrap();
        let g = Geometry::new(4 * 4096, 4096).unwrap();
        let data = vec![7u8; 4096];
        let h = ChunkHash::of(&data);
        // Another disk of the store holds the content.
        let base = store.open_or_create("base", g).unwrap();
        let mut w = base.writer().unwrap();
        w.put(0, h, &data).unwrap();
        w.commit().unwrap();
        drop(w);
        let d = store.open_or_create("d", g).unwrap();
        let manifest = Entries::All(vec![ChunkEntry::Data(h); 4]);
        // Chunk 0 is copied from "base"; copying it on to chunks 1 and 2 fails, to 3 works.
        sim.pass_next_writes(1);
        sim.fail_next_write(Fault::Io);
        sim.fail_next_write(Fault::Io);
        let (_w, fetch, dups) = plan(&d, &manifest, None, &SeedProgress::default()).unwrap();
        assert_eq!(fetch, vec![1], "the content must be fetched once");
        assert_eq!(
            dups.get(&1),
            Some(&vec![2]),
            "chunk 2 is copied from 1 once it lands"
        );
    }
}
