//! `helio export` against clients we did not write: qemu-img, qemu-io, nbdinfo, nbdcopy, fio,
//! and libnbd's Python binding.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

fn seeded(dir: &Path, size: &str, seed: u64) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = dir.join("a.img");
    sample_image(&img, size, seed);
    let src = source(dir, &[(&img, "a")], &[]);
    let store = dir.join("store");
    seed_into(&src.addr, "a", &store);
    (img, store)
}

#[test]
fn complete_replica_serves_qemu_img_nbdinfo_and_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = seeded(dir.path(), "16MiB", 21);
    let (exp, sock) = export(dir.path(), &store, "a", &[]);
    let uri = nbd_uri(&sock, "a");
    let mode = std::fs::metadata(&sock)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600, "the NBD socket must be private");

    let out = dir.path().join("out.raw");
    read_export(&uri, &out);
    assert!(
        cmp(&img, &out),
        "qemu-img convert of the export differs from the image"
    );

    // nbdinfo --map: every hole it reports reads as zeros in the image, and there are holes.
    let map: serde_json::Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--map", "--json", &uri])).unwrap();
    let data = std::fs::read(&img).unwrap();
    let mut holes = 0;
    for e in map.as_array().unwrap() {
        let (off, len, ty) = (
            e["offset"].as_u64().unwrap() as usize,
            e["length"].as_u64().unwrap() as usize,
            e["type"].as_u64().unwrap(),
        );
        if ty & 1 != 0 {
            holes += 1;
            assert!(
                data[off..off + len].iter().all(|&b| b == 0),
                "hole at {off}+{len} holds data"
            );
        }
    }
    assert!(
        holes > 0,
        "no holes reported for an image with zero regions: {map}"
    );

    // Aligned and unaligned writes, read back, then across a restart of the export.
    let cmds = [
        "write -P 0x11 65536 65536",
        "write -P 0x22 1000 3000",
        "write -z 131072 65536",
        "flush",
    ];
    let (ok, text) = qemu_io(&uri, &cmds);
    assert!(ok, "{text}");
    let checks = [
        "read -P 0x11 65536 65536",
        "read -P 0x22 1000 3000",
        "read -P 0 131072 65536",
    ];
    let (ok, text) = qemu_io(&uri, &checks);
    assert!(ok, "{text}");
    exp.stop();
    let (_exp, sock) = export(dir.path(), &store, "a", &[]);
    let (ok, text) = qemu_io(&nbd_uri(&sock, "a"), &checks);
    assert!(ok, "writes lost across an export restart: {text}");
    // Bytes around the unaligned write are the image's.
    let (ok, text) = qemu_io(
        &nbd_uri(&sock, "a"),
        &[
            &format!("read -P {} 999 1", data[999]),
            &format!("read -P {} 4000 1", data[4000]),
        ],
    );
    assert!(ok, "{text}");
}

#[test]
fn nbdcopy_with_four_connections_and_fio_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = seeded(dir.path(), "32MiB", 22);
    let (_exp, sock) = export(dir.path(), &store, "a", &[]);
    let uri = nbd_uri(&sock, "a");
    let out = dir.path().join("copy.raw");
    run_ok(
        "nbdcopy",
        &["-C", "4", "--requests", "16", &uri, out.to_str().unwrap()],
    );
    assert!(
        cmp(&img, &out),
        "nbdcopy with 4 connections read wrong data"
    );

    let fio = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            // fio otherwise leaves a verify state file in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&fio[fio.find('{').unwrap()..]).unwrap();
    assert_eq!(
        report["jobs"][0]["error"].as_u64(),
        Some(0),
        "fio reported an error: {fio}"
    );
}

