//! Requests and replies after the hello: a serde header, then the payload bytes as they are.
//!
//! Frame body layout: `u16` header length (big endian), the bincode header, the payload. Keeping
//! payloads out of serde means a 1 MiB chunk is never copied to be (de)serialised.

use crate::chunk::{ChunkHash, Geometry};
use bincode::Options;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// `Dirty`'s figures when the source cannot measure what a replica lacks; an older client
/// reads it as a huge figure, which is the safe reading (not converged).
pub const DIRTY_UNKNOWN: u64 = u64::MAX;

/// A disk as a source agent announces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The name destinations ask for.
    pub name: String,
    /// Size and chunk size.
    pub geometry: Geometry,
    /// blake3 over the manifest's entries: changes whenever any chunk's content does.
    pub manifest_digest: ChunkHash,
}

/// How a chunk's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// The bytes as they are (they did not compress).
    Raw,
    /// zstd-compressed bytes.
    Zstd,
    /// No payload: the chunk now reads as zeros.
    Zero,
}

/// Why a request failed, for the requester to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// No disk of that name is served.
    UnknownDisk,
    /// A disk request came before `Open`.
    NotOpen,
    /// A chunk or manifest index beyond the disk.
    OutOfRange,
    /// The source could not read its image.
    ImageRead,
    /// The image is shorter than its manifest says.
    ImageTruncated,
    /// The request made no sense in this state.
    BadRequest,
    /// The disk is served without write tracking (no `--nbd` at the source).
    NotTracked,
    /// The replica never registered (seeded) with this source.
    NotRegistered,
}

