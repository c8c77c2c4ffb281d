//! Page batches: how pages travel. A batch lists records (page number and kind) followed by the
//! data of the pages that carry data; the whole batch is zstd-compressed when that pays.
//!
//! Kinds: `Zero` (a marker: the page now reads as zeros), `Data` (the page's 4 KiB), `Ref`
//! (the destination already holds this content at another page: copy it from there; the
//! content's blake3 travels along and is checked on arrival).

use crate::page::PAGE_SIZE;
use protocol::{ChunkHash, Encoding};

const ZERO: u8 = 0;
const DATA: u8 = 1;
const REF: u8 = 2;

/// One page in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The page is all zeros.
    Zero,
    /// The page's bytes.
    Data(&'a [u8]),
    /// Same content as the destination's page `from`, whose hash is `hash`.
    Ref {
        /// The page to copy from.
        from: u64,
        /// The content's hash.
        hash: ChunkHash,
    },
}

/// A batch that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("malformed page batch: {0}")]
pub struct BatchError(pub String);

/// Builds a batch.
#[derive(Default)]
pub struct BatchBuilder {
    records: Vec<u8>,
    data: Vec<u8>,
    pages: u32,
}

impl BatchBuilder {
    /// Adds a page.
    pub fn push(&mut self, page: u64, record: &Record<'_>) {
        self.records.extend_from_slice(&page.to_le_bytes());
        match record {
            Record::Zero => self.records.push(ZERO),
            Record::Data(d) => {
                self.records.push(DATA);
                self.data.extend_from_slice(&d[..PAGE_SIZE]);
            }
            Record::Ref { from, hash } => {
                self.records.push(REF);
                self.records.extend_from_slice(&from.to_le_bytes());
                self.records.extend_from_slice(&hash.0);
            }
        }
        self.pages += 1;
    }

    /// Pages so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Raw bytes so far (what the batch would be uncompressed).
    pub fn raw_len(&self) -> usize {
        4 + self.records.len() + self.data.len()
    }

    /// The encoded batch, compressed at `level` when that saves enough; `None` to never
    /// compress. Resets the builder.
    pub fn finish(&mut self, level: Option<i32>) -> (Encoding, u32, Vec<u8>) {
        let mut raw = Vec::with_capacity(self.raw_len());
        raw.extend_from_slice(&self.pages.to_le_bytes());
        raw.extend_from_slice(&self.records);
        raw.extend_from_slice(&self.data);
        let pages = self.pages;
        *self = BatchBuilder::default();
        match level.and_then(|l| protocol::codec::compress(&raw, l)) {
            Some(z) => (Encoding::Zstd, pages, z),
            None => (Encoding::Raw, pages, raw),
        }
    }
}

/// The raw size a batch of `pages` pages can at most have.
fn max_raw(pages: u32) -> usize {
    4 + pages as usize * (8 + 1 + 40 + PAGE_SIZE)
}

/// Decodes a batch into its raw form (decompressing if needed).
pub fn decode_payload(
    encoding: Encoding,
    pages: u32,
    payload: &[u8],
) -> Result<Vec<u8>, BatchError> {
    match encoding {
        Encoding::Raw => Ok(payload.to_vec()),
        Encoding::Zstd => zstd::bulk::decompress(payload, max_raw(pages))
            .map_err(|e| BatchError(format!("does not decompress: {e}"))),
        Encoding::Zero => Err(BatchError("a batch cannot be encoded as Zero".into())),
    }
}

/// Walks the records of a raw batch.
pub fn records(raw: &[u8]) -> Result<Vec<(u64, Record<'_>)>, BatchError> {
    let short = || BatchError(format!("truncated ({} bytes)", raw.len()));
    let count = u32::from_le_bytes(
        raw.get(..4)
            .ok_or_else(short)?
            .try_into()
            .map_err(|_| short())?,
    );
    if max_raw(count) < raw.len() || count as usize > raw.len() {
        return Err(BatchError(format!(
            "{count} pages cannot fill {} bytes",
            raw.len()
        )));
    }
    let mut at = 4;
    let mut heads = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let page = u64::from_le_bytes(
            raw.get(at..at + 8)
                .ok_or_else(short)?
                .try_into()
                .map_err(|_| short())?,
        );
        let kind = *raw.get(at + 8).ok_or_else(short)?;
        at += 9;
        match kind {
            ZERO | DATA => heads.push((page, kind, 0, [0u8; 32])),
            REF => {
                let from = u64::from_le_bytes(
                    raw.get(at..at + 8)
                        .ok_or_else(short)?
                        .try_into()
                        .map_err(|_| short())?,
                );
                let hash: [u8; 32] = raw
                    .get(at + 8..at + 40)
                    .ok_or_else(short)?
                    .try_into()
                    .map_err(|_| short())?;
                at += 40;
                heads.push((page, kind, from, hash));
            }
            k => {
                return Err(BatchError(format!(
                    "unknown record kind {k} for page {page}"
                )))
            }
        }
    }
    let mut out = Vec::with_capacity(heads.len());
    for (page, kind, from, hash) in heads {
        let rec = match kind {
            ZERO => Record::Zero,
            DATA => {
                let d = raw.get(at..at + PAGE_SIZE).ok_or_else(short)?;
                at += PAGE_SIZE;
                Record::Data(d)
            }
            _ => Record::Ref {
                from,
                hash: ChunkHash(hash),
            },
        };
        out.push((page, rec));
    }
    if at != raw.len() {
        return Err(BatchError(format!("{} trailing bytes", raw.len() - at)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_garbage_is_an_error() {
        let text = b"page of text ".repeat(400)[..PAGE_SIZE].to_vec();
        let mut b = BatchBuilder::default();
        b.push(3, &Record::Zero);
        b.push(9, &Record::Data(&text));
        let hash = ChunkHash::of(&text);
        b.push(12, &Record::Ref { from: 9, hash });
        let (enc, pages, payload) = b.finish(Some(1));
        assert_eq!((enc, pages), (Encoding::Zstd, 3));
        assert!(payload.len() < 1000);
        let raw = decode_payload(enc, pages, &payload).unwrap();
        let recs = records(&raw).unwrap();
        assert_eq!(
            recs,
            vec![
                (3, Record::Zero),
                (9, Record::Data(&text)),
                (12, Record::Ref { from: 9, hash })
            ]
        );
        for cut in [0, 3, 10, raw.len() - 1] {
            assert!(records(&raw[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = raw.clone();
        bad[12] = 9;
        assert!(records(&bad).is_err());
        assert!(decode_payload(Encoding::Zstd, 3, b"not zstd").is_err());
        let mut huge = raw.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(records(&huge).is_err());
    }
}
