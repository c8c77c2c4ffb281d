//! `helio seed` end to end: the real binary, a real source agent, loopback and emulated WANs.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn mixed_image_round_trips_byte_identical() {
    let (dir, img, src) = served_sample("24MiB", 3);
    let store = dir.path().join("store");
    let r = seed_json(&src.addr, "a", &store, &[]);
    let total = field(&r, "chunks_total");
    assert_eq!(total, 24 * 16);
    assert!(
        field(&r, "chunks_zero") > 0,
        "the sample image has zero regions: {r}"
    );
    assert_eq!(
        field(&r, "chunks_fetched") + field(&r, "chunks_zero") + field(&r, "chunks_deduplicated"),
        total
    );
    // Zeros never travel and text compresses: the wire carries well under the logical size.
    assert!(
        field(&r, "wire_bytes") < field(&r, "logical_bytes") * 3 / 4,
        "{r}"
    );

    let out = dir.path().join("out.raw");
    materialize(&store, "a", &out);
    assert!(
        cmp(&img, &out),
        "materialized replica differs from the image"
    );
    verify_equal(&store, "a", &img);

    // A second run finds everything present and fetches nothing.
    let again = seed_json(&src.addr, "a", &store, &[]);
    assert_eq!(field(&again, "chunks_fetched"), 0);
    assert_eq!(
        field(&again, "chunks_present") + field(&again, "chunks_zero"),
        total
    );
}

#[test]
fn disk_sharing_70_percent_fetches_about_30_percent() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sample_image(&a, "32MiB", 5);
    derived_image(&a, &b, 0.3, 6);
    let src = source(dir.path(), &[(&a, "a"), (&b, "b")], &[]);
    let store = dir.path().join("store");
    seed_json(&src.addr, "a", &store, &[]);
    let r = seed_json(&src.addr, "b", &store, &[]);
    let nonzero = field(&r, "chunks_total") - field(&r, "chunks_zero");
    let fetched = field(&r, "chunks_fetched") as f64 / nonzero as f64;
    assert!(
        (0.2..0.42).contains(&fetched),
        "fetched {fetched:.3} of b's data chunks: {r}"
    );
    assert!(field(&r, "chunks_deduplicated") > 0);
    let wire = field(&r, "wire_bytes") as f64 / field(&r, "logical_bytes") as f64;
    assert!(
        wire < 0.36,
        "b cost {wire:.3} of its logical bytes on the wire: {r}"
    );
    let out = dir.path().join("b.raw");
    materialize(&store, "b", &out);
    assert!(cmp(&b, &out));
}