/// A request or reply header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Lists the disks a source serves.
    ListDisks,
    /// Reply to `ListDisks`.
    Disks(Vec<DiskInfo>),
    /// Binds this connection to a disk.
    Open {
        /// The disk's name.
        disk: String,
    },
    /// Reply to `Open`.
    Opened(DiskInfo),
    /// Asks for `count` manifest entries from `start`.
    GetManifest {
        /// Request id, echoed in the reply.
        id: u64,
        /// First chunk index.
        start: u64,
        /// Number of entries.
        count: u32,
    },
    /// Manifest entries; payload: zstd of `count` compact entries.
    Manifest {
        /// The request's id.
        id: u64,
        /// First chunk index.
        start: u64,
        /// Number of entries.
        count: u32,
    },
    /// Asks for one chunk's bytes.
    GetChunk {
        /// Request id, echoed in the reply.
        id: u64,
        /// Chunk index.
        index: u64,
        /// Compress the payload (worth it on a WAN; on a LAN the CPU costs more than it saves).
        compress: bool,
        /// The sync round (the generation its plan was cut at) the chunk is fetched for: the
        /// source may answer with what that round's plan read. `None` for seeds and on-demand
        /// fetches, which must get the image as it is now.
        round: Option<u64>,
    },
    /// A chunk; payload encoded as `encoding` says.
    Chunk {
        /// The request's id.
        id: u64,
        /// Chunk index.
        index: u64,
        /// blake3 of the bytes the source actually read (not of what it once announced).
        hash: ChunkHash,
        /// Payload encoding.
        encoding: Encoding,
    },
    /// A destination replica (its store's id) starts seeding: the source refreshes the
    /// manifest and tracks writes for this replica from now on.
    Register {
        /// The destination store's id.
        replica: [u8; 16],
    },
    /// Reply to `Register`.
    Registered {
        /// The generation the replica starts from.
        generation: u64,
    },
    /// Starts a sync round: cut a generation and list what the replica lacks.
    SyncBegin {
        /// The destination store's id.
        replica: [u8; 16],
    },
    /// The round's chunks; payload: zstd of `count` × (`u64` index, 33-byte entry).
    SyncPlan {
        /// The generation this round brings the replica to.
        generation: u64,
        /// The generation the replica had.
        since: u64,
        /// Number of chunks.
        count: u32,
    },
    /// The replica holds the round's chunks durably.
    SyncDone {
        /// The destination store's id.
        replica: [u8; 16],
        /// The round's generation.
        generation: u64,
    },
    /// Reply to `SyncDone`.
    SyncDoneOk,
    /// How much the replica lacks now, without cutting a generation.
    DirtyQuery {
        /// The destination store's id.
        replica: [u8; 16],
    },
    /// Reply to `DirtyQuery`.
    Dirty {
        /// Chunks written since the replica's generation, or [`DIRTY_UNKNOWN`] (with `bytes`)
        /// when the source cannot tell (a QEMU dirty bitmap is never cut per replica).
        chunks: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// Round-trip probe.
    Ping {
        /// Echoed in `Pong`.
        id: u64,
    },
    /// Reply to `Ping`.
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// A failed request (or, with no id, a failed connection).
    Error {
        /// The request's id, if the error belongs to one.
        id: Option<u64>,
        /// What kind of failure.
        kind: ErrorKind,
        /// For a person.
        message: String,
    },
    // Memory migration. Added after every disk message so that their encodings (bincode
    // numbers variants in order) stay as earlier agents numbered them.
    /// Memory migration: the source describes the guest (JSON of `memory::MigrationSpec`) so
    /// that the destination can build an empty one of the same shape.
    MemStart {
        /// The guest's description.
        spec: String,
    },
    /// Reply to `MemStart`: the destination's guest exists and waits for pages.
    MemReady,
    /// A batch of guest pages; payload: a page batch (`memory::wire`), encoded as `encoding`.
    MemPages {
        /// The pre-copy round (0 for pages the destination asked for during post-copy).
        round: u32,
        /// Pages in the batch.
        pages: u32,
        /// How the payload is encoded (raw or zstd; a batch is never `Zero`).
        encoding: Encoding,
    },
    /// The destination has installed this many bytes of `MemPages` payload in all: the
    /// source keeps no more than about a bandwidth-delay product unacknowledged, so that its
    /// final pages never queue behind earlier rounds.
    MemAck {
        /// Cumulative payload bytes.
        bytes: u64,
    },
    /// The guest is paused at the source and every page the destination needs before it may
    /// run has been sent; payload: the vCPU state. With `postcopy` the destination resumes at
    /// once and pulls what it lacks.
    MemSwitchover {
        /// When the source paused the guest (Unix time, ns), for the downtime measurement.
        paused_at_unix_ns: u64,
        /// Resume before all pages are there and fault the rest in.
        postcopy: bool,
        /// Pages the destination holds stale copies of (dirtied since they were sent): with
        /// post-copy they are discarded so that a guest access faults them in.
        discard: Vec<u64>,
    },
    /// The guest runs at the destination.
    MemResumed {
        /// When it was resumed (Unix time, ns).
        at_unix_ns: u64,
        /// The guest's write counter when it resumed.
        counter: u64,
    },
    /// Post-copy: the destination's guest touched pages it lacks; send them first.
    MemFault {
        /// Page numbers.
        pages: Vec<u64>,
    },
    /// Every page has been sent; `memory_hash` is the source's memory at the pause.
    MemComplete {
        /// blake3 over the per-page blake3 hashes, in page order.
        memory_hash: ChunkHash,
    },
    /// Reply to `MemComplete`: every page is in place; the source may free the guest's memory.
    MemCompleted,
    /// The destination's verdict (JSON of `memory::DestinationReport`).
    MemVerified {
        /// The report.
        report: String,
    },
    /// The migration is abandoned; the guest stays (or keeps running) at the source.
    MemAbort {
        /// Why.
        reason: String,
    },
    // Moving a QEMU VM between agents (after every earlier message, for the same reason).
    /// The source agent asks the destination agent to prepare an incoming VM: JSON of the
    /// agent's VM spec; the destination starts QEMU waiting for a migration stream.
    VmIncoming {
        /// The VM's spec.
        spec: String,
    },
    /// Reply to `VmIncoming`: the destination's QEMU waits for the stream.
    VmIncomingReady,
    /// Turns this connection into a tunnel to the named incoming VM's migration socket: from
    /// now on `TunnelData` frames carry the bytes, both ways.
    Tunnel {
        /// The VM.
        vm: String,
    },
    /// Tunnel bytes (payload); an empty payload ends the sender's direction.
    TunnelData,
    /// The source agent asks whether the destination could take a VM (JSON of its spec),
    /// without starting anything.
    VmCheck {
        /// The VM's spec.
        spec: String,
    },
    /// Reply to `VmCheck`: it could (JSON of what the destination found: accelerator, free
    /// memory).
    VmCheckOk {
        /// The destination's findings.
        report: String,
    },
    /// The source agent asks the destination agent to run a job of its own (JSON of the
    /// agent's job spec: a seed, a sync round or an export, pulling from the source).
    JobStart {
        /// The job's spec.
        spec: String,
    },
    /// Asks how a job started with `JobStart` is doing.
    JobQuery {
        /// The job's id.
        id: String,
    },
    /// Reply to `JobStart` and `JobQuery`: JSON of the job.
    JobState {
        /// The job.
        job: String,
    },
    /// At a migration's switchover: the chunks of `disk` written at the source since the
    /// destination's last sync round; the destination's export fetches them again on demand.
    ExportInvalidate {
        /// The disk.
        disk: String,
        /// Chunk indexes.
        chunks: Vec<u64>,
    },
    /// Reply to `ExportInvalidate`: how many chunks were made absent.
    Invalidated {
        /// Chunks now absent.
        count: u64,
    },
    /// A migration's way back: one chunk the VM wrote at the sending agent, for the image
    /// disk of the same name here (the base the VM left behind). Payload: the chunk,
    /// zstd-compressed; empty when `zero`. No reply unless it fails (`PatchCommit` answers).
    DiskPatch {
        /// The disk.
        disk: String,
        /// The chunk's index.
        index: u64,
        /// The chunk is all zeros.
        zero: bool,
    },
    /// Makes the `DiskPatch` chunks of `disk` sent so far durable.
    PatchCommit {
        /// The disk.
        disk: String,
    },
    /// Reply to `PatchCommit`: how many chunks were applied since the last commit.
    PatchCommitted {
        /// Chunks applied.
        chunks: u64,
    },
    /// Cancels a job started with `JobStart` (a migration cancelled or failed before its cut);
    /// the reply is `JobState`.
    JobCancel {
        /// The job's id.
        id: String,
    },
    /// A migration that ends before its QEMU stream began (cancelled or failed) asks the
    /// destination to stop the incoming QEMU it started for `vm`; the reply is
    /// `VmIncomingAborted`. A VM that runs there already is left alone.
    VmIncomingAbort {
        /// The VM.
        vm: String,
    },
    /// Reply to `VmIncomingAbort`.
    VmIncomingAborted {
        /// Whether an incoming QEMU was stopped (false: there was none).
        stopped: bool,
    },
    /// Tunnel bytes compressed with zstd (a `TunnelData` whose payload shrank); at most
    /// `TUNNEL_CHUNK` bytes once decompressed. Never empty: the end is an empty `TunnelData`.
    TunnelZstd,
    /// A migration's way back, many chunks in one frame: chunks the VM wrote at the sending
    /// agent, for the image disk of the same name here. Payload: zstd, one frame or several
    /// concatenated, that decompresses to every chunk that is not `zero`, in the order listed,
    /// each at its full length (small chunks do not each pay a message). At most [`MAX_PATCH_CHUNKS`]
    /// chunks and [`MAX_PATCH_RAW`] bytes once decompressed. No reply unless it fails
    /// (`PatchCommit` answers).
    DiskPatchBatch {
        /// The disk.
        disk: String,
        /// The chunks, in payload order.
        chunks: Vec<PatchedChunk>,
    },
    /// A migration's switchover, sent just before the source lets its paused QEMU finish
    /// (`migrate-continue`) and answered while that final stream crosses: the chunks each
    /// disk's export here must make absent (written at the source since the last round), after
    /// which the incoming VM, whose QEMU waits with `-S`, runs as soon as its state is loaded.
    /// A VM that took its switchover already ignores a repeat (sent again after a lost
    /// connection) and says so. Payload: the chunk indexes, u64 little-endian, the disks'
    /// lists one after another in `disks` order (see [`encode_cut`]).
    VmSwitchover {
        /// The VM.
        vm: String,
        /// Each disk and how many of its chunks the payload lists.
        disks: Vec<CutDisk>,
    },
    /// Reply to `VmSwitchover`: the cut was applied and the VM runs (or will, the moment its
    /// stream is loaded).
    VmSwitched {
        /// Chunks made absent.
        invalidated: u64,
        /// The VM had taken this switchover before; nothing was done again.
        repeat: bool,
    },
}

