//! The source dirty tracker's crash model: random writes (some cut short by a crash between
//! the activity log and the stamp), flushes, sync rounds (some never completed) and crashes
//! (the tracker and its catalog dropped and reopened from what RocksDB made durable). After
//! every step the property is the sync protocol's promise: every chunk written since the
//! replica's synced generation is in the next round's plan (a superset is fine).
//!
//! `HELIO_CRASH_CASES` sets the number of cases (default 100: each crash reopens RocksDB).

use crate::tracked::Tracker;
use blockstore::dirty::EXTENT_CHUNKS;
use blockstore::Catalog;
use proptest::prelude::*;
use protocol::Geometry;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Enough chunks for more than the 64 hot extents after which a flush retires them.
const CHUNKS: u64 = 100 * EXTENT_CHUNKS;
const DISK: &str = "d";
const REPLICA: [u8; 16] = [7; 16];

#[derive(Clone, Debug)]
enum Op {
    /// A write that returned (landed or not).
    Write {
        first: u64,
        count: u64,
    },
    /// A write that began (its extents logged) and was cut short by a crash.
    Torn {
        first: u64,
        count: u64,
    },
    Flush,
    /// A sync round: cut and plan; `complete` when the replica then reports it durable.
    Round {
        complete: bool,
    },
    Crash,
}

fn chunks() -> impl Strategy<Value = (u64, u64)> {
    let count = prop_oneof![4 => 1..8u64, 1 => 1..(30 * EXTENT_CHUNKS)];
    (0..CHUNKS, count).prop_map(|(first, count)| (first, count.min(CHUNKS - first)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => chunks().prop_map(|(first, count)| Op::Write { first, count }),
        1 => chunks().prop_map(|(first, count)| Op::Torn { first, count }),
        2 => Just(Op::Flush),
        2 => any::<bool>().prop_map(|complete| Op::Round { complete }),
        1 => Just(Op::Crash),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    tracker: Option<Tracker>,
    /// Chunks written (or maybe written) since the replica's synced generation was cut.
    owed: BTreeSet<u64>,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut h = Harness {
            dir,
            tracker: None,
            owed: BTreeSet::new(),
        };
        h.open();
        // Registration, as a seed does it: the replica holds everything up to this cut.
        let t = h.tracker();
        let cut = t.cut().expect("cut");
        t.set_synced(&REPLICA, cut).expect("register");
        h
    }

    fn open(&mut self) {
        let catalog = Arc::new(Catalog::open(self.dir.path()).expect("open the catalog"));
        // Invariant: CHUNKS chunks of 4 KiB is a valid geometry.
        let g = Geometry::new(CHUNKS * 4096, 4096).expect("geometry");
        self.tracker = Some(Tracker::load(catalog, DISK, g).expect("load the tracker"));
    }

    fn tracker(&self) -> &Tracker {
        // Invariant: open() runs in new() and after every crash.
        self.tracker.as_ref().expect("tracker open")
    }

    fn crash(&mut self) {
        // Everything the tracker persists is written synced: what a kill -9 or a power cut
        // keeps is what it had written; unflushed stamps and the hot set are lost.
        self.tracker = None;
        self.open();
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Write { first, count } => {
                {
                    let t = self.tracker();
                    let _gate = t.write_gate();
                    t.before_write(first..first + count).expect("before_write");
                    t.after_write(first..first + count);
                }
                self.owed.extend(first..first + count);
            }
            Op::Torn { first, count } => {
                {
                    let t = self.tracker();
                    let _gate = t.write_gate();
                    t.before_write(first..first + count).expect("before_write");
                }
                self.owed.extend(first..first + count);
                self.crash();
            }
            Op::Flush => self.tracker().flush().expect("flush"),
            Op::Round { complete } => self.round(complete)?,
            Op::Crash => self.crash(),
        }
        Ok(())
    }

    /// A sync round as the source runs it (SyncBegin, then SyncDone when `complete`).
    fn round(&mut self, complete: bool) -> Result<(), TestCaseError> {
        let t = self.tracker();
        let since = t.synced(&REPLICA).expect("synced").expect("registered");
        let cut = t.cut().expect("cut");
        let plan: BTreeSet<u64> = t.written_between(since, cut).into_iter().collect();
        let missing: Vec<u64> = self.owed.difference(&plan).copied().take(8).collect();
        prop_assert!(
            missing.is_empty(),
            "chunks written since generation {} are not in the round's plan: {:?}",
            since,
            missing
        );
        if complete {
            let current = t.synced(&REPLICA).expect("synced").unwrap_or(0);
            t.set_synced(&REPLICA, cut.max(current))
                .expect("set_synced");
            self.owed.clear();
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: blockstore::crashsim::cases(100), ..ProptestConfig::default() })]

    #[test]
    fn every_chunk_written_since_the_synced_generation_is_in_the_next_round(
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let mut h = Harness::new();
        for op in &ops {
            h.run(op)?;
        }
        // Whatever happened last, one more round must still owe nothing.
        h.crash();
        h.round(true)?;
    }
}
