//! The transmission phase: read requests in order, serve them concurrently, answer by handle.
//!
//! Every range and flag is checked here, before a device sees it, with the spec's errors: EINVAL
//! for reads, trims, caches and block status beyond the end or unknown commands and flags,
//! ENOSPC for writes beyond the end, EPERM for writes to a read-only export. A request header
//! with a bad magic, or a stream that ends mid-request, ends the connection: nothing after it
//! can be trusted.

use super::device::{Device, DeviceError, Extent};
use super::handshake::Negotiated;
use super::proto::*;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Semaphore};

/// Requests served at once per connection.
const IN_FLIGHT: usize = 64;

fn simple_reply(handle: u64, errno: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn chunk_header(b: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
}

fn error_reply(structured: bool, handle: u64, err: &DeviceError) -> Vec<u8> {
    if !structured {
        return simple_reply(handle, err.errno, &[]);
    }
    let msg = &err.message.as_bytes()[..err.message.len().min(4096)];
    let mut b = Vec::with_capacity(32 + msg.len());
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    );
    b.extend_from_slice(&err.errno.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// A reply: its header bytes and, for reads, the data sent after them without a copy.
type Reply = (Vec<u8>, Vec<u8>);

fn read_reply(structured: bool, handle: u64, offset: u64, data: Vec<u8>) -> Reply {
    if !structured {
        return (simple_reply(handle, 0, &[]), data);
    }
    let mut b = Vec::with_capacity(28);
    if data.is_empty() {
        chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
    } else {
        let len = 8 + data.len() as u32;
        chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, len);
        b.extend_from_slice(&offset.to_be_bytes());
    }
    (b, data)
}

fn block_status_reply(handle: u64, extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + 8 * extents.len());
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        4 + 8 * extents.len() as u32,
    );
    b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for e in extents {
        b.extend_from_slice(&e.length.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
    }
    b
}

fn invalid(errno: u32, message: String) -> DeviceError {
    DeviceError { errno, message }
}

/// Checks a request against the export; the error to answer with, if any.
fn check(
    req: &Request,
    size: u64,
    read_only: bool,
    base_allocation: bool,
) -> Result<(), DeviceError> {
    let end = req.offset.checked_add(req.length as u64);
    let beyond = end.is_none_or(|e| e > size);
    let allowed: u16 = match req.kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        CMD_FLUSH | CMD_CACHE => 0,
        other => return Err(invalid(EINVAL, format!("unknown command {other}"))),
    };
    if req.flags & !allowed != 0 {
        return Err(invalid(
            EINVAL,
            format!("flags {:#x} not valid for command {}", req.flags, req.kind),
        ));
    }
    let range = || {
        format!(
            "{} bytes at {} is beyond the export's {size} bytes",
            req.length, req.offset
        )
    };
    match req.kind {
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM if read_only => {
            Err(invalid(EPERM, "the export is read-only".into()))
        }
        CMD_WRITE | CMD_WRITE_ZEROES if beyond => Err(invalid(ENOSPC, range())),
        CMD_READ | CMD_TRIM | CMD_CACHE if beyond => Err(invalid(EINVAL, range())),
        CMD_READ if req.length > MAX_REQUEST => Err(invalid(
            EINVAL,
            format!(
                "read of {} bytes exceeds the {MAX_REQUEST} byte maximum",
                req.length
            ),
        )),
        CMD_BLOCK_STATUS if !base_allocation => {
            Err(invalid(EINVAL, "no metadata context was negotiated".into()))
        }
        CMD_BLOCK_STATUS if beyond || req.length == 0 => Err(invalid(EINVAL, range())),
        _ => Ok(()),
    }
}