/// One disk of a [`Message::VmSwitchover`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutDisk {
    /// The disk.
    pub disk: String,
    /// How many chunk indexes of the payload are this disk's.
    pub chunks: u64,
}

/// The header list and payload of a [`Message::VmSwitchover`] cutting `lists` (disk, chunks).
pub fn encode_cut(lists: &[(String, Vec<u64>)]) -> (Vec<CutDisk>, Bytes) {
    let total: usize = lists.iter().map(|(_, c)| c.len()).sum();
    let mut payload = BytesMut::with_capacity(total * 8);
    let mut disks = Vec::with_capacity(lists.len());
    for (disk, chunks) in lists {
        for c in chunks {
            payload.put_u64_le(*c);
        }
        disks.push(CutDisk {
            disk: disk.clone(),
            chunks: chunks.len() as u64,
        });
    }
    (disks, payload.freeze())
}

/// The (disk, chunks) lists of a [`Message::VmSwitchover`], or why its payload does not match
/// its header (the counts must add up to exactly the payload's length; nothing is allocated
/// before that is checked).
pub fn decode_cut(disks: &[CutDisk], payload: &[u8]) -> Result<Vec<(String, Vec<u64>)>, String> {
    let listed = disks
        .iter()
        .try_fold(0u64, |sum, d| sum.checked_add(d.chunks))
        .and_then(|n| n.checked_mul(8));
    if listed != Some(payload.len() as u64) {
        return Err(format!(
            "a switchover's header lists {} chunk indexes, its payload holds {} bytes (8 per index)",
            disks.iter().fold(0u64, |s, d| s.saturating_add(d.chunks)),
            payload.len()
        ));
    }
    let mut words = payload
        .chunks_exact(8)
        // chunks_exact(8) yields 8-byte slices only.
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()));
    Ok(disks
        .iter()
        .map(|d| {
            (
                d.disk.clone(),
                words.by_ref().take(d.chunks as usize).collect(),
            )
        })
        .collect())
}