#[test]
fn resume_after_kill_9_fetches_no_stored_chunk_again() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, "48MiB", 7);
    let store = dir.path().join("store");
    let src = source(dir.path(), &[(&img, "a")], &[]);

    // A capped seed (about 4 s), killed part way.
    let mut child = std::process::Command::new(helio_bin())
        .args(seed_args(
            &src.addr,
            "a",
            &store,
            &["--bandwidth", "8MiB/s"],
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    src.stop();

    let stored = {
        let s = blockstore::Store::open(&store).unwrap();
        let states = s.replica("a").unwrap().states().unwrap();
        states
            .iter()
            .filter(|st| matches!(st, Some(blockstore::ChunkState::Data(_))))
            .count() as u64
    };
    assert!(stored > 0, "nothing was committed before the kill");

    // A fresh source, so its log counts only what the resumed run asks for.
    let src2 = source(dir.path(), &[(&img, "a")], &[]);
    let r = seed_json(&src2.addr, "a", &store, &[]);
    let log = src2.stop();
    let served = sum_log_field(&log, "served_chunks");
    assert_eq!(field(&r, "chunks_present"), stored, "{r}");
    assert_eq!(field(&r, "chunks_refetched"), 0);
    // Every absent data chunk must be fetched; fetching exactly that many means none of the
    // stored ones was fetched again.
    assert_eq!(
        served,
        field(&r, "chunks_fetched"),
        "source served {served}: {r}"
    );
    assert_eq!(
        field(&r, "chunks_fetched")
            + stored
            + field(&r, "chunks_zero")
            + field(&r, "chunks_deduplicated"),
        field(&r, "chunks_total")
    );
    let out = dir.path().join("out.raw");
    materialize(&store, "a", &out);
    assert!(cmp(&img, &out));
}

#[test]
fn byte_flipped_in_flight_is_caught_and_refetched() {
    // About 24 MB cross the link at one flipped byte per 4 MB: some six corruptions.
    let (dir, img, src) = served_sample("48MiB", 9);
    let proxy = wan_proxy(
        &src.addr,
        &["--corrupt-every", "4000000"],
        &dir.path().join("proxy.log"),
    );
    let store = dir.path().join("store");
    let r = seed_json(&proxy.addr, "a", &store, &["--streams", "1"]);
    assert!(
        field(&r, "chunks_refetched") > 0,
        "the corrupting proxy went unnoticed: {r}"
    );
    verify_equal(&store, "a", &img);
}

#[test]
fn every_segment_corrupted_fails_with_a_clear_error() {
    let (dir, _img, src) = served_sample("8MiB", 10);
    let proxy = wan_proxy(
        &src.addr,
        &["--corrupt-every", "2000"],
        &dir.path().join("proxy.log"),
    );
    let start = Instant::now();
    let out = helio(&seed_args(
        &proxy.addr,
        "a",
        &dir.path().join("s"),
        &["--retries", "2"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("failed verification") || err.contains("corrupt") || err.contains("malformed"),
        "unclear error: {err}"
    );
    assert!(start.elapsed() < Duration::from_secs(60));
}

#[test]
fn tls_peers_from_the_ca_work_and_strangers_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    helio_ok(&["pki", "init", &d("ca")]);
    helio_ok(&[
        "pki",
        "issue",
        "--ca",
        &d("ca"),
        "--name",
        "src",
        "--out",
        &d("src"),
    ]);
    helio_ok(&[
        "pki",
        "issue",
        "--ca",
        &d("ca"),
        "--name",
        "dst",
        "--out",
        &d("dst"),
    ]);
    helio_ok(&["pki", "init", &d("other-ca")]);
    helio_ok(&[
        "pki",
        "issue",
        "--ca",
        &d("other-ca"),
        "--name",
        "dst",
        "--out",
        &d("stranger"),
    ]);
    assert!(
        !helio(&["pki", "init", &d("ca")]).status.success(),
        "init must not overwrite a CA"
    );

    let img = dir.path().join("a.img");
    sample_image(&img, "4MiB", 11);
    let src = source(dir.path(), &[(&img, "a")], &["--tls", &d("src")]);
    let ok = seed_json(
        &src.addr,
        "a",
        &dir.path().join("s1"),
        &["--tls", &d("dst")],
    );
    assert_eq!(field(&ok, "chunks_total"), 64);

    let (s2, stranger) = (dir.path().join("s2"), d("stranger"));
    let out = helio(&seed_args(
        &src.addr,
        "a",
        &s2,
        &["--tls", &stranger, "--retries", "0"],
    ));
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted"
    );
    let plain = helio(&seed_args(
        &src.addr,
        "a",
        &dir.path().join("s3"),
        &["--retries", "0"],
    ));
    assert!(!plain.status.success(), "a client without TLS was served");
    std::thread::sleep(Duration::from_millis(200));
    let log = src.stop();
    assert!(
        log.contains("rejected peer"),
        "the source did not log the rejection:\n{log}"
    );
}

#[test]
fn plain_tcp_on_a_reachable_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, "1MiB", 1);
    let out = helio(&[
        "source",
        "--listen",
        "0.0.0.0:0",
        "--state",
        dir.path().join("st").to_str().unwrap(),
        "--image",
        img.to_str().unwrap(),
        "--name",
        "a",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without --tls"));
}
