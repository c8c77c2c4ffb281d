//! Crash loops against real clients: `helio export` killed with `kill -9` at random points
//! while libnbd writes sequence-tagged blocks with flushes and the background copier pulls
//! the rest over an emulated WAN; after every restart, every block must read as its source
//! content or a write the client made, and never lose a write that a completed FLUSH covered.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
/// Large enough that the slow copier is still at work in every iteration (the reads cover only
/// 4-25 MiB; zero and text regions cost the copier little of its wire budget).
const SIZE: usize = 64 << 20;
const BLOCKS: usize = SIZE / BLOCK;
/// Iteration `i` writes into its own 1 MiB at `4 MiB + i MiB`, which the restart before it
/// fetched: its chunks hold fetched data whose records the writes must not leave standing.
/// Reading only there (never the whole disk) leaves the copier work to do meanwhile.
const SUB: usize = 1 << 20;
fn sub_region(iter: u32) -> usize {
    (4 << 20) + iter as usize * SUB
}
const ITERATIONS: u32 = 20;

/// What a block may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Content {
    Source,
    /// Write `k` of iteration `iter`.
    Write {
        iter: u32,
        k: u32,
    },
}

/// The block a write puts down: (iteration, write number) repeated.
fn written_block(iter: u32, k: u32) -> Vec<u8> {
    let mut unit = iter.to_le_bytes().to_vec();
    unit.extend_from_slice(&k.to_le_bytes());
    unit.repeat(BLOCK / 8)
}

fn content_of(block: &[u8], source: &[u8]) -> Option<Content> {
    if block == source {
        return Some(Content::Source);
    }
    let iter = u32::from_le_bytes(block[..4].try_into().unwrap());
    let k = u32::from_le_bytes(block[4..8].try_into().unwrap());
    (block == written_block(iter, k).as_slice()).then_some(Content::Write { iter, k })
}

/// A libnbd client writing random runs of tagged blocks, flushing now and then; it prints
/// `W k offset blocks` before each write (every 20 ms) and `F k` after each completed flush, and runs until
/// the export dies.
const WRITER: &str = r#"
import nbd, random, struct, sys
import time
uri, it, seed, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h = nbd.NBD()
h.connect_uri(uri)
rnd = random.Random(seed)
k = 0
while True:
    n = rnd.randint(1, 24)
    off = start + rnd.randrange(0, (end - start) // 4096 - n + 1) * 4096
    print(f"W {k} {off} {n}", flush=True)
    h.pwrite(struct.pack("<II", it, k) * (512 * n), off)
    if rnd.random() < 0.15:
        h.flush()
        print(f"F {k}", flush=True)
    k += 1
    time.sleep(0.02)
"#;

/// One iteration's writes as the client reported them, and the last write a flush covered.
struct Reported {
    writes: Vec<(u32, usize, usize)>,
    flushed: Option<u32>,
}

fn parse(out: &str) -> Reported {
    let mut r = Reported {
        writes: Vec::new(),
        flushed: None,
    };
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["W", k, off, n] => {
                r.writes
                    .push((k.parse().unwrap(), off.parse().unwrap(), n.parse().unwrap()))
            }
            ["F", k] => r.flushed = Some(k.parse().unwrap()),
            _ => {}
        }
    }
    r
}