/// One chunk of a [`Message::DiskPatchBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchedChunk {
    /// The chunk's index.
    pub index: u64,
    /// The chunk is all zeros (it has no bytes in the payload).
    pub zero: bool,
}

/// The most chunks one `DiskPatchBatch` may list (its header stays far below 64 KiB).
pub const MAX_PATCH_CHUNKS: usize = 1024;
/// The most bytes one `DiskPatchBatch` may hold once decompressed.
pub const MAX_PATCH_RAW: u64 = 16 << 20;

/// A header with its payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub msg: Message,
    /// Payload bytes (empty for most messages).
    pub payload: Bytes,
}

/// A frame body that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("malformed frame: {0}")]
pub struct MalformedFrame(pub String);

fn options() -> impl Options {
    bincode::DefaultOptions::new().with_limit(u16::MAX as u64)
}

impl Frame {
    /// A frame with no payload.
    pub fn new(msg: Message) -> Self {
        Frame {
            msg,
            payload: Bytes::new(),
        }
    }

    /// A frame with a payload.
    pub fn with_payload(msg: Message, payload: Bytes) -> Self {
        Frame { msg, payload }
    }

    /// Encodes the frame body.
    pub fn encode(&self) -> Result<Bytes, MalformedFrame> {
        let mut b = self.encode_head(0)?;
        b.reserve(self.payload.len());
        b.put_slice(&self.payload);
        Ok(b.freeze())
    }

    /// Encodes everything but the payload, after `prefix` bytes left for the caller (a length
    /// prefix), so that the payload can be written from where it already is.
    pub fn encode_head(&self, prefix: usize) -> Result<BytesMut, MalformedFrame> {
        let header = options()
            .serialize(&self.msg)
            .map_err(|e| MalformedFrame(format!("header does not serialise: {e}")))?;
        let mut b = BytesMut::with_capacity(prefix + 2 + header.len());
        b.put_bytes(0, prefix);
        b.put_u16(header.len() as u16);
        b.put_slice(&header);
        Ok(b)
    }

