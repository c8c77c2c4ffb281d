//! A source disk: a raw image file or a block device, read by offset.

use crate::error::{io_err, Result, StoreError};
use protocol::Geometry;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// An open source disk.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    size: u64,
    is_block_device: bool,
    mtime_ns: i128,
}

impl Image {
    /// Opens a raw image or block device read-only.
    pub fn open(path: &Path) -> Result<Image> {
        Self::open_with(path, false)
    }

    /// Opens a raw image or block device, writable when `write` is set.
    pub fn open_with(path: &Path, write: bool) -> Result<Image> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(io_err("cannot open image", path))?;
        let meta = file.metadata().map_err(io_err("cannot stat image", path))?;
        let is_block_device = meta.file_type().is_block_device();
        // A block device reports size 0 in its metadata; its end is where seeking stops.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(io_err("cannot find the size of image", path))?;
        Ok(Image {
            file,
            path: path.to_path_buf(),
            size,
            is_block_device,
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a block device (whose mtime says nothing about its content).
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Modification time in nanoseconds since the epoch.
    pub fn mtime_ns(&self) -> i128 {
        self.mtime_ns
    }

    /// The file, for callers that write or sync it.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a short read means the image shrank.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Truncated {
                    path: self.path.clone(),
                    detail: format!(
                        "{} bytes at offset {offset} could not be read (the image was {} bytes when opened)",
                        buf.len(),
                        self.size
                    ),
                }
            } else {
                StoreError::Io {
                    what: "cannot read image",
                    path: self.path.clone(),
                    source: e,
                }
            }
        })
    }

    /// Reads chunk `index` of `geometry`.
    pub fn read_chunk(&self, geometry: &Geometry, index: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; geometry.len(index)];
        self.read_exact_at(&mut buf, geometry.offset(index))?;
        Ok(buf)
    }
}
