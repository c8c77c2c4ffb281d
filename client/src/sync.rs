//! `helio sync`: incremental rounds of disk pre-copy.
//!
//! One round: the source cuts a generation and lists the chunks written since this replica's
//! last round (with fresh hashes); they are fetched like a seed (verified, compressed,
//! deduplicated, landed durably); only then is the round confirmed, so the source advances the
//! replica. A chunk written during the round belongs to the next generation and comes next time.
//!
//! `until_converged` repeats rounds until what is left is at most `max_dirty`, and stops, with
//! both rates named, when the disk is written at least as fast as rounds can ship it.

use crate::seed::{transfer, Scope, SeedError, SeedOptions, SeedProgress};
use crate::session::{Peer, SessionError};
use blockstore::Store;
use bytes::Bytes;
use protocol::{ChunkEntry, DiskInfo, Frame, Message};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Rounds at most, as Xen's pre-copy.
pub const MAX_ROUNDS: usize = 30;

/// How to sync.
#[derive(Clone)]
pub struct SyncOptions {
    /// Source, disk, link options (as for seeding).
    pub seed: SeedOptions,
    /// Repeat rounds until converged or diverging.
    pub until_converged: bool,
    /// Remaining dirty bytes at which the disk counts as converged.
    pub max_dirty: u64,
}

/// One round.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// Bytes of the chunks the round shipped (chunk granularity).
    pub dirty_bytes: u64,
    /// Bytes that crossed the network.
    pub wire_bytes: u64,
    /// Wall time.
    pub elapsed_s: f64,
    /// Bytes dirtied per second while the round ran; `None` (null) when the source cannot
    /// measure it (a QEMU dirty bitmap).
    pub dirty_rate: Option<f64>,
    /// Dirty bytes shipped per second.
    pub transfer_rate: f64,
    /// Chunks shipped.
    pub chunks: u64,
}

/// What `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// The disk.
    pub disk: String,
    /// Each round.
    pub rounds: Vec<Round>,
    /// Bytes written at the source since the last round's cut; `None` (null) when the source
    /// cannot measure it (a QEMU dirty bitmap).
    pub remaining_dirty_bytes: Option<u64>,
    /// Remaining dirty bytes are known and at most `max_dirty`.
    pub converged: bool,
    /// Why the rounds stopped.
    pub stopped: String,
}

fn dirty_query(conn_reply: Message, peer: &str) -> Result<Option<u64>, SessionError> {
    match conn_reply {
        Message::Dirty { bytes, .. } => Ok((bytes != protocol::DIRTY_UNKNOWN).then_some(bytes)),
        other => Err(SessionError::from_reply(peer, other)),
    }
}

/// A round whose plan the source has sent (it has cut the round's generation).
pub struct Begun {
    /// The replica (destination store id) the plan is for.
    pub replica: [u8; 16],
    started: Instant,
    info: DiskInfo,
    generation: u64,
    count: u32,
    plan: Bytes,
}

/// Asks the source for the plan of a round of `name` for `replica`. [`sync`] does this for
/// every round; a caller may do it for the first one while it opens the store (the source
/// spends that time reading and hashing the round's chunks) and hand it to [`sync_from`].
pub async fn begin_round(peer: &Peer, name: &str, replica: [u8; 16]) -> Result<Begun, SeedError> {
    let started = Instant::now();
    let (mut conn, info) = peer.open(name).await?;
    conn.send(&Frame::new(Message::SyncBegin { replica }))
        .await
        .map_err(SessionError::from)?;
    let frame = conn.recv().await.map_err(SessionError::from)?;
    let Message::SyncPlan {
        generation, count, ..
    } = frame.msg
    else {
        return Err(SessionError::from_reply(conn.peer(), frame.msg).into());
    };
    Ok(Begun {
        replica,
        started,
        info,
        generation,
        count,
        plan: frame.payload,
    })
}

/// Runs sync rounds of `opts.seed.name` into `store`.
pub async fn sync(
    store: &Store,
    opts: SyncOptions,
    cancel: CancellationToken,
) -> Result<SyncReport, SeedError> {
    sync_from(store, opts, None, cancel).await
}

