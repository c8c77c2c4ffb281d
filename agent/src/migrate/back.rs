//! The way back: a VM that came here by migration returns to where it came from. Its disk here
//! is a replica served by an export job; the image it left there, frozen at the cut, is the
//! base. Only the chunks the VM wrote here move: each round cuts the export's write generation
//! and patches the chunks written since the last round into the image there (through that
//! agent's tracked export, so its own tracking sees them); the last round runs inside the
//! switchover, with the VM paused, and carries what it wrote during the memory's pre-copy.

use super::disk::{ask, Ctl, MAX_ROUNDS, SMALL_ROUND};
use super::{Migration, Migrations};
use bytes::Bytes;
use protocol::{Frame, Message};
use server::export::ReplicaDevice;
use std::collections::BTreeSet;
use std::sync::Arc;

/// zstd level of the chunks sent back (the replication protocol's default).
const LEVEL: i32 = 3;
/// Chunks read and compressed per blocking task.
const BATCH: usize = 64;
/// A frame's header and length on the wire, besides the payload (for the byte figures).
const FRAME_OVERHEAD: u64 = 48;

/// One disk going back.
pub struct Returning {
    /// The disk's name (the same here and there).
    pub disk: String,
    dev: Arc<ReplicaDevice>,
    /// The last generation shipped.
    since: u64,
    /// Every chunk shipped so far (for the figures).
    shipped: BTreeSet<u64>,
}

/// What one round shipped.
#[derive(Default)]
struct Shipped {
    chunks: u64,
    raw: u64,
    wire: u64,
}

impl Migrations {
    /// The returning disks among `disks`: `None` when they are image disks here (the ordinary
    /// way), their exports when every one is a replica a VM that came here runs on.
    pub(super) fn returning_disks(
        &self,
        disks: &[String],
    ) -> Result<Option<Vec<Returning>>, String> {
        if disks.iter().all(|d| self.disks.exists(d)) {
            return Ok(None);
        }
        let mut back = Vec::new();
        for d in disks {
            let dev = self.jobs.export_device(d).ok_or_else(|| {
                format!("disk {d:?} is neither an image disk here nor served by an export job: it cannot move")
            })?;
            if !dev.is_complete() {
                return Err(format!("disk {d:?} is still being fetched here ({} chunks absent): wait for its export to finish before moving the VM again", dev.absent_chunks()));
            }
            back.push(Returning {
                disk: d.clone(),
                dev,
                since: 0,
                shipped: BTreeSet::new(),
            });
        }
        Ok(Some(back))
    }

    /// `syncing` for a way back: rounds of the chunks written here, until one is small.
    pub(super) async fn return_disks(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
    ) -> Result<(), String> {
        for round in 1..=MAX_ROUNDS {
            let why = format!("the way back, round {round}: the chunks the VM wrote here");
            self.set_phase(m, "syncing", &why)
                .map_err(|e| e.to_string())?;
            let raw = self.return_round(m, ctl, &round.to_string()).await?;
            if raw <= SMALL_ROUND {
                break;
            }
        }
        Ok(())
    }

    /// One round of the way back, recorded as `return.rounds.label`; the bytes it carried.
    pub(super) async fn return_round(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        label: &str,
    ) -> Result<u64, String> {
        let first = m.figures["return"]["rounds"].is_null();
        let s = patch_round(ctl, first).await?;
        m.figures["return"]["rounds"][label] =
            serde_json::json!({"chunks": s.chunks, "raw_bytes": s.raw, "wire_bytes": s.wire});
        add(m, "disk_wire_bytes", s.wire);
        Ok(s.raw)
    }

