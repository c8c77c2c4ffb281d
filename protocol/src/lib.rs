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
pub use message::{
    decode_cut, encode_cut, CutDisk, DiskInfo, Encoding, ErrorKind, Frame, Message, PatchedChunk,
    DIRTY_UNKNOWN, MAX_PATCH_CHUNKS, MAX_PATCH_RAW,
};

/// Checks a disk, VM or job name: 1 to 128 letters, digits, `.`, `_` or `-` (names become file
/// and socket names, NBD export names and database keys). The error says what is allowed.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} name {name:?}: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

/// Version of the replication protocol spoken by this build; carried in every hello.
/// 2: `GetChunk` names the sync round it fetches for.
pub const PROTOCOL_VERSION: u32 = 2;
