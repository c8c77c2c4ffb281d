//! What an NBD export must provide. The transmission loop checks ranges and flags; a device
//! only sees requests that are in range and allowed.

use std::future::Future;

/// A failed device operation: an NBD errno and a message for the log.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DeviceError {
    /// The errno sent to the client ([`super::proto::EIO`] and friends).
    pub errno: u32,
    /// What failed, for the log.
    pub message: String,
}

impl DeviceError {
    /// An I/O error.
    pub fn io(message: impl Into<String>) -> Self {
        DeviceError {
            errno: super::proto::EIO,
            message: message.into(),
        }
    }

    /// Not supported (FAST_ZERO that would be slow).
    pub fn notsup(message: impl Into<String>) -> Self {
        DeviceError {
            errno: super::proto::ENOTSUP,
            message: message.into(),
        }
    }

    /// Out of space.
    pub fn nospc(message: impl Into<String>) -> Self {
        DeviceError {
            errno: super::proto::ENOSPC,
            message: message.into(),
        }
    }
}

/// A run of bytes with one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u32,
    /// `base:allocation` flags ([`super::proto::STATE_HOLE`], [`super::proto::STATE_ZERO`]).
    pub flags: u32,
}

/// An exported disk. Methods may be called concurrently from many connections.
pub trait Device: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True when writes are refused.
    fn read_only(&self) -> bool;
    /// Reads `len` bytes at `offset`.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<u8>, DeviceError>> + Send;
    /// Writes `data` at `offset`; durable before returning when `fua`.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Zeroes a range; may leave holes unless `no_hole`.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// True when zeroing the range is fast (no slower than writing it would be). A
    /// WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO over a range where this is false fails with
    /// ENOTSUP at once, as the NBD spec asks, so the client can write zeros itself.
    fn zeroing_is_fast(&self, _offset: u64, _len: u32) -> bool {
        true
    }
    /// Discards a range (it may then read as anything; ours reads as zeros).
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Makes every completed write durable, from every connection.
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Brings a range close (prefetch).
    fn cache(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Allocation of a range, as extents covering at least its first byte.
    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<Extent>, DeviceError>> + Send;
}
