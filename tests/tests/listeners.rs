//! Every listener has limits: a peer that connects and never finishes its handshake is
//! dropped after 10 s (TLS and hello for the replication source, negotiation for NBD), and a
//! listener serving 256 connections refuses the next at once.

mod common;

use common::*;
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Waits (at most 30 s) for the peer to close `s`; how long it took.
fn closed_after(s: &mut impl Read) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("still open after {:?}: {e}", started.elapsed()),
        }
    }
}

#[test]
fn peers_that_never_finish_their_handshake_are_dropped() {
    let (dir, _img, src) = served_sample("4MiB", 91);
    let store = dir.path().join("store");
    seed_into(&src.addr, "a", &store);
    let (_exp, sock) = export(dir.path(), &store, "a", &[]);

    let addr = src.addr.clone();
    let replication = std::thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        closed_after(&mut s)
    });
    let mut nbd = UnixStream::connect(&sock).unwrap();
    nbd.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    nbd.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let nbd_after = closed_after(&mut nbd);
    let replication_after = replication.join().unwrap();
    for (what, after) in [("replication", replication_after), ("NBD", nbd_after)] {
        assert!(
            after >= Duration::from_secs(8) && after < Duration::from_secs(20),
            "an idle {what} handshake was dropped after {after:?}, not after 10 s"
        );
    }
    // Both listeners still serve.
    run_ok("nbdinfo", &[&nbd_uri(&sock, "a")]);
    seed_into(&src.addr, "a", &dir.path().join("store2"));
}

#[test]
fn a_source_refuses_connections_beyond_its_limit_and_serves_again_after() {
    let (dir, _img, src) = served_sample("4MiB", 92);
    let held: Vec<TcpStream> = (0..256)
        .map(|_| TcpStream::connect(&src.addr).unwrap())
        .collect();
    // Accepted in order: give the source time to take all 256 before the next arrives.
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = TcpStream::connect(&src.addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let after = closed_after(&mut extra);
    assert!(
        after < Duration::from_secs(3),
        "the 257th connection was kept {after:?}"
    );
    assert!(
        src.log().contains("refusing a replication connection"),
        "{}",
        src.log()
    );
    drop(held);
    // Slots come back as connections end.
    std::thread::sleep(Duration::from_millis(500));
    seed_into(&src.addr, "a", &dir.path().join("store"));
}