    /// At the switchover (the VM paused, its disks flushed): the last round, then the figures
    /// of what the VM wrote here, compressed, beside what crossed.
    pub(super) async fn return_cut(&self, m: &mut Migration, ctl: &mut Ctl) -> Result<(), String> {
        let t = std::time::Instant::now();
        let s = patch_round(ctl, false).await?;
        m.figures["switchover_chunks"] = s.chunks.into();
        m.figures["switchover_disk_ms"] = (t.elapsed().as_millis() as u64).into();
        m.figures["return"]["switchover"] =
            serde_json::json!({"chunks": s.chunks, "raw_bytes": s.raw, "wire_bytes": s.wire});
        add(m, "disk_wire_bytes", s.wire);
        let mut written = 0;
        let mut chunks = 0;
        for r in &ctl.returning {
            let all: Vec<u64> = r.shipped.iter().copied().collect();
            chunks += all.len() as u64;
            for part in all.chunks(BATCH) {
                written += read_batch(&r.dev, part.to_vec())
                    .await?
                    .iter()
                    .map(|(_, p)| p.len() as u64)
                    .sum::<u64>();
            }
        }
        m.figures["return"]["chunks_written_here"] = chunks.into();
        m.figures["return"]["written_compressed_bytes"] = written.into();
        Ok(())
    }
}

fn add(m: &mut Migration, key: &str, n: u64) {
    let had = m.figures["return"][key].as_u64().unwrap_or(0);
    m.figures["return"][key] = (had + n).into();
}

/// One round over every returning disk: cut, then ship what was written since the last cut
/// (the first round: everything written since the VM arrived), then commit.
async fn patch_round(ctl: &mut Ctl, first: bool) -> Result<Shipped, String> {
    let mut total = Shipped::default();
    for i in 0..ctl.returning.len() {
        let r = &mut ctl.returning[i];
        let until = r.dev.cut();
        let chunks = if first {
            r.dev.changed_until(until)
        } else {
            r.dev.written_between(r.since, until)
        };
        r.since = until;
        r.shipped.extend(chunks.iter().copied());
        let (disk, dev) = (r.disk.clone(), r.dev.clone());
        let s = ship(&mut ctl.conn, &disk, &dev, chunks).await?;
        total.chunks += s.chunks;
        total.raw += s.raw;
        total.wire += s.wire;
    }
    Ok(total)
}

/// Sends `chunks` of `disk` and commits them; what crossed.
async fn ship(
    conn: &mut protocol::Conn,
    disk: &str,
    dev: &Arc<ReplicaDevice>,
    chunks: Vec<u64>,
) -> Result<Shipped, String> {
    let mut s = Shipped::default();
    for part in chunks.chunks(BATCH) {
        for (index, payload) in read_batch(dev, part.to_vec()).await? {
            let zero = payload.is_empty();
            s.raw += if zero {
                0
            } else {
                dev.geometry().len(index) as u64
            };
            s.wire += payload.len() as u64 + FRAME_OVERHEAD;
            let msg = Message::DiskPatch {
                disk: disk.to_string(),
                index,
                zero,
            };
            conn.send(&Frame::with_payload(msg, payload))
                .await
                .map_err(|e| format!("sending chunk {index} of disk {disk:?} back: {e}"))?;
        }
    }
    s.chunks = chunks.len() as u64;
    let commit = Message::PatchCommit {
        disk: disk.to_string(),
    };
    match ask(conn, commit).await {
        Ok(Message::PatchCommitted { chunks: n }) if n == s.chunks => Ok(s),
        Ok(Message::PatchCommitted { chunks: n }) => Err(format!(
            "the destination applied {n} chunks of disk {disk:?}, not the {} sent",
            s.chunks
        )),
        Ok(other) => Err(format!("the destination answered {other:?} to PatchCommit")),
        Err(e) => Err(format!(
            "the destination refused disk {disk:?}'s chunks: {e}"
        )),
    }
}

/// Reads and compresses `chunks` off the runtime's threads: (index, payload), an empty payload
/// for a zero chunk.
async fn read_batch(
    dev: &Arc<ReplicaDevice>,
    chunks: Vec<u64>,
) -> Result<Vec<(u64, Bytes)>, String> {
    let dev = dev.clone();
    tokio::task::spawn_blocking(move || {
        chunks
            .into_iter()
            .map(|i| {
                let payload = match dev.local_chunk(i).map_err(|e| e.to_string())? {
                    None => Bytes::new(),
                    Some(data) if data.iter().all(|&b| b == 0) => Bytes::new(),
                    Some(data) => zstd::bulk::compress(&data, LEVEL)
                        .map(Bytes::from)
                        .map_err(|e| format!("compressing chunk {i}: {e}"))?,
                };
                Ok((i, payload))
            })
            .collect()
    })
    .await
    .map_err(|e| format!("reading chunks to send back: {e}"))?
}
