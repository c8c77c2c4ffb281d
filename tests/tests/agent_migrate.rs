//! Moving a running QEMU VM between two agents (mutual TLS, the link emulator between them),
//! its disk on storage both reach (`disk: shared`): the guest's state carries on at the
//! destination (its tick sequence continues without a gap, its disk records all verify), and a
//! cancelled migration leaves it running at the source.

mod common;

use common::agent::{console, sample_guest, wait_for, QemuReaper, TestAgent};
use common::{helio_ok, wan_proxy};
use std::path::Path;
use std::time::Duration;

/// One migration test at a time: each runs two or three TCG guests, and on two cores their
/// timing (ticks, convergence) is what the tests look at.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Ticks on a console: the first and last sequence numbers.
fn ticks(serial: &Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(serial).ok()?;
    let mut seq = text.lines().filter_map(|l| {
        l.strip_prefix("tick ")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    let first = seq.next()?;
    Some((first, seq.next_back().unwrap_or(first)))
}

/// The first tick on `serial` after tick `n`.
fn ticks_after(serial: &Path, n: u64) -> Option<u64> {
    let text = std::fs::read_to_string(serial).ok()?;
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("tick ")?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .find(|&t| t > n)
}

/// Fields drop in order: the reapers read the VMs' pidfiles before the directory goes.
struct Sites {
    _reapers: (QemuReaper, QemuReaper),
    a: TestAgent,
    b: TestAgent,
    wan: common::Agent,
    img: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Agents a and b with certificates from one CA, b behind an emulated 20 ms, 200 Mbit/s link,
/// both holding disk d1 (one image file: shared storage), and VM g1 running at a.
fn sites(kernel: &Path, initrd: &Path) -> Sites {
    sites_dirtying(kernel, initrd, 2000)
}

/// [`sites`] with the guest dirtying `mem_rate` pages a second over 32 MiB.
fn sites_dirtying(kernel: &Path, initrd: &Path, mem_rate: u32) -> Sites {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    helio_ok(&["pki", "init", pki.join("ca").to_str().unwrap()]);
    for n in ["a", "b"] {
        let (ca, out) = (pki.join("ca"), pki.join(n));
        helio_ok(&[
            "pki",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--name",
            n,
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    let reapers = (QemuReaper(sa.clone()), QemuReaper(sb.clone()));
    let a = TestAgent::start("a", &sa, &["--tls", pki.join("a").to_str().unwrap()]);
    let b = TestAgent::start("b", &sb, &["--tls", pki.join("b").to_str().unwrap()]);
    let wan = wan_proxy(
        &b.proc.addr,
        &["--rtt", "20ms", "--bandwidth", "200Mbit"],
        &dir.path().join("wan.log"),
    );
    let img = dir.path().join("d1.raw");
    let disk = serde_json::json!({"name": "d1", "path": img, "size": 64 << 20}).to_string();
    a.api_ok("POST", "/v1/disks", Some(&disk), 201);
    b.api_ok("POST", "/v1/disks", Some(&disk), 201);
    let spec = serde_json::json!({
        "name": "g1", "memory_mib": 192,
        "boot": {"kernel": kernel, "initrd": initrd,
                 "cmdline": format!("console=ttyS0 quiet helio.disk=/dev/vda helio.disk_rate=50 helio.mem_mib=32 helio.mem_rate={mem_rate}")},
        "disks": ["d1"],
    })
    .to_string();
    a.api_ok("POST", "/v1/vms", Some(&spec), 201);
    let serial = sa.join("vms/g1/serial.log");
    wait_for(90, "the guest's first disk records", || {
        console(&serial).1 > 0
    });
    Sites {
        _reapers: reapers,
        a,
        b,
        wan,
        img,
        _dir: dir,
    }
}

fn migration(agent: &TestAgent, id: &str) -> serde_json::Value {
    agent.api_ok("GET", &format!("/v1/migrations/{id}"), None, 200)
}

/// Watches the consoles of both sites from the host, every millisecond, and keeps the longest
/// time between two consecutive ticks: the pause the guest's users would see.
struct TickWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Duration>>,
}

impl TickWatch {
    fn start(files: [std::path::PathBuf; 2]) -> TickWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut offsets = [0usize; 2];
            let (mut last, mut worst) = (None::<std::time::Instant>, Duration::ZERO);
            while !flag.load(Ordering::Relaxed) {
                for (i, f) in files.iter().enumerate() {
                    let Ok(text) = std::fs::read(f) else { continue };
                    let Some(end) = text.iter().rposition(|b| *b == b'\n') else {
                        continue;
                    };
                    if end < offsets[i] {
                        continue;
                    }
                    let fresh = String::from_utf8_lossy(&text[offsets[i]..=end]).into_owned();
                    offsets[i] = end + 1;
                    if fresh.lines().any(|l| l.starts_with("tick ")) {
                        let now = std::time::Instant::now();
                        worst = worst.max(last.map_or(Duration::ZERO, |p| now - p));
                        last = Some(now);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            worst
        });
        TickWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// The longest time without a new tick on either console.
    fn finish(mut self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn a_running_vm_moves_to_the_other_agent_and_carries_on() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("a_running_vm_moves") else {
        return;
    };
    let s = sites(&kernel, &initrd);
    let (sa, sb) = (
        s.a.state.join("vms/g1/serial.log"),
        s.b.state.join("vms/g1/serial.log"),
    );
    let watch = TickWatch::start([sa.clone(), sb.clone()]);
    std::thread::sleep(Duration::from_millis(500));
    let spec =
        serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "max_downtime_ms": 300, "streams": 4})
            .to_string();
    let m = s.a.api_ok("POST", "/v1/migrations", Some(&spec), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(180, "the migration to end", || {
        let m = migration(&s.a, &id);
        assert_ne!(
            m["phase"],
            "failed",
            "{m}\nA:\n{}\nB:\n{}",
            s.a.proc.log(),
            s.b.proc.log()
        );
        m["phase"] == "completed"
    });
    let m = migration(&s.a, &id);
    eprintln!("migration: {m}");
    assert!(m["figures"]["downtime_ms"].as_u64().is_some(), "{m}");
    // Four multifd channels, each through its own tunnel, carried the pages.
    assert!(
        m["figures"]["ram"]["multifd-bytes"].as_u64().unwrap() > 32 << 20,
        "{m}"
    );
    assert!(
        m["figures"]["tunnel_bytes_sent"].as_u64().unwrap() > 32 << 20,
        "{m}"
    );
    assert_eq!(s.a.api_ok("GET", "/v1/vms/g1", None, 200)["state"], "moved");
    wait_for(30, "the VM running at b", || {
        let vm = s.b.api_ok("GET", "/v1/vms/g1", None, 200);
        vm["state"] == "running" && vm["qemu_status"] == "running"
    });
    wait_for(30, "ticks at b", || {
        ticks(&sb).is_some_and(|(f, l)| l > f + 100)
    });
    let gap = watch.finish();
    let (_, last_a) = ticks(&sa).unwrap();
    let (first_b, _) = ticks(&sb).unwrap();
    assert_eq!(
        first_b,
        last_a + 1,
        "the guest's tick sequence has a gap: a ended at {last_a}, b began at {first_b}"
    );
    eprintln!(
        "downtime: QEMU {} ms; the guest's console stopped for {} ms at most",
        m["figures"]["downtime_ms"],
        gap.as_millis()
    );
    assert!(gap < Duration::from_secs(5), "the guest paused {gap:?}");
    let acked_before = console(&sb).1;
    wait_for(60, "disk records acknowledged at b", || {
        console(&sb).1 > acked_before + 100
    });
    helio_ok(&["vm", "stop", "g1", "--agent", &s.b.url]);
    let (_, acked) = console(&sb);
    let records = agent::guest::check(&s.img).unwrap();
    assert_eq!(
        (records.corrupt, records.misplaced, records.boots),
        (0, 0, 1),
        "{records:?}"
    );
    assert!(
        records.max_seq >= acked,
        "acknowledged record {acked} missing: {records:?}"
    );
    eprintln!("records after the move: {records:?}, last acknowledged {acked}");
}

#[test]
fn a_cancelled_migration_leaves_the_vm_running_at_the_source() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("a_cancelled_migration") else {
        return;
    };
    let s = sites(&kernel, &initrd);
    // Dry runs: the guest dirties about 7 MiB/s; 16 Mbit/s cannot keep up, 1 Gbit/s can.
    let dry = |bw: &str| {
        let spec = serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "bandwidth": bw, "dry_run": true});
        let m =
            s.a.api_ok("POST", "/v1/migrations", Some(&spec.to_string()), 201);
        assert_eq!(m["phase"], "completed", "{m}");
        eprintln!("dry run at {bw}: {}", m["figures"]["prediction"]);
        m["figures"]["prediction"]["verdict"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(dry("16Mbit"), "needs postcopy");
    assert_eq!(dry("1Gbit"), "converges");
    // A deadline: 5 s cannot take the memory at 16 Mbit/s, an hour at 1 Gbit/s can.
    let at = |secs: u64| {
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(secs))
            .to_string()
    };
    for (bw, secs, feasible) in [("16Mbit", 5, false), ("1Gbit", 3600, true)] {
        let spec = serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "bandwidth": bw, "dry_run": true, "deadline": at(secs)});
        let m =
            s.a.api_ok("POST", "/v1/migrations", Some(&spec.to_string()), 201);
        assert_eq!(m["figures"]["deadline"]["feasible"], feasible, "{m}");
    }
    assert_eq!(
        s.b.api("GET", "/v1/vms/g1", None).0,
        404,
        "a dry run started something at b"
    );
    // Not before 3 s from now: it waits in `scheduled`. Then a slow stream keeps it in precopy
    // long enough to cancel it there.
    let spec =
        serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "bandwidth": "16Mbit", "not_before": at(3)})
            .to_string();
    let m = s.a.api_ok("POST", "/v1/migrations", Some(&spec), 201);
    let id = m["id"].as_str().unwrap().to_string();
    let posted = std::time::Instant::now();
    wait_for(10, "scheduled", || {
        migration(&s.a, &id)["phase"] == "scheduled"
    });
    wait_for(60, "precopy", || migration(&s.a, &id)["phase"] == "precopy");
    assert!(
        posted.elapsed() >= Duration::from_secs(1),
        "not_before was not waited for"
    );
    std::thread::sleep(Duration::from_secs(2));
    s.a.api_ok("DELETE", &format!("/v1/migrations/{id}"), None, 200);
    wait_for(30, "the cancel", || {
        migration(&s.a, &id)["phase"] == "cancelled"
    });
    let vm = s.a.api_ok("GET", "/v1/vms/g1", None, 200);
    assert_eq!(
        (vm["state"].as_str(), vm["qemu_status"].as_str()),
        (Some("running"), Some("running")),
        "{vm}"
    );
    let serial = s.a.state.join("vms/g1/serial.log");
    let (_, before) = ticks(&serial).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        ticks(&serial).unwrap().1 > before + 50,
        "the guest at a stopped ticking"
    );
    // Nothing is left at b but the disk.
    wait_for(30, "the incoming VM gone from b", || {
        s.b.api("GET", "/v1/vms/g1", None).0 == 404
    });
    assert_eq!(
        s.b.api_ok("GET", "/v1/disks", None, 200)[0]["spec"]["name"],
        "d1"
    );
    // Cancelling again changes nothing.
    let again =
        s.a.api_ok("DELETE", &format!("/v1/migrations/{id}"), None, 200);
    assert_eq!(again["phase"], "cancelled");
    // A migration of a VM that is not running, or to nowhere, is refused.
    let (st, v) = s.a.api(
        "POST",
        "/v1/migrations",
        Some(r#"{"vm":"ghost","to":"127.0.0.1:1","disk":"shared"}"#),
    );
    assert_eq!(st, 404, "{v}");
    let (st, v) = s.a.api(
        "POST",
        "/v1/migrations",
        Some(r#"{"vm":"g1","to":"127.0.0.1:1","disk":"teleport"}"#),
    );
    assert_eq!(st, 422, "{v}");
    // An unreachable destination: the migration fails saying which, and the VM stays.
    let body = r#"{"vm":"g1","to":"127.0.0.1:1","disk":"shared"}"#;
    let m = s.a.api_ok("POST", "/v1/migrations", Some(body), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(60, "the failure", || {
        migration(&s.a, &id)["phase"] == "failed"
    });
    let m = migration(&s.a, &id);
    assert!(m["error"].as_str().unwrap().contains("127.0.0.1:1"), "{m}");
    assert_eq!(
        s.a.api_ok("GET", "/v1/vms/g1", None, 200)["qemu_status"],
        "running"
    );
}

#[test]
fn the_source_agent_killed_in_precopy_leaves_the_vm_running_there() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("the_source_agent_killed_in_precopy") else {
        return;
    };
    let s = sites(&kernel, &initrd);
    let spec =
        serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "bandwidth": "16Mbit"})
            .to_string();
    let m = s.a.api_ok("POST", "/v1/migrations", Some(&spec), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(60, "precopy", || migration(&s.a, &id)["phase"] == "precopy");
    std::thread::sleep(Duration::from_secs(2));
    let state = s.a.state.clone();
    let Sites {
        a,
        b,
        wan,
        _dir,
        img: _,
        _reapers,
    } = s;
    a.proc.kill9();
    let serial = state.join("vms/g1/serial.log");
    let (_, before) = ticks(&serial).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        ticks(&serial).unwrap().1 > before + 50,
        "the guest stopped when its agent died mid-migration"
    );
    let dir = state.parent().unwrap();
    let cert = dir.join("pki/a");
    let a = TestAgent::start("a", &state, &["--tls", cert.to_str().unwrap()]);
    let m = migration(&a, &id);
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(m["error"].as_str().unwrap().contains("restarted"), "{m}");
    wait_for(10, "the VM re-adopted and running at a", || {
        let vm = a.api_ok("GET", "/v1/vms/g1", None, 200);
        vm["state"] == "running" && vm["qemu_status"] == "running"
    });
    wait_for(30, "the incoming VM gone from b", || {
        b.api("GET", "/v1/vms/g1", None).0 == 404
    });
    drop(wan);
}

