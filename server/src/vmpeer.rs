//! What an agent adds to the replication protocol beyond disks: preparing an incoming VM for a
//! peer agent (`VmIncoming`), and tunnelling a VM's migration stream (`Tunnel`, then
//! `TunnelData` frames both ways) between the two QEMUs, so that it crosses the WAN on the
//! agents' mutually authenticated TLS connection.

use protocol::{ConnError, ErrorKind, Frame, FrameReader, FrameWriter, Message};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Bytes read from a migration socket per `TunnelData` frame.
pub const TUNNEL_CHUNK: usize = 256 * 1024;
/// zstd level of the tunnel: the fastest, far quicker than any WAN link it feeds.
const TUNNEL_ZSTD_LEVEL: i32 = 1;

/// A frame of `buf` read from QEMU: compressed (`TunnelZstd`) when that makes it smaller, as
/// is (`TunnelData`) otherwise (random pages do not shrink); an empty `buf` ends the direction.
fn tunnel_frame(buf: &[u8]) -> Frame {
    if !buf.is_empty() {
        if let Ok(z) = zstd::bulk::compress(buf, TUNNEL_ZSTD_LEVEL) {
            if z.len() < buf.len() {
                return Frame::with_payload(Message::TunnelZstd, bytes::Bytes::from(z));
            }
        }
    }
    Frame::with_payload(Message::TunnelData, bytes::Bytes::copy_from_slice(buf))
}

/// The bytes of a tunnel frame from the peer, or why it is not one (a compressed payload may
/// not grow past `TUNNEL_CHUNK`).
fn tunnel_bytes(frame: Frame, peer: &str) -> Result<bytes::Bytes, ConnError> {
    let bad = |detail: String| ConnError::Malformed {
        peer: peer.to_string(),
        detail,
    };
    match frame.msg {
        Message::TunnelData => Ok(frame.payload),
        Message::TunnelZstd if !frame.payload.is_empty() => {
            zstd::bulk::decompress(&frame.payload, TUNNEL_CHUNK)
                .map(bytes::Bytes::from)
                .map_err(|e| {
                    bad(format!(
                "a compressed tunnel frame does not decompress within {TUNNEL_CHUNK} bytes: {e}"
            ))
                })
        }
        Message::Error { message, .. } => {
            Err(bad(format!("the peer refused the tunnel: {message}")))
        }
        _ => Err(bad("only TunnelData may follow Tunnel".into())),
    }
}

/// What a tunnel carried: bytes from the local QEMU, what they took on the wire, bytes to it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TunnelStats {
    /// Bytes read from the local socket and sent.
    pub sent: u64,
    /// Wire bytes of those (payloads, compressed or not).
    pub sent_wire: u64,
    /// Bytes received and written to the local socket.
    pub received: u64,
}

/// The agent's side of VM requests.
pub trait VmPeer: Send + Sync + 'static {
    /// Prepares an incoming VM from `spec` (JSON of the agent's VM spec); the error is told to
    /// the peer.
    fn incoming(&self, spec: String) -> futures::future::BoxFuture<'static, Result<(), String>>;
    /// Whether a VM of `spec` could come here (nothing is started): JSON of the findings.
    fn check(&self, spec: String) -> futures::future::BoxFuture<'static, Result<String, String>>;
    /// Starts a job here for the peer (JSON of a job spec); JSON of the job.
    fn start_job(
        &self,
        spec: String,
    ) -> futures::future::BoxFuture<'static, Result<String, String>>;
    /// Stops the incoming QEMU of `vm` if it has not run yet; whether one was stopped.
    fn abort_incoming(
        &self,
        vm: String,
    ) -> futures::future::BoxFuture<'static, Result<bool, String>>;
    /// JSON of a job.
    fn job(&self, id: &str) -> Result<String, String>;
    /// Cancels a job (idempotent); JSON of it.
    fn cancel_job(&self, id: &str) -> Result<String, String>;
    /// Makes `chunks` of the export of `disk` absent; how many.
    fn invalidate(&self, disk: &str, chunks: &[u64]) -> Result<u64, String>;
    /// Applies chunks of a way back to the image disk `disk`: `data` is zstd (one frame or several) of the
    /// chunks that are not zeros, in order (unchecked: the implementation validates it).
    fn patch(
        &self,
        disk: String,
        chunks: Vec<protocol::PatchedChunk>,
        data: bytes::Bytes,
    ) -> futures::future::BoxFuture<'static, Result<(), String>>;
    /// Makes the chunks patched into `disk` durable; how many since the last commit.
    fn patch_commit(
        &self,
        disk: String,
    ) -> futures::future::BoxFuture<'static, Result<u64, String>>;
    /// The unix socket a tunnel for `vm` connects to (its QEMU's incoming socket).
    fn tunnel_target(&self, vm: &str) -> Result<PathBuf, String>;
    /// A migration's switchover for the incoming `vm`: makes each disk's `chunks` absent,
    /// then lets the VM run once its stream is loaded. (chunks made absent, whether the VM had
    /// taken this switchover already, in which case nothing is done again).
    fn switchover(
        &self,
        vm: String,
        cut: Vec<(String, Vec<u64>)>,
    ) -> futures::future::BoxFuture<'static, Result<(u64, bool), String>>;
}

