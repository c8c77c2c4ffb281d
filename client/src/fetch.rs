//! Fetching single chunks on demand, many in flight over one connection, each verified.
//!
//! Replies are matched to requests by id, never by order: a source may answer out of order
//! (xNBD's proxy mode takes replies in order and returns wrong data from such a peer). A lost
//! connection fails the requests in flight; the next request dials again. So does a source
//! that stays silent for the peer's timeout while requests wait (a blackholed link keeps the
//! connection up and answers nothing).

use crate::session::{Peer, SessionError};
use protocol::{codec, ChunkHash, ConnError, DiskInfo, Encoding, Frame, FrameWriter, Message};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// A fetched, verified chunk.
#[derive(Debug)]
pub struct Fetched {
    /// blake3 of `data` as the source read it.
    pub hash: ChunkHash,
    /// The bytes (all zeros for a zero chunk).
    pub data: bytes::Bytes,
    /// True when the source found the chunk all zeros.
    pub zero: bool,
    /// Bytes that crossed the network.
    pub wire_bytes: u64,
}

/// Why a fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The source could not be reached or the connection broke (retrying may help).
    #[error("source unreachable: {0}")]
    Unreachable(String),
    /// The chunk failed verification (retrying may help).
    #[error("chunk {0} failed verification")]
    Corrupt(u64),
    /// The source refused (retrying will not help).
    #[error("source refused: {0}")]
    Refused(String),
}

impl FetchError {
    /// True when trying again may succeed.
    pub fn is_transient(&self) -> bool {
        !matches!(self, FetchError::Refused(_))
    }
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Frame, FetchError>>>>>;

struct Link {
    writer: Arc<tokio::sync::Mutex<FrameWriter>>,
    waiters: Waiters,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Fetches chunks of one disk from a source agent.
pub struct Fetcher {
    peer: Peer,
    disk: DiskInfo,
    compress: bool,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fetcher {
    /// A fetcher for `disk` (as announced by the source when opened).
    pub fn new(peer: Peer, disk: DiskInfo, compress: bool) -> Fetcher {
        Fetcher {
            peer,
            disk,
            compress,
            link: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// Drops the connection (the source's resources can be released).
    pub async fn close(&self) {
        self.link.lock().await.take();
    }

    async fn link(&self) -> Result<Arc<Link>, FetchError> {
        let mut slot = self.link.lock().await;
        if let Some(l) = slot.as_ref().filter(|l| !l.reader.is_finished()) {
            return Ok(l.clone());
        }
        let (conn, info) = self.peer.open(&self.disk.name).await.map_err(|e| match e {
            SessionError::Refused { message, .. } => FetchError::Refused(message),
            other => FetchError::Unreachable(other.to_string()),
        })?;
        if info.manifest_digest != self.disk.manifest_digest || info.geometry != self.disk.geometry
        {
            return Err(FetchError::Refused(format!(
                "the source now serves a different {:?} (its image changed since this replica started); sync it first",
                self.disk.name
            )));
        }
        let (mut reader, writer) = conn.split();
        let waiters: Waiters = Arc::default();
        let w = waiters.clone();
        let reader = tokio::spawn(async move {
            let err = loop {
                match reader.recv().await {
                    // An idle link is silent by right; with requests waiting it is dead.
                    Err(ConnError::Silent { .. }) if lock(&w).is_empty() => continue,
                    Ok(frame) => {
                        let id = match &frame.msg {
                            Message::Chunk { id, .. } => Some(*id),
                            Message::Error { id, .. } => *id,
                            _ => None,
                        };
                        let Some(id) = id else {
                            break format!("unexpected message from {}", reader.peer());
                        };
                        if let Some(tx) = lock(&w).remove(&id) {
                            let _ = tx.send(Ok(frame));
                        }
                    }
                    Err(e) => break e.to_string(),
                }
            };
            for (_, tx) in lock(&w).drain() {
                let _ = tx.send(Err(FetchError::Unreachable(err.clone())));
            }
        });
        let link = Arc::new(Link {
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            waiters,
            reader,
        });
        *slot = Some(link.clone());
        Ok(link)
    }

    /// Fetches and verifies chunk `index`.
    pub async fn fetch(&self, index: u64) -> Result<Fetched, FetchError> {
        let frame = self.request(index).await?;
        self.verify(index, frame)
    }

    /// Asks for chunk `index` and waits for its reply, unverified (see [`Fetcher::verify`]).
    pub async fn request(&self, index: u64) -> Result<Frame, FetchError> {
        let link = self.link().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&link.waiters).insert(id, tx);
        let sent = link
            .writer
            .lock()
            .await
            .send(&Frame::new(Message::GetChunk {
                id,
                index,
                compress: self.compress,
                round: None,
            }))
            .await;
        if let Err(e) = sent {
            lock(&link.waiters).remove(&id);
            self.drop_link(&link).await;
            return Err(FetchError::Unreachable(e.to_string()));
        }
        match rx.await {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => {
                self.drop_link(&link).await;
                Err(e)
            }
            Err(_) => Err(FetchError::Unreachable("connection closed".into())),
        }
    }

    /// Decodes and verifies the reply to a request for chunk `index` (CPU work: decompression
    /// and blake3, which callers may move off latency-sensitive threads).
    pub fn verify(&self, index: u64, frame: Frame) -> Result<Fetched, FetchError> {
        let wire_bytes = frame.payload.len() as u64 + 48;
        match frame.msg {
            Message::Chunk {
                index: got,
                hash,
                encoding,
                ..
            } if got == index => {
                let len = self.disk.geometry.len(index);
                let data = codec::decompress(encoding, &frame.payload, len)
                    .map_err(|_| FetchError::Corrupt(index))?;
                if encoding != Encoding::Zero && ChunkHash::of(&data) != hash {
                    return Err(FetchError::Corrupt(index));
                }
                Ok(Fetched {
                    hash,
                    data,
                    zero: encoding == Encoding::Zero,
                    wire_bytes,
                })
            }
            Message::Chunk { .. } => Err(FetchError::Corrupt(index)),
            Message::Error { message, .. } => Err(FetchError::Refused(message)),
            other => Err(FetchError::Unreachable(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }

    async fn drop_link(&self, link: &Arc<Link>) {
        let mut slot = self.link.lock().await;
        if slot.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
            *slot = None;
        }
    }
}
