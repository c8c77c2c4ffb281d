//! The first frame on every connection: magic, protocol version, role, and a status line.
//!
//! It has a fixed layout, unlike every later frame, so that two builds of different versions can
//! always read each other's hello and say clearly why they cannot talk.

use crate::PROTOCOL_VERSION;
use bytes::{BufMut, Bytes, BytesMut};

/// Eight bytes that open every heliotrope connection.
pub const MAGIC: &[u8; 8] = b"HELIOTRP";
const FIXED_LEN: usize = 8 + 4 + 1 + 4;

/// A parsed hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's protocol version.
    pub version: u32,
    /// `true` when the sender accepts the connection (always true from a client).
    pub accepted: bool,
    /// The sender's name, or the reason for refusing.
    pub text: String,
}

/// Why a hello could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    /// The frame does not start with [`MAGIC`].
    #[error(
        "the peer does not speak the heliotrope protocol (no HELIOTRP magic in its first frame)"
    )]
    BadMagic,
    /// The hello fails its checksum: damaged in transit.
    #[error("the peer's hello fails its checksum (corrupted in transit)")]
    Corrupt,
}

impl Hello {
    /// A hello of this build's version.
    pub fn ours(accepted: bool, text: impl Into<String>) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            accepted,
            text: text.into(),
        }
    }

    /// The frame bytes.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(FIXED_LEN + self.text.len());
        b.put_slice(MAGIC);
        b.put_u32(self.version);
        b.put_u8(u8::from(self.accepted));
        b.put_slice(&check(&b[..13], self.text.as_bytes()));
        b.put_slice(self.text.as_bytes());
        b.freeze()
    }

    /// Parses a frame; the text is taken lossily since it is only ever shown to a person.
    pub fn decode(frame: &[u8]) -> Result<Self, HelloError> {
        if frame.len() < FIXED_LEN || &frame[..8] != MAGIC {
            return Err(HelloError::BadMagic);
        }
        if frame[13..17] != check(&frame[..13], &frame[FIXED_LEN..]) {
            return Err(HelloError::Corrupt);
        }
        let version = u32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
        Ok(Hello {
            version,
            accepted: frame[12] != 0,
            text: String::from_utf8_lossy(&frame[FIXED_LEN..]).into_owned(),
        })
    }
}

/// Four bytes of blake3 over the fixed fields and the text: without it a flipped bit in the
/// version would read as a peer of another version.
fn check(fixed: &[u8], text: &[u8]) -> [u8; 4] {
    let mut h = blake3::Hasher::new();
    h.update(fixed);
    h.update(text);
    let d = h.finalize();
    [
        d.as_bytes()[0],
        d.as_bytes()[1],
        d.as_bytes()[2],
        d.as_bytes()[3],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello::ours(true, "agent-a");
        assert_eq!(Hello::decode(&h.encode()), Ok(h.clone()));
        assert_eq!(
            Hello::decode(b"GET / HTTP/1.1\r\n"),
            Err(HelloError::BadMagic)
        );
        assert_eq!(Hello::decode(b"HELIO"), Err(HelloError::BadMagic));
        let mut flipped = h.encode().to_vec();
        flipped[10] ^= 4;
        assert_eq!(Hello::decode(&flipped), Err(HelloError::Corrupt));
    }
}
