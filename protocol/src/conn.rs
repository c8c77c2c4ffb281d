//! A framed connection to a peer, over plain TCP (loopback only) or mutual TLS.
//!
//! Frames are length-delimited (`u32` big-endian length). After the hello exchange a connection is
//! split into a reader and a writer so that many requests can be in flight at once.

use crate::hello::{Hello, HelloError};
use crate::message::{Frame, MalformedFrame};
use crate::tls::TlsClient;
use crate::PROTOCOL_VERSION;
use bytes::{Buf, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedRead, LengthDelimitedCodec};

/// Largest frame accepted: a 1 MiB chunk with its header, or a page of manifest entries.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Anything a connection can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

type Framing = Framed<Box<dyn Io>, LengthDelimitedCodec>;

/// What went wrong on a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Could not connect.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// The cause.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("connection to {peer} failed: {source}")]
    Io {
        /// The peer.
        peer: String,
        /// The cause.
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("{peer} closed the connection")]
    Closed {
        /// The peer.
        peer: String,
    },
    /// The peer sent something that is not a valid frame.
    #[error("{peer} sent a malformed frame: {detail}")]
    Malformed {
        /// The peer.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// The peer is not a heliotrope agent.
    #[error("{peer}: {source}")]
    NotHeliotrope {
        /// The peer.
        peer: String,
        /// Why.
        source: HelloError,
    },
    /// The peer speaks another protocol version.
    #[error(
        "{peer} speaks protocol version {theirs}, this build speaks {ours}: upgrade the older side"
    )]
    Version {
        /// The peer.
        peer: String,
        /// Its version.
        theirs: u32,
        /// Ours.
        ours: u32,
    },
    /// The peer refused us.
    #[error("{peer} refused the connection: {reason}")]
    Refused {
        /// The peer.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// The peer sent nothing for as long as the connection allows while a reply was due
    /// (a blackholed link or a hung peer: the connection stays up, nothing answers).
    #[error("{peer} sent nothing for {}s while a reply was due (the link is blackholed or the peer hung); check the link and the source", after.as_secs_f64())]
    Silent {
        /// The peer.
        peer: String,
        /// How long it was silent.
        after: Duration,
    },
    /// TLS failed.
    #[error("TLS with {peer} failed: {source}")]
    Tls {
        /// The peer.
        peer: String,
        /// The cause.
        source: io::Error,
    },
}

impl ConnError {
    /// True when retrying the same peer may help (a network failure, not a refusal).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnError::Connect { .. }
                | ConnError::Io { .. }
                | ConnError::Closed { .. }
                | ConnError::NotHeliotrope {
                    source: HelloError::Corrupt,
                    ..
                }
        )
    }
}

/// A framed connection.
pub struct Conn {
    framed: Framing,
    peer: String,
    /// How long a send or a receive may wait for the peer; none waits for ever.
    timeout: Option<Duration>,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

impl Conn {
    /// Wraps a byte stream.
    pub fn new(io: Box<dyn Io>, peer: impl Into<String>) -> Self {
        Conn {
            framed: Framed::new(io, codec()),
            peer: peer.into(),
            timeout: None,
        }
    }

    /// The peer's address, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Bounds every later send and receive (and those of the halves of [`Conn::split`]):
    /// a peer silent for `timeout` fails them with [`ConnError::Silent`].
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    async fn send_raw(&mut self, body: bytes::Bytes) -> Result<(), ConnError> {
        let send = self.framed.send(body);
        within(self.timeout, &self.peer, send)
            .await?
            .map_err(|source| ConnError::Io {
                peer: self.peer.clone(),
                source,
            })
    }

    async fn recv_raw(&mut self) -> Result<bytes::Bytes, ConnError> {
        recv_body(&mut self.framed, &self.peer, self.timeout).await
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        let body = frame.encode().map_err(malformed(&self.peer))?;
        self.send_raw(body).await
    }

    /// Receives a frame.
    pub async fn recv(&mut self) -> Result<Frame, ConnError> {
        let body = self.recv_raw().await?;
        Frame::decode(body).map_err(malformed(&self.peer))
    }

    /// Client side of the hello exchange.
    pub async fn client_hello(&mut self, agent: &str) -> Result<(), ConnError> {
        self.send_raw(Hello::ours(true, agent).encode()).await?;
        let body = self.recv_raw().await?;
        let hello = Hello::decode(&body).map_err(|source| ConnError::NotHeliotrope {
            peer: self.peer.clone(),
            source,
        })?;
        if !hello.accepted {
            return Err(ConnError::Refused {
                peer: self.peer.clone(),
                reason: hello.text,
            });
        }
        if hello.version != PROTOCOL_VERSION {
            return Err(ConnError::Version {
                peer: self.peer.clone(),
                theirs: hello.version,
                ours: PROTOCOL_VERSION,
            });
        }
        Ok(())
    }

