//! The export's crash-consistency model: random guest writes, zeroes and trims, fetched
//! chunks landing, flushes, injected I/O errors and power cuts, over a store whose data file
//! sits on a page-cache model ([`blockstore::crashsim`]: unsynced writes survive a crash in
//! any subset). Every sector's content is a tag; the model keeps, per sector, the tags a crash
//! may leave there (the last flushed one and every write acknowledged since) and checks:
//! - after every crash and reopen, every sector reads as one of those tags, so as its old
//!   content or a later acknowledged one (an absent chunk is fetched again: its source tags);
//! - everything acknowledged by a completed FLUSH or FUA write reads back;
//! - no record lies: a chunk recorded as data re-hashes to its record, a chunk recorded or
//!   reported (block status) as zero reads as zeros, and opening needed no repair;
//! - the background copier never overwrites a chunk the guest wrote (a landing over it would
//!   bring back a source tag the model no longer allows);
//! - after a failed sync nothing more is acknowledged until the replica is reopened.
//!
//! `HELIO_CRASH_CASES` sets the number of cases (default 200).

use super::*;
use crate::nbd::Device;
use blockstore::crashsim::{CrashSim, Fault};
use proptest::prelude::*;
use protocol::ChunkHash;
use rand::SeedableRng;
use std::collections::BTreeSet;

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 8;
const SECTOR: u64 = 512;
const PER_CHUNK: u64 = CHUNK / SECTOR;
const SECTORS: u64 = CHUNKS * PER_CHUNK;

#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        count: u64,
        fua: bool,
        fault: Option<Fault>,
    },
    Zero {
        sector: u64,
        count: u64,
        no_hole: bool,
    },
    Land {
        chunk: u64,
    },
    Read {
        sector: u64,
        count: u64,
    },
    Flush {
        fail: bool,
    },
    Crash {
        seed: u64,
    },
}

