//! The store's error type: every variant names the object that failed.

use std::path::PathBuf;

/// Why a store or catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("metadata database {path}: {source}")]
    Db {
        /// Database directory.
        path: PathBuf,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory holds another layout version.
    #[error("{path} has layout version {found}, this build reads version {expected}")]
    Layout {
        /// Database directory.
        path: PathBuf,
        /// Version on disk.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// No disk of that name.
    #[error("no disk named {name:?} in {path} (seed it first with `helio seed`)")]
    UnknownDisk {
        /// The name.
        name: String,
        /// The store.
        path: PathBuf,
    },
    /// A stored record does not parse.
    #[error("corrupt record in {path}: {detail}")]
    Corrupt {
        /// Database directory.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// The image is shorter than its manifest or geometry says.
    #[error("image {path} is shorter than expected: {detail}")]
    Truncated {
        /// The image.
        path: PathBuf,
        /// Where the data ran out.
        detail: String,
    },
    /// The store's volume is nearly full.
    #[error("store {path} has only {free} bytes free and keeps {reserve} for its metadata: free some space or use a larger volume; what was stored so far is kept")]
    Full {
        /// The store.
        path: PathBuf,
        /// Free bytes.
        free: u64,
        /// Bytes kept back.
        reserve: u64,
    },
    /// A commit failed earlier; the replica acknowledges nothing more until it is reopened.
    #[error("replica {path} stopped after a failed commit ({detail}): it acknowledges nothing more; restart the command or export to reopen it, which fetches again whatever was not durably recorded")]
    Failed {
        /// The replica's data file.
        path: PathBuf,
        /// The failure that stopped it.
        detail: String,
    },
    /// A disk's shape changed incompatibly.
    #[error("disk {name:?}: {detail}")]
    Geometry {
        /// The disk.
        name: String,
        /// What differs.
        detail: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    what: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { what, path, source }
}