fn refused(message: String) -> Frame {
    Frame::new(Message::Error {
        id: None,
        kind: ErrorKind::BadRequest,
        message,
    })
}

/// Answers `VmIncoming`.
pub async fn incoming(peer: Option<Arc<dyn VmPeer>>, spec: String) -> Frame {
    let Some(p) = peer else {
        return refused("this source runs no VMs (it is not an agent)".into());
    };
    match p.incoming(spec).await {
        Ok(()) => Frame::new(Message::VmIncomingReady),
        Err(e) => refused(e),
    }
}

/// Answers `VmIncomingAbort`.
pub async fn abort_incoming(peer: Option<Arc<dyn VmPeer>>, vm: String) -> Frame {
    let Some(p) = peer else {
        return refused("this source runs no VMs (it is not an agent)".into());
    };
    match p.abort_incoming(vm).await {
        Ok(stopped) => Frame::new(Message::VmIncomingAborted { stopped }),
        Err(e) => refused(e),
    }
}

/// Answers `VmCheck`.
pub async fn check(peer: Option<Arc<dyn VmPeer>>, spec: String) -> Frame {
    let Some(p) = peer else {
        return refused("this source runs no VMs (it is not an agent)".into());
    };
    match p.check(spec).await {
        Ok(report) => Frame::new(Message::VmCheckOk { report }),
        Err(e) => refused(e),
    }
}

/// Answers `JobStart`, `JobQuery`, `JobCancel` and `ExportInvalidate`.
pub async fn jobs(peer: Option<Arc<dyn VmPeer>>, msg: Message) -> Frame {
    let Some(p) = peer else {
        return refused("this source runs no jobs (it is not an agent)".into());
    };
    let answer = match msg {
        Message::JobStart { spec } => p.start_job(spec).await.map(|job| Message::JobState { job }),
        Message::JobQuery { id } => p.job(&id).map(|job| Message::JobState { job }),
        Message::JobCancel { id } => p.cancel_job(&id).map(|job| Message::JobState { job }),
        Message::ExportInvalidate { disk, chunks } => p
            .invalidate(&disk, &chunks)
            .map(|count| Message::Invalidated { count }),
        _ => Err("not a job request".into()),
    };
    match answer {
        Ok(m) => Frame::new(m),
        Err(e) => refused(e),
    }
}

/// Answers `VmSwitchover` (whose payload lists the cut's chunks).
pub async fn switchover(
    peer: Option<Arc<dyn VmPeer>>,
    vm: String,
    disks: Vec<protocol::CutDisk>,
    payload: &[u8],
) -> Frame {
    let Some(p) = peer else {
        return refused("this source runs no VMs (it is not an agent)".into());
    };
    let cut = match protocol::decode_cut(&disks, payload) {
        Ok(cut) => cut,
        Err(e) => return refused(e),
    };
    match p.switchover(vm, cut).await {
        Ok((invalidated, repeat)) => Frame::new(Message::VmSwitched {
            invalidated,
            repeat,
        }),
        Err(e) => refused(e),
    }
}

/// Answers `DiskPatch` and `DiskPatchBatch` (nothing unless they fail) and `PatchCommit`.
pub async fn patch(
    peer: Option<Arc<dyn VmPeer>>,
    msg: Message,
    payload: bytes::Bytes,
) -> Option<Frame> {
    let Some(p) = peer else {
        return Some(refused(
            "this source takes no patches (it is not an agent)".into(),
        ));
    };
    match msg {
        // A single chunk is a batch of one: its payload is that chunk's own zstd frame.
        Message::DiskPatch { disk, index, zero } => {
            let one = vec![protocol::PatchedChunk { index, zero }];
            p.patch(disk, one, payload).await.err().map(refused)
        }
        Message::DiskPatchBatch { disk, chunks } => {
            p.patch(disk, chunks, payload).await.err().map(refused)
        }
        Message::PatchCommit { disk } => Some(match p.patch_commit(disk).await {
            Ok(chunks) => Frame::new(Message::PatchCommitted { chunks }),
            Err(e) => refused(e),
        }),
        _ => Some(refused("not a patch request".into())),
    }
}

