//! One connection to a source agent, with a disk opened on it.

use protocol::tls::TlsClient;
use protocol::{connect, ChunkEntry, Conn, ConnError, DiskInfo, Frame, Message};
use std::time::Duration;

/// How to reach a source agent.
#[derive(Clone)]
pub struct Peer {
    /// `HOST:PORT`.
    pub addr: String,
    /// TLS material, if the link is secured.
    pub tls: Option<TlsClient>,
    /// Our name, sent in the hello.
    pub agent: String,
    /// How long the source may stay silent when an answer is due (dialing, the handshake, each
    /// reply) before the exchange fails with [`ConnError::Silent`].
    pub timeout: Duration,
}

/// The default of [`Peer::timeout`] (`--timeout` of seed and sync).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a source said instead of the expected reply.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Connection-level failure.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The source answered with an error.
    #[error("source {peer} refused: {message}")]
    Refused {
        /// The source.
        peer: String,
        /// Its kind of error.
        kind: protocol::ErrorKind,
        /// Its message.
        message: String,
    },
    /// The manifest did not match the digest announced with it.
    #[error("the manifest of {disk:?} from {peer} does not match its announced digest (corrupted in transit?)")]
    ManifestCorrupt {
        /// The source.
        peer: String,
        /// The disk.
        disk: String,
    },
    /// The source answered with something unexpected.
    #[error("source {peer} answered {what} out of protocol")]
    Unexpected {
        /// The source.
        peer: String,
        /// What came.
        what: String,
    },
}

