//! Bad input during seeding: each case gets a clear error and loses nothing already stored.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn seed(from: &str, name: &str, store: &Path, extra: &[&str]) -> std::process::Output {
    helio(&seed_args(from, name, store, extra))
}

#[test]
fn unknown_disk_name_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, "1MiB", 1);
    let src = source(dir.path(), &[(&img, "alpha")], &[]);
    let out = seed(&src.addr, "beta", &dir.path().join("s"), &[]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("no disk named \"beta\"") && err.contains("alpha"),
        "{err}"
    );
}

#[test]
fn image_truncated_after_scan_is_reported_and_the_source_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (img, other) = (dir.path().join("a.img"), dir.path().join("b.img"));
    sample_image(&img, "8MiB", 2);
    sample_image(&other, "1MiB", 3);
    let src = source(dir.path(), &[(&img, "a"), (&other, "b")], &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let out = seed(&src.addr, "a", &dir.path().join("s"), &[]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(err.contains("shorter than its manifest"), "{err}");
    // The source is still serving.
    let ok = seed(&src.addr, "b", &dir.path().join("s"), &[]);
    assert!(ok.status.success(), "{}", stderr_of(&ok));
}

#[test]
fn store_that_cannot_be_created_is_reported() {
    let (dir, _img, src) = served_sample("1MiB", 1);
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = seed(&src.addr, "a", &file.join("store"), &[]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("cannot create store directory"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn disk_full_fails_clearly_and_keeps_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let test = "disk_full_fails_clearly_and_keeps_a_consistent_store";
    let Some(volume) = small_volume(dir.path(), "56M", test) else {
        return;
    };
    let mnt = volume.0.clone();
    let img = dir.path().join("a.img");
    sample_image(&img, "64MiB", 4);
    let src = source(dir.path(), &[(&img, "a")], &[]);
    let store = mnt.join("store");
    let out = seed(&src.addr, "a", &store, &[]);
    assert!(
        !out.status.success(),
        "a 64 MiB disk fit in 56 MiB with 32 MiB reserved?"
    );
    let err = stderr_of(&out);
    assert!(err.contains("free some space"), "{err}");
    // Whatever was recorded is intact: verify reports only absent chunks, never wrong ones.
    let v = helio(&[
        "verify",
        "--store",
        store.to_str().unwrap(),
        "--name",
        "a",
        "--image",
        img.to_str().unwrap(),
        "--json",
    ]);
    let report = last_json(&String::from_utf8_lossy(&v.stdout));
    let mismatches = report["mismatches"].as_array().expect("mismatch list");
    assert!(!mismatches.is_empty());
    assert!(
        (mismatches.len() as u64) < report["chunks"].as_u64().unwrap(),
        "nothing was kept before the volume filled"
    );
    for m in mismatches {
        let reason = m["reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("absent"),
            "stored chunk is wrong after disk full: {m}"
        );
    }
}

#[test]
fn garbage_speaking_peer_gets_a_clear_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).unwrap();
        // Serve a few connections (the client retries), then stop.
        for _ in 0..4 {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
            let mut buf = [0u8; 64];
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = s.read(&mut buf);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = seed(&addr, "a", &dir.path().join("s"), &["--retries", "0"]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("malformed") || err.contains("does not speak"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    drop(server);
}

#[test]
fn source_survives_garbage_and_refuses_other_versions() {
    let (dir, _img, src) = served_sample("2MiB", 5);

    let mut s = TcpStream::connect(&src.addr).unwrap();
    let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let _ = s.write_all(&junk);
    drop(s);
    let mut s = TcpStream::connect(&src.addr).unwrap();
    let _ = s.write_all(&[0, 0, 0, 5, b'H', b'E', b'L', b'L', b'O']);
    drop(s);

    // A peer from the future: a well-formed hello with version 99.
    let mut s = TcpStream::connect(&src.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = protocol::hello::Hello {
        version: 99,
        accepted: true,
        text: "future".into(),
    }
    .encode();
    s.write_all(&(hello.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&hello).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    let reply = protocol::hello::Hello::decode(&body).unwrap();
    assert!(!reply.accepted);
    assert!(
        reply.text.contains("protocol version 99 is not supported"),
        "{}",
        reply.text
    );

    let ok = seed(&src.addr, "a", &dir.path().join("s"), &[]);
    assert!(
        ok.status.success(),
        "source stopped serving after garbage: {}",
        stderr_of(&ok)
    );
    let log = src.stop();
    assert!(
        log.contains("HELIOTRP") || log.contains("malformed"),
        "garbage went unlogged:\n{log}"
    );
}

#[test]
fn source_vanishing_mid_seed_fails_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, "32MiB", 6);
    let store = dir.path().join("store");
    let src = source(dir.path(), &[(&img, "a")], &[]);
    let addr = src.addr.clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        src.kill9();
    });
    let start = Instant::now();
    let out = seed(
        &addr,
        "a",
        &store,
        &["--bandwidth", "6MiB/s", "--retries", "2"],
    );
    killer.join().unwrap();
    assert!(
        !out.status.success(),
        "seed claimed success without its source"
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("lost the source") && err.contains("resume"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(40));

    let kept = data_chunks(&store, "a");
    assert!(kept > 0, "progress before the loss was not kept");

    let src2 = source(dir.path(), &[(&img, "a")], &[]);
    let r = seed_into(&src2.addr, "a", &store);
    assert_eq!(field(&r, "chunks_present") as usize, kept);
    verify_equal(&store, "a", &img);
}

#[test]
fn verify_reports_a_corrupted_replica_chunk() {
    let (dir, _img, src) = served_sample("4MiB", 8);
    let store = dir.path().join("store");
    seed_into(&src.addr, "a", &store);
    // Find a data chunk and flip one byte of it in the replica file.
    let s = blockstore::Store::open(&store).unwrap();
    let r = s.replica("a").unwrap();
    let idx = r
        .states()
        .unwrap()
        .iter()
        .position(|st| matches!(st, Some(blockstore::ChunkState::Data(_))))
        .unwrap();
    let path = r.data_path().clone();
    drop((r, s));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let off = idx as u64 * 65536 + 100;
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 1], off).unwrap();
    drop(f);
    let out = helio(&["verify", "--store", store.to_str().unwrap(), "--name", "a"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("chunk {idx} ")), "{text}");
}