/// A sector range: anywhere, or whole chunks (which skip the fetch of an absent chunk).
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..SECTORS, 1..=2 * PER_CHUNK).prop_map(|(s, n)| (s, n.min(SECTORS - s))),
        (0..CHUNKS, 1..=2u64).prop_map(|(c, n)| (c * PER_CHUNK, n.min(CHUNKS - c) * PER_CHUNK)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let fault = prop::option::weighted(0.15, prop_oneof![Just(Fault::Io), Just(Fault::NoSpace)]);
    prop_oneof![
        4 => (range(), any::<bool>(), fault).prop_map(|((sector, count), fua, fault)| {
            Op::Write { sector, count, fua, fault }
        }),
        2 => (range(), any::<bool>())
            .prop_map(|((sector, count), no_hole)| Op::Zero { sector, count, no_hole }),
        3 => (0..CHUNKS).prop_map(|chunk| Op::Land { chunk }),
        1 => range().prop_map(|(sector, count)| Op::Read { sector, count }),
        2 => prop::bool::weighted(0.2).prop_map(|fail| Op::Flush { fail }),
        1 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

/// Sector `s`'s content at the source: zero chunks (every fourth), or a tag of its own.
fn source_tag(s: u64) -> u16 {
    if (s / PER_CHUNK) % 4 == 3 {
        0
    } else {
        1000 + s as u16
    }
}

fn sector_bytes(tag: u16) -> Vec<u8> {
    tag.to_le_bytes().repeat(SECTOR as usize / 2)
}

fn tag_of(bytes: &[u8]) -> Option<u16> {
    let tag = u16::from_le_bytes([bytes[0], bytes[1]]);
    (bytes == sector_bytes(tag).as_slice()).then_some(tag)
}

struct Harness {
    dir: tempfile::TempDir,
    sim: CrashSim,
    rt: tokio::runtime::Runtime,
    dev: Option<Arc<ReplicaDevice>>,
    /// What a read returns now.
    current: Vec<u16>,
    /// What a crash may leave, per sector.
    allowed: Vec<BTreeSet<u16>>,
    /// A sync failed: nothing may be acknowledged until a reopen.
    stopped: bool,
}

impl Harness {
    fn new() -> Harness {
        let mut h = Harness {
            dir: tempfile::tempdir().unwrap(),
            sim: CrashSim::new(),
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            dev: None,
            current: (0..SECTORS).map(source_tag).collect(),
            allowed: (0..SECTORS)
                .map(|s| BTreeSet::from([source_tag(s)]))
                .collect(),
            stopped: false,
        };
        h.open();
        h
    }

    fn dev(&self) -> &Arc<ReplicaDevice> {
        self.dev.as_ref().expect("device open")
    }

    /// Opens the store and the device, checking that no record lies about the data file.
    fn open(&mut self) {
        let files = Arc::new(self.sim.clone());
        let store = Store::open_with(self.dir.path(), files).unwrap();
        let g = Geometry::new(CHUNKS * CHUNK, CHUNK).unwrap();
        let replica = store.open_or_create("d", g).unwrap();
        assert_eq!(
            replica.repaired(),
            0,
            "opening found records the data file does not back"
        );
        for (i, state) in replica.states().unwrap().into_iter().enumerate() {
            let bytes = replica.read_chunk(i as u64).unwrap();
            match state {
                Some(ChunkState::Data(h)) => {
                    assert_eq!(
                        ChunkHash::of(&bytes),
                        h,
                        "chunk {i} does not match its record"
                    )
                }
                Some(ChunkState::Zero) => {
                    assert!(bytes.iter().all(|&b| b == 0), "zero chunk {i} holds data")
                }
                _ => {}
            }
        }
        drop(replica);
        let opts = ExportOptions {
            read_only: false,
            fetch_timeout: Duration::from_secs(1),
            bandwidth: None,
            compress: false,
        };
        self.dev = Some(
            self.rt
                .block_on(ReplicaDevice::open(&store, "d", None, &opts))
                .unwrap(),
        );
    }

    /// Lands chunk `c` as the source has it (what a fetch brings).
    fn land(&self, c: u64) -> Result<bool, DeviceError> {
        let data: Vec<u8> = (c * PER_CHUNK..(c + 1) * PER_CHUNK)
            .flat_map(|s| sector_bytes(source_tag(s)))
            .collect();
        let fetched = Fetched {
            hash: ChunkHash::of(&data),
            zero: data.iter().all(|&b| b == 0),
            data: data.into(),
            wire_bytes: 0,
        };
        self.dev().land(c, &fetched)
    }

    /// As the export's `ensure`: absent chunks the range covers only in part are fetched.
    fn fetch_partial(&self, offset: u64, len: u64) {
        let dev = self.dev();
        for c in dev.g.chunks_touching(offset, len) {
            if dev.state(c) == ABSENT && !dev.covers(c, offset, len) {
                let _ = self.land(c);
            }
        }
    }

    fn read_tags(&self, sector: u64, count: u64) -> Vec<Option<u16>> {
        let mut buf = vec![0u8; (count * SECTOR) as usize];
        self.dev()
            .file
            .read_exact_at(&mut buf, sector * SECTOR)
            .unwrap();
        buf.chunks(SECTOR as usize).map(tag_of).collect()
    }

    /// A completed flush: what reads now is what any crash leaves.
    fn flushed(&mut self) {
        for (a, c) in self.allowed.iter_mut().zip(&self.current) {
            *a = BTreeSet::from([*c]);
        }
    }

    fn wrote(&mut self, sector: u64, count: u64, tag: u16) {
        for s in sector..sector + count {
            self.current[s as usize] = tag;
            self.allowed[s as usize].insert(tag);
        }
    }

    fn run(&mut self, n: usize, op: &Op) {
        match *op {
            Op::Write {
                sector,
                count,
                fua,
                fault,
            } => self.write(n, sector, count, fua, fault),
            Op::Zero {
                sector,
                count,
                no_hole,
            } => {
                let (offset, len) = (sector * SECTOR, count * SECTOR);
                self.fetch_partial(offset, len);
                let r = self.dev().apply_zero(offset, len, no_hole);
                assert_eq!(r.is_err(), self.stopped, "zeroing: {r:?}");
                if r.is_ok() {
                    self.wrote(sector, count, 0);
                }
            }
            Op::Land { chunk } => {
                let r = self.land(chunk);
                assert!(r.is_ok() || self.stopped, "landing: {r:?}");
            }
            Op::Read { sector, count } => {
                let read = self.read_tags(sector, count);
                for (s, got) in (sector..).zip(read) {
                    if self.dev().state(s / PER_CHUNK) != ABSENT {
                        assert_eq!(
                            got,
                            Some(self.current[s as usize]),
                            "sector {s} reads wrong"
                        );
                    }
                }
            }
            Op::Flush { fail } => {
                if fail {
                    self.sim.fail_next_sync();
                }
                let r = self.dev().sync();
                self.sim.clear_faults();
                assert_eq!(r.is_err(), fail || self.stopped, "flush: {r:?}");
                match r {
                    Ok(()) => self.flushed(),
                    Err(_) => self.stopped = true,
                }
            }
            Op::Crash { seed } => self.crash(seed),
        }
    }

    fn write(&mut self, n: usize, sector: u64, count: u64, fua: bool, fault: Option<Fault>) {
        let tag = n as u16 + 1;
        let (offset, len) = (sector * SECTOR, count * SECTOR);
        self.fetch_partial(offset, len);
        let data: Vec<u8> = (0..count).flat_map(|_| sector_bytes(tag)).collect();
        if let Some(f) = fault {
            self.sim.fail_next_write(f);
        }
        let r = self.dev().apply_write(offset, &data);
        self.sim.clear_faults();
        assert_eq!(r.is_err(), self.stopped || fault.is_some(), "write: {r:?}");
        if r.is_err() {
            return; // a failed write changed nothing a crash could keep
        }
        self.wrote(sector, count, tag);
        if fua {
            let synced = self.dev().sync();
            assert_eq!(synced.is_err(), self.stopped, "FUA sync: {synced:?}");
            self.flushed();
        }
    }

    /// A power cut, a reopen, and the checks of the module's documentation.
    fn crash(&mut self, seed: u64) {
        self.dev = None;
        self.sim
            .crash(&mut rand::rngs::StdRng::seed_from_u64(seed))
            .unwrap();
        self.stopped = false;
        self.open();
        for c in 0..CHUNKS {
            if self.dev().state(c) == ABSENT {
                self.land(c).unwrap();
            }
        }
        let read = self.read_tags(0, SECTORS);
        for (s, got) in read.into_iter().enumerate() {
            let got = got.unwrap_or_else(|| panic!("sector {s} holds no whole tag"));
            assert!(
                self.allowed[s].contains(&got),
                "sector {s} reads tag {got} after a crash; allowed {:?}",
                self.allowed[s]
            );
            self.current[s] = got;
        }
        self.flushed();
        self.check_block_status();
    }

    fn check_block_status(&self) {
        let dev = Exported(self.dev().clone());
        let extents = self
            .rt
            .block_on(dev.block_status(0, (CHUNKS * CHUNK) as u32))
            .unwrap();
        let mut offset = 0u64;
        for e in extents {
            if e.flags & STATE_ZERO != 0 {
                let tags = self.read_tags(offset / SECTOR, e.length as u64 / SECTOR);
                assert!(
                    tags.iter().all(|t| *t == Some(0)),
                    "zero extent at {offset} holds data"
                );
            }
            offset += e.length as u64;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: blockstore::crashsim::cases(200), ..ProptestConfig::default() })]

    #[test]
    fn every_crash_leaves_old_or_acknowledged_content(ops in prop::collection::vec(op(), 1..48)) {
        let mut h = Harness::new();
        for (n, op) in ops.iter().enumerate() {
            h.run(n, op);
        }
        h.crash(0x5eed);
    }
}