#[test]
fn reads_of_absent_chunks_fetch_on_demand_through_a_wan() {
    let (dir, img, src) = served_sample("16MiB", 23);
    let proxy = wan_proxy(
        &src.addr,
        &["--rtt", "20ms", "--bandwidth", "200Mbit"],
        &dir.path().join("proxy.log"),
    );
    let store = dir.path().join("store");
    // A slow background copier, so reads find chunks absent.
    let (_exp, sock) = export(
        dir.path(),
        &store,
        "a",
        &["--from", &proxy.addr, "--bandwidth", "1MiB/s"],
    );
    let data = std::fs::read(&img).unwrap();
    let uri = nbd_uri(&sock, "a");
    let off = 12 * 1024 * 1024 + 4096;
    let (ok, text) = qemu_io(&uri, &[&format!("read -P {} {off} 1", data[off])]);
    assert!(ok, "{text}");
    let out = dir.path().join("out.raw");
    read_export(&uri, &out);
    assert!(
        cmp(&img, &out),
        "data fetched on demand differs from the source image"
    );
    let st = status(&store, "a");
    assert!(
        st["on_demand_fetches"].as_u64().unwrap() > 0,
        "no read waited for a fetch: {st}"
    );
    assert!(
        st["on_demand_p50_ms"].as_f64().unwrap() >= 20.0,
        "a fetch through a 20 ms RTT link took less than one RTT: {st}"
    );
}

#[test]
fn write_during_background_copy_survives_its_completion() {
    let (dir, img, src) = served_sample("8MiB", 24);
    let store = dir.path().join("store");
    let (_exp, sock) = export(
        dir.path(),
        &store,
        "a",
        &["--from", &src.addr, "--bandwidth", "2MiB/s"],
    );
    let uri = nbd_uri(&sock, "a");
    // Unaligned across a chunk boundary, a whole chunk, zeroes, all near the end (copied last).
    let cmds = [
        "write -P 0x5a 7000000 70000",
        "write -P 0x6b 7340032 65536",
        "write -z 7667712 4096",
        "flush",
    ];
    let (ok, text) = qemu_io(&uri, &cmds);
    assert!(ok, "{text}");
    let st = status(&store, "a");
    assert_eq!(
        st["complete"], false,
        "copy finished before the writes: the test proves nothing: {st}"
    );
    wait_complete(&store, "a", 90);
    let mut expected = std::fs::read(&img).unwrap();
    expected[7000000..7070000].fill(0x5a);
    expected[7340032..7340032 + 65536].fill(0x6b);
    expected[7667712..7667712 + 4096].fill(0);
    let out = dir.path().join("out.raw");
    read_export(&uri, &out);
    let got = std::fs::read(&out).unwrap();
    let first_bad = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_bad, None,
        "replica differs from image+writes at byte {first_bad:?}"
    );
}

#[test]
fn source_killed_mid_copy_fails_absent_reads_only_then_copy_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    sample_image(&img, "8MiB", 25);
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let state = dir.path().join("state");
    let start_source = |log: &str| {
        Agent::start(
            &[
                "source",
                "--listen",
                &listen,
                "--state",
                state.to_str().unwrap(),
                "--image",
                img.to_str().unwrap(),
                "--name",
                "a",
            ],
            &dir.path().join(log),
        )
    };
    let src = start_source("src1.log");
    let store = dir.path().join("store");
    let (_exp, sock) = export(
        dir.path(),
        &store,
        "a",
        &[
            "--from",
            &listen,
            "--bandwidth",
            "512KiB/s",
            "--fetch-timeout",
            "2s",
        ],
    );
    let uri = nbd_uri(&sock, "a");
    let data = std::fs::read(&img).unwrap();
    // Chunk 0 fetched now; the end of the disk stays absent at this rate.
    let (ok, text) = qemu_io(&uri, &[&format!("read -P {} 0 1", data[0])]);
    assert!(ok, "{text}");
    src.kill9();

    let (ok, text) = qemu_io(&uri, &[&format!("read -P {} 0 65536", data[0])]);
    assert!(
        ok && !text.contains("Input/output"),
        "a present chunk failed without its source: {text}"
    );
    let far = 8 * 1024 * 1024 - 65536;
    let started = std::time::Instant::now();
    let (ok, text) = qemu_io(&uri, &[&format!("read {far} 4096")]);
    assert!(
        !ok && text.contains("Input/output error"),
        "an absent chunk did not fail with EIO: {text}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "EIO came before the fetch timeout"
    );

    let _src2 = start_source("src2.log");
    wait_complete(&store, "a", 120);
    let out = dir.path().join("out.raw");
    read_export(&uri, &out);
    assert!(cmp(&img, &out), "the resumed copy differs from the image");
}

