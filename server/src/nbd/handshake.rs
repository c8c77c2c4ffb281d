//! Fixed newstyle negotiation, up to the start of transmission.
//!
//! Unknown options get `NBD_REP_ERR_UNSUP` and negotiation goes on, as the baseline requires.
//! With TLS configured, everything but STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD` until the
//! connection is upgraded.

use super::device::Device;
use super::proto::*;
use protocol::conn::Io;
use protocol::tls::TlsServer;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One export offered by a server.
pub struct Export<D> {
    /// Its name (the disk's name).
    pub name: String,
    /// The device.
    pub device: Arc<D>,
}

impl<D> Clone for Export<D> {
    fn clone(&self) -> Self {
        Export {
            name: self.name.clone(),
            device: self.device.clone(),
        }
    }
}

/// The outcome of a successful negotiation.
pub struct Negotiated<D> {
    /// The stream, possibly upgraded to TLS.
    pub io: Box<dyn Io>,
    /// The chosen export.
    pub export: Export<D>,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected.
    pub base_allocation: bool,
}

/// The block sizes advertised: any byte alignment works, 4 KiB is preferred.
const PREFERRED_BLOCK: u32 = 4096;

async fn reply(io: &mut Box<dyn Io>, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    io.write_all(&b).await?;
    io.flush().await
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses `u32 len, name` at the start of `data`; returns the name and the rest.
fn take_string(data: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let s = data.get(4..4 + len)?;
    Some((String::from_utf8_lossy(s).into_owned(), &data[4 + len..]))
}

fn export_info(dev: &dyn SizeFlags) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&dev.size().to_be_bytes());
    b.extend_from_slice(&dev.transmission_flags().to_be_bytes());
    b
}

/// Size and transmission flags of a device, object-safe.
pub trait SizeFlags {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Flags announced for it.
    fn transmission_flags(&self) -> u16;
}

impl<D: Device> SizeFlags for D {
    fn size(&self) -> u64 {
        Device::size(self)
    }
    fn transmission_flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_FAST_ZERO
            | TF_SEND_CACHE
            // All connections share one data file and one flush: a flush covers them all.
            | TF_CAN_MULTI_CONN;
        if self.read_only() {
            f |= TF_READ_ONLY;
        }
        f
    }
}

