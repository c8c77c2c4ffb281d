//! The way back: a VM that came here by migration returns to where it came from. Its disk here
//! is a replica served by an export job; the image it left there, frozen at the cut, is the
//! base. Only the chunks the VM wrote here move: each round cuts the export's write generation
//! and patches the chunks written since the last round into the image there (through that
//! agent's tracked export, so its own tracking sees them); the last round runs inside the
//! switchover, with the VM paused, and carries what it wrote during the memory's pre-copy.

use super::disk::{ask, Ctl, MAX_ROUNDS, SMALL_ROUND};
use super::{Migration, Migrations};
use protocol::{Frame, Message, PatchedChunk};
use server::export::ReplicaDevice;
use std::collections::BTreeSet;
use std::sync::Arc;

/// zstd level of the chunks sent back (the replication protocol's default).
const LEVEL: i32 = 3;
/// How long a round waits after its cut before it lists the chunks written before it (see
/// [`patch_round`]).
const HOT_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);
/// Raw bytes per batch at most: compressed, a batch must fit a frame (4 MiB) even when its
/// chunks do not compress.
const BATCH_RAW: usize = 3 << 20;

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
        let s = patch_round(ctl, first, true).await?;
        m.figures["return"]["rounds"][label] =
            serde_json::json!({"chunks": s.chunks, "raw_bytes": s.raw, "wire_bytes": s.wire});
        add(m, "disk_wire_bytes", s.wire);
        Ok(s.raw)
    }

    /// At the switchover (the VM paused, its disks flushed): the last round, then the figures
    /// of what the VM wrote here, compressed, beside what crossed.
    pub(super) async fn return_cut(&self, m: &mut Migration, ctl: &mut Ctl) -> Result<(), String> {
        let t = std::time::Instant::now();
        let s = patch_round(ctl, false, false).await?;
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
            written += compressed_size(&r.dev, all).await?;
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
///
/// While the VM runs (`settle`), the chunks are listed [`HOT_WINDOW`] after the cut: a chunk
/// the guest wrote again by then is left to the next round. Those are the chunks it is
/// writing right now (a log's tail); sent at once, each would cross twice, the first time
/// half old bytes, which do not compress.
async fn patch_round(ctl: &mut Ctl, first: bool, settle: bool) -> Result<Shipped, String> {
    let mut total = Shipped::default();
    let cuts: Vec<u64> = ctl.returning.iter().map(|r| r.dev.cut()).collect();
    if settle {
        tokio::time::sleep(HOT_WINDOW).await;
    }
    for (i, until) in cuts.into_iter().enumerate() {
        let r = &mut ctl.returning[i];
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

/// Sends `chunks` of `disk` in batches compressed together, and commits them; what crossed.
async fn ship(
    conn: &mut protocol::Conn,
    disk: &str,
    dev: &Arc<ReplicaDevice>,
    chunks: Vec<u64>,
) -> Result<Shipped, String> {
    let mut s = Shipped::default();
    for part in chunks.chunks(batch_len(dev)) {
        let (frame, raw) = pack(dev, disk, part.to_vec()).await?;
        s.raw += raw;
        s.wire += frame_bytes(&frame)?;
        conn.send(&frame)
            .await
            .map_err(|e| format!("sending {} chunks of disk {disk:?} back: {e}", part.len()))?;
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

/// Chunks per batch: as many as keep its raw bytes (hence, compressed, the frame) under
/// [`BATCH_RAW`], within the protocol's cap.
fn batch_len(dev: &ReplicaDevice) -> usize {
    let chunk = dev.geometry().chunk_size.max(1) as usize;
    (BATCH_RAW / chunk).clamp(1, protocol::MAX_PATCH_CHUNKS)
}

/// Bytes `frame` takes on the connection (length prefix, header, payload), before TLS.
fn frame_bytes(frame: &Frame) -> Result<u64, String> {
    let head = frame
        .encode_head(4)
        .map_err(|e| format!("encoding a patch frame: {e}"))?;
    Ok((head.len() + frame.payload.len()) as u64)
}

/// Reads `chunks` and packs them into one `DiskPatchBatch` frame (off the runtime's threads);
/// the frame and the raw bytes of its chunks that are not zeros.
async fn pack(
    dev: &Arc<ReplicaDevice>,
    disk: &str,
    chunks: Vec<u64>,
) -> Result<(Frame, u64), String> {
    let (dev, disk) = (dev.clone(), disk.to_string());
    tokio::task::spawn_blocking(move || {
        let mut listed = Vec::with_capacity(chunks.len());
        let (mut payload, mut raw) = (Vec::new(), 0);
        for index in chunks {
            let data = read_chunk(&dev, index)?;
            listed.push(PatchedChunk {
                index,
                zero: data.is_none(),
            });
            // One zstd frame per chunk, concatenated: measured on the sample guest's records,
            // a 64 KiB chunk alone compresses better than in a batch (zstd picks its
            // parameters by input size), and a frame per chunk costs 8 bytes, not a message.
            if let Some(data) = data {
                raw += data.len() as u64;
                payload.extend(
                    zstd::bulk::compress(&data, LEVEL)
                        .map_err(|e| format!("compressing chunk {index} of disk {disk:?}: {e}"))?,
                );
            }
        }
        let msg = Message::DiskPatchBatch {
            disk,
            chunks: listed,
        };
        Ok((Frame::with_payload(msg, payload.into()), raw))
    })
    .await
    .map_err(|e| format!("reading chunks to send back: {e}"))?
}

/// Chunk `index` as it is here; `None` for zeros.
fn read_chunk(dev: &ReplicaDevice, index: u64) -> Result<Option<Vec<u8>>, String> {
    match dev.local_chunk(index).map_err(|e| e.to_string())? {
        Some(data) if data.iter().any(|&b| b != 0) => Ok(Some(data)),
        _ => Ok(None),
    }
}

/// The bytes `chunks` take compressed one by one, as the chunk store holds them (zeros take
/// none): the measure the way back's wire bytes are held against.
async fn compressed_size(dev: &Arc<ReplicaDevice>, chunks: Vec<u64>) -> Result<u64, String> {
    let dev = dev.clone();
    tokio::task::spawn_blocking(move || {
        let mut total = 0;
        for i in chunks {
            if let Some(data) = read_chunk(&dev, i)? {
                total += zstd::bulk::compress(&data, LEVEL)
                    .map_err(|e| format!("compressing chunk {i}: {e}"))?
                    .len() as u64;
            }
        }
        Ok(total)
    })
    .await
    .map_err(|e| format!("reading chunks to measure: {e}"))?
}