#[test]
fn acknowledged_writes_survive_kill_9_of_the_export() {
    let (dir, _img, src) = served_sample("8MiB", 26);
    let store = dir.path().join("store");
    let (exp, sock) = export(
        dir.path(),
        &store,
        "a",
        &["--from", &src.addr, "--bandwidth", "1MiB/s"],
    );
    let (ok, text) = qemu_io(
        &nbd_uri(&sock, "a"),
        &[
            "write -P 0x3c 5000000 100000",
            "flush",
            "write -P 0x4d -f 6000000 4096",
        ],
    );
    assert!(ok, "{text}");
    exp.kill9();
    let (_exp, sock) = export(dir.path(), &store, "a", &["--from", &src.addr]);
    let (ok, text) = qemu_io(
        &nbd_uri(&sock, "a"),
        &["read -P 0x3c 5000000 100000", "read -P 0x4d 6000000 4096"],
    );
    assert!(ok, "acknowledged writes lost after kill -9: {text}");
    wait_complete(&store, "a", 60);
    let (ok, text) = qemu_io(&nbd_uri(&sock, "a"), &["read -P 0x3c 5000000 100000"]);
    assert!(ok, "the background copy overwrote a local write: {text}");
}

#[test]
fn readonly_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let (_img, store) = seeded(dir.path(), "4MiB", 27);
    let (_exp, sock) = export(dir.path(), &store, "a", &["--readonly"]);
    let uri = nbd_uri(&sock, "a");
    assert!(run_ok("nbdinfo", &[&uri]).contains("is_read_only: true"));
    let code = libnbd(
        &uri,
        "
try:
    h.pwrite(b'x' * 512, 0)
    print('WROTE')
except nbd.Error as e:
    print('ERRNO', e.errno)
",
    );
    assert!(
        code.contains("ERRNO EPERM") || code.contains("ERRNO 1"),
        "write to a read-only export: {code}"
    );
}

/// `err(f)`: runs `f`, and names the errno it failed with (`OK` if it did not).
const ERR: &str = "
def err(f):
    try:
        f()
        return 'OK'
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, str(e.errno))
";

/// Runs a libnbd Python snippet with `h` connected to `uri` (client-side checks off, so the
/// server's own checks are exercised) and `err` defined (see [`ERR`]).
fn libnbd(uri: &str, body: &str) -> String {
    let script = format!(
        "import nbd, errno\n{ERR}\nh = nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri({uri:?})\n{body}\nh.shutdown()\n"
    );
    run_ok("/usr/bin/python3", &["-c", &script])
}

#[test]
fn out_of_range_and_malformed_requests_get_errors_not_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let (_img, store) = seeded(dir.path(), "4MiB", 28);
    let (_exp, sock) = export(dir.path(), &store, "a", &[]);
    let uri = nbd_uri(&sock, "a");
    let size = 4 * 1024 * 1024;
    let out = libnbd(
        &uri,
        &format!(
            "
print('read', err(lambda: h.pread(512, {size} - 256)))
print('write', err(lambda: h.pwrite(b'y' * 512, {size})))
print('trim', err(lambda: h.trim(4096, {size})))
print('zero', err(lambda: h.zero(4096, {size})))
print('inrange', err(lambda: h.pread(512, 0)))
"
        ),
    );
    assert!(out.contains("read EINVAL"), "{out}");
    assert!(out.contains("write ENOSPC"), "{out}");
    assert!(out.contains("trim EINVAL"), "{out}");
    assert!(out.contains("zero ENOSPC"), "{out}");
    assert!(out.contains("inrange OK"), "{out}");

    // Garbage instead of a handshake, and a bad request magic: the server drops those
    // connections and keeps serving.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    let _ = s.write_all(b"\x00\x00\x00\x03this is not an NBD option at all");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    drop(s);
    run_ok("nbdinfo", &[&uri]);
}

