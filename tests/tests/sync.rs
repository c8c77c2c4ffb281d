//! Dirty tracking at the source and `helio sync` rounds, with qemu-io as the VM's writer.

mod common;

use common::*;
use std::path::Path;

fn sync_json(from: &str, store: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "sync",
        "--from",
        from,
        "--name",
        "a",
        "--store",
        store.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    last_json(&helio_ok(&args))
}

fn random_file(dir: &Path, len: usize) -> std::path::PathBuf {
    let p = dir.join(format!("rand-{}.bin", rand::random::<u32>()));
    let mut buf = vec![0u8; len];
    blake3::Hasher::new_keyed(&rand::random())
        .finalize_xof()
        .fill(&mut buf);
    std::fs::write(&p, buf).unwrap();
    p
}

/// A sample image of `size` served by a tracking source: (its directory, the image, the
/// source, the NBD URI its VM writes through).
fn tracked_sample(size: &str, seed: u64) -> (tempfile::TempDir, std::path::PathBuf, Agent, String) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, size, seed);
    let (src, vm) = tracking_source(dir.path(), &img, &dir.path().join("state"), "127.0.0.1:0");
    (dir, img, src, vm)
}

#[test]
fn scattered_writes_are_shipped_exactly_and_the_replica_equals_the_image() {
    let (dir, img, src, vm) = tracked_sample("32MiB", 41);
    let store = dir.path().join("store");
    seed_into(&src.addr, "a", &store);

    let data = random_file(dir.path(), 200_000);
    let d = data.to_str().unwrap();
    // Chunks touched (64 KiB): 3_000_000..3_200_000 -> 45..48 (4), 20_000_000+100 (1),
    // 30_000_000..30_000_000+65536 -> 457..458 (2): 7 chunks.
    let cmds = [
        format!("write -s {d} 3000000 200000"),
        "write -P 0x77 20000000 100".to_string(),
        format!("write -s {d} 30000000 65536"),
        "flush".to_string(),
    ];
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (ok, text) = qemu_io(&vm, &refs);
    assert!(ok, "{text}");

    let r = sync_json(&src.addr, &store, &[]);
    let round = &r["rounds"][0];
    assert_eq!(round["chunks"].as_u64(), Some(7), "{r}");
    assert_eq!(round["dirty_bytes"].as_u64(), Some(7 * 65536), "{r}");
    assert_eq!(r["remaining_dirty_bytes"].as_u64(), Some(0));
    assert_eq!(r["converged"], true);
    verify_equal(&store, "a", &img);
    // Nothing written since: the next round ships nothing.
    let again = sync_json(&src.addr, &store, &[]);
    assert_eq!(again["rounds"][0]["chunks"].as_u64(), Some(0), "{again}");
}

#[test]
fn kill_9_of_the_source_between_writes_and_sync_loses_no_extent() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, "16MiB", 42);
    let state = dir.path().join("state");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (src, vm) = tracking_source(dir.path(), &img, &state, &listen);
    let store = dir.path().join("store");
    seed_into(&src.addr, "a", &store);
    let data = random_file(dir.path(), 100_000);
    let cmds = [
        format!("write -s {} 5000000 100000", data.display()),
        "write -P 0x21 12000000 512".into(),
        "flush".into(),
    ];
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (ok, text) = qemu_io(&vm, &refs);
    assert!(ok, "{text}");
    src.kill9();

    let (src2, _vm2) = tracking_source(dir.path(), &img, &state, &listen);
    let r = sync_json(&src2.addr, &store, &[]);
    assert!(
        r["rounds"][0]["chunks"].as_u64().unwrap() >= 3,
        "writes before the crash were not shipped: {r}"
    );
    verify_equal(&store, "a", &img);
}

/// The source reuses the plan's hash for a chunk it sends in the same round only while nothing
/// wrote the chunk in between: here the VM rewrites a planned chunk before the destination
/// asks for it, and the reply must carry the new bytes with their own hash.
#[test]
fn a_chunk_rewritten_after_the_plan_is_sent_with_the_hash_of_its_new_bytes() {
    use protocol::{ChunkEntry, ChunkHash, Encoding, Frame, Message};
    let (_dir, _img, src, vm) = tracked_sample("8MiB", 44);
    let replica = [7u8; 16];
    async fn ask(conn: &mut protocol::Conn, msg: Message) -> Frame {
        conn.send(&Frame::new(msg)).await.unwrap();
        conn.recv().await.unwrap()
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conn = protocol::connect(&src.addr, None, "test").await.unwrap();
        let opened = ask(&mut conn, Message::Open { disk: "a".into() }).await;
        assert!(matches!(opened.msg, Message::Opened(_)), "{:?}", opened.msg);
        let registered = ask(&mut conn, Message::Register { replica }).await;
        assert!(
            matches!(registered.msg, Message::Registered { .. }),
            "{:?}",
            registered.msg
        );

        let (ok, text) = qemu_io(&vm, &["write -P 0x11 0 65536", "flush"]);
        assert!(ok, "{text}");
        let plan = ask(&mut conn, Message::SyncBegin { replica }).await;
        let Message::SyncPlan {
            generation, count, ..
        } = plan.msg
        else {
            panic!("expected a plan, got {:?}", plan.msg);
        };
        assert_eq!(count, 1);
        let raw = zstd::bulk::decompress(&plan.payload, 1 << 16).unwrap();
        assert_eq!(u64::from_be_bytes(raw[..8].try_into().unwrap()), 0);
        let first = vec![0x11u8; 65536];
        assert_eq!(
            ChunkEntry::decode(&raw[8..]),
            Some(ChunkEntry::Data(ChunkHash::of(&first)))
        );

        let (ok, text) = qemu_io(&vm, &["write -P 0x22 0 65536", "flush"]);
        assert!(ok, "{text}");
        let get = Message::GetChunk {
            id: 1,
            index: 0,
            compress: false,
            round: Some(generation),
        };
        let reply = ask(&mut conn, get).await;
        let Message::Chunk { hash, encoding, .. } = reply.msg else {
            panic!("expected the chunk, got {:?}", reply.msg);
        };
        assert_eq!(encoding, Encoding::Raw);
        assert_eq!(
            &reply.payload[..],
            &[0x22u8; 65536][..],
            "the bytes as they are now"
        );
        assert_eq!(
            hash,
            ChunkHash::of(&reply.payload),
            "the hash of the bytes sent, not the plan's"
        );
    });
    drop(src);
}

