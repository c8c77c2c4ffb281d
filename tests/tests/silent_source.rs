//! A source behind a blackholed link: the connection stays up and nothing answers. Reads of
//! absent chunks fail with EIO within `--fetch-timeout`, seed and sync end with a clear error
//! within `--timeout` and keep their progress, and all of them recover once the link does.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A link in front of `to` that is blackholed while the returned file exists.
fn blackholable(dir: &Path, to: &str, extra: &[&str]) -> (Agent, PathBuf) {
    let hole = dir.join("blackhole");
    let mut args = vec!["--blackhole-while", hole.to_str().unwrap()];
    args.extend_from_slice(extra);
    let proxy = wan_proxy(to, &args, &dir.join("proxy.log"));
    (proxy, hole)
}

fn blackhole(file: &Path, on: bool) {
    if on {
        std::fs::write(file, b"").unwrap();
    } else {
        std::fs::remove_file(file).unwrap();
    }
    // The proxy looks every 50 ms.
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn reads_of_absent_chunks_fail_within_the_fetch_timeout_and_recover_with_the_link() {
    let (dir, img, src) = served_sample("8MiB", 71);
    let (proxy, hole) = blackholable(dir.path(), &src.addr, &["--rtt", "10ms"]);
    let store = dir.path().join("store");
    let extra = [
        "--from",
        &proxy.addr,
        "--bandwidth",
        "256KiB/s",
        "--fetch-timeout",
        "3s",
    ];
    let (_exp, sock) = export(dir.path(), &store, "a", &extra);
    let uri = nbd_uri(&sock, "a");
    let data = std::fs::read(&img).unwrap();
    let (ok, text) = qemu_io(&uri, &[&format!("read -P {} 0 1", data[0])]);
    assert!(ok, "{text}");

    blackhole(&hole, true);
    let far = 8 * 1024 * 1024 - 65536;
    let started = Instant::now();
    let (ok, text) = qemu_io(&uri, &[&format!("read {far} 4096")]);
    let waited = started.elapsed();
    assert!(
        !ok && text.contains("Input/output error"),
        "a read behind a blackholed link did not fail with EIO: {text}"
    );
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(15),
        "EIO after {waited:?}, not after the 3 s fetch timeout"
    );

    blackhole(&hole, false);
    let (ok, text) = qemu_io(&uri, &[&format!("read -P {} {far} 1", data[far])]);
    assert!(ok, "the read failed after the link came back: {text}");
    wait_complete(&store, "a", 120);
    let out = dir.path().join("out.raw");
    read_export(&uri, &out);
    assert!(
        cmp(&out, &img),
        "the export differs from the source after the blackhole"
    );
}

#[test]
fn seed_and_sync_from_a_blackholed_source_end_within_their_timeout_and_resume() {
    let (dir, img, src) = served_sample("32MiB", 72);
    let (proxy, hole) = blackholable(dir.path(), &src.addr, &["--bandwidth", "48Mbit"]);
    let store = dir.path().join("store");
    let hole2 = hole.clone();
    let holer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        blackhole(&hole2, true);
        Instant::now()
    });
    let out = helio(&seed_args(&proxy.addr, "a", &store, &["--timeout", "3s"]));
    let blackholed_at = holer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "seed claimed success behind a blackhole"
    );
    assert!(
        err.contains("sent nothing") && err.contains("resume"),
        "no clear error: {err}"
    );
    let after = blackholed_at.elapsed();
    assert!(
        after < Duration::from_secs(15),
        "seed ended {after:?} after the blackhole"
    );

    let kept = data_chunks(&store, "a");
    assert!(kept > 0, "progress before the blackhole was not kept");

    blackhole(&hole, false);
    let r = seed_into(&proxy.addr, "a", &store);
    assert_eq!(field(&r, "chunks_present") as usize, kept);
    verify_equal(&store, "a", &img);

    blackhole(&hole, true);
    let started = Instant::now();
    let args = [
        "sync",
        "--from",
        &proxy.addr,
        "--name",
        "a",
        "--store",
        store.to_str().unwrap(),
        "--timeout",
        "2s",
    ];
    let out = helio(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "sync claimed success behind a blackhole"
    );
    assert!(err.contains("sent nothing"), "no clear error: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "sync took {:?}",
        started.elapsed()
    );
}
