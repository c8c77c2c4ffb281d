//! A page-cache model under the store, for crash-consistency tests.
//!
//! [`CrashSim`] is a [`FileLayer`] whose files are real files (what a running process reads:
//! the page cache) plus, per file, a durable image and the writes made since the last
//! successful `fdatasync`. [`CrashSim::crash`] rewrites every file as a power cut could leave
//! it: the durable image with any subset of the unsynced writes applied, in their order.
//! Faults can be injected: the next writes or syncs fail with `EIO` (or `ENOSPC`). A failed
//! sync loses the writes it should have made durable, as Linux does after a writeback error
//! (the pages are marked clean; the next `fsync` reports success).
//!
//! RocksDB is not modelled: the store writes it only with synced batches, so what a crash
//! leaves of it is exactly what was acknowledged.
//!
//! Test support only: nothing in production opens files through it.

use crate::datafile::{DataFile, FileLayer};
use rand::Rng;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A change to a file's bytes not yet durable.
#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

#[derive(Default)]
struct Image {
    durable: Vec<u8>,
    unsynced: Vec<Op>,
}

impl Image {
    fn apply(bytes: &mut Vec<u8>, op: &Op) {
        let (offset, len) = match op {
            Op::Write { offset, data } => (*offset as usize, data.len()),
            Op::Zero { offset, len } => (*offset as usize, *len as usize),
        };
        if bytes.len() < offset + len {
            bytes.resize(offset + len, 0);
        }
        match op {
            Op::Write { data, .. } => bytes[offset..offset + len].copy_from_slice(data),
            Op::Zero { .. } => bytes[offset..offset + len].fill(0),
        }
    }
}

/// Which fault the next operations meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`.
    Io,
    /// `ENOSPC`.
    NoSpace,
}

#[derive(Default)]
struct State {
    files: HashMap<PathBuf, Image>,
    /// What the next writes meet, in order: a fault, or nothing (the write goes through).
    failing_writes: Vec<Option<Fault>>,
    failing_syncs: u32,
}

/// The simulated page cache of every file opened through it. Cheap to clone.
#[derive(Clone, Default)]
pub struct CrashSim {
    state: Arc<Mutex<State>>,
}

impl CrashSim {
    /// A simulation with no files yet.
    pub fn new() -> CrashSim {
        CrashSim::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next write, punch or zeroing fails with `fault` and changes nothing.
    pub fn fail_next_write(&self, fault: Fault) {
        self.state().failing_writes.push(Some(fault));
    }

    /// The next `n` writes not yet armed go through: faults armed after fall on later writes.
    pub fn pass_next_writes(&self, n: usize) {
        self.state()
            .failing_writes
            .extend(std::iter::repeat_n(None, n));
    }

    /// The next `fdatasync` fails with `EIO`, and the writes it should have made durable are lost.
    pub fn fail_next_sync(&self) {
        self.state().failing_syncs += 1;
    }

    /// Ends pending faults (none is left armed across a crash).
    pub fn clear_faults(&self) {
        let mut s = self.state();
        s.failing_writes.clear();
        s.failing_syncs = 0;
    }

    /// Writes are not durable yet in any file.
    pub fn unsynced_writes(&self) -> usize {
        self.state().files.values().map(|i| i.unsynced.len()).sum()
    }

    /// A power cut: every file becomes its durable image plus a random subset of its unsynced
    /// writes (applied in order). Every handle must have been dropped first.
    pub fn crash(&self, rng: &mut impl Rng) -> io::Result<()> {
        let mut s = self.state();
        s.failing_writes.clear();
        s.failing_syncs = 0;
        for (path, image) in s.files.iter_mut() {
            let mut bytes = image.durable.clone();
            for op in std::mem::take(&mut image.unsynced) {
                if rng.gen_bool(0.5) {
                    Image::apply(&mut bytes, &op);
                }
            }
            let f = std::fs::OpenOptions::new().write(true).open(path)?;
            let len = f.metadata()?.len();
            f.write_all_at(&bytes, 0)?;
            // Past the image the file was never written: it reads as zeros.
            if (bytes.len() as u64) < len {
                crate::datafile::punch_hole(&f, bytes.len() as u64, len - bytes.len() as u64)?;
            }
            image.durable = bytes;
        }
        Ok(())
    }

    fn take_write_fault(&self) -> io::Result<()> {
        let mut s = self.state();
        if s.failing_writes.is_empty() {
            return Ok(());
        }
        match s.failing_writes.remove(0) {
            None => Ok(()),
            Some(Fault::Io) => Err(io::Error::from_raw_os_error(libc::EIO)),
            Some(Fault::NoSpace) => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        }
    }

    fn record(&self, path: &Path, op: Op) {
        self.state()
            .files
            .entry(path.to_path_buf())
            .or_default()
            .unsynced
            .push(op);
    }
}

impl FileLayer for CrashSim {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn DataFile>> {
        let file = crate::datafile::open_rw(path, create)?;
        let mut s = self.state();
        if !s.files.contains_key(path) {
            // A file met for the first time is durable as it is.
            let mut durable = vec![0u8; file.metadata()?.len() as usize];
            file.read_exact_at(&mut durable, 0)?;
            s.files.insert(
                path.to_path_buf(),
                Image {
                    durable,
                    unsynced: Vec::new(),
                },
            );
        }
        Ok(Arc::new(SimFile {
            file,
            path: path.to_path_buf(),
            sim: self.clone(),
        }))
    }
}

/// A file opened through [`CrashSim`].
struct SimFile {
    file: File,
    path: PathBuf,
    sim: CrashSim,
}

impl DataFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.sim.take_write_fault()?;
        self.file.write_all_at(data, offset)?;
        let data = data.to_vec();
        self.sim.record(&self.path, Op::Write { offset, data });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.sim.state();
        let failing = s.failing_syncs > 0;
        let image = s.files.entry(self.path.clone()).or_default();
        let ops = std::mem::take(&mut image.unsynced);
        if failing {
            // Lost in writeback: the cache still shows them, the disk never will.
            s.failing_syncs -= 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for op in &ops {
            Image::apply(&mut image.durable, op);
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.sim.take_write_fault()?;
        crate::datafile::punch_hole(&self.file, offset, len)?;
        self.sim.record(&self.path, Op::Zero { offset, len });
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.sim.take_write_fault()?;
        crate::datafile::zero_range(&self.file, offset, len)?;
        self.sim.record(&self.path, Op::Zero { offset, len });
        Ok(())
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // Sizes are treated as durable at once (the store syncs them with the file's directory).
        self.file.set_len(len)?;
        let mut s = self.sim.state();
        let image = s.files.entry(self.path.clone()).or_default();
        image.durable.resize(len as usize, 0);
        Ok(())
    }

    fn os_file(&self) -> Option<&File> {
        // Direct I/O and copy_file_range would bypass the model.
        None
    }
}

/// Cases for a crash model's property test: `HELIO_CRASH_CASES` when set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("HELIO_CRASH_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
