//! The NBD server: ours, written from the protocol (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! - [`proto`]: the protocol's numbers and the request/reply layouts.
//! - [`handshake`]: fixed newstyle negotiation (GO, INFO, EXPORT_NAME, LIST, ABORT,
//!   STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`).
//! - [`transmission`]: the command loop: requests read in order, served concurrently, answered
//!   out of order by handle, with simple or structured replies.
//! - [`device`]: what an export must provide ([`Device`]); the store-backed one lives in
//!   [`crate::export`].
//! - [`listener`]: unix (mode 0600) and TCP listeners.

pub mod device;
pub mod handshake;
pub mod listener;
pub mod proto;
pub mod transmission;

pub use device::{Device, DeviceError, Extent};
