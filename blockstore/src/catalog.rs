//! The source agent's catalog (`--state DIR`): each served image's manifest, kept in RocksDB so a
//! restart does not rescan terabytes.
//!
//! A stored manifest is reused only when the image looks unchanged: same path, size, mtime and
//! chunk size, and a sample of chunks re-hashed to the same values. A block device's mtime does not
//! move when it is written, so a block device is always rescanned.

use crate::db::Db;
use crate::dirty::{self, DirtyLog};
use crate::error::Result;
use crate::image::Image;
use crate::scan;
use protocol::{ChunkEntry, Geometry};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const LAYOUT_VERSION: u32 = 1;
const IMAGES: &str = "images";
const MANIFEST: &str = "manifest";
const SAMPLE: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    path: PathBuf,
    size: u64,
    mtime_ns: i128,
    chunk_size: u32,
}

/// How a manifest was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestOrigin {
    /// Loaded from the catalog.
    Reused,
    /// Built by scanning the image.
    Scanned,
}

/// The source's catalog of manifests.
pub struct Catalog {
    db: Db,
}

fn manifest_key(name: &str, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

impl Catalog {
    /// Opens (creating) the catalog in `dir`.
    pub fn open(dir: &Path) -> Result<Catalog> {
        Ok(Catalog {
            db: Db::open(
                dir,
                &[
                    IMAGES,
                    MANIFEST,
                    dirty::STAMPS,
                    dirty::ACTIVITY,
                    dirty::REPLICAS,
                    dirty::GENS,
                ],
                LAYOUT_VERSION,
            )?,
        })
    }

    /// The manifest of `image` served as `name`: reused when the image is unchanged, otherwise
    /// rebuilt (calling `progress` with scanned bytes) and stored.
    pub fn manifest(
        &self,
        name: &str,
        image: &Image,
        geometry: &Geometry,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Vec<ChunkEntry>, ManifestOrigin)> {
        let stamp = Stamp {
            path: image.path().to_path_buf(),
            size: image.size(),
            mtime_ns: image.mtime_ns(),
            chunk_size: geometry.chunk_size,
        };
        if !image.is_block_device() {
            if let Some(entries) = self.reusable(name, &stamp, image, geometry)? {
                return Ok((entries, ManifestOrigin::Reused));
            }
        }
        let entries = scan::scan(image, geometry, progress)?;
        self.store(name, &stamp, &entries)?;
        Ok((entries, ManifestOrigin::Scanned))
    }

    fn reusable(
        &self,
        name: &str,
        stamp: &Stamp,
        image: &Image,
        g: &Geometry,
    ) -> Result<Option<Vec<ChunkEntry>>> {
        let Some(raw) = self
            .db
            .db
            .get_cf(self.db.cf(IMAGES), name)
            .map_err(|e| self.db.err(e))?
        else {
            return Ok(None);
        };
        let Ok(old) = bincode::deserialize::<Stamp>(&raw) else {
            tracing::warn!(disk = name, "stored image stamp does not parse; rescanning");
            return Ok(None);
        };
        if old != *stamp {
            tracing::info!(
                disk = name,
                "image changed since its manifest was built; rescanning"
            );
            return Ok(None);
        }
        let entries = self.load(name)?;
        if entries.len() as u64 != g.chunk_count() {
            return Ok(None);
        }
        let mut rng = rand::thread_rng();
        let n = g.chunk_count();
        let mut sample = vec![0, n.saturating_sub(1)];
        sample.extend((0..SAMPLE).map(|_| rng.gen_range(0..n.max(1))));
        for index in sample.into_iter().filter(|&i| i < n) {
            let data = image.read_chunk(g, index)?;
            if ChunkEntry::of(&data) != entries[index as usize] {
                tracing::info!(
                    disk = name,
                    index,
                    "sampled chunk differs from the stored manifest; rescanning"
                );
                return Ok(None);
            }
        }
        Ok(Some(entries))
    }

    fn load(&self, name: &str) -> Result<Vec<ChunkEntry>> {
        let prefix = manifest_key(name, 0);
        let prefix = &prefix[..name.len() + 1];
        let mut out = Vec::new();
        let iter = self.db.db.iterator_cf(
            self.db.cf(MANIFEST),
            rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| self.db.err(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            let entry = ChunkEntry::decode(&v)
                .ok_or_else(|| self.db.corrupt(format!("manifest entry of {name}")))?;
            out.push(entry);
        }
        Ok(out)
    }

    fn store(&self, name: &str, stamp: &Stamp, entries: &[ChunkEntry]) -> Result<()> {
        let cf = self.db.cf(MANIFEST);
        let mut batch = rocksdb::WriteBatch::default();
        let mut end = manifest_key(name, u64::MAX);
        end.push(0xff);
        batch.delete_range_cf(cf, manifest_key(name, 0), end);
        let mut buf = Vec::with_capacity(ChunkEntry::ENCODED_LEN);
        for (i, e) in entries.iter().enumerate() {
            buf.clear();
            e.encode(&mut buf);
            batch.put_cf(cf, manifest_key(name, i as u64), &buf);
        }
        // Invariant: Stamp holds only plain data, which bincode always serialises.
        let stamp = bincode::serialize(stamp).expect("stamp serialises");
        batch.put_cf(self.db.cf(IMAGES), name, stamp);
        self.db.write_sync(batch)
    }

    /// The dirty-tracking state of disk `name`.
    pub fn dirty(&self, name: &str) -> DirtyLog<'_> {
        DirtyLog {
            db: &self.db,
            disk: name.to_string(),
        }
    }

    /// Records new entries for chunks of `name` (the image was written while served).
    pub fn update(&self, name: &str, changes: &[(u64, ChunkEntry)]) -> Result<()> {
        let cf = self.db.cf(MANIFEST);
        let mut batch = rocksdb::WriteBatch::default();
        let mut buf = Vec::with_capacity(ChunkEntry::ENCODED_LEN);
        for (i, e) in changes {
            buf.clear();
            e.encode(&mut buf);
            batch.put_cf(cf, manifest_key(name, *i), &buf);
        }
        self.db.write_sync(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn manifest_is_reused_until_the_image_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![3u8; 8192 * 4]).unwrap();
        drop(f);
        let cat = Catalog::open(&dir.path().join("state")).unwrap();
        let img = Image::open(&path).unwrap();
        let g = Geometry::new(img.size(), 8192).unwrap();
        let (m1, o1) = cat.manifest("a", &img, &g, &|_| {}).unwrap();
        assert_eq!(o1, ManifestOrigin::Scanned);
        let (m2, o2) = cat.manifest("a", &img, &g, &|_| {}).unwrap();
        assert_eq!((o2, &m2), (ManifestOrigin::Reused, &m1));

        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 8192], 0).unwrap();
        drop(f);
        let img = Image::open(&path).unwrap();
        let (m3, o3) = cat.manifest("a", &img, &g, &|_| {}).unwrap();
        assert_eq!(o3, ManifestOrigin::Scanned);
        assert_eq!(m3[0], ChunkEntry::Zero);
    }
}
