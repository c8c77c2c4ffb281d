//! `helio memory demo`: a source and a destination process over the emulated WAN migrate a
//! guest, and the source's JSON report says how it went. KVM tests run where /dev/kvm exists
//! and say clearly when it does not; the synthetic guest covers the engine's decisions.

mod common;

use common::{helio, last_json};
use serde_json::Value;
use std::sync::Mutex;

/// Migrations measure time; running two at once on a 2-core machine would skew them, and so
/// would this file's other tests (agents and the model) running beside one.
static SERIAL: Mutex<()> = Mutex::new(());

/// Held by each test while it runs processes (a test that failed poisons it harmlessly).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `helio memory demo --json ARGS`; returns the report and whether the command succeeded.
fn demo(args: &[&str]) -> (Value, bool) {
    let _one = serial();
    let mut all = vec!["memory", "demo", "--json"];
    all.extend_from_slice(args);
    let out = helio(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.trim().is_empty() {
        panic!(
            "helio {all:?} printed nothing ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (last_json(&stdout), out.status.success())
}

/// True when KVM can run the micro-VM here: /dev/kvm opens and answers (not only exists).
fn kvm_or_skip(test: &str) -> bool {
    match memory::kvm_available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}, so the kvm backend cannot run");
            false
        }
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

fn assert_verified(r: &Value, ok: bool) {
    assert!(ok, "demo failed: {r:#}");
    assert_eq!(r["outcome"], "migrated", "{r:#}");
    let v = &r["verified"];
    assert_eq!(v["ok"], true, "{r:#}");
    assert_eq!(v["memory_hash_equal"], true, "{r:#}");
    // The hash came (in part) from the destination's memory itself, not only from what it
    // recorded while installing.
    assert!(v["pages_reread"].as_u64() > Some(0), "{r:#}");
    assert_eq!(v["guest_ran_on"], true, "{r:#}");
    assert_eq!(v["counter_at_resume"], v["counter_at_pause"], "{r:#}");
    assert!(
        v["counter_after"].as_u64() > v["counter_at_resume"].as_u64(),
        "the guest did not run on: {r:#}"
    );
    for k in [
        "backend",
        "mode",
        "memory_bytes",
        "rounds",
        "downtime_ms",
        "total_ms",
        "wire_bytes",
        "converged",
        "policy_applied",
        "predicted",
    ] {
        assert!(!r[k].is_null(), "report lacks {k}: {r:#}");
    }
    for round in r["rounds"].as_array().expect("rounds") {
        for k in ["pages", "bytes", "elapsed_ms", "dirty_rate", "bandwidth"] {
            assert!(round[k].is_number(), "round lacks {k}: {round}");
        }
    }
}

const KVM: &[&str] = &[
    "--backend=kvm",
    "--memory=64MiB",
    "--bandwidth=1Gbit",
    "--rtt=10ms",
];

#[test]
fn kvm_precopy_moves_a_running_guest() {
    if !kvm_or_skip("kvm_precopy_moves_a_running_guest") {
        return;
    }
    let (r, ok) = demo(&[KVM, &["--mode=precopy", "--dirty-rate=3000"]].concat());
    assert_verified(&r, ok);
    assert_eq!(r["backend"], "kvm");
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2, "live rounds then a stop-and-copy: {r:#}");
    assert_eq!(rounds.last().unwrap()["kind"], "stop-and-copy");
    assert!(f(&r, "downtime_ms") < f(&r, "total_ms") / 3.0, "{r:#}");
}

#[test]
fn kvm_warm_migration_pauses_copies_resumes() {
    if !kvm_or_skip("kvm_warm_migration_pauses_copies_resumes") {
        return;
    }
    let (r, ok) = demo(&[KVM, &["--mode=warm", "--dirty-rate=3000"]].concat());
    assert_verified(&r, ok);
    let rounds = r["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 1, "{r:#}");
    assert_eq!(rounds[0]["kind"], "warm");
    // The whole copy happens while the guest is paused.
    assert!(f(&r, "downtime_ms") >= f(&rounds[0], "elapsed_ms"), "{r:#}");
}

#[test]
fn kvm_postcopy_resumes_at_once_and_pulls_pages() {
    if !kvm_or_skip("kvm_postcopy_resumes_at_once_and_pulls_pages") {
        return;
    }
    let (r, ok) = demo(&[KVM, &["--mode=postcopy", "--dirty-rate=20000"]].concat());
    assert_verified(&r, ok);
    let pc = &r["postcopy"];
    assert!(
        pc["faults"].as_u64().unwrap() > 0,
        "the guest never faulted: {r:#}"
    );
    assert!(pc["pushed_pages"].as_u64().unwrap() > 1000, "{r:#}");
    // Resuming needs only the vCPU state and a handful of pages, not the memory.
    assert!(f(&r, "downtime_ms") < 100.0, "{r:#}");
    assert!(f(&r, "downtime_ms") * 3.0 < f(&r, "total_ms"), "{r:#}");
}

/// A guest of random pages on a 200 Mbit/s link: about 6000 pages a second cross it.
const SYN: &[&str] = &[
    "--backend=synthetic",
    "--plain",
    "--zero-fraction=0",
    "--random-fraction=1",
    "--duplicate-fraction=0",
    "--bandwidth=200Mbit",
    "--rtt=10ms",
];

#[test]
fn synthetic_precopy_converges_in_the_predicted_rounds() {
    // d/r ≈ 0.5: round times halve until the dirty pages fit the downtime target.
    let (r, ok) = demo(&[SYN, &["--memory=32MiB", "--dirty-rate=3000"]].concat());
    assert_verified(&r, ok);
    assert_eq!(r["converged"], true, "{r:#}");
    assert_eq!(r["policy_applied"], "none", "{r:#}");
    let live = r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["kind"] == "live")
        .count() as i64;
    let predicted = r["predicted"]["rounds"].as_i64().unwrap();
    assert!(
        (live - predicted).abs() <= 1,
        "{live} live rounds, model said {predicted}: {r:#}"
    );
    assert!(live >= 3, "d/r 0.5 takes several rounds: {r:#}");
    let total = f(&r, "total_ms");
    let model = f(&r["predicted"], "total_ms");
    assert!(
        (total - model).abs() / model < 0.35,
        "total {total} ms, model {model} ms"
    );
}

const DIVERGING: &[&str] = &["--memory=16MiB", "--dirty-rate=7500"];

#[test]
fn divergence_throttles_the_guest_until_it_converges() {
    let (r, ok) = demo(&[SYN, DIVERGING, &["--on-diverge=throttle"]].concat());
    assert_verified(&r, ok);
    assert_eq!(r["policy_applied"], "throttle", "{r:#}");
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.len() <= 40, "{r:#}");
    assert!(rounds.iter().any(|x| f(x, "throttle") >= 0.2), "{r:#}");
    let last_live = rounds.iter().rev().find(|x| x["kind"] == "live").unwrap();
    assert!(f(last_live, "predicted_downtime_ms") <= 50.0, "{r:#}");
}

#[test]
fn divergence_switches_to_postcopy() {
    let (r, ok) = demo(&[SYN, DIVERGING, &["--on-diverge=postcopy"]].concat());
    assert_verified(&r, ok);
    assert_eq!(r["policy_applied"], "postcopy", "{r:#}");
    assert_eq!(r["converged"], false);
    let rounds = r["rounds"].as_array().unwrap();
    assert!(
        rounds.iter().filter(|x| x["kind"] == "live").count() <= 3,
        "detected within 3 rounds: {r:#}"
    );
    assert_eq!(rounds.last().unwrap()["kind"], "postcopy");
    assert!(f(&r, "downtime_ms") < 200.0, "{r:#}");
}

#[test]
fn divergence_stops_and_copies_with_the_long_downtime_reported() {
    let (r, ok) = demo(&[SYN, DIVERGING, &["--on-diverge=stop"]].concat());
    assert_verified(&r, ok);
    assert_eq!(r["policy_applied"], "stop", "{r:#}");
    assert_eq!(r["converged"], false);
    let rounds = r["rounds"].as_array().unwrap();
    assert!(
        rounds.iter().filter(|x| x["kind"] == "live").count() <= 3,
        "{r:#}"
    );
    // Most of memory crosses with the guest paused: far beyond the 50 ms target.
    let last = rounds.last().unwrap();
    assert_eq!(last["kind"], "stop-and-copy");
    assert!(last["pages"].as_u64().unwrap() > 1000, "{r:#}");
    assert!(f(&r, "downtime_ms") > 100.0, "{r:#}");
}

#[test]
fn divergence_abort_leaves_the_guest_running_at_the_source() {
    let (r, ok) = demo(&[SYN, DIVERGING, &["--on-diverge=abort"]].concat());
    assert!(ok, "an abort by policy is a clean outcome: {r:#}");
    assert_eq!(r["outcome"], "aborted", "{r:#}");
    assert_eq!(r["policy_applied"], "abort");
    assert_eq!(r["source_guest_running"], true, "{r:#}");
    assert!(r["error"]
        .as_str()
        .unwrap()
        .contains("keeps running at the source"));
}

#[test]
fn holding_hot_pages_sends_fewer_bytes() {
    // 70% of the writes go to a 2 MiB hot set, the rest sweep the cold pages at d/r ≈ 0.4.
    // The hot set is dirty at the end of every round; from round three on the engine holds it
    // back (it fits half the 200 ms target) instead of sending it again.
    let hot = [
        "--memory=32MiB",
        "--hot-set=2MiB",
        "--hot-fraction=0.7",
        "--dirty-rate=8000",
        "--downtime-target=200ms",
    ];
    let (held, ok1) = demo(&[SYN, &hot].concat());
    let (plain, ok2) = demo(&[SYN, &hot, &["--no-hold-hot"]].concat());
    assert_verified(&held, ok1);
    assert_verified(&plain, ok2);
    assert!(
        held["saved"]["held_page_sends"].as_u64().unwrap() > 200,
        "{held:#}"
    );
    assert_eq!(plain["saved"]["held_page_sends"], 0);
    let first3 = |r: &Value| -> f64 {
        r["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .take(3)
            .map(|x| f(x, "bytes"))
            .sum()
    };
    let (h, p) = (first3(&held), first3(&plain));
    assert!(
        h + 200.0 * 4096.0 < p,
        "rounds 1-3: held {h} bytes, plain {p} bytes\nheld: {held:#}\nplain: {plain:#}"
    );
    let (h, p) = (f(&held, "wire_bytes"), f(&plain, "wire_bytes"));
    assert!(h < p, "in all: held {h} bytes, plain {p} bytes");
}

#[test]
fn a_dropped_link_leaves_the_guest_running_at_the_source() {
    // Round 1 of 64 MiB takes ~2.7 s at 200 Mbit/s; the link goes down 0.5 s in.
    let (r, ok) = demo(
        &[
            SYN,
            &["--memory=64MiB", "--dirty-rate=2000", "--cut-after=500ms"],
        ]
        .concat(),
    );
    assert!(!ok, "a failed migration must fail the command: {r:#}");
    assert_eq!(r["outcome"], "failed", "{r:#}");
    assert_eq!(r["source_guest_running"], true, "{r:#}");
    let err = r["error"].as_str().unwrap();
    assert!(err.contains("keeps running at the source"), "{err}");
}

#[test]
fn model_prints_the_d_over_r_prediction() {
    let _one = serial();
    let out = common::helio_ok(&[
        "memory",
        "model",
        "--memory=512MiB",
        "--dirty-rate=15258",
        "--bandwidth=1Gbit",
        "--json",
    ]);
    let m = last_json(&out);
    assert!((f(&m, "d_over_r") - 0.5).abs() < 0.01, "{m}");
    assert_eq!(m["converges"], true);
    assert!((f(&m, "first_round_ms") - 4295.0).abs() < 5.0, "{m}");
    let diverging = last_json(&common::helio_ok(&[
        "memory",
        "model",
        "--memory=512MiB",
        "--dirty-rate=40000",
        "--bandwidth=1Gbit",
        "--json",
    ]));
    assert_eq!(diverging["converges"], false);
    assert_eq!(diverging["stop_reason"], "diverges");
    let bad = helio(&[
        "memory",
        "model",
        "--memory=1GiB",
        "--dirty-rate=1",
        "--bandwidth=0",
    ]);
    assert!(!bad.status.success());
}

/// Sends `frames` to a fresh `helio memory dest` (after the hello, and after its `MemReady`
/// when the first frame is a valid `MemStart`); returns its exit status and log.
fn feed_destination(tag: &str, frames: Vec<protocol::Frame>) -> (std::process::ExitStatus, String) {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join(format!("{tag}.log"));
    let mut dest = common::Agent::start(&["memory", "dest"], &log);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conn = protocol::connect(&dest.addr, None, "test").await.unwrap();
        for f in frames {
            let start = matches!(f.msg, protocol::Message::MemStart { .. });
            if conn.send(&f).await.is_err() {
                break;
            }
            if start {
                // A spec that parses is answered; one that does not closes the connection.
                let _ = conn.recv().await;
            }
        }
    });
    let status = dest
        .wait_exit(30)
        .expect("the destination must exit after bad input");
    let text = dest.log();
    assert!(!text.contains("panicked"), "{text}");
    (status, text)
}