/// Serves `Tunnel`: connects to the VM's socket and carries bytes both ways until either side
/// ends. The connection is used up.
pub async fn tunnel(
    peer: Option<Arc<dyn VmPeer>>,
    vm: &str,
    reader: &mut FrameReader,
    tx: &mpsc::Sender<Frame>,
) -> Result<(), ConnError> {
    let target = match peer.map(|p| p.tunnel_target(vm)) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return refuse(tx, e).await,
        None => return refuse(tx, "this source runs no VMs".into()).await,
    };
    let stream = match UnixStream::connect(&target).await {
        Ok(s) => s,
        Err(e) => {
            let why = format!(
                "VM {vm:?}: cannot reach its migration socket {}: {e}",
                target.display()
            );
            return refuse(tx, why).await;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let out = tx.clone();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; TUNNEL_CHUNK];
        loop {
            let n = rd.read(&mut buf).await.unwrap_or(0);
            if out.send(tunnel_frame(&buf[..n])).await.is_err() || n == 0 {
                return;
            }
        }
    });
    let result = loop {
        let frame = match reader.recv().await {
            Ok(f) => f,
            Err(ConnError::Closed { .. }) => break Ok(()),
            Err(e) => break Err(e),
        };
        let data = match tunnel_bytes(frame, reader.peer()) {
            Ok(d) => d,
            Err(e) => break Err(e),
        };
        if data.is_empty() {
            let _ = wr.shutdown().await;
        } else if wr.write_all(&data).await.is_err() {
            break Ok(()); // QEMU went away; the peer sees the connection close
        }
    };
    up.abort();
    result
}

async fn refuse(tx: &mpsc::Sender<Frame>, why: String) -> Result<(), ConnError> {
    let _ = tx.send(refused(why)).await;
    Ok(())
}

/// The client side: carries bytes between `stream` (a local QEMU's migration socket) and a
/// connection on which `Tunnel` was sent, until both directions end or either fails. Returns
/// what it carried.
pub async fn pump(
    stream: UnixStream,
    mut reader: FrameReader,
    mut writer: FrameWriter,
) -> Result<TunnelStats, ConnError> {
    let (mut rd, mut wr) = stream.into_split();
    let up = async move {
        let mut buf = vec![0u8; TUNNEL_CHUNK];
        let (mut sent, mut wire) = (0u64, 0u64);
        loop {
            let n = rd.read(&mut buf).await.unwrap_or(0);
            let frame = tunnel_frame(&buf[..n]);
            wire += frame.payload.len() as u64;
            writer.send(&frame).await?;
            sent += n as u64;
            if n == 0 {
                return Ok::<(u64, u64), ConnError>((sent, wire));
            }
        }
    };
    let down = async move {
        let mut got = 0u64;
        loop {
            let frame = match reader.recv().await {
                Ok(f) => f,
                Err(ConnError::Closed { .. }) => return Ok(got),
                Err(e) => return Err(e),
            };
            let data = tunnel_bytes(frame, reader.peer())?;
            if data.is_empty() {
                let _ = wr.shutdown().await;
                return Ok(got);
            }
            got += data.len() as u64;
            if wr.write_all(&data).await.is_err() {
                return Ok(got);
            }
        }
    };
    // The stream ends when QEMU closes its socket; the other direction may stay silent.
    let (up, down) = tokio::join!(up, down);
    let ((sent, sent_wire), received) = (up?, down?);
    Ok(TunnelStats {
        sent,
        sent_wire,
        received,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_frames_shrink_what_compresses_and_refuse_what_grows_too_far() {
        let pages = vec![7u8; TUNNEL_CHUNK];
        let f = tunnel_frame(&pages);
        assert!(matches!(f.msg, Message::TunnelZstd) && f.payload.len() < 1024);
        assert_eq!(tunnel_bytes(f, "peer").unwrap(), &pages[..]);
        // Random bytes go as they are.
        let mut x = 1u64;
        let random: Vec<u8> = (0..TUNNEL_CHUNK)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let f = tunnel_frame(&random);
        assert!(matches!(f.msg, Message::TunnelData));
        assert_eq!(tunnel_bytes(f, "peer").unwrap(), &random[..]);
        // A peer's frame that would decompress past TUNNEL_CHUNK is refused, not allocated.
        let bomb = zstd::bulk::compress(&vec![0u8; 4 * TUNNEL_CHUNK], 1).unwrap();
        let f = Frame::with_payload(Message::TunnelZstd, bytes::Bytes::from(bomb));
        assert!(tunnel_bytes(f, "peer").is_err());
        // The end of a direction stays an empty TunnelData.
        assert!(matches!(tunnel_frame(&[]).msg, Message::TunnelData));
    }
}
