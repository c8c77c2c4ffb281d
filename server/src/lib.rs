//! heliotrope's agents: the long-running processes that serve disks.
//!
//! - [`source`]: the replication source (`helio source`): serves manifests and chunks of its
//!   images to destination agents over the replication protocol.
//! - [`listen`]: accepting connections, with mutual TLS, and the loopback-only rule without it.
//! - [`export`]: a store replica as an NBD device: on-demand fetch, background copy, local
//!   writes, status (`helio export`, `helio status`).
//! - [`planned`]: what a sync round's plan read at the source, kept for that round's requests.
//! - [`tracked`]: write tracking at the source: the NBD device a running VM writes through, and
//!   the generations that tell each sync round what to ship.
//! - [`nbd`]: the NBD server (protocol, handshake, transmission, listeners).
//! - [`vmpeer`]: VM requests between agents on the replication protocol, and the tunnel that
//!   carries a QEMU migration stream.

pub mod export;
pub mod listen;
pub mod nbd;
pub mod planned;
pub mod source;
pub mod tracked;
#[cfg(test)]
mod tracked_model;
pub mod vmpeer;

pub use listen::{Acceptor, ListenError};
pub use source::{Source, SourceDisk};