#[test]
fn kill_9_of_the_export_loses_no_flushed_write_and_invents_nothing() {
    let (dir, img, src) = served_sample("64MiB", 41);
    let proxy = wan_proxy(
        &src.addr,
        &["--rtt", "20ms", "--bandwidth", "100Mbit"],
        &dir.path().join("proxy.log"),
    );
    let source = std::fs::read(&img).unwrap();
    let store = dir.path().join("store");
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    // Per block, what the export may hold after the next kill.
    let mut allowed: Vec<BTreeSet<Content>> = vec![BTreeSet::from([Content::Source]); BLOCKS];
    let mut copier_running = 0;
    // A slow copier: it is still running in most iterations.
    let slow = ["--from", proxy.addr.as_str(), "--bandwidth", "16KiB/s"];
    let (exp, sock) = export(dir.path(), &store, "a", &slow);
    read_range(&nbd_uri(&sock, "a"), sub_region(0), SUB);
    exp.stop();
    for iter in 0..ITERATIONS {
        let (exp, sock) = export(dir.path(), &store, "a", &slow);
        // The status file (if any yet) is the previous run's last word on the copy.
        let last = std::fs::read(store.join("status").join("a.json")).ok();
        let complete = last
            .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
            .is_some_and(|v| v["complete"] == true);
        if !complete {
            copier_running += 1;
        }
        let uri = nbd_uri(&sock, "a");
        let mut writer = Command::new("/usr/bin/python3")
            .args([
                "-c",
                WRITER,
                &uri,
                &iter.to_string(),
                &rng.gen::<u32>().to_string(),
            ])
            .args([sub_region(iter), sub_region(iter) + SUB].map(|x| x.to_string()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run python3 (apt-get install python3-libnbd)");
        let stdout = writer.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out.push_str(&line);
                out.push('\n');
            }
            out
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(200..1200)));
        exp.kill9();
        let deadline = Instant::now() + Duration::from_secs(20);
        while writer.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = writer.kill();
        let _ = writer.wait();
        let reported = parse(&reader.join().unwrap());
        assert!(
            !reported.writes.is_empty(),
            "iteration {iter}: the client wrote nothing"
        );
        for &(k, off, n) in &reported.writes {
            let c = Content::Write { iter, k };
            let flushed = reported.flushed.is_some_and(|f| k <= f);
            for set in allowed.iter_mut().skip(off / BLOCK).take(n) {
                if flushed {
                    *set = BTreeSet::from([c]);
                } else {
                    set.insert(c);
                }
            }
        }
        records_tell_the_truth(&store, iter);
        let (exp, sock) = export(dir.path(), &store, "a", &slow);
        // This iteration's region, and the next one's (fetched now, untouched yet).
        let len = (2 * SUB).min(SIZE - sub_region(iter));
        let got = read_range(&nbd_uri(&sock, "a"), sub_region(iter), len);
        exp.stop();
        check(
            sub_region(iter),
            &got,
            &source,
            &mut allowed,
            &format!("iteration {iter}"),
        );
    }
    // The whole disk at last, copied to the end: the source wherever the client never wrote.
    let (_exp, sock) = export(dir.path(), &store, "a", &["--from", &proxy.addr]);
    wait_complete(&store, "a", 120);
    let got = read_range(&nbd_uri(&sock, "a"), 0, SIZE);
    check(0, &got, &source, &mut allowed, "after the copy completed");
    assert!(
        copier_running >= ITERATIONS / 2,
        "the copier was running in only {copier_running} of {ITERATIONS} iterations"
    );
}

/// `helio verify` right after the kill: every record must match the bytes it vouches for
/// (absent chunks are expected: the copy is not done), and opening must have dropped none.
fn records_tell_the_truth(store: &std::path::Path, iter: u32) {
    let out = helio(&[
        "verify",
        "--store",
        store.to_str().unwrap(),
        "--name",
        "a",
        "--json",
    ]);
    let report = last_json(&String::from_utf8_lossy(&out.stdout));
    let lies: Vec<&serde_json::Value> = report["mismatches"]
        .as_array()
        .expect("mismatches")
        .iter()
        .filter(|m| !m["reason"].as_str().unwrap_or("").starts_with("absent"))
        .collect();
    assert!(
        lies.is_empty(),
        "iteration {iter}: records that lie after kill -9: {lies:?}"
    );
    assert_eq!(
        report["repaired"].as_u64().unwrap_or(0),
        0,
        "iteration {iter}: opening found records the data file did not back"
    );
}

/// A libnbd reader of `LEN` bytes at `OFFSET` of `URI` to stdout, 8 MiB a request (servers
/// cap request sizes).
const READER: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
off, end = int(sys.argv[2]), int(sys.argv[2]) + int(sys.argv[3])
while off < end:
    n = min(8 << 20, end - off)
    sys.stdout.buffer.write(h.pread(n, off))
    off += n
"#;

/// Reads `len` bytes at `offset` of `uri` with libnbd.
fn read_range(uri: &str, offset: usize, len: usize) -> Vec<u8> {
    let out = Command::new("/usr/bin/python3")
        .args(["-c", READER, uri, &offset.to_string(), &len.to_string()])
        .output()
        .expect("run python3");
    assert!(
        out.status.success() && out.stdout.len() == len,
        "reading {uri}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Every block of `got` (read at `offset`) must be one of `allowed`, which then narrows to
/// what was read: a restart keeps it.
fn check(offset: usize, got: &[u8], source: &[u8], allowed: &mut [BTreeSet<Content>], when: &str) {
    for (i, bytes) in got.chunks(BLOCK).enumerate() {
        let b = offset / BLOCK + i;
        let c = content_of(bytes, &source[b * BLOCK..(b + 1) * BLOCK]);
        assert!(
            c.is_some_and(|c| allowed[b].contains(&c)),
            "{when}: block {b} holds {c:?} after kill -9; allowed {:?}",
            allowed[b]
        );
        allowed[b] = BTreeSet::from([c.unwrap()]);
    }
}
