//! Chunk payload compression: zstd at a fast level, raw when compression does not pay.
//!
//! Compression contexts are kept per thread: creating one per 64 KiB chunk would cost more than
//! compressing it.

use crate::message::Encoding;
use bytes::Bytes;
use std::cell::RefCell;

/// zstd level used on the wire unless the operator chooses another: fast enough to keep up with
/// a 10 Gbit link on one core for text-like data, and most of level 3's ratio on disk images.
pub const DEFAULT_LEVEL: i32 = 1;

/// A payload that does not decode to the chunk it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// zstd rejected the payload.
    #[error("chunk payload does not decompress: {0}")]
    Corrupt(String),
    /// The payload decoded to the wrong number of bytes.
    #[error("chunk payload decodes to {got} bytes, expected {expected}")]
    WrongLength {
        /// Bytes produced.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `data`; `None` when the result would not be meaningfully smaller (send it raw).
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let (_, c) = slot.as_mut()?;
        let out = c.compress(data).ok()?;
        // Under 1/32 saved is not worth the receiver's decompression time.
        (out.len() < data.len() - data.len() / 32).then_some(out)
    })
}

/// Decodes a payload of `expected` bytes. A raw payload is returned as it is, not copied.
pub fn decompress(
    encoding: Encoding,
    payload: &Bytes,
    expected: usize,
) -> Result<Bytes, CodecError> {
    let out = match encoding {
        Encoding::Raw => payload.clone(),
        Encoding::Zero => Bytes::from(vec![0u8; expected]),
        Encoding::Zstd => DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| CodecError::Corrupt(e.to_string()))?,
                );
            }
            // Invariant: filled just above.
            let d = slot.as_mut().expect("decompressor initialised above");
            d.decompress(payload, expected)
                .map(Bytes::from)
                .map_err(|e| CodecError::Corrupt(e.to_string()))
        })?,
    };
    if out.len() != expected {
        return Err(CodecError::WrongLength {
            got: out.len(),
            expected,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_compresses_and_round_trips() {
        let data: Vec<u8> = b"log line 42: all is well\n".repeat(3000);
        let z = compress(&data, DEFAULT_LEVEL).expect("text compresses");
        assert!(z.len() < data.len() / 10);
        assert_eq!(
            decompress(Encoding::Zstd, &z.into(), data.len()).unwrap(),
            data
        );
    }

    #[test]
    fn random_bytes_go_raw_and_corruption_is_caught() {
        let mut random = vec![0u8; 65536];
        blake3::Hasher::new().finalize_xof().fill(&mut random);
        assert!(
            compress(&random, DEFAULT_LEVEL).is_none(),
            "random data must be sent raw"
        );

        let text = b"abcabcabc".repeat(1000);
        let mut z = compress(&text, DEFAULT_LEVEL).unwrap();
        let mid = z.len() / 2;
        z[mid] ^= 0xff;
        let r = decompress(Encoding::Zstd, &z.into(), text.len());
        assert!(r.is_err() || r.unwrap() != text);
        assert!(decompress(Encoding::Raw, &Bytes::copy_from_slice(&random[..10]), 11).is_err());
    }
}