#[test]
fn tcp_export_needs_tls_and_serves_libnbd_over_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = seeded(dir.path(), "4MiB", 29);
    let d = |p: &str| dir.path().join(p).display().to_string();
    let refused = helio(&[
        "export",
        "--store",
        &d("store"),
        "--name",
        "a",
        "--nbd",
        "0.0.0.0:0",
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("without --tls"));

    helio_ok(&["pki", "init", &d("ca")]);
    helio_ok(&[
        "pki",
        "issue",
        "--ca",
        &d("ca"),
        "--name",
        "exp",
        "--out",
        &d("exp"),
    ]);
    helio_ok(&[
        "pki",
        "issue",
        "--ca",
        &d("ca"),
        "--name",
        "cli",
        "--out",
        &d("cli"),
    ]);
    // libnbd (GnuTLS) wants its own file names.
    let gnutls = dir.path().join("gnutls");
    std::fs::create_dir(&gnutls).unwrap();
    for (from, to) in [
        ("ca.pem", "ca-cert.pem"),
        ("cert.pem", "client-cert.pem"),
        ("key.pem", "client-key.pem"),
    ] {
        std::fs::copy(dir.path().join("cli").join(from), gnutls.join(to)).unwrap();
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _exp = Agent::start(
        &[
            "export",
            "--store",
            store.to_str().unwrap(),
            "--name",
            "a",
            "--nbd",
            &listen,
            "--tls",
            &d("exp"),
        ],
        &dir.path().join("exp.log"),
    );
    let out = dir.path().join("out.raw");
    let tls_uri = format!("nbds://{listen}/a?tls-certificates={}", gnutls.display());
    run_ok("nbdcopy", &[&tls_uri, out.to_str().unwrap()]);
    assert!(cmp(&img, &out), "data over STARTTLS differs");
    let plain = std::process::Command::new("nbdinfo")
        .arg(format!("nbd://{listen}/a"))
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a client without TLS was served");
}

#[test]
fn a_replica_seeded_from_an_older_image_serves_the_image_as_it_is_now() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = seeded(dir.path(), "8MiB", 81);
    // The image changes at the source (a VM ran there, unsynced) before the export starts.
    let now = dir.path().join("now.img");
    derived_image(&img, &now, 0.3, 82);
    let src = source(dir.path(), &[(&now, "a")], &[]);
    let (exp, sock) = export(dir.path(), &store, "a", &["--from", &src.addr]);
    let uri = nbd_uri(&sock, "a");
    let out = dir.path().join("out.raw");
    read_export(&uri, &out);
    assert!(
        cmp(&out, &now),
        "the export served chunks of the older image"
    );
    assert!(exp.log().contains("no longer serves"), "{}", exp.log());
}

#[test]
fn fast_zero_that_would_need_a_fetch_is_refused_with_enotsup() {
    let (dir, img, src) = served_sample("8MiB", 83);
    let store = dir.path().join("store");
    // A slow copier: the chunks zeroed below are still absent.
    let slow = ["--from", src.addr.as_str(), "--bandwidth", "64KiB/s"];
    let (_exp, sock) = export(dir.path(), &store, "a", &slow);
    let uri = nbd_uri(&sock, "a");
    let (part, whole) = (6 * 1024 * 1024 + 4096, 7 * 1024 * 1024);
    let out = libnbd(
        &uri,
        &format!(
            "
fast = nbd.CMD_FLAG_FAST_ZERO
print('partial-fast', err(lambda: h.zero(4096, {part}, flags=fast)))
print('whole-fast', err(lambda: h.zero(65536, {whole}, flags=fast)))
print('partial-slow', err(lambda: h.zero(4096, {part})))
print('read', h.pread(65536, {part} - 4096) == open({img:?}, 'rb').read()[{part} - 4096:{part}] + bytes(4096) + open({img:?}, 'rb').read()[{part} + 4096:{part} + 65536 - 4096])
",
            img = img.display().to_string()
        ),
    );
    // Part of an absent chunk needs the rest of it from the source: not fast.
    assert!(out.contains("partial-fast ENOTSUP"), "{out}");
    // A whole chunk is zeroed without its old bytes.
    assert!(out.contains("whole-fast OK"), "{out}");
    // Without the flag the same request fetches, then zeroes.
    assert!(out.contains("partial-slow OK"), "{out}");
    assert!(out.contains("read True"), "{out}");
}

