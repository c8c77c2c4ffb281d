//! A small blocking NBD client for reading a disk that QEMU owns (`qemu-nbd`, or QEMU's own
//! NBD server) and for asking it which extents a persistent dirty bitmap marks.
//!
//! Fixed newstyle, structured replies, `qemu:dirty-bitmap:NAME` through SET_META_CONTEXT,
//! READ and BLOCK_STATUS; one request at a time, each reply checked against its handle.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
/// Largest read sent at once (qemu-nbd caps requests at 32 MiB).
const MAX_READ: usize = 4 << 20;

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Where an NBD export is: `nbd+unix:///NAME?socket=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// The export name.
    pub export: String,
    /// The unix socket.
    pub socket: String,
}

impl NbdUri {
    /// Parses an `nbd+unix` URI; `None` for anything else.
    pub fn parse(uri: &str) -> Option<NbdUri> {
        let rest = uri.strip_prefix("nbd+unix://")?;
        let rest = rest.strip_prefix('/').unwrap_or(rest);
        let (export, query) = rest.split_once('?')?;
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        Some(NbdUri {
            export: export.to_string(),
            socket: socket.to_string(),
        })
    }
}

/// A connected client.
pub struct NbdClient {
    s: UnixStream,
    size: u64,
    bitmap_context: Option<u32>,
    next_handle: u64,
}

impl NbdClient {
    /// Connects, negotiates structured replies (and the bitmap's context when asked), and GOes.
    pub fn connect(uri: &NbdUri, bitmap: Option<&str>) -> io::Result<NbdClient> {
        let mut s = UnixStream::connect(&uri.socket)?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet)?;
        if u64::from_be_bytes(greet[..8].try_into().expect("8 bytes")) != NBDMAGIC
            || u64::from_be_bytes(greet[8..16].try_into().expect("8 bytes")) != IHAVEOPT
        {
            return Err(bad(format!("{} is not a newstyle NBD server", uri.socket)));
        }
        s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut c = NbdClient {
            s,
            size: 0,
            bitmap_context: None,
            next_handle: 1,
        };
        c.option(OPT_STRUCTURED_REPLY, &[])?;
        c.expect_ack(OPT_STRUCTURED_REPLY)?;
        if let Some(b) = bitmap {
            let query = format!("qemu:dirty-bitmap:{b}");
            let mut d = (uri.export.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(uri.export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(query.len() as u32).to_be_bytes());
            d.extend_from_slice(query.as_bytes());
            c.option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (kind, data) = c.opt_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        c.bitmap_context =
                            Some(u32::from_be_bytes(data[..4].try_into().expect("4 bytes")));
                    }
                    REP_ACK => break,
                    _ => {
                        return Err(bad(format!(
                            "unexpected reply {kind:#x} to SET_META_CONTEXT"
                        )))
                    }
                }
            }
            if c.bitmap_context.is_none() {
                return Err(bad(format!(
                    "export {:?} offers no dirty bitmap {b:?} (export it with `qemu-nbd -B {b}`)",
                    uri.export
                )));
            }
        }
        let mut d = (uri.export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(uri.export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        c.option(OPT_GO, &d)?;
        loop {
            let (kind, data) = c.opt_reply(OPT_GO)?;
            match kind {
                REP_INFO if data.len() >= 10 && data[..2] == [0, 0] => {
                    c.size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                }
                REP_INFO => {}
                REP_ACK => break,
                _ => return Err(bad(format!("unexpected reply {kind:#x} to GO"))),
            }
        }
        Ok(c)
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    fn opt_reply(&mut self, opt: u32) -> io::Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        if u64::from_be_bytes(h[..8].try_into().expect("8 bytes")) != OPT_REPLY_MAGIC
            || u32::from_be_bytes(h[8..12].try_into().expect("4 bytes")) != opt
        {
            return Err(bad("malformed option reply"));
        }
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
        if len > 1 << 20 {
            return Err(bad("option reply too long"));
        }
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data)?;
        if kind & 0x8000_0000 != 0 {
            return Err(bad(format!(
                "server refused option {opt}: {}",
                String::from_utf8_lossy(&data)
            )));
        }
        Ok((kind, data))
    }

    fn expect_ack(&mut self, opt: u32) -> io::Result<()> {
        match self.opt_reply(opt)? {
            (REP_ACK, _) => Ok(()),
            (k, _) => Err(bad(format!("expected ACK to option {opt}, got {k:#x}"))),
        }
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&b)?;
        Ok(handle)
    }

    /// Reads reply chunks for `handle`, handing each (type, payload) to `each`.
    fn replies(
        &mut self,
        handle: u64,
        mut each: impl FnMut(u16, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        loop {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m)?;
            match u32::from_be_bytes(m) {
                SIMPLE_REPLY_MAGIC => {
                    let mut h = [0u8; 12];
                    self.s.read_exact(&mut h)?;
                    let err = u32::from_be_bytes(h[..4].try_into().expect("4 bytes"));
                    if u64::from_be_bytes(h[4..].try_into().expect("8 bytes")) != handle {
                        return Err(bad("reply to another request"));
                    }
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(err as i32))
                    };
                }
                STRUCTURED_REPLY_MAGIC => {
                    let mut h = [0u8; 16];
                    self.s.read_exact(&mut h)?;
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let kind = u16::from_be_bytes([h[2], h[3]]);
                    let got = u64::from_be_bytes(h[4..12].try_into().expect("8 bytes"));
                    let len = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes")) as usize;
                    if got != handle {
                        return Err(bad("reply to another request"));
                    }
                    if len > MAX_READ + 1024 {
                        return Err(bad("reply chunk too long"));
                    }
                    let mut payload = vec![0u8; len];
                    self.s.read_exact(&mut payload)?;
                    if kind & 0x8000 != 0 {
                        let errno = payload
                            .get(..4)
                            .map_or(5, |e| u32::from_be_bytes(e.try_into().expect("4 bytes")));
                        let msg = payload
                            .get(6..)
                            .map(String::from_utf8_lossy)
                            .unwrap_or_default();
                        return Err(io::Error::new(
                            io::Error::from_raw_os_error(errno as i32).kind(),
                            format!("NBD error {errno}: {msg}"),
                        ));
                    }
                    each(kind, &payload)?;
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
                _ => return Err(bad("reply with a bad magic")),
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (i, piece) in buf.chunks_mut(MAX_READ).enumerate() {
            let off = offset + (i * MAX_READ) as u64;
            piece.fill(0);
            let len = piece.len();
            let handle = self.request(CMD_READ, off, len as u32)?;
            self.replies(handle, |kind, p| {
                match kind {
                    REPLY_OFFSET_DATA if p.len() >= 8 => {
                        let at = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
                        let start = at
                            .checked_sub(off)
                            .map(|s| s as usize)
                            .filter(|s| s + p.len() - 8 <= len)
                            .ok_or_else(|| bad("data outside the request"))?;
                        piece[start..start + p.len() - 8].copy_from_slice(&p[8..]);
                    }
                    // Holes read as zeros: the buffer already is.
                    REPLY_OFFSET_HOLE | REPLY_NONE => {}
                    k => return Err(bad(format!("unexpected reply chunk {k} to READ"))),
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The extents the dirty bitmap marks, as (offset, length), over the whole export.
    pub fn dirty_extents(&mut self) -> io::Result<Vec<(u64, u64)>> {
        let ctx = self
            .bitmap_context
            .ok_or_else(|| bad("no dirty bitmap was negotiated"))?;
        let mut out = Vec::new();
        let mut off = 0u64;
        while off < self.size {
            let len = (self.size - off).min(1 << 30) as u32;
            let handle = self.request(CMD_BLOCK_STATUS, off, len)?;
            let mut covered = 0u64;
            self.replies(handle, |kind, p| {
                if kind != REPLY_BLOCK_STATUS
                    || p.len() < 4
                    || u32::from_be_bytes(p[..4].try_into().expect("4 bytes")) != ctx
                {
                    return Ok(());
                }
                let mut at = off;
                for d in p[4..].chunks_exact(8) {
                    let l = u32::from_be_bytes(d[..4].try_into().expect("4 bytes")) as u64;
                    let flags = u32::from_be_bytes(d[4..].try_into().expect("4 bytes"));
                    if flags & 1 != 0 {
                        out.push((at, l));
                    }
                    at += l;
                }
                covered = at - off;
                Ok(())
            })?;
            if covered == 0 {
                return Err(bad("block status made no progress"));
            }
            off += covered;
        }
        Ok(out)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0);
    }
}
