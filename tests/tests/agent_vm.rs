//! `helio agent` with real QEMU VMs: the sample guest boots on a tracked disk, keeps running
//! through a `kill -9` of the agent, is re-adopted, and every record it wrote survives; a QEMU
//! that dies is reported with its last words; bad specs are refused with problems.

mod common;

use common::agent::{console, guest_cmdline, sample_guest, wait_for, QemuReaper, TestAgent};
use common::helio_ok;
use std::time::Duration;

fn vm_spec(name: &str, kernel: &str, initrd: &str, disk: &str) -> String {
    serde_json::json!({
        "name": name, "memory_mib": 256, "vcpus": 1,
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": guest_cmdline(50)},
        "disks": [disk],
    })
    .to_string()
}

#[test]
fn vm_survives_agent_kill9_is_readopted_and_keeps_every_record() {
    let Some((kernel, initrd)) = sample_guest("vm_survives_agent_kill9") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a");
    let _reaper = QemuReaper(state.clone());
    let agent = TestAgent::start("a", &state, &[]);
    let img = dir.path().join("d1.raw");
    let disk = serde_json::json!({"name": "d1", "path": img, "size": 64 << 20}).to_string();
    agent.api_ok("POST", "/v1/disks", Some(&disk), 201);
    let spec = vm_spec(
        "g1",
        kernel.to_str().unwrap(),
        initrd.to_str().unwrap(),
        "d1",
    );
    let vm = agent.api_ok("POST", "/v1/vms", Some(&spec), 201);
    assert_eq!(vm["state"], "running", "{vm}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(vm["accel"], "tcg", "KVM-PVM must mean TCG: {vm}");
    }
    // The same spec again creates nothing.
    agent.api_ok("POST", "/v1/vms", Some(&spec), 200);
    let serial = std::path::PathBuf::from(vm["serial_log"].as_str().unwrap());
    wait_for(90, "the guest's first acknowledged disk records", || {
        console(&serial).1 > 0
    });
    let pid = vm["pid"].as_u64().unwrap();

    agent.proc.kill9();
    let (tick_at_kill, acked_at_kill) = console(&serial);
    std::thread::sleep(Duration::from_secs(3));
    let (tick_later, _) = console(&serial);
    assert!(
        tick_later > tick_at_kill + 100,
        "the guest stopped ticking when the agent died ({tick_at_kill} -> {tick_later})"
    );

    let agent = TestAgent::start("a", &state, &[]);
    let vm = agent.api_ok("GET", "/v1/vms/g1", None, 200);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["adopted"], true, "{vm}");
    assert_eq!(vm["pid"].as_u64(), Some(pid), "{vm}");
    // The disk's NBD client reconnects to the restarted agent and the guest's writes resume.
    wait_for(60, "disk records acknowledged after the restart", || {
        console(&serial).1 > acked_at_kill + 100
    });
    wait_for(10, "QEMU's run state through QMP", || {
        agent.api_ok("GET", "/v1/vms/g1", None, 200)["qemu_status"] == "running"
    });

    let metrics = agent.api_ok("GET", "/metrics", None, 200);
    let writes = metrics
        .as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("helio_nbd_request_seconds_count{export=\"d1\",command=\"write\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        writes > 0.0,
        "the VM's writes are not in /metrics:\n{metrics}"
    );
    // A second agent seeds the running VM's disk through its API, then (VM stopped) one sync
    // round makes its replica the image, byte for byte.
    let b_state = dir.path().join("b");
    let b = TestAgent::start("b", &b_state, &[]);
    let seed =
        serde_json::json!({"kind": "seed", "disk": "d1", "from": agent.proc.addr}).to_string();
    // Watched over Server-Sent Events by curl, to completion.
    let mut sse = std::process::Command::new("curl")
        .args([
            "-sN",
            "--max-time",
            "180",
            "--unix-socket",
            b.sock().to_str().unwrap(),
            "http://agent/v1/events",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let job = b.api_ok("POST", "/v1/jobs", Some(&seed), 201);
    let id = job["id"].as_str().unwrap().to_string();
    let mut progress_events = 0;
    let mut done = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(sse.stdout.take().unwrap())) {
        let Some(data) = line.unwrap().strip_prefix("data:").map(str::to_string) else {
            continue;
        };
        let e: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
        if e["object"] != id.as_str() {
            continue;
        }
        if e["kind"] == "job.progress" {
            progress_events += 1;
        }
        if e["kind"] == "job.phase"
            && ["done", "failed"].contains(&e["data"]["phase"].as_str().unwrap())
        {
            done = Some(e);
            break;
        }
    }
    let _ = sse.kill();
    let _ = sse.wait();
    let done = done.expect("the event stream ended before the seed did");
    assert_eq!(done["data"]["phase"], "done", "{done}");
    assert!(progress_events > 0, "no progress on the event stream");
    let bytes = &done["data"]["progress"];
    assert_eq!(bytes["bytes_done"], bytes["bytes_total"], "{done}");

    helio_ok(&["vm", "stop", "g1", "--agent", &agent.url]);
    let sync =
        serde_json::json!({"kind": "sync", "disk": "d1", "from": agent.proc.addr}).to_string();
    let job = b.api_ok("POST", "/v1/jobs", Some(&sync), 201);
    let id = job["id"].as_str().unwrap().to_string();
    wait_for(120, "the sync round", || {
        let j = b.api_ok("GET", &format!("/v1/jobs/{id}"), None, 200);
        assert_ne!(j["phase"], "failed", "{j}");
        j["phase"] == "done"
    });
    let (_, events) = common::agent::curl(
        &[
            "--max-time",
            "2",
            "-N",
            "--unix-socket",
            b.sock().to_str().unwrap(),
        ],
        "http://agent",
        "GET",
        "/v1/events",
        None,
        &[],
    );
    let events = events.as_str().unwrap_or_default().to_string();
    assert!(
        events.contains("event: job.round") && events.contains("dirty_bytes"),
        "no round figures on the event stream:\n{events}"
    );
    b.proc.kill9();
    common::verify_equal(&b_state.join("store"), "d1", &img);
    let (_, acked) = console(&serial);
    let records = agent::guest::check(&img).unwrap();
    assert_eq!(records.corrupt, 0, "{records:?}");
    assert_eq!(records.misplaced, 0, "{records:?}");
    assert!(
        records.max_seq >= acked,
        "acknowledged record {acked} is missing: {records:?}"
    );
    eprintln!("records after kill -9 of the agent: {records:?}, last acknowledged {acked}");

    // A QEMU that dies without being asked is reported, with its last words.
    let vm = agent.api_ok("POST", "/v1/vms/g1/start", None, 200);
    let pid = vm["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(10, "the VM reported as died", || {
        agent.api_ok("GET", "/v1/vms/g1", None, 200)["state"] == "died"
    });
    let vm = agent.api_ok("GET", "/v1/vms/g1", None, 200);
    assert!(
        vm["last_words"].as_str().unwrap().contains("console"),
        "{vm}"
    );
}