    /// Server side of the hello exchange; tells a peer of another version why it is refused.
    pub async fn server_hello(&mut self, agent: &str) -> Result<Hello, ConnError> {
        let body = self.recv_raw().await?;
        let hello = Hello::decode(&body).map_err(|source| ConnError::NotHeliotrope {
            peer: self.peer.clone(),
            source,
        })?;
        if hello.version != PROTOCOL_VERSION {
            let reason = format!(
                "protocol version {} is not supported; {agent} speaks version {PROTOCOL_VERSION}",
                hello.version
            );
            // Best effort: the peer may already be gone.
            let _ = self.send_raw(Hello::ours(false, reason).encode()).await;
            return Err(ConnError::Version {
                peer: self.peer.clone(),
                theirs: hello.version,
                ours: PROTOCOL_VERSION,
            });
        }
        self.send_raw(Hello::ours(true, agent).encode()).await?;
        Ok(hello)
    }

    /// Splits into independently usable halves.
    pub fn split(self) -> (FrameReader, FrameWriter) {
        let parts = self.framed.into_parts();
        let (rd, wr) = tokio::io::split(parts.io);
        let mut stream = FramedRead::new(rd, codec());
        // Bytes that arrived with the hello exchange belong to the next frames.
        stream.read_buffer_mut().extend_from_slice(&parts.read_buf);
        let mut writer = FrameWriter::new(wr, self.peer.clone());
        writer.timeout = self.timeout;
        (
            FrameReader {
                stream,
                peer: self.peer,
                timeout: self.timeout,
            },
            writer,
        )
    }
}

/// A frame that does not encode or decode, as an error of the connection to `peer`.
fn malformed(peer: &str) -> impl FnOnce(MalformedFrame) -> ConnError + '_ {
    move |MalformedFrame(detail)| ConnError::Malformed {
        peer: peer.to_string(),
        detail,
    }
}

/// Runs `fut` for at most `timeout`; past it the peer is [`ConnError::Silent`].
pub async fn within<F: std::future::Future>(
    timeout: Option<Duration>,
    peer: &str,
    fut: F,
) -> Result<F::Output, ConnError> {
    match timeout {
        None => Ok(fut.await),
        Some(after) => tokio::time::timeout(after, fut)
            .await
            .map_err(|_| ConnError::Silent {
                peer: peer.to_string(),
                after,
            }),
    }
}

// Cancel-safe: a frame partly read stays in the stream's buffer (which is what lets callers
// time out or select on a receive and call it again).
async fn recv_body<S>(
    stream: &mut S,
    peer: &str,
    timeout: Option<Duration>,
) -> Result<bytes::Bytes, ConnError>
where
    S: futures::Stream<Item = Result<bytes::BytesMut, io::Error>> + Unpin,
{
    match within(timeout, peer, stream.next()).await? {
        None => Err(ConnError::Closed {
            peer: peer.to_string(),
        }),
        Some(Ok(b)) => Ok(b.freeze()),
        // The codec reports an oversized or truncated length prefix as InvalidData.
        Some(Err(e)) if e.kind() == io::ErrorKind::InvalidData => Err(ConnError::Malformed {
            peer: peer.to_string(),
            detail: e.to_string(),
        }),
        // A TLS peer that goes away without close_notify has simply disconnected.
        Some(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ConnError::Closed {
            peer: peer.to_string(),
        }),
        Some(Err(source)) => Err(ConnError::Io {
            peer: peer.to_string(),
            source,
        }),
    }
}

/// The receiving half of a split connection.
pub struct FrameReader {
    stream: FramedRead<ReadHalf<Box<dyn Io>>, LengthDelimitedCodec>,
    peer: String,
    timeout: Option<Duration>,
}

