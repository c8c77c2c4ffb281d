//! The replication wire protocol shared by heliotrope's agents and clients.
//!
//! - [`chunk`]: what a chunk is (hash, zero marker, disk geometry): the vocabulary both sides share.
//! - [`hello`]: the fixed, version-carrying first frame each side sends.
//! - [`message`]: the request and reply headers (serde) and how a frame carries them.
//! - [`conn`]: a framed connection over TCP or TLS, split for pipelining.
//! - [`tls`] and [`pki`]: mutual TLS 1.3 with agent certificates from a private CA.
//! - [`codec`]: chunk payload compression (zstd, raw when it does not help).

pub mod chunk;
pub mod codec;
pub mod conn;
pub mod hello;
pub mod message;
pub mod pki;
pub mod tls;

pub use chunk::{ChunkEntry, ChunkHash, Geometry};
pub use conn::{connect, Conn, ConnError, FrameReader, FrameWriter};
pub use message::{DiskInfo, Encoding, ErrorKind, Frame, Message, DIRTY_UNKNOWN};

/// Version of the replication protocol spoken by this build; carried in every hello.
/// 2: `GetChunk` names the sync round it fetches for.
pub const PROTOCOL_VERSION: u32 = 2;