#[test]
fn guest_writes_stop_with_enospc_before_the_space_reserve_and_resume_when_freed() {
    let dir = tempfile::tempdir().unwrap();
    let test = "guest_writes_stop_with_enospc_before_the_space_reserve_and_resume_when_freed";
    let Some(volume) = small_volume(dir.path(), "72M", test) else {
        return;
    };
    let mnt = volume.0.clone();
    // An all-zero disk: the seeded replica allocates nothing, guest writes allocate it all.
    let img = dir.path().join("a.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let src = source(dir.path(), &[(&img, "a")], &[]);
    let store = mnt.join("store");
    seed_into(&src.addr, "a", &store);
    // Leave 44 MiB free: 12 MiB above the 32 MiB reserve.
    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let filler = mnt.join("filler");
    std::fs::File::create(&filler).unwrap();
    run_ok(
        "fallocate",
        &[
            "-l",
            &(free - (44 << 20)).to_string(),
            filler.to_str().unwrap(),
        ],
    );
    let (_exp, sock) = export(dir.path(), &store, "a", &[]);
    let uri = nbd_uri(&sock, "a");
    let writes: Vec<String> = (0..24)
        .map(|i| format!("write -P 0x11 {} 1M", i << 20))
        .collect();
    let refs: Vec<&str> = writes.iter().map(String::as_str).collect();
    let (_, text) = qemu_io(&uri, &refs);
    let failed = text.matches("No space left on device").count();
    assert!(
        failed > 0,
        "24 MiB of writes fit into 12 MiB above the reserve: {text}"
    );
    assert!(failed < 24, "no write fit above the reserve: {text}");
    let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
    let left = st.blocks_available() as u64 * st.fragment_size() as u64;
    // Guest data stops above the reserve; RocksDB's own writes may use some of it (that is
    // what it is for). Without the reserve the writes would leave 20 MiB.
    assert!(
        left >= 28 << 20,
        "guest writes ate into the reserve: {left} bytes left"
    );
    let s = status(&store, "a");
    assert!(s["failed"].is_null(), "ENOSPC stopped the store: {s}");

    std::fs::remove_file(&filler).unwrap();
    let (ok, text) = qemu_io(&uri, &refs);
    assert!(
        ok && !text.contains("No space"),
        "writes still fail after space was freed: {text}"
    );
    let (ok, text) = qemu_io(&uri, &["read -P 0x11 0 24M"]);
    assert!(
        ok && !text.contains("Pattern verification failed"),
        "{text}"
    );
}

#[test]
fn the_background_copy_keeps_to_its_bandwidth_cap_on_incompressible_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    let mut data = vec![0u8; 4 << 20];
    blake3::Hasher::new_keyed(&[7; 32])
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(&img, &data).unwrap();
    let src = source(dir.path(), &[(&img, "a")], &[]);
    let store = dir.path().join("store");
    let started = std::time::Instant::now();
    let (_exp, _sock) = export(
        dir.path(),
        &store,
        "a",
        &["--from", &src.addr, "--bandwidth", "1MiB/s"],
    );
    wait_complete(&store, "a", 60);
    let took = started.elapsed();
    // 4 MiB at 1 MiB/s, less a first burst of at most a second's worth.
    assert!(
        took >= Duration::from_millis(2900),
        "4 MiB of random data copied in {took:?} under a 1 MiB/s cap"
    );
}