/// [`sync`], whose first round may already have begun (a plan for another replica is
/// ignored: the round is begun again).
pub async fn sync_from(
    store: &Store,
    opts: SyncOptions,
    first: Option<Begun>,
    cancel: CancellationToken,
) -> Result<SyncReport, SeedError> {
    let replica = store.id();
    let peer = &opts.seed.peer;
    let name = &opts.seed.name;
    let mut first = first.filter(|b| b.replica == replica);
    let mut rounds: Vec<Round> = Vec::new();
    let stopped;
    let mut remaining;
    loop {
        let begun = match first.take() {
            Some(b) => b,
            None => begin_round(peer, name, replica).await?,
        };
        let Begun {
            started,
            info,
            generation,
            count,
            plan,
            ..
        } = begun;
        tracing::debug!(disk = %name, generation, chunks = count, "plan received");
        let n = count as usize;
        let raw =
            zstd::bulk::decompress(&plan, n * (8 + ChunkEntry::ENCODED_LEN)).map_err(|_| {
                SessionError::Unexpected {
                    peer: peer.addr.clone(),
                    what: "a sync plan that does not decompress".into(),
                }
            })?;
        let g = info.geometry;
        let mut chunks = HashMap::with_capacity(n);
        for rec in raw.chunks_exact(8 + ChunkEntry::ENCODED_LEN) {
            // Invariant: chunks_exact gives 8 + 33 bytes.
            let index = u64::from_be_bytes(rec[..8].try_into().expect("8 bytes"));
            match ChunkEntry::decode(&rec[8..]) {
                Some(e) if index < g.chunk_count() => {
                    chunks.insert(index, e);
                }
                _ => {
                    return Err(SessionError::Unexpected {
                        peer: peer.addr.clone(),
                        what: format!(
                            "a sync plan naming chunk {index} malformed or beyond the disk"
                        ),
                    }
                    .into())
                }
            }
        }
        let dirty_bytes: u64 = chunks.keys().map(|&i| g.len(i) as u64).sum();
        let progress = Arc::new(SeedProgress::default());
        let report = transfer(
            store,
            &opts.seed,
            &info,
            Scope::Round { chunks, generation },
            progress,
            cancel.clone(),
        )
        .await?;
        tracing::debug!(disk = %name, "round's chunks durable");
        // Only now, with the chunks durable, may the source advance this replica.
        let (mut conn, _) = peer.open(name).await?;
        conn.send(&Frame::new(Message::SyncDone {
            replica,
            generation,
        }))
        .await
        .map_err(SessionError::from)?;
        match conn.recv().await.map_err(SessionError::from)?.msg {
            Message::SyncDoneOk => {}
            other => return Err(SessionError::from_reply(conn.peer(), other).into()),
        }
        conn.send(&Frame::new(Message::DirtyQuery { replica }))
            .await
            .map_err(SessionError::from)?;
        remaining = dirty_query(
            conn.recv().await.map_err(SessionError::from)?.msg,
            &peer.addr,
        )?;
        let elapsed = started.elapsed().as_secs_f64().max(1e-6);
        let round = Round {
            dirty_bytes,
            wire_bytes: report.wire_bytes,
            elapsed_s: elapsed,
            dirty_rate: remaining.map(|r| r as f64 / elapsed),
            transfer_rate: dirty_bytes as f64 / elapsed,
            chunks: count as u64,
        };
        tracing::info!(
            disk = %name, round = rounds.len() + 1, dirty_bytes, wire_bytes = round.wire_bytes,
            elapsed_s = format!("{elapsed:.2}"), remaining = ?remaining, "sync round done"
        );
        rounds.push(round.clone());
        if !opts.until_converged {
            stopped = "one round".to_string();
            break;
        }
        if let Some(why) = stop_reason(&rounds, &round, remaining, opts.max_dirty) {
            stopped = why;
            break;
        }
        if rounds.len() >= MAX_ROUNDS {
            stopped = format!(
                "stopped after {MAX_ROUNDS} rounds with {} dirty bytes left",
                remaining.unwrap_or(0)
            );
            break;
        }
        if cancel.is_cancelled() {
            return Err(SeedError::Interrupted);
        }
    }
    // No flush of RocksDB's memtables here, unlike after a seed: a round's few thousand records
    // are in the synced log, and replaying them at the next open costs less than writing
    // tables now; that open also overlaps the source's plan (see `helio sync`), where this
    // flush was on every round's path.
    Ok(SyncReport {
        disk: name.clone(),
        converged: remaining.is_some_and(|r| r <= opts.max_dirty),
        remaining_dirty_bytes: remaining,
        rounds,
        stopped,
    })
}

/// Why `--until-converged` stops after `round` (the last of `rounds`), if it does.
fn stop_reason(
    rounds: &[Round],
    round: &Round,
    remaining: Option<u64>,
    max: u64,
) -> Option<String> {
    let Some(remaining) = remaining else {
        return Some(
            "the source cannot measure what is left (a QEMU dirty bitmap holds every write since \
             it was added): convergence is unknown; pause the VM and run a final round"
                .to_string(),
        );
    };
    if remaining <= max {
        return Some(format!(
            "converged: {remaining} dirty bytes left, at most {max} wanted"
        ));
    }
    let dirty_rate = round.dirty_rate.unwrap_or(0.0);
    // d/r >= 1 over a round that had real work: another round would ship as much or more.
    if rounds.len() >= 2 && round.dirty_bytes > 0 && dirty_rate >= round.transfer_rate {
        return Some(format!(
            "not converging: the disk is dirtied at {:.1} MB/s and rounds ship {:.1} MB/s (d/r = {:.2} >= 1); \
             pause the VM or throttle its writes, then run a final round",
            dirty_rate / 1e6,
            round.transfer_rate / 1e6,
            dirty_rate / round.transfer_rate
        ));
    }
    None
}