#[test]
fn the_destination_rejects_malformed_input_with_a_clear_error() {
    use protocol::{Encoding, Frame, Message};
    let spec = |memory: u64| {
        serde_json::json!({
            "backend": "synthetic",
            "workload": {
                "memory_bytes": memory, "dirty_rate": 10, "hot_set_bytes": 0, "hot_fraction": 0.9,
                "zero_fraction": 0.2, "random_fraction": 0.4, "duplicate_fraction": 0.1, "seed": 1
            },
            "run_after_ms": 0
        })
        .to_string()
    };
    let start = |memory| Frame::new(Message::MemStart { spec: spec(memory) });

    let (status, log) = feed_destination(
        "garbage-spec",
        vec![Frame::new(Message::MemStart {
            spec: "{not json".into(),
        })],
    );
    assert!(!status.success());
    assert!(log.contains("the migration spec does not parse"), "{log}");

    // 3 MiB is not a guest the built-in layout can hold: refused before anything is mapped.
    let (status, log) = feed_destination("bad-size", vec![start(3 << 20)]);
    assert!(!status.success());
    assert!(log.contains("memory must be a multiple of 2 MiB"), "{log}");

    let garbage = Frame::with_payload(
        Message::MemPages {
            round: 1,
            pages: 3,
            encoding: Encoding::Zstd,
        },
        bytes::Bytes::from_static(b"not a zstd frame"),
    );
    let (status, log) = feed_destination("garbage-batch", vec![start(8 << 20), garbage]);
    assert!(!status.success());
    assert!(log.contains("malformed page batch"), "{log}");

    // One zero-page record for page 2^40: far beyond an 8 MiB guest.
    let mut raw = 1u32.to_le_bytes().to_vec();
    raw.extend_from_slice(&(1u64 << 40).to_le_bytes());
    raw.push(0);
    let beyond = Frame::with_payload(
        Message::MemPages {
            round: 1,
            pages: 1,
            encoding: Encoding::Raw,
        },
        bytes::Bytes::from(raw),
    );
    let (status, log) = feed_destination("beyond", vec![start(8 << 20), beyond]);
    assert!(!status.success());
    assert!(log.contains("beyond guest memory"), "{log}");
}

