//! NBD protocol numbers and layouts (fixed newstyle, structured replies, `base:allocation`).

/// "NBDMAGIC": opens the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle marker, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server will omit the 124 zero bytes after EXPORT_NAME when the client agrees.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client agrees to no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and start transmission.
pub const OPT_GO: u32 = 7;
/// Enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// An export in a LIST reply.
pub const REP_SERVER: u32 = 2;
/// An info item.
pub const REP_INFO: u32 = 3;
/// A metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option not supported.
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
/// Refused by policy.
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Export name.
pub const INFO_NAME: u16 = 1;
/// Export description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Read-only export.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// FLUSH supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// FUA supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// TRIM supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Several connections see each other's flushed writes.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// CACHE supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// FAST_ZERO supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// WRITE_ZEROES must allocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment (READ).
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// One extent only (BLOCK_STATUS).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Fail rather than zero slowly (WRITE_ZEROES).
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flags.
pub const STATE_HOLE: u32 = 1 << 0;
/// Reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// Errors (errno values on the wire).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// Beyond the end (writes) or out of space.
pub const ENOSPC: u32 = 28;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// Shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id on a connection.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest request payload accepted (qemu-nbd's limit too).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Largest option payload accepted during negotiation.
pub const MAX_OPTION: u32 = 64 * 1024;

/// A request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Bytes of a request header.
    pub const LEN: usize = 28;

    /// Parses a header; `None` when the magic is wrong (the stream cannot be trusted after that).
    pub fn parse(b: &[u8; Self::LEN]) -> Option<Request> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return None;
        }
        let be64 = |s: &[u8]| u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
        Some(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_parses_and_bad_magic_is_refused() {
        let mut b = [0u8; Request::LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&42u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::parse(&b).unwrap();
        assert_eq!(
            (r.flags, r.kind, r.handle, r.offset, r.length),
            (CMD_FLAG_FUA, CMD_WRITE, 42, 4096, 512)
        );
        b[0] ^= 1;
        assert!(Request::parse(&b).is_none());
    }
}