#[test]
fn a_manual_switchover_waits_for_its_go_and_warm_mode_brings_the_vm_back() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("a_manual_switchover") else {
        return;
    };
    let s = sites(&kernel, &initrd);
    let sa = s.a.state.join("vms/g1/serial.log");
    let manual =
        serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "switchover": "manual"});
    let m =
        s.a.api_ok("POST", "/v1/migrations", Some(&manual.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(60, "ready", || {
        let m = migration(&s.a, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "ready"
    });
    // Held: the VM keeps running here, nothing of it at b, for as long as the operator waits.
    let (_, before) = ticks(&sa).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let m = migration(&s.a, &id);
    assert_eq!(m["phase"], "ready", "{m}");
    assert_eq!(
        s.a.api_ok("GET", "/v1/vms/g1", None, 200)["qemu_status"],
        "running"
    );
    assert!(
        ticks(&sa).unwrap().1 > before + 100,
        "the held VM stopped ticking"
    );
    assert_eq!(s.b.api("GET", "/v1/vms/g1", None).0, 404);
    // The go, and a second one: harmless (200 while the hold ends, 409 after).
    s.a.api_ok(
        "POST",
        &format!("/v1/migrations/{id}/switchover"),
        None,
        200,
    );
    let (st, v) =
        s.a.api("POST", &format!("/v1/migrations/{id}/switchover"), None);
    assert!(st == 200 || st == 409, "{st} {v}");
    let id = id.clone();
    wait_for(120, "completed", || {
        let m = migration(&s.a, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "completed"
    });
    wait_for(30, "the VM running at b", || {
        s.b.api_ok("GET", "/v1/vms/g1", None, 200)["qemu_status"] == "running"
    });
    let live = migration(&s.a, &id)["figures"]["downtime_ms"]
        .as_u64()
        .unwrap();

    // The way back, warm: the VM pauses at once and its memory moves paused.
    let back =
        serde_json::json!({"vm": "g1", "to": s.a.proc.addr, "disk": "shared", "mode": "warm"});
    let m =
        s.b.api_ok("POST", "/v1/migrations", Some(&back.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(120, "the warm move back", || {
        let m = migration(&s.b, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "completed"
    });
    let figures = migration(&s.b, &id)["figures"].clone();
    let warm = figures["downtime_ms"].as_u64().unwrap();
    let ram = &figures["ram"];
    let pages = |k: &str| ram[k].as_u64().unwrap();
    wait_for(30, "the VM running at a again", || {
        let vm = s.a.api_ok("GET", "/v1/vms/g1", None, 200);
        vm["state"] == "running" && vm["qemu_status"] == "running"
    });
    eprintln!("downtime: live {live} ms, warm {warm} ms; warm figures {figures}");
    // Paused for the whole transfer: QEMU sent no byte while the guest ran, every page once,
    // and the pause covers QEMU's whole migration.
    assert_eq!(
        pages("precopy-bytes"),
        0,
        "warm moved memory while the guest ran: {figures}"
    );
    assert_eq!(
        pages("normal") + pages("duplicate"),
        pages("total") / pages("page-size"),
        "warm sent some page twice: {figures}"
    );
    assert!(
        warm >= figures["total_time_ms"].as_u64().unwrap(),
        "{figures}"
    );
}

#[test]
fn a_migration_that_cannot_converge_aborts_when_asked() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("a_migration_that_cannot_converge") else {
        return;
    };
    // 20000 pages a second over 32 MiB: every iteration finds the whole buffer dirty again.
    let s = sites_dirtying(&kernel, &initrd, 20000);
    let spec = serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "on_diverge": "abort", "max_downtime_ms": 50});
    let m =
        s.a.api_ok("POST", "/v1/migrations", Some(&spec.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(180, "the migration to give up", || {
        migration(&s.a, &id)["phase"] == "failed"
    });
    let m = migration(&s.a, &id);
    assert!(
        m["error"].as_str().unwrap().contains("does not converge"),
        "{m}"
    );
    wait_for(10, "the VM running at a", || {
        s.a.api_ok("GET", "/v1/vms/g1", None, 200)["qemu_status"] == "running"
    });
    wait_for(30, "the incoming VM gone from b", || {
        s.b.api("GET", "/v1/vms/g1", None).0 == 404
    });
}

#[test]
fn a_migration_that_cannot_converge_finishes_in_postcopy() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("a_migration_finishes_in_postcopy") else {
        return;
    };
    let s = sites_dirtying(&kernel, &initrd, 20000);
    let (sa, sb) = (
        s.a.state.join("vms/g1/serial.log"),
        s.b.state.join("vms/g1/serial.log"),
    );
    let spec = serde_json::json!({"vm": "g1", "to": s.wan.addr, "disk": "shared", "on_diverge": "postcopy", "max_downtime_ms": 50});
    let m =
        s.a.api_ok("POST", "/v1/migrations", Some(&spec.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    let mut phases = vec![];
    wait_for(240, "the migration to end in post-copy", || {
        let m = migration(&s.a, &id);
        assert_ne!(
            m["phase"],
            "failed",
            "{m}\nA:\n{}\nB:\n{}",
            s.a.proc.log(),
            s.b.proc.log()
        );
        let p = m["phase"].as_str().unwrap().to_string();
        if phases.last() != Some(&p) {
            phases.push(p);
        }
        m["phase"] == "completed"
    });
    let m = migration(&s.a, &id);
    eprintln!("phases seen: {phases:?}\nfigures: {}", m["figures"]);
    let after = m["figures"]["postcopy_after_iterations"].as_u64();
    assert!(
        after.is_some_and(|n| n >= 5),
        "post-copy should start once divergence shows: {m}"
    );
    assert!(
        m["figures"]["ram"]["postcopy-bytes"].as_u64().unwrap() > 0,
        "{m}"
    );
    wait_for(30, "the VM running at b", || {
        let vm = s.b.api_ok("GET", "/v1/vms/g1", None, 200);
        vm["state"] == "running" && vm["qemu_status"] == "running"
    });
    wait_for(30, "ticks at b", || {
        ticks(&sb).is_some_and(|(f, l)| l > f + 100)
    });
    let (_, last_a) = ticks(&sa).unwrap();
    let (first_b, _) = ticks(&sb).unwrap();
    assert_eq!(
        first_b,
        last_a + 1,
        "tick gap: a ended at {last_a}, b began at {first_b}"
    );
    assert_eq!(s.a.api_ok("GET", "/v1/vms/g1", None, 200)["state"], "moved");

    // Back in post-copy mode: it switches after the first pass, without waiting to diverge.
    let back =
        serde_json::json!({"vm": "g1", "to": s.a.proc.addr, "disk": "shared", "mode": "postcopy"});
    let m =
        s.b.api_ok("POST", "/v1/migrations", Some(&back.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(240, "the way back in post-copy", || {
        let m = migration(&s.b, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "completed"
    });
    let m = migration(&s.b, &id);
    eprintln!("back in post-copy mode: {}", m["figures"]);
    let after = m["figures"]["postcopy_after_iterations"].as_u64();
    assert!(
        after.is_some_and(|n| n <= 3),
        "mode postcopy waits for one pass only: {m}"
    );
    wait_for(30, "the VM running at a again", || {
        let vm = s.a.api_ok("GET", "/v1/vms/g1", None, 200);
        vm["state"] == "running" && vm["qemu_status"] == "running"
    });
}

/// Two agents with TLS, each behind an emulated WAN link (b seeds and fetches from a through
/// `to_a`; a streams to b through `to_b`), and the sample guest running at a on a replicated
/// 64 MiB disk, writing `disk_rate` records a second. Fields drop in order.
struct WanSites {
    _reapers: (QemuReaper, QemuReaper),
    to_a: common::Agent,
    to_b: common::Agent,
    a: TestAgent,
    b: TestAgent,
    img: std::path::PathBuf,
    dir: tempfile::TempDir,
}

/// The link both proxies emulate.
const LINK: [&str; 4] = ["--rtt", "20ms", "--bandwidth", "200Mbit"];

impl WanSites {
    fn start(kernel: &Path, initrd: &Path, disk_rate: u32) -> WanSites {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        helio_ok(&["pki", "init", pki.join("ca").to_str().unwrap()]);
        for n in ["a", "b"] {
            let (ca, out) = (pki.join("ca"), pki.join(n));
            let (ca, out) = (ca.to_str().unwrap(), out.to_str().unwrap());
            helio_ok(&["pki", "issue", "--ca", ca, "--name", n, "--out", out]);
        }
        let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
        let _reapers = (QemuReaper(sa.clone()), QemuReaper(sb.clone()));
        let a = TestAgent::start("a", &sa, &["--tls", pki.join("a").to_str().unwrap()]);
        let b = TestAgent::start("b", &sb, &["--tls", pki.join("b").to_str().unwrap()]);
        let to_b = wan_proxy(&b.proc.addr, &LINK, &dir.path().join("wan-b.log"));
        let to_a = wan_proxy(&a.proc.addr, &LINK, &dir.path().join("wan-a.log"));
        let img = dir.path().join("d1.raw");
        let disk = serde_json::json!({"name": "d1", "path": img, "size": 64 << 20}).to_string();
        a.api_ok("POST", "/v1/disks", Some(&disk), 201);
        let cmdline = format!("console=ttyS0 quiet helio.disk=/dev/vda helio.disk_rate={disk_rate} helio.mem_mib=32 helio.mem_rate=2000");
        let spec = serde_json::json!({
            "name": "g1", "memory_mib": 192,
            "boot": {"kernel": kernel, "initrd": initrd, "cmdline": cmdline},
            "disks": ["d1"],
        });
        a.api_ok("POST", "/v1/vms", Some(&spec.to_string()), 201);
        wait_for(90, "the guest's first disk records", || {
            console(&sa.join("vms/g1/serial.log")).1 > 0
        });
        WanSites {
            _reapers,
            to_a,
            to_b,
            a,
            b,
            img,
            dir,
        }
    }

    /// A link proxy on `listen` (the address of a killed one: the link comes back) to `to`.
    fn relink(&self, listen: &str, to: &str, log: &str) -> common::Agent {
        let mut args = vec!["wan-proxy", "--listen", listen, "--to", to];
        args.extend_from_slice(&LINK);
        common::Agent::start(&args, &self.dir.path().join(log))
    }
}

#[test]
fn a_replicated_migration_cancelled_in_each_phase_leaves_the_vm_at_a_and_the_replica_at_b() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("cancelled_in_each_phase") else {
        return;
    };
    let w = WanSites::start(&kernel, &initrd, 200);
    let serial_a = w.a.state.join("vms/g1/serial.log");
    let later =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(600))
            .to_string();
    // (phase to cancel in, what makes it last): a start window, a disk capped at 4 Mbit/s, a
    // manual switchover's hold, a memory stream capped at 16 Mbit/s.
    let cases = [
        ("scheduled", serde_json::json!({"not_before": later})),
        ("seeding", serde_json::json!({"bandwidth": "4Mbit"})),
        ("ready", serde_json::json!({"switchover": "manual"})),
        ("precopy", serde_json::json!({"bandwidth": "16Mbit"})),
    ];
    for (phase, extra) in cases {
        let mut spec =
            serde_json::json!({"vm": "g1", "to": w.to_b.addr, "source_addr": w.to_a.addr});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let m =
            w.a.api_ok("POST", "/v1/migrations", Some(&spec.to_string()), 201);
        let id = m["id"].as_str().unwrap().to_string();
        wait_for(120, phase, || {
            let m = migration(&w.a, &id);
            assert!(
                !matches!(m["phase"].as_str(), Some("failed" | "completed")),
                "{m}"
            );
            m["phase"] == phase
        });
        w.a.api_ok("DELETE", &format!("/v1/migrations/{id}"), None, 200);
        wait_for(30, "cancelled", || {
            migration(&w.a, &id)["phase"] == "cancelled"
        });
        let m = migration(&w.a, &id);
        eprintln!("cancelled in {phase}: {}", m["phase_reason"]);
        // The VM runs at a, untouched; b holds no VM and runs no job of this migration.
        let vm = w.a.api_ok("GET", "/v1/vms/g1", None, 200);
        assert_eq!(
            (vm["state"].as_str(), vm["qemu_status"].as_str()),
            (Some("running"), Some("running")),
            "{vm}"
        );
        let (before, _) = console(&serial_a);
        wait_for(10, "ticks at a", || console(&serial_a).0 > before + 50);
        wait_for(30, "no VM at b", || {
            w.b.api("GET", "/v1/vms/g1", None).0 == 404
        });
        wait_for(30, "no job running at b", || {
            let jobs = w.b.api_ok("GET", "/v1/jobs", None, 200);
            jobs.as_array()
                .unwrap()
                .iter()
                .all(|j| matches!(j["phase"].as_str(), Some("done" | "cancelled" | "failed")))
        });
    }
    // What b seeded stays: the next attempt starts from it.
    let replicas = w.b.api_ok("GET", "/v1/replicas", None, 200);
    assert!(
        replicas
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "d1"),
        "{replicas}"
    );
    // And the next attempt goes through.
    let spec = serde_json::json!({"vm": "g1", "to": w.to_b.addr, "source_addr": w.to_a.addr});
    let m =
        w.a.api_ok("POST", "/v1/migrations", Some(&spec.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    // (The cancelled precopy's 16 Mbit/s cap stays in A's QEMU unless the migration sets its
    // own: without it this move crawls and never converges.)
    wait_for(180, "the move after the cancels", || {
        let m = migration(&w.a, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "completed"
    });
    let m = migration(&w.a, &id);
    eprintln!(
        "the move after the cancels: downtime {} ms, seed {}",
        m["figures"]["downtime_ms"], m["figures"]["seed"]["d1"]
    );
    let vm = w.b.api_ok("GET", "/v1/vms/g1", None, 200);
    assert_eq!(vm["state"], "running", "{vm}");
}

#[test]
fn the_link_cut_after_the_cut_waits_and_the_vm_runs_on() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("the_link_cut_after_the_cut") else {
        return;
    };
    let mut w = WanSites::start(&kernel, &initrd, 200);
    let (serial_a, serial_b) = (
        w.a.state.join("vms/g1/serial.log"),
        w.b.state.join("vms/g1/serial.log"),
    );
    let mig = serde_json::json!({"vm": "g1", "to": w.to_b.addr, "source_addr": w.to_a.addr});
    let m =
        w.a.api_ok("POST", "/v1/migrations", Some(&mig.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    // b's way to a goes down once the export runs: every chunk the switchover makes absent
    // waits for it. (A proxy to the discard port stands in for the dead link.)
    wait_for(120, "precopy", || {
        let m = migration(&w.a, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "precopy"
    });
    let to_a_addr = w.to_a.addr.clone();
    let dead = w.relink("127.0.0.1:0", "127.0.0.1:9", "dead-a.log");
    drop(std::mem::replace(&mut w.to_a, dead));
    wait_for(120, "running_at_destination", || {
        let m = migration(&w.a, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "running_at_destination"
    });
    // And a's way to b: the control connection breaks too.
    let to_b_addr = w.to_b.addr.clone();
    let dead = w.relink("127.0.0.1:0", "127.0.0.1:9", "dead-b.log");
    drop(std::mem::replace(&mut w.to_b, dead));
    std::thread::sleep(Duration::from_secs(5));
    let m = migration(&w.a, &id);
    assert_eq!(m["phase"], "running_at_destination", "{m}");
    eprintln!("during the outage: {}", m["phase_reason"]);
    let vm = w.b.api_ok("GET", "/v1/vms/g1", None, 200);
    assert_eq!(vm["qemu_status"], "running", "{vm}");
    let (ticked, _) = console(&serial_b);
    wait_for(10, "ticks at b during the outage", || {
        console(&serial_b).0 > ticked + 50
    });

    // The link returns: fetching resumes, the migration completes.
    w.to_a = w.relink(&to_a_addr, &w.a.proc.addr, "wan-a2.log");
    w.to_b = w.relink(&to_b_addr, &w.b.proc.addr, "wan-b2.log");
    wait_for(120, "the migration to complete after the outage", || {
        let m = migration(&w.a, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "completed"
    });
    let m = migration(&w.a, &id);
    eprintln!("after the outage: {}", m["figures"]);
    assert!(
        m["figures"]["link_down_ms"].as_u64().unwrap() >= 3000,
        "{m}"
    );
    assert!(
        m["figures"]["switchover_chunks"].as_u64().unwrap() > 0,
        "{m}"
    );
    let (_, last_a) = ticks(&serial_a).unwrap();
    assert_eq!(ticks(&serial_b).map(|t| t.0), Some(last_a + 1));
    let acked_before = console(&serial_b).1;
    wait_for(60, "records acknowledged at b", || {
        console(&serial_b).1 > acked_before + 100
    });
    helio_ok(&["vm", "stop", "g1", "--agent", &w.b.url]);
    let (_, acked) = console(&serial_b);
    let copy = w.dir.path().join("b-disk.raw");
    let uri = common::nbd_uri(&w.b.state.join("exports/d1.sock"), "d1");
    common::run_ok(
        "qemu-img",
        &["convert", "-O", "raw", &uri, copy.to_str().unwrap()],
    );
    let records = agent::guest::check(&copy).unwrap();
    assert_eq!((records.corrupt, records.misplaced), (0, 0), "{records:?}");
    assert!(
        records.max_seq >= acked,
        "acknowledged record {acked} missing: {records:?}"
    );
    eprintln!("records at b after the outage: {records:?}, last acknowledged {acked}");
}

#[test]
fn a_vm_moves_with_its_disk_replicated_and_back_and_every_record_survives() {
    let _serial = serial();
    let Some((kernel, initrd)) = sample_guest("a_vm_moves_with_its_disk") else {
        return;
    };
    let w = WanSites::start(&kernel, &initrd, 50);
    let (a, b, to_a, to_b, img) = (&w.a, &w.b, &w.to_a, &w.to_b, &w.img);
    let (sa, sb) = (&a.state, &b.state);
    let serial_a = sa.join("vms/g1/serial.log");

    // Due within 10 minutes: the disk jobs are paced to the window, not to the link.
    let deadline = std::time::SystemTime::now() + Duration::from_secs(600);
    let deadline = humantime::format_rfc3339_seconds(deadline).to_string();
    let mig = serde_json::json!({"vm": "g1", "to": to_b.addr, "source_addr": to_a.addr, "deadline": deadline});
    let m = a.api_ok("POST", "/v1/migrations", Some(&mig.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    let mut phases = vec![];
    wait_for(300, "the migration with its disk", || {
        let m = migration(a, &id);
        assert_ne!(
            m["phase"],
            "failed",
            "{m}\nA:\n{}\nB:\n{}",
            a.proc.log(),
            b.proc.log()
        );
        let p = m["phase"].as_str().unwrap().to_string();
        if phases.last() != Some(&p) {
            phases.push(p);
        }
        m["phase"] == "completed"
    });
    let m = migration(a, &id);
    eprintln!("phases seen: {phases:?}\nmigration: {m}");
    assert!(
        m["figures"]["seed"]["d1"]["chunks_total"]
            .as_u64()
            .is_some(),
        "{m}"
    );
    assert!(m["figures"]["switchover_chunks"].as_u64().is_some(), "{m}");
    let pace = &m["figures"]["deadline"];
    assert_eq!(pace["feasible"], true, "{m}");
    assert!(pace["disk_pace_bytes_per_s"].as_u64().is_some(), "{m}");
    assert!(
        m["figures"]["prediction"]["disk_bytes"].as_u64().unwrap() > 0,
        "{m}"
    );
    let serial_b = sb.join("vms/g1/serial.log");
    wait_for(30, "ticks at b", || {
        ticks(&serial_b).is_some_and(|(f, l)| l > f + 100)
    });
    let (_, last_a) = ticks(&serial_a).unwrap();
    let (first_b, _) = ticks(&serial_b).unwrap();
    assert_eq!(
        first_b,
        last_a + 1,
        "tick sequence gap: a ended at {last_a}, b began at {first_b}"
    );
    let acked_before = console(&serial_b).1;
    wait_for(60, "disk records acknowledged at b", || {
        console(&serial_b).1 > acked_before + 100
    });
    assert_eq!(a.api_ok("GET", "/v1/vms/g1", None, 200)["state"], "moved");
    // The copy left at a is the base for the way back, not a VM to start.
    let (st, v) = a.api("POST", "/v1/vms/g1/start", None);
    assert_eq!(st, 409, "{v}");

    // The way back: only what the VM wrote at b moves; a's image, frozen at the cut, is the base.
    let back = serde_json::json!({"vm": "g1", "to": to_a.addr, "source_addr": to_b.addr});
    let m = b.api_ok("POST", "/v1/migrations", Some(&back.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(300, "the way back", || {
        let m = migration(b, &id);
        assert_ne!(
            m["phase"],
            "failed",
            "{m}\nA:\n{}\nB:\n{}",
            a.proc.log(),
            b.proc.log()
        );
        m["phase"] == "completed"
    });
    let m = migration(b, &id);
    eprintln!("the way back: {}", m["figures"]["return"]);
    let ret = &m["figures"]["return"];
    let (wire, written) = (
        ret["disk_wire_bytes"].as_u64().unwrap(),
        ret["written_compressed_bytes"].as_u64().unwrap(),
    );
    assert!(
        written > 0,
        "the guest wrote at b, yet nothing went back: {m}"
    );
    // The disk is 64 MiB: a way back that re-sent it would cross far more than what b wrote.
    assert!(
        wire < (16 << 20),
        "the way back sent {wire} disk bytes for {written} compressed bytes written at b: {m}"
    );
    eprintln!(
        "the way back: {wire} disk bytes on the wire for {written} compressed bytes written at b ({:.2}x)",
        wire as f64 / written as f64
    );
    wait_for(30, "the VM running at a again", || {
        let vm = a.api_ok("GET", "/v1/vms/g1", None, 200);
        vm["state"] == "running" && vm["qemu_status"] == "running"
    });
    let (_, last_b) = ticks(&serial_b).unwrap();
    wait_for(30, "ticks at a again", || {
        ticks(&serial_a).is_some_and(|(_, l)| l > last_b + 100)
    });
    let first_back = ticks_after(&serial_a, last_a).unwrap();
    assert_eq!(
        first_back,
        last_b + 1,
        "tick sequence gap on the way back: b ended at {last_b}, a began again at {first_back}"
    );
    let acked_at_b = console(&serial_b).1;
    wait_for(60, "disk records acknowledged at a again", || {
        console(&serial_a).1 > acked_at_b + 100
    });

    // The next day: to b again, onto the replica b kept (its chunks settled with their hashes),
    // at the minute the operator picks.
    let mut again = mig.clone();
    again["switchover"] = "manual".into();
    let m = a.api_ok("POST", "/v1/migrations", Some(&again.to_string()), 201);
    let id = m["id"].as_str().unwrap().to_string();
    wait_for(120, "the second move ready", || {
        let m = migration(a, &id);
        assert_ne!(m["phase"], "failed", "{m}");
        m["phase"] == "ready"
    });
    a.api_ok(
        "POST",
        &format!("/v1/migrations/{id}/switchover"),
        None,
        200,
    );
    wait_for(300, "the second move to b", || {
        let m = migration(a, &id);
        assert_ne!(
            m["phase"],
            "failed",
            "{m}\nA:\n{}\nB:\n{}",
            a.proc.log(),
            b.proc.log()
        );
        m["phase"] == "completed"
    });
    let m = migration(a, &id);
    eprintln!(
        "the second move: seed {} sync {}",
        m["figures"]["seed"]["d1"], m["figures"]["sync_rounds"]
    );
    let (_, last_a) = ticks(&serial_a).unwrap();
    wait_for(30, "ticks at b again", || {
        ticks(&serial_b).is_some_and(|(_, l)| l > last_a + 100)
    });
    assert_eq!(ticks_after(&serial_b, last_b), Some(last_a + 1));
    let acked_at_a = console(&serial_a).1;
    wait_for(60, "disk records acknowledged at b again", || {
        console(&serial_b).1 > acked_at_a + 100
    });
    helio_ok(&["vm", "stop", "g1", "--agent", &b.url]);
    // a's image, frozen at the second cut: every record written at a, at b, and at a again.
    let records = agent::guest::check(img).unwrap();
    assert_eq!(
        (records.corrupt, records.misplaced, records.boots),
        (0, 0, 1),
        "{records:?}"
    );
    assert!(
        records.max_seq >= acked_at_a,
        "acknowledged record {acked_at_a} missing at a: {records:?}"
    );
    eprintln!(
        "records at a, frozen at the second cut: {records:?}, last acknowledged there {acked_at_a}"
    );
    let (_, acked) = console(&serial_b);
    // b's disk, read through its export by qemu-img: every record, from before and after the cut.
    let copy = w.dir.path().join("b-disk.raw");
    let uri = common::nbd_uri(&sb.join("exports/d1.sock"), "d1");
    common::run_ok(
        "qemu-img",
        &["convert", "-O", "raw", &uri, copy.to_str().unwrap()],
    );
    let records = agent::guest::check(&copy).unwrap();
    assert_eq!(
        (records.corrupt, records.misplaced, records.boots),
        (0, 0, 1),
        "{records:?}"
    );
    assert!(
        records.max_seq >= acked,
        "acknowledged record {acked} missing at b: {records:?}"
    );
    eprintln!("records at b after the move: {records:?}, last acknowledged {acked}");
}