#[test]
fn bad_vm_specs_are_refused_with_problems() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a");
    let _reaper = QemuReaper(state.clone());
    let agent = TestAgent::start("a", &state, &[]);
    let problem = |method: &str, path: &str, body: &str, want: u16, says: &str| {
        let (status, v) = agent.api(method, path, Some(body));
        assert_eq!(status, want, "{path} {body}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains(says),
            "{body}: {v}"
        );
        assert!(
            v["title"].is_string() && v["status"] == want,
            "not a problem: {v}"
        );
    };
    problem(
        "POST",
        "/v1/vms",
        r#"{"name":"v","memory_mib":64,"disks":["nope"]}"#,
        404,
        "disk \"nope\"",
    );
    problem(
        "POST",
        "/v1/vms",
        r#"{"name":"v","memory_mib":64,"colour":"red"}"#,
        422,
        "colour",
    );
    problem(
        "POST",
        "/v1/vms",
        r#"{"name":"v","memory_mib":"#,
        400,
        "not valid JSON",
    );
    problem(
        "POST",
        "/v1/vms",
        r#"{"name":"../x","memory_mib":64}"#,
        422,
        "invalid vm name",
    );
    problem(
        "POST",
        "/v1/vms",
        r#"{"name":"v","memory_mib":1}"#,
        422,
        "memory_mib",
    );
    problem(
        "POST",
        "/v1/disks",
        r#"{"name":"d","path":"/nonexistent/x.raw"}"#,
        422,
        "give `size`",
    );
    let (status, v) = agent.api("GET", "/v1/vms/ghost", None);
    assert_eq!(status, 404, "{v}");
    // QEMU refuses an argument: the error carries its stderr, and no VM is left behind.
    if sample_guest("bad_vm_specs (QEMU part)").is_some() {
        let bad = r#"{"name":"q","memory_mib":64,"qemu_args":["-no-such-option"]}"#;
        problem("POST", "/v1/vms", bad, 502, "no-such-option");
        let (status, _) = agent.api("GET", "/v1/vms/q", None);
        assert_eq!(status, 404, "a VM that could not start was left behind");
    }
}

#[test]
fn a_stuck_qemu_monitor_or_a_slow_client_blocks_nothing() {
    use std::io::{Read, Write};
    let Some((kernel, initrd)) = sample_guest("a_stuck_qemu_monitor") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a");
    let _reaper = QemuReaper(state.clone());
    let agent = TestAgent::start("a", &state, &[]);
    let spec = serde_json::json!({
        "name": "g", "memory_mib": 128,
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 quiet"},
        "nics": [{"network": "user", "mac": "52:54:00:12:34:56"}],
    })
    .to_string();
    let vm = agent.api_ok("POST", "/v1/vms", Some(&spec), 201);
    let pid = nix::unistd::Pid::from_raw(vm["pid"].as_u64().unwrap() as i32);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm["pid"])).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("mac=52:54:00:12:34:56"),
        "the NIC is not on QEMU's command line"
    );
    // A client that connects and sends half a request, then nothing.
    let mut slow = std::os::unix::net::UnixStream::connect(agent.sock()).unwrap();
    slow.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // QEMU frozen: its monitor answers nothing.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let t = std::time::Instant::now();
    agent.api_ok("GET", "/v1/vms/g", None, 200);
    agent.api_ok("GET", "/v1/agent", None, 200);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "reads waited on a stuck monitor: {:?}",
        t.elapsed()
    );
    let t = std::time::Instant::now();
    let stopped = agent.api_ok("POST", "/v1/vms/g/stop", None, 200);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(
        nix::sys::signal::kill(pid, None).is_err() || {
            std::thread::sleep(Duration::from_millis(500));
            std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"))
        },
        "the frozen QEMU is still there"
    );
    // The slow client is dropped by the header timeout.
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(
        n == 0 || answer.contains("408") || answer.contains("400"),
        "slow client got: {answer}"
    );
}