impl SessionError {
    /// True when the same request may succeed if tried again (network trouble, corruption).
    pub fn is_transient(&self) -> bool {
        match self {
            SessionError::Conn(e) => e.is_transient() || matches!(e, ConnError::Malformed { .. }),
            SessionError::ManifestCorrupt { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn from_reply(peer: &str, msg: Message) -> Self {
        match msg {
            Message::Error { kind, message, .. } => SessionError::Refused {
                peer: peer.to_string(),
                kind,
                message,
            },
            other => SessionError::Unexpected {
                peer: peer.to_string(),
                what: format!("{other:?}").chars().take(80).collect(),
            },
        }
    }
}

impl Peer {
    /// Connects and opens `disk`.
    pub async fn open(&self, disk: &str) -> Result<(Conn, DiskInfo), SessionError> {
        let dial = connect(&self.addr, self.tls.as_ref(), &self.agent);
        let mut conn = protocol::conn::within(Some(self.timeout), &self.addr, dial).await??;
        conn.set_timeout(Some(self.timeout));
        conn.send(&Frame::new(Message::Open {
            disk: disk.to_string(),
        }))
        .await?;
        match conn.recv().await?.msg {
            Message::Opened(info) => Ok((conn, info)),
            other => Err(SessionError::from_reply(&self.addr, other)),
        }
    }
}

/// Registers this replica (a destination store's id) for the disk opened on `conn`.
pub async fn register(conn: &mut Conn, replica: [u8; 16]) -> Result<u64, SessionError> {
    conn.send(&Frame::new(Message::Register { replica }))
        .await?;
    match conn.recv().await?.msg {
        Message::Registered { generation } => Ok(generation),
        other => Err(SessionError::from_reply(conn.peer(), other)),
    }
}

/// Opens `disk` again on `conn`, for its current description (a tracking source refreshes
/// its manifest on `Register`).
pub async fn reopen_info(conn: &mut Conn, disk: &str) -> Result<DiskInfo, SessionError> {
    conn.send(&Frame::new(Message::Open {
        disk: disk.to_string(),
    }))
    .await?;
    match conn.recv().await?.msg {
        Message::Opened(info) => Ok(info),
        other => Err(SessionError::from_reply(conn.peer(), other)),
    }
}

/// The smallest of three request round trips on `conn`: tells a LAN from a WAN.
pub async fn round_trip(conn: &mut Conn) -> Result<std::time::Duration, SessionError> {
    let mut best = std::time::Duration::MAX;
    for id in 0..3 {
        let t = std::time::Instant::now();
        conn.send(&Frame::new(Message::Ping { id })).await?;
        match conn.recv().await?.msg {
            Message::Pong { .. } => best = best.min(t.elapsed()),
            other => return Err(SessionError::from_reply(conn.peer(), other)),
        }
    }
    Ok(best)
}

/// Fetches the whole manifest of the disk opened on `conn`, all pages requested at once.
pub async fn fetch_manifest(
    conn: &mut Conn,
    info: &DiskInfo,
) -> Result<Vec<ChunkEntry>, SessionError> {
    let n = info.geometry.chunk_count();
    let page = blockstore_page();
    let pages = n.div_ceil(page);
    for p in 0..pages {
        conn.send(&Frame::new(Message::GetManifest {
            id: p,
            start: p * page,
            count: page as u32,
        }))
        .await?;
    }
    let mut entries = vec![ChunkEntry::Zero; n as usize];
    let peer = conn.peer().to_string();
    for _ in 0..pages {
        let frame = conn.recv().await?;
        let Message::Manifest { start, count, .. } = frame.msg else {
            return Err(SessionError::from_reply(&peer, frame.msg));
        };
        let bad = |what: &str| SessionError::Unexpected {
            peer: peer.clone(),
            what: format!("a manifest page that {what}"),
        };
        // Checked before they size the decompression or index the manifest: a page is at most
        // what was asked for, and lies within the disk.
        if count as u64 > page || start.checked_add(count as u64).is_none_or(|end| end > n) {
            return Err(bad(&format!(
                "covers chunks {start}+{count}, outside the disk's {n} or over a page of {page}"
            )));
        }
        let raw = zstd::bulk::decompress(&frame.payload, count as usize * ChunkEntry::ENCODED_LEN)
            .map_err(|_| bad("does not decompress"))?;
        if raw.len() != count as usize * ChunkEntry::ENCODED_LEN {
            return Err(bad("has the wrong size"));
        }
        for (i, e) in raw.chunks_exact(ChunkEntry::ENCODED_LEN).enumerate() {
            entries[start as usize + i] =
                ChunkEntry::decode(e).ok_or_else(|| bad("holds a malformed entry"))?;
        }
    }
    if blockstore::scan::digest(&entries) != info.manifest_digest {
        return Err(SessionError::ManifestCorrupt {
            peer,
            disk: info.name.clone(),
        });
    }
    Ok(entries)
}

fn blockstore_page() -> u64 {
    // The source caps pages at this size; asking for more only wastes request ids.
    32 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::chunk::{ChunkHash, Geometry};

    /// A source that answers the first manifest request with `start` and `count` of its own.
    async fn answered_with(start: u64, count: u32) -> Result<Vec<ChunkEntry>, SessionError> {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let mut conn = Conn::new(Box::new(ours), "test");
        let mut peer = Conn::new(Box::new(theirs), "us");
        let info = DiskInfo {
            name: "d".into(),
            // 4 chunks: one page.
            geometry: Geometry::new(4 * 65536, 65536).expect("a valid geometry"),
            manifest_digest: ChunkHash::of(b"m"),
        };
        let source = tokio::spawn(async move {
            let Ok(frame) = peer.recv().await else { return };
            let Message::GetManifest { id, .. } = frame.msg else {
                return;
            };
            let payload = zstd::bulk::compress(&[0u8; 64], 1).expect("compresses");
            let msg = Message::Manifest { id, start, count };
            let _ = peer.send(&Frame::with_payload(msg, payload.into())).await;
        });
        let out = fetch_manifest(&mut conn, &info).await;
        source.abort();
        out
    }

    #[tokio::test]
    async fn a_manifest_page_outside_the_disk_or_over_a_page_is_refused_before_it_is_read() {
        // count = u32::MAX would size a 141 GB buffer; start + count would overflow.
        for (start, count) in [(0, u32::MAX), (u64::MAX, 2), (3, 2), (0, 40_000)] {
            let e = answered_with(start, count).await.expect_err("refused");
            assert!(
                e.to_string().contains("outside the disk"),
                "{start}+{count}: {e}"
            );
        }
    }
}