#[test]
fn postcopy_sends_zero_pages_so_the_guest_runs_on_and_every_stall_counts() {
    // Half the guest's pages are zero: a push that skipped them (the destination would count
    // them present, and ignore the faults on them) blocked the guest until the push's end.
    let (r, ok) = demo(&[
        "--backend=synthetic",
        "--plain",
        "--mode=postcopy",
        "--zero-fraction=0.5",
        "--random-fraction=0.5",
        "--duplicate-fraction=0",
        "--bandwidth=200Mbit",
        "--rtt=10ms",
    ]);
    assert_verified(&r, ok);
    let pc = &r["postcopy"];
    assert_eq!(pc["unanswered_faults"], 0, "faults left for the end: {r:#}");
    let push = f(
        r["rounds"].as_array().unwrap().last().unwrap(),
        "elapsed_ms",
    );
    assert!(
        f(pc, "fault_max_ms") < push / 4.0,
        "a stall lasted most of the {push} ms push: {r:#}"
    );
    assert!(f(pc, "fault_p99_ms") <= f(pc, "fault_max_ms"), "{r:#}");
    // The guest writes about 5000 pages a second; blocked, it would make none.
    assert!(
        pc["guest_writes_during_push"].as_u64().unwrap() > 1000,
        "the guest was blocked during the push: {r:#}"
    );
}