/// Serves one negotiated connection until the client disconnects.
pub async fn serve<D: Device>(neg: Negotiated<D>, peer: String) -> io::Result<()> {
    let Negotiated {
        io,
        export,
        structured,
        base_allocation,
    } = neg;
    let dev = export.device.clone();
    let (mut rd, wr) = tokio::io::split(io);
    let (tx, mut rx) = mpsc::channel::<Reply>(IN_FLIGHT * 2);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 * 1024, wr);
        while let Some((head, data)) = rx.recv().await {
            w.write_all(&head).await?;
            w.write_all(&data).await?;
            // Flush once nothing else is ready: bursts of replies leave in few syscalls.
            while let Ok((head, data)) = rx.try_recv() {
                w.write_all(&head).await?;
                w.write_all(&data).await?;
            }
            w.flush().await?;
        }
        w.shutdown().await
    });
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let (size, read_only) = (dev.size(), dev.read_only());
    let result: io::Result<()> = loop {
        let mut header = [0u8; Request::LEN];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let Some(req) = Request::parse(&header) else {
            tracing::warn!(%peer, "request with a bad magic; closing the connection");
            break Ok(());
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        let mut payload = Vec::new();
        if req.kind == CMD_WRITE {
            if req.length > MAX_REQUEST {
                // Stay in step with the stream: consume the payload, then refuse.
                let mut left = req.length as u64;
                let mut sink = vec![0u8; 1 << 20];
                while left > 0 {
                    let n = left.min(sink.len() as u64) as usize;
                    if let Err(e) = rd.read_exact(&mut sink[..n]).await {
                        return finish(tx, writer, slots, Err(e)).await;
                    }
                    left -= n as u64;
                }
                let err = invalid(
                    EINVAL,
                    format!(
                        "write of {} bytes exceeds the {MAX_REQUEST} byte maximum",
                        req.length
                    ),
                );
                let _ = tx
                    .send((error_reply(structured, req.handle, &err), Vec::new()))
                    .await;
                continue;
            }
            payload = vec![0u8; req.length as usize];
            if let Err(e) = rd.read_exact(&mut payload).await {
                break Err(e);
            }
        }
        if let Err(err) = check(&req, size, read_only, base_allocation) {
            tracing::debug!(%peer, handle = req.handle, error = %err, "refused request");
            if tx
                .send((error_reply(structured, req.handle, &err), Vec::new()))
                .await
                .is_err()
            {
                break Ok(());
            }
            continue;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        let (dev, tx) = (dev.clone(), tx.clone());
        tokio::spawn(async move {
            let reply = handle(&*dev, req, payload, structured).await;
            let _ = tx.send(reply).await;
            drop(permit);
        });
    };
    finish(tx, writer, slots, result).await
}

async fn finish(
    tx: mpsc::Sender<Reply>,
    writer: tokio::task::JoinHandle<io::Result<()>>,
    slots: Arc<Semaphore>,
    result: io::Result<()>,
) -> io::Result<()> {
    // Let requests in flight answer before the writer stops.
    let _ = slots.acquire_many(IN_FLIGHT as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

async fn handle<D: Device>(dev: &D, req: Request, payload: Vec<u8>, structured: bool) -> Reply {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let done = |r: Result<(), DeviceError>| match r {
        Ok(()) => (simple_reply(req.handle, 0, &[]), Vec::new()),
        Err(e) => (error_reply(structured, req.handle, &e), Vec::new()),
    };
    let header = |h: Vec<u8>| (h, Vec::new());
    match req.kind {
        CMD_READ => match dev.read(req.offset, req.length).await {
            Ok(data) => read_reply(structured, req.handle, req.offset, data),
            Err(e) => header(error_reply(structured, req.handle, &e)),
        },
        CMD_WRITE => done(dev.write(req.offset, payload, fua).await),
        CMD_WRITE_ZEROES
            if req.flags & CMD_FLAG_FAST_ZERO != 0
                && !dev.zeroing_is_fast(req.offset, req.length) =>
        {
            done(Err(DeviceError::notsup(
                "FAST_ZERO refused: zeroing this range needs data from the source first",
            )))
        }
        CMD_WRITE_ZEROES => done(
            dev.write_zeroes(
                req.offset,
                req.length,
                req.flags & CMD_FLAG_NO_HOLE != 0,
                fua,
            )
            .await,
        ),
        CMD_TRIM => done(dev.trim(req.offset, req.length, fua).await),
        CMD_FLUSH => done(dev.flush().await),
        CMD_CACHE => done(dev.cache(req.offset, req.length).await),
        CMD_BLOCK_STATUS => match dev.block_status(req.offset, req.length).await {
            Ok(mut extents) => {
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    extents.truncate(1);
                }
                header(block_status_reply(req.handle, &extents))
            }
            Err(e) => header(error_reply(structured, req.handle, &e)),
        },
        // Invariant: `check` refused every other command.
        _ => header(error_reply(
            structured,
            req.handle,
            &invalid(EINVAL, "unknown command".into()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 1,
            offset,
            length,
        }
    }

    #[test]
    fn out_of_range_and_forbidden_requests_get_the_spec_errors() {
        let e = |r: Request, ro: bool| check(&r, 1 << 20, ro, true).err().map(|e| e.errno);
        assert_eq!(e(req(CMD_READ, 0, (1 << 20) - 1, 2), false), Some(EINVAL));
        assert_eq!(e(req(CMD_WRITE, 0, 1 << 20, 1), false), Some(ENOSPC));
        assert_eq!(
            e(req(CMD_WRITE_ZEROES, 0, u64::MAX, 1), false),
            Some(ENOSPC)
        );
        assert_eq!(e(req(CMD_TRIM, 0, 1 << 20, 1), false), Some(EINVAL));
        assert_eq!(e(req(CMD_WRITE, 0, 0, 1), true), Some(EPERM));
        assert_eq!(e(req(CMD_TRIM, 0, 0, 1), true), Some(EPERM));
        assert_eq!(e(req(99, 0, 0, 1), false), Some(EINVAL));
        assert_eq!(e(req(CMD_READ, CMD_FLAG_FUA, 0, 1), false), Some(EINVAL));
        assert_eq!(e(req(CMD_READ, 0, 0, 4096), true), None);
        assert_eq!(e(req(CMD_WRITE, CMD_FLAG_FUA, 0, 4096), false), None);
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, 0, 0, 1), 1 << 20, false, false)
                .err()
                .map(|e| e.errno),
            Some(EINVAL)
        );
    }
}