/// Runs the handshake. `Ok(None)` when the client aborted or went away politely.
pub async fn negotiate<D: Device>(
    mut io: Box<dyn Io>,
    exports: &[Export<D>],
    tls: Option<&TlsServer>,
    peer: &str,
) -> io::Result<Option<Negotiated<D>>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting).await?;
    io.flush().await?;
    let client_flags = io.read_u32().await?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error("client does not speak fixed newstyle NBD"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut tls_done = tls.is_none();
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        if io.read_u64().await? != IHAVEOPT {
            return Err(protocol_error("option without IHAVEOPT magic"));
        }
        let opt = io.read_u32().await?;
        let len = io.read_u32().await?;
        if len > MAX_OPTION {
            return Err(protocol_error(format!(
                "option {opt} carries {len} bytes, more than {MAX_OPTION}"
            )));
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;

        if !tls_done && !matches!(opt, OPT_STARTTLS | OPT_ABORT) {
            if opt == OPT_EXPORT_NAME {
                return Err(protocol_error(
                    "EXPORT_NAME before STARTTLS on a TLS-only server",
                ));
            }
            reply(
                &mut io,
                opt,
                REP_ERR_TLS_REQD,
                b"this server requires TLS (STARTTLS)",
            )
            .await?;
            continue;
        }
        match opt {
            OPT_STARTTLS => {
                let Some(tls) = tls.filter(|_| !tls_done) else {
                    let kind = if tls.is_some() {
                        REP_ERR_INVALID
                    } else {
                        REP_ERR_POLICY
                    };
                    reply(&mut io, opt, kind, b"TLS is not offered on this connection").await?;
                    continue;
                };
                if !data.is_empty() {
                    reply(&mut io, opt, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
                    continue;
                }
                reply(&mut io, opt, REP_ACK, &[]).await?;
                io = Box::new(tls.accept_io(io).await.map_err(|e| {
                    tracing::warn!(%peer, error = %e, "rejected NBD client: TLS handshake failed");
                    e
                })?);
                tls_done = true;
            }
            OPT_ABORT => {
                let _ = reply(&mut io, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(&mut io, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for e in exports {
                    let mut b = (e.name.len() as u32).to_be_bytes().to_vec();
                    b.extend_from_slice(e.name.as_bytes());
                    reply(&mut io, opt, REP_SERVER, &b).await?;
                }
                reply(&mut io, opt, REP_ACK, &[]).await?;
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = find(exports, &name) else {
                    // The protocol has no error reply here: closing is the answer.
                    return Err(protocol_error(format!(
                        "client asked for unknown export {name:?}"
                    )));
                };
                let dev: &dyn SizeFlags = &*export.device;
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&dev.size().to_be_bytes());
                b.extend_from_slice(&dev.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                io.write_all(&b).await?;
                io.flush().await?;
                return Ok(Some(Negotiated {
                    io,
                    export,
                    structured,
                    base_allocation,
                }));
            }
            OPT_INFO | OPT_GO => {
                let parsed = take_string(&data).and_then(|(name, rest)| {
                    let n = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
                    let reqs = rest.get(2..2 + 2 * n)?;
                    (rest.len() == 2 + 2 * n).then(|| {
                        let reqs: Vec<u16> = reqs
                            .chunks_exact(2)
                            .map(|c| u16::from_be_bytes([c[0], c[1]]))
                            .collect();
                        (name, reqs)
                    })
                });
                let Some((name, reqs)) = parsed else {
                    reply(&mut io, opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                let Some(export) = find(exports, &name) else {
                    let msg = format!("no export named {name:?}");
                    reply(&mut io, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let dev: &dyn SizeFlags = &*export.device;
                reply(&mut io, opt, REP_INFO, &export_info(dev)).await?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                reply(&mut io, opt, REP_INFO, &bs).await?;
                if reqs.contains(&INFO_NAME) {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(export.name.as_bytes());
                    reply(&mut io, opt, REP_INFO, &b).await?;
                }
                if reqs.contains(&INFO_DESCRIPTION) {
                    let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    b.extend_from_slice(b"heliotrope replica");
                    reply(&mut io, opt, REP_INFO, &b).await?;
                }
                reply(&mut io, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(Negotiated {
                        io,
                        export,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() || structured {
                    reply(
                        &mut io,
                        opt,
                        REP_ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data and is negotiated once",
                    )
                    .await?;
                    continue;
                }
                structured = true;
                reply(&mut io, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    reply(
                        &mut io,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    reply(
                        &mut io,
                        opt,
                        REP_ERR_INVALID,
                        b"malformed meta context request",
                    )
                    .await?;
                    continue;
                };
                if find(exports, &name).is_none() {
                    let msg = format!("no export named {name:?}");
                    reply(&mut io, opt, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                }
                let list = opt == OPT_LIST_META_CONTEXT;
                let matches = |q: &str| q == BASE_ALLOCATION || (list && q == "base:");
                let selected = if list && queries.is_empty() {
                    true
                } else {
                    queries.iter().any(|q| matches(q))
                };
                if !list {
                    base_allocation = selected;
                }
                if selected {
                    let mut b = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(&mut io, opt, REP_META_CONTEXT, &b).await?;
                }
                reply(&mut io, opt, REP_ACK, &[]).await?;
            }
            _ => {
                let msg = format!("option {opt} is not supported");
                reply(&mut io, opt, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
}

fn find<D>(exports: &[Export<D>], name: &str) -> Option<Export<D>> {
    // An empty name selects the default (first) export, as qemu-nbd does.
    exports
        .iter()
        .find(|e| e.name == name || (name.is_empty() && exports.len() == 1))
        .cloned()
}

fn parse_meta(data: &[u8]) -> Option<(String, Vec<String>)> {
    let (name, rest) = take_string(data)?;
    let n = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut rest = &rest[4..];
    let mut queries = Vec::new();
    for _ in 0..n.min(1024) {
        let (q, r) = take_string(rest)?;
        queries.push(q);
        rest = r;
    }
    rest.is_empty().then_some((name, queries))
}
