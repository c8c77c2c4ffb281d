//! heliotrope's agents: the long-running processes that serve disks.
//!
//! - [`source`]: the replication source (`helio source`): serves manifests and chunks of its
//!   images to destination agents over the replication protocol.
//! - [`listen`]: accepting connections, with mutual TLS, and the loopback-only rule without it.

pub mod listen;
pub mod source;

pub use listen::{Acceptor, ListenError};
pub use source::{Source, SourceDisk};
