//! heliotrope's chunk store: everything about bytes at rest.
//!
//! - [`image`]: reading a source disk (raw file, block device, or an NBD export such as a
//!   qcow2 served by `qemu-nbd`) chunk by chunk.
//! - [`nbd_client`]: the small NBD client behind NBD images, with QEMU dirty bitmaps.
//! - [`scan`]: building a disk's manifest (zero detection and blake3 per chunk) in parallel.
//! - [`catalog`]: the source agent's `--state`: manifests kept in RocksDB, reused across restarts.
//! - [`store`]: the destination's `--store`: disks, per-chunk state and the content index in
//!   RocksDB; each disk's bytes in a sparse raw file served later by a plain `pread`.
//! - [`replica`]: one disk in the store; opening it checks the data file against its records.
//! - [`writer`]: [`ChunkWriter`], which makes chunks durable before recording them (data
//!   `fdatasync`, then one synced RocksDB batch) and withdraws a record before its bytes change.
//! - [`datafile`]: the operations on a data file, behind a trait; [`crashsim`] puts a
//!   page-cache model with injected faults under it for crash tests.
//! - [`direct`]: streaming chunk data to the device (`O_DIRECT` through io_uring), past the
//!   page cache, for seeds and sync rounds.
//! - [`dirty`]: the source's write generations, activity log and replicas' sync points.
//! - [`db`]: opening RocksDB with a versioned layout.

pub mod activity;
pub mod catalog;
pub mod crashsim;
pub mod datafile;
pub mod db;
pub mod direct;
pub mod dirty;
pub mod error;
pub mod image;
pub mod nbd_client;
pub mod replica;
pub mod scan;
pub mod store;
pub mod writer;
#[cfg(test)]
mod writer_model;

pub use catalog::Catalog;
pub use error::StoreError;
pub use image::Image;
pub use replica::{ChunkState, Replica};
pub use store::Store;
pub use writer::ChunkWriter;