#[test]
fn two_destinations_sync_independently() {
    let (dir, img, src, vm) = tracked_sample("16MiB", 43);
    let (s1, s2) = (dir.path().join("store1"), dir.path().join("store2"));
    for s in [&s1, &s2] {
        seed_into(&src.addr, "a", s);
    }
    let (ok, text) = qemu_io(&vm, &["write -P 0x01 0 65536", "flush"]);
    assert!(ok, "{text}");
    let r1 = sync_json(&src.addr, &s1, &[]);
    assert_eq!(r1["rounds"][0]["chunks"].as_u64(), Some(1), "{r1}");
    let (ok, text) = qemu_io(&vm, &["write -P 0x02 1048576 65536", "flush"]);
    assert!(ok, "{text}");
    // The second destination never synced: it lacks both writes.
    let r2 = sync_json(&src.addr, &s2, &[]);
    assert_eq!(r2["rounds"][0]["chunks"].as_u64(), Some(2), "{r2}");
    // The first lacks only the second write.
    let r1 = sync_json(&src.addr, &s1, &[]);
    assert_eq!(r1["rounds"][0]["chunks"].as_u64(), Some(1), "{r1}");
    verify_equal(&s1, "a", &img);
    verify_equal(&s2, "a", &img);
}

#[test]
fn a_writer_faster_than_the_link_is_reported_as_not_converging() {
    let (dir, _img, src, vm) = tracked_sample("16MiB", 44);
    let store = dir.path().join("store");
    seed_into(&src.addr, "a", &store);
    // A writer rewriting an 8 MiB working set with fresh data at about 20 MB/s for at most 40 s
    // (killed once sync returns), against rounds capped at 2 MiB/s.
    const WRITER: &str = r#"
import nbd, os, sys, time, random
h = nbd.NBD()
h.connect_uri(sys.argv[1])
end = time.time() + 40
n = 0
while time.time() < end:
    h.pwrite(os.urandom(65536), random.randrange(0, 128) * 65536)
    n += 1
    if n % 10 == 0:
        h.flush()
    time.sleep(0.002)
"#;
    let writer = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(WRITER)
        .arg(&vm)
        .spawn()
        .expect("python3 with libnbd (apt-get install python3-libnbd)");
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let out = helio_ok(&[
        "sync",
        "--from",
        &src.addr,
        "--name",
        "a",
        "--store",
        store.to_str().unwrap(),
        "--until-converged",
        "--max-dirty",
        "64KiB",
        "--bandwidth",
        "2MiB/s",
        "--json",
    ]);
    let mut writer = writer;
    let _ = writer.kill();
    let _ = writer.wait();
    let r = last_json(&out);
    assert_eq!(r["converged"], false, "{r}");
    assert!(
        r["stopped"].as_str().unwrap().contains("not converging"),
        "{r}"
    );
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.len() >= 2 && rounds.len() < 30, "{r}");
    let last = rounds.last().unwrap();
    assert!(
        last["dirty_rate"].as_f64().unwrap() >= last["transfer_rate"].as_f64().unwrap(),
        "{r}"
    );
}

