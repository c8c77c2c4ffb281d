//! Building a manifest: every chunk of an image classified as zero or hashed with blake3.
//!
//! Work is split into 4 MiB reads spread over rayon's threads; hashing (4+ GB/s a core) and
//! reading both scale with the cores, which the source has to spare before a migration.

use crate::error::Result;
use crate::image::Image;
use protocol::{ChunkEntry, Geometry};
use rayon::prelude::*;

const READ_SIZE: u64 = 4 * 1024 * 1024;

/// Scans the whole image; `progress` is called with the bytes of each finished read.
pub fn scan(
    image: &Image,
    geometry: &Geometry,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<ChunkEntry>> {
    scan_range(image, geometry, 0..geometry.chunk_count(), progress)
}

/// Scans chunks `range` of the image.
pub fn scan_range(
    image: &Image,
    geometry: &Geometry,
    range: std::ops::Range<u64>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<ChunkEntry>> {
    let per_read = (READ_SIZE / geometry.chunk_size as u64).max(1);
    let starts: Vec<u64> = (range.start..range.end)
        .step_by(per_read as usize)
        .collect();
    let parts: Vec<Vec<ChunkEntry>> = starts
        .par_iter()
        .map(|&first| {
            let last = (first + per_read).min(range.end);
            let offset = geometry.offset(first);
            let len = (geometry.offset(last).min(geometry.size) - offset) as usize;
            let mut buf = vec![0u8; len];
            image.read_exact_at(&mut buf, offset)?;
            image.drop_cached(offset, len as u64);
            let entries = buf
                .chunks(geometry.chunk_size as usize)
                .map(ChunkEntry::of)
                .collect();
            progress(len as u64);
            Ok(entries)
        })
        .collect::<Result<_>>()?;
    Ok(parts.concat())
}

/// Digest of a manifest: equal digests mean equal content, chunk for chunk.
pub fn digest(entries: &[ChunkEntry]) -> protocol::ChunkHash {
    let mut h = blake3::Hasher::new();
    let mut buf = Vec::with_capacity(ChunkEntry::ENCODED_LEN);
    for e in entries {
        buf.clear();
        e.encode(&mut buf);
        h.update(&buf);
    }
    protocol::ChunkHash(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn scan_marks_zero_chunks_and_hashes_the_rest() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 4096 * 5 + 10];
        data[4096 * 2 + 5] = 1;
        data[4096 * 5 + 3] = 9;
        f.write_all(&data).unwrap();
        let img = Image::open(f.path()).unwrap();
        let g = Geometry::new(img.size(), 4096).unwrap();
        let m = scan(&img, &g, &|_| {}).unwrap();
        assert_eq!(m.len(), 6);
        assert_eq!(m[0], ChunkEntry::Zero);
        assert_eq!(m[2], ChunkEntry::of(&data[8192..12288]));
        assert!(matches!(m[5], ChunkEntry::Data(_)));
        assert_eq!(m[5], ChunkEntry::of(&data[20480..]));
    }
}