    /// Decodes a frame body; never panics on any input.
    pub fn decode(body: Bytes) -> Result<Self, MalformedFrame> {
        if body.len() < 2 {
            return Err(MalformedFrame(format!(
                "{} bytes, shorter than a header",
                body.len()
            )));
        }
        let hlen = u16::from_be_bytes([body[0], body[1]]) as usize;
        if body.len() < 2 + hlen {
            return Err(MalformedFrame(format!(
                "header length {hlen} exceeds the frame's {} bytes",
                body.len() - 2
            )));
        }
        let msg: Message = options()
            .deserialize(&body[2..2 + hlen])
            .map_err(|e| MalformedFrame(format!("header does not parse: {e}")))?;
        Ok(Frame {
            msg,
            payload: body.slice(2 + hlen..),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_whose_geometry_would_divide_by_zero_or_allocate_without_bound_is_refused() {
        let disk = |size: u64, chunk_size: u32| {
            // The fields are public: a peer can send what `Geometry::new` would refuse.
            let geometry = Geometry { size, chunk_size };
            let msg = Message::Opened(DiskInfo {
                name: "d".into(),
                geometry,
                manifest_digest: ChunkHash::of(b"m"),
            });
            Frame::decode(Frame::new(msg).encode().expect("encodes"))
        };
        assert!(disk(1 << 30, 65536).is_ok());
        for (size, chunk_size) in [
            (1 << 30, 0),
            (1 << 30, 1 << 31),
            (u64::MAX, 4096),
            (1, 3000),
        ] {
            let e = disk(size, chunk_size).expect_err("refused");
            assert!(e.to_string().contains("chunk"), "{e}");
        }
    }

    #[test]
    fn frame_round_trips_with_payload() {
        let f = Frame::with_payload(
            Message::Chunk {
                id: 7,
                index: 9,
                hash: ChunkHash::of(b"x"),
                encoding: Encoding::Zstd,
            },
            Bytes::from_static(b"payload"),
        );
        assert_eq!(Frame::decode(f.encode().unwrap()).unwrap(), f);
    }

    #[test]
    fn disk_messages_keep_their_version_1_encoding() {
        // Messages added later go after `Error`, so it stays variant 18 (bincode writes the
        // variant index first, as a varint: one byte here).
        let f = Frame::new(Message::Error {
            id: None,
            kind: ErrorKind::BadRequest,
            message: String::new(),
        });
        let body = f.encode().unwrap();
        assert_eq!(body[2], 18);
    }

    #[test]
    fn a_switchover_cut_round_trips_through_its_frame() {
        let lists = vec![
            ("a".to_string(), vec![0, 7, u64::MAX]),
            ("empty".to_string(), vec![]),
            ("b".to_string(), vec![3]),
        ];
        let (disks, payload) = encode_cut(&lists);
        let f = Frame::with_payload(
            Message::VmSwitchover {
                vm: "vm".into(),
                disks,
            },
            payload,
        );
        let back = Frame::decode(f.encode().unwrap()).unwrap();
        let Message::VmSwitchover { disks, .. } = &back.msg else {
            panic!("decoded {:?}", back.msg);
        };
        assert_eq!(decode_cut(disks, &back.payload).unwrap(), lists);
    }

    #[test]
    fn a_switchover_whose_counts_do_not_match_its_payload_is_refused() {
        let one = |chunks| CutDisk {
            disk: "d".into(),
            chunks,
        };
        let err = decode_cut(&[one(2)], &[0u8; 8]).unwrap_err();
        assert!(err.contains("lists 2 chunk indexes"), "{err}");
        assert!(decode_cut(&[one(1)], &[0u8; 12]).is_err());
        // Counts that overflow when added are refused before anything is sized by them.
        assert!(decode_cut(&[one(u64::MAX), one(2)], &[0u8; 8]).is_err());
        assert!(decode_cut(&[one(u64::MAX / 4)], &[]).is_err());
    }

    #[test]
    fn garbage_frames_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"\x00",
            b"\xff\xff abc",
            b"\x00\x03\xff\xff\xff",
            b"\x00\x01\x07",
        ] {
            assert!(
                Frame::decode(Bytes::copy_from_slice(body)).is_err(),
                "{body:?}"
            );
        }
        // A header claiming a huge string must not allocate it.
        let mut evil = vec![0u8, 10, 2];
        evil.extend_from_slice(&[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(Frame::decode(Bytes::from(evil)).is_err());
    }
}
