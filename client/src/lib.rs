//! heliotrope's clients: what talks to a source agent from the destination side.
//!
//! - [`seed`]: `helio seed`: plans a disk against the local store (zeros, chunks already held
//!   by any disk, chunks to fetch), fetches over several pipelined streams, verifies and lands
//!   every chunk durably, and resumes where an interrupted run stopped.
//! - [`fetch`]: single chunks on demand, many in flight on one connection, each verified (used
//!   by `helio export --from`).
//! - [`sync`]: `helio sync`: incremental rounds (disk pre-copy) until converged.
//! - [`session`]: one connection to a source agent with its disk opened.
//! - [`window`]: how many bytes a stream keeps in flight to fill a long, fat link.

pub mod fetch;
pub mod seed;
pub mod session;
pub mod sync;
pub mod window;

pub use seed::{seed, Compress, SeedError, SeedOptions, SeedProgress, SeedReport};
