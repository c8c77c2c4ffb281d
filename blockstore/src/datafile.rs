//! A replica's data file as the store sees it: the few operations it needs, behind a trait so
//! that a crash test can put a page-cache model under the store ([`crate::crashsim`]).
//!
//! Production uses [`OsFiles`]: plain `pread`/`pwrite`/`fdatasync`/`fallocate` on the file.
//! Paths that move bytes past this layer (direct I/O, `copy_file_range`) ask for the OS file
//! with [`DataFile::os_file`] and fall back to the plain operations where there is none.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The operations the store performs on a data file.
pub trait DataFile: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`.
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Deallocates a range so that it reads as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zeros, keeping it allocated.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The file's length.
    fn file_len(&self) -> io::Result<u64>;
    /// Sets the file's length (sparse when growing).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The OS file, for paths that move bytes past this layer; `None` where they must not.
    fn os_file(&self) -> Option<&File>;
}

/// Opens data files.
pub trait FileLayer: Send + Sync {
    /// Opens `path` for reading and writing; with `create`, creates it if it does not exist.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DataFile>>;
}

/// Plain files.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsFiles;

/// Opens a data file for reading and writing, creating it (empty) when `create` is set.
pub fn open_rw(path: &Path, create: bool) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}

impl FileLayer for OsFiles {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DataFile>> {
        Ok(Arc::new(OsFile(open_rw(path, create)?)))
    }
}

/// A plain file.
#[derive(Debug)]
pub struct OsFile(pub File);

impl DataFile for OsFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        punch_hole(&self.0, offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&self.0, offset, len)
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn os_file(&self) -> Option<&File> {
        Some(&self.0)
    }
}

/// Makes a directory entry durable: after creating or renaming a file, the file's data is
/// durable with `fsync`, but its name only once the directory holding it is synced too.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Deallocates a range so it reads as zeros (writing zeros where holes are not supported).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(
        std::os::fd::AsRawFd::as_raw_fd(file),
        flags,
        offset as i64,
        len as i64,
    ) {
        Ok(()) => Ok(()),
        // A filesystem without hole punching still reads zeros if we write them.
        Err(nix::errno::Errno::EOPNOTSUPP) => write_zeros(file, offset, len),
        Err(e) => Err(e.into()),
    }
}

/// Makes a range read as zeros and keeps it allocated (`FALLOC_FL_ZERO_RANGE`): the kernel
/// marks the blocks unwritten without moving data. Used for NBD WRITE_ZEROES, where punching
/// freed the blocks, and a filesystem mounted with `discard` waited on the device for each
/// punch: a 1 GiB `nbdcopy` upload through the tracking export took 2.8-4 s instead of 1.2 s
/// once earlier writes had allocated its zero regions. Freeing space is TRIM's job.
/// Writes zeros where the filesystem cannot (never a hole: NBD's NO_HOLE forbids one).
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let flags = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    match fallocate(fd, flags, offset as i64, len as i64) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => write_zeros(file, offset, len),
        Err(e) => Err(e.into()),
    }
}

/// Writes `len` zero bytes at `offset`, a bounded buffer at a time (an NBD request may zero
/// up to 4 GiB).
pub(crate) fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = PIECE.min(len - done) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