impl FrameReader {
    /// Receives a frame.
    pub async fn recv(&mut self) -> Result<Frame, ConnError> {
        let body = recv_body(&mut self.stream, &self.peer, self.timeout).await?;
        Frame::decode(body).map_err(malformed(&self.peer))
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

/// The sending half of a split connection.
///
/// Payloads are written from the buffers they already live in (vectored writes), not copied
/// into a frame and again into the codec's buffer: at loopback rates those two copies were a
/// tenth of the source's CPU. Headers and small payloads are gathered into one buffer.
pub struct FrameWriter {
    io: WriteHalf<Box<dyn Io>>,
    /// Pieces waiting to be written, in order.
    queue: VecDeque<Bytes>,
    /// Small pieces being gathered before they join the queue.
    small: BytesMut,
    queued: usize,
    peer: String,
    timeout: Option<Duration>,
}

/// Payloads shorter than this are copied into the gathering buffer instead of queued apart.
const GATHER_BELOW: usize = 4096;
/// `feed` writes before it returns once this much is queued, so a fast producer waits for the
/// socket instead of buffering without bound.
const QUEUE_LIMIT: usize = 1 << 20;
/// Slices per `writev`.
const MAX_SLICES: usize = 64;

impl FrameWriter {
    fn new(io: WriteHalf<Box<dyn Io>>, peer: String) -> Self {
        FrameWriter {
            io,
            queue: VecDeque::new(),
            small: BytesMut::new(),
            queued: 0,
            peer,
            timeout: None,
        }
    }

    /// Sends a frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ConnError> {
        self.feed(frame).await?;
        self.flush().await
    }

    /// Queues a frame without flushing; call [`FrameWriter::flush`] after a burst.
    pub async fn feed(&mut self, frame: &Frame) -> Result<(), ConnError> {
        let mut head = frame.encode_head(4).map_err(malformed(&self.peer))?;
        let len = head.len() - 4 + frame.payload.len();
        if len > MAX_FRAME {
            return Err(ConnError::Malformed {
                peer: self.peer.clone(),
                detail: format!("outgoing frame of {len} bytes exceeds the limit of {MAX_FRAME}"),
            });
        }
        // Invariant: the frame was just checked against MAX_FRAME, which fits in a u32.
        head[..4].copy_from_slice(&u32::try_from(len).expect("bounded").to_be_bytes());
        self.small.extend_from_slice(&head);
        if frame.payload.len() < GATHER_BELOW {
            self.small.extend_from_slice(&frame.payload);
        } else {
            let gathered = self.small.split().freeze();
            self.queue.push_back(gathered);
            self.queue.push_back(frame.payload.clone());
        }
        self.queued += 4 + len;
        if self.queued >= QUEUE_LIMIT {
            let (timeout, peer) = (self.timeout, self.peer.clone());
            within(timeout, &peer, self.write_queued()).await??;
        }
        Ok(())
    }

    /// Writes everything queued and flushes the stream.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        let (timeout, peer) = (self.timeout, self.peer.clone());
        within(timeout, &peer, async {
            self.write_queued().await?;
            self.io.flush().await.map_err(|e| self.io_err(e))
        })
        .await?
    }

    // Not cancel-safe on its own (a write may be half done): callers bound it as a whole and
    // treat a timeout as the end of the connection.
    async fn write_queued(&mut self) -> Result<(), ConnError> {
        if !self.small.is_empty() {
            let gathered = self.small.split().freeze();
            self.queue.push_back(gathered);
        }
        while !self.queue.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .queue
                .iter()
                .take(MAX_SLICES)
                .map(|b| IoSlice::new(b))
                .collect();
            let mut n = self
                .io
                .write_vectored(&slices)
                .await
                .map_err(|e| self.io_err(e))?;
            if n == 0 {
                return Err(self.io_err(io::ErrorKind::WriteZero.into()));
            }
            self.queued = self.queued.saturating_sub(n);
            while n > 0 {
                // Invariant: the kernel wrote no more than the slices held, all from the queue.
                let front = self.queue.front_mut().expect("written bytes were queued");
                if n >= front.len() {
                    n -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        Ok(())
    }

    fn io_err(&self, source: io::Error) -> ConnError {
        ConnError::Io {
            peer: self.peer.clone(),
            source,
        }
    }
}

/// Dials `addr`, runs TLS when `tls` is given, and exchanges hellos.
pub async fn connect(addr: &str, tls: Option<&TlsClient>, agent: &str) -> Result<Conn, ConnError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    // Requests are small and latency-bound; Nagle would hold them back behind unacked data.
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match tls {
        Some(tls) => Box::new(
            tls.connect(addr, tcp)
                .await
                .map_err(|source| ConnError::Tls {
                    peer: addr.to_string(),
                    source,
                })?,
        ),
        None => Box::new(tcp),
    };
    let mut conn = Conn::new(io, addr);
    conn.client_hello(agent).await?;
    Ok(conn)
}