#[test]
fn sync_needs_a_tracking_source_and_a_seeded_replica() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, "2MiB", 45);
    let plain = source(dir.path(), &[(&img, "a")], &[]);
    let store = dir.path().join("store");
    seed_into(&plain.addr, "a", &store);
    let out = helio(&[
        "sync",
        "--from",
        &plain.addr,
        "--name",
        "a",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--nbd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (tracked, _vm) =
        tracking_source(dir.path(), &img, &dir.path().join("state2"), "127.0.0.1:0");
    let out = helio(&[
        "sync",
        "--from",
        &tracked.addr,
        "--name",
        "a",
        "--store",
        store.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "a replica this source never registered was synced"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not registered"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Qemunbd(std::process::Child);
impl Drop for Qemunbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd_bitmap(qcow2: &Path, sock: &Path) -> Qemunbd {
    let _ = std::fs::remove_file(sock);
    let child = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-x", "d", "-B", "bm", "-r", "-t", "-k"])
        .arg(sock)
        .arg(qcow2)
        .spawn()
        .expect("qemu-nbd (apt-get install qemu-utils)");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Qemunbd(child)
}

#[test]
fn qemu_owned_qcow2_syncs_from_its_persistent_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    sample_image(&raw, "16MiB", 46);
    let qcow2 = dir.path().join("d.qcow2");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow2.to_str().unwrap(),
        ],
    );
    run_ok(
        "qemu-img",
        &["bitmap", "--add", qcow2.to_str().unwrap(), "bm"],
    );
    let sock = dir.path().join("q.sock");
    let uri = format!("nbd+unix:///d?socket={}", sock.display());
    let state = dir.path().join("state");
    let start_source = |tag: &str| {
        Agent::start(
            &[
                "source",
                "--listen",
                "127.0.0.1:0",
                "--state",
                state.to_str().unwrap(),
                "--image",
                &uri,
                "--name",
                "d",
                "--dirty-bitmap",
                "bm",
            ],
            &dir.path().join(format!("{tag}.log")),
        )
    };
    let store = dir.path().join("store");
    {
        let _q = qemu_nbd_bitmap(&qcow2, &sock);
        let src = start_source("src1");
        seed_into(&src.addr, "d", &store);
    }
    // The VM (here qemu-io) writes while QEMU owns the disk; the persistent bitmap records it.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1048576 100000",
            "-c",
            "write -P 0x55 10000000 512",
            qcow2.to_str().unwrap(),
        ],
    );
    let _q = qemu_nbd_bitmap(&qcow2, &sock);
    let src = start_source("src2");
    let out = helio_ok(&[
        "sync",
        "--from",
        &src.addr,
        "--name",
        "d",
        "--store",
        store.to_str().unwrap(),
        "--until-converged",
        "--json",
    ]);
    let r = last_json(&out);
    // 1048576..1148576 touches chunks 16 and 17; 10000000 touches chunk 152.
    assert_eq!(r["rounds"][0]["chunks"].as_u64(), Some(3), "{r}");
    // The bitmap cannot say what is left: one round, and no claim of convergence.
    assert_eq!(r["rounds"].as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(r["converged"], false, "{r}");
    assert!(r["remaining_dirty_bytes"].is_null(), "{r}");
    assert!(
        r["stopped"].as_str().unwrap().contains("cannot measure"),
        "{r}"
    );
    let now = dir.path().join("now.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow2.to_str().unwrap(),
            now.to_str().unwrap(),
        ],
    );
    let rep = dir.path().join("rep.raw");
    materialize(&store, "d", &rep);
    assert!(
        cmp(&now, &rep),
        "the replica differs from the qcow2 after the bitmap sync"
    );
}

#[test]
fn zeroed_and_discarded_ranges_are_tracked_and_only_discard_frees_space() {
    use std::os::unix::fs::MetadataExt;
    let (dir, img, src, vm) = tracked_sample("16MiB", 44);
    let store = dir.path().join("store");
    let data = random_file(dir.path(), 1 << 20);
    let d = data.to_str().unwrap();
    let mib = 1u64 << 20;
    let cmds: Vec<String> = [4, 8, 12]
        .iter()
        .map(|m| format!("write -s {d} {} {mib}", m * mib))
        .chain(["flush".to_string()])
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (ok, text) = qemu_io(&vm, &refs);
    assert!(ok, "{text}");
    seed_into(&src.addr, "a", &store);
    let blocks = || std::fs::metadata(&img).unwrap().blocks();
    let before = blocks();

    // WRITE_ZEROES with NO_HOLE (-z), WRITE_ZEROES that may unmap (-z -u), and TRIM.
    let cmds = [
        format!("write -z {} {mib}", 4 * mib),
        format!("write -z -u {} {mib}", 8 * mib),
        format!("discard {} {mib}", 12 * mib),
        "flush".to_string(),
    ];
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    let (ok, text) = qemu_io_with(&vm, &["-d", "unmap"], &refs);
    assert!(ok, "{text}");

    let bytes = std::fs::read(&img).unwrap();
    for m in [4, 8, 12] {
        let r = (m * mib) as usize..((m + 1) * mib) as usize;
        assert!(bytes[r].iter().all(|&b| b == 0), "{m} MiB: not zero");
    }
    // Zeroing keeps the blocks (the VM wrote zeros); only the discard gives 1 MiB back
    // (2048 sectors; a few more or less for the filesystem's own extent records).
    let freed = before as i64 - blocks() as i64;
    assert!(
        (2048 - 16..=2048 + 16).contains(&freed),
        "{freed} sectors freed, expected 2048"
    );
    let r = sync_json(&src.addr, &store, &[]);
    assert_eq!(r["rounds"][0]["chunks"].as_u64(), Some(48), "{r}");
    verify_equal(&store, "a", &img);
}
