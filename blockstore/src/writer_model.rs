//! The seed and sync-round writer's crash-consistency model: random chunk landings (streamed,
//! zero, copied from another chunk), rounds that withdraw their chunks' records first, commits
//! in the foreground and background, injected I/O errors and power cuts over the page-cache
//! model of [`crate::crashsim`]. After every crash and reopen:
//! - no record lies: a chunk recorded as data re-hashes to its record, a zero chunk reads as
//!   zeros, and opening needed no repair;
//! - a chunk committed (a `commit` returned) and not touched since keeps its state;
//! - after a failed commit the writer refuses everything until the replica is reopened.
//!
//! `HELIO_CRASH_CASES` sets the number of cases (default 200).

use crate::crashsim::{CrashSim, Fault};
use crate::{ChunkState, ChunkWriter, Store};
use proptest::prelude::*;
use protocol::{ChunkHash, Geometry};
use rand::SeedableRng;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 8;

#[derive(Clone, Debug)]
enum Op {
    /// A chunk fetched with content `version`; `forget_first`: as a sync round, which
    /// withdraws the records of the chunks it will change before landing any.
    Put {
        chunk: u64,
        version: u8,
        forget_first: bool,
        fault: Option<Fault>,
    },
    Zero {
        chunk: u64,
    },
    Copy {
        from: u64,
        to: u64,
    },
    Commit {
        background: bool,
        fail: bool,
    },
    Crash {
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let fault = prop::option::weighted(0.1, prop_oneof![Just(Fault::Io), Just(Fault::NoSpace)]);
    prop_oneof![
        5 => (0..CHUNKS, 1..=4u8, any::<bool>(), fault).prop_map(|(chunk, version, forget_first, fault)| {
            Op::Put { chunk, version, forget_first, fault }
        }),
        1 => (0..CHUNKS).prop_map(|chunk| Op::Zero { chunk }),
        1 => (0..CHUNKS, 0..CHUNKS).prop_map(|(from, to)| Op::Copy { from, to }),
        2 => (any::<bool>(), prop::bool::weighted(0.15))
            .prop_map(|(background, fail)| Op::Commit { background, fail }),
        1 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

fn content(chunk: u64, version: u8) -> Vec<u8> {
    let mut v = vec![version; CHUNK as usize];
    v[0] = chunk as u8;
    v
}

struct Harness {
    dir: tempfile::TempDir,
    sim: CrashSim,
    w: Option<ChunkWriter>,
    /// States as of the last `commit` that returned.
    committed: HashMap<u64, ChunkState>,
    /// Chunks changed (or tried) since then.
    touched: HashSet<u64>,
    stopped: bool,
}

impl Harness {
    fn new() -> Harness {
        let mut h = Harness {
            dir: tempfile::tempdir().unwrap(),
            sim: CrashSim::new(),
            w: None,
            committed: HashMap::new(),
            touched: HashSet::new(),
            stopped: false,
        };
        h.open();
        h
    }

    fn w(&mut self) -> &mut ChunkWriter {
        self.w.as_mut().expect("writer open")
    }

    /// Opens the replica and checks every record against the bytes.
    fn open(&mut self) {
        let store = Store::open_with(self.dir.path(), Arc::new(self.sim.clone())).unwrap();
        let g = Geometry::new(CHUNKS * CHUNK, CHUNK).unwrap();
        let r = store.open_or_create("d", g).unwrap();
        assert_eq!(
            r.repaired(),
            0,
            "opening found records the data file does not back"
        );
        let states = r.states().unwrap();
        for (i, s) in states.iter().enumerate() {
            let bytes = r.read_chunk(i as u64).unwrap();
            match s {
                Some(ChunkState::Data(h)) => assert_eq!(ChunkHash::of(&bytes), *h, "chunk {i}"),
                Some(ChunkState::Zero) => assert!(bytes.iter().all(|&b| b == 0), "chunk {i}"),
                _ => {}
            }
        }
        for (&i, &s) in &self.committed {
            if !self.touched.contains(&i) {
                assert_eq!(states[i as usize], Some(s), "committed chunk {i} was lost");
            }
        }
        self.committed = (0..CHUNKS)
            .filter_map(|i| states[i as usize].map(|s| (i, s)))
            .collect();
        self.touched.clear();
        self.w = Some(r.writer().unwrap());
    }

    fn run(&mut self, op: &Op) {
        let r = match *op {
            Op::Put {
                chunk,
                version,
                forget_first,
                fault,
            } => {
                self.touched.insert(chunk);
                let data = content(chunk, version);
                if forget_first {
                    if let Err(e) = self.w().forget(&[chunk]) {
                        assert!(self.stopped, "forget: {e}");
                        return;
                    }
                }
                if let Some(f) = fault {
                    self.sim.fail_next_write(f);
                }
                let r = self.w().put_streaming(chunk, ChunkHash::of(&data), &data);
                self.sim.clear_faults();
                assert!(r.is_ok() || self.stopped || fault.is_some(), "put: {r:?}");
                return;
            }
            Op::Zero { chunk } => {
                self.touched.insert(chunk);
                self.w().put_zero(chunk).map(|_| ())
            }
            Op::Copy { from, to } => {
                let Some(ChunkState::Data(h)) = self.w().state(from) else {
                    return;
                };
                self.touched.insert(to);
                let id = self.w().replica().record().id;
                self.w().copy_local(id, from, to, h).map(|_| ())
            }
            Op::Commit { background, fail } => return self.commit(background, fail),
            Op::Crash { seed } => return self.crash(seed),
        };
        assert_eq!(r.is_err(), self.stopped, "{op:?}: {r:?}");
    }

    fn commit(&mut self, background: bool, fail: bool) {
        // Only a commit with something to sync surely meets the injected failure: a commit
        // started in the background may have synced already (or been waited for by an
        // overwrite), and then the failure would fall on nothing. With something pending, a
        // new sync runs, after any in flight; the failure hits one of them.
        let syncs = self.w().pending() > 0;
        let fail = fail && syncs;
        if fail {
            self.sim.fail_next_sync();
        }
        let r = match background {
            true => self.w().commit_in_background().map(|_| ()),
            false => self.w().commit().map(|_| ()),
        };
        if fail && !self.stopped {
            // A background commit reports its failure at the next call that waits for it.
            let waited = self.w().commit().map(|_| ());
            assert!(
                r.is_err() || waited.is_err(),
                "a failed sync was acknowledged"
            );
            self.stopped = true;
        } else {
            assert_eq!(r.is_err(), self.stopped, "commit: {r:?}");
        }
        self.sim.clear_faults();
        if !background && !self.stopped {
            for i in self.touched.drain() {
                let s = self.w.as_ref().and_then(|w| w.state(i));
                match s {
                    Some(s) => self.committed.insert(i, s),
                    None => self.committed.remove(&i),
                };
            }
        }
    }

    fn crash(&mut self, seed: u64) {
        self.w = None;
        self.sim
            .crash(&mut rand::rngs::StdRng::seed_from_u64(seed))
            .unwrap();
        self.stopped = false;
        self.open();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::crashsim::cases(200), ..ProptestConfig::default() })]

    #[test]
    fn every_crash_leaves_records_that_tell_the_truth(ops in prop::collection::vec(op(), 1..48)) {
        let mut h = Harness::new();
        for op in &ops {
            h.run(op);
        }
        h.crash(0x5eed);
    }
}
