//! Two `helio agent`s on one host, mutual TLS, an emulated WAN between them: a seed driven
//! through the API and watched on the event stream, resumed after a `kill -9` with no chunk
//! fetched twice; roles; bad input and cancellation; the OpenAPI document validated by a
//! validator we did not write.

mod common;

use common::agent::{curl, wait_for, TestAgent};
use common::{data_chunks, free_port, helio, helio_ok, sample_image, verify_equal, wan_proxy};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA and certificates for agents a and b, an operator, a scheduler.
fn pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    helio_ok(&["pki", "init", pki.join("ca").to_str().unwrap()]);
    for (name, role) in [
        ("a", "agent"),
        ("b", "agent"),
        ("op", "operator"),
        ("sched", "scheduler"),
    ] {
        helio_ok(&[
            "pki",
            "issue",
            "--ca",
            pki.join("ca").to_str().unwrap(),
            "--name",
            name,
            "--role",
            role,
            "--out",
            pki.join(name).to_str().unwrap(),
        ]);
    }
    pki
}

/// curl options presenting `who`'s certificate.
fn tls_opts(pki: &Path, who: &str) -> Vec<String> {
    let d = pki.join(who);
    vec![
        "--cacert".into(),
        d.join("ca.pem").display().to_string(),
        "--cert".into(),
        d.join("cert.pem").display().to_string(),
        "--key".into(),
        d.join("key.pem").display().to_string(),
    ]
}

fn tls_api(
    pki: &Path,
    who: &str,
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let opts = tls_opts(pki, who);
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    curl(
        &opts,
        &format!("https://127.0.0.1:{port}"),
        method,
        path,
        body,
        &[],
    )
}

fn job(agent: &TestAgent, id: &str) -> serde_json::Value {
    agent.api_ok("GET", &format!("/v1/jobs/{id}"), None, 200)
}

fn wait_phase(agent: &TestAgent, id: &str, phase: &str, secs: u64) -> serde_json::Value {
    wait_for(secs, &format!("{id} to reach {phase}"), || {
        let j = job(agent, id);
        assert!(
            !(j["phase"] == "failed" && phase != "failed"),
            "{id} failed: {j}\nlog:\n{}",
            agent.proc.log()
        );
        j["phase"] == phase
    });
    job(agent, id)
}

#[test]
fn seed_through_the_api_over_a_wan_resumes_after_kill9_without_refetching() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let img = dir.path().join("disk.img");
    sample_image(&img, "48MiB", 7);
    let a = TestAgent::start(
        "a",
        &dir.path().join("a"),
        &["--tls", pki.join("a").to_str().unwrap()],
    );
    let disk = serde_json::json!({"name": "d", "path": img}).to_string();
    a.api_ok("POST", "/v1/disks", Some(&disk), 201);
    let wan = wan_proxy(
        &a.proc.addr,
        &["--rtt", "20ms", "--bandwidth", "40Mbit"],
        &dir.path().join("wan.log"),
    );

    let b_state = dir.path().join("b");
    let b_cert = pki.join("b");
    let b_tls = ["--tls", b_cert.to_str().unwrap()];
    let b = TestAgent::start("b", &b_state, &b_tls);
    // The event stream, read by curl as the job runs.
    let sse_file = dir.path().join("events.txt");
    let mut sse = Command::new("curl")
        .args([
            "-sN",
            "--max-time",
            "120",
            "--unix-socket",
            b.sock().to_str().unwrap(),
            "http://agent/v1/events",
        ])
        .stdout(std::fs::File::create(&sse_file).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let spec = serde_json::json!({"kind": "seed", "disk": "d", "from": wan.addr}).to_string();
    let post_keyed = || {
        curl(
            &["--unix-socket", b.sock().to_str().unwrap()],
            "http://agent",
            "POST",
            "/v1/jobs",
            Some(&spec),
            &["Idempotency-Key: seed-d-1"],
        )
    };
    let (status, created) = post_keyed();
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    // A retry with the same key creates nothing.
    let (status, again) = post_keyed();
    assert_eq!(
        (status, again["id"].as_str()),
        (200, Some(id.as_str())),
        "{again}"
    );

    wait_for(120, "a third of the seed", || {
        let p = &job(&b, &id)["progress"];
        p["bytes_total"].as_u64().unwrap_or(0) > 0
            && p["bytes_done"].as_u64().unwrap() * 3 > p["bytes_total"].as_u64().unwrap()
    });
    let before = job(&b, &id);
    b.proc.kill9();
    let _ = sse.kill();
    let _ = sse.wait();
    let stored = data_chunks(&b_state.join("store"), "d");
    assert!(stored > 0);

    let b = TestAgent::start("b", &b_state, &b_tls);
    let done = wait_phase(&b, &id, "done", 180);
    let f = &done["figures"];
    assert_eq!(done["resumed"], 1, "{done}");
    assert_eq!(
        f["chunks_present"].as_u64(),
        Some(stored as u64),
        "chunks kept from before the kill must not be fetched again: {done}"
    );
    assert!(
        done["progress"]["bytes_done"].as_u64() >= before["progress"]["bytes_done"].as_u64(),
        "progress went backwards: {before} -> {done}"
    );
    assert!(
        done["ended_at"].is_string() && done["error"].is_null(),
        "{done}"
    );
    // The replica served over NBD by an export job, read by qemu-img.
    let export = serde_json::json!({"kind": "export", "disk": "d"}).to_string();
    let (s, busy) = b.api("POST", "/v1/jobs", Some(&spec));
    assert_eq!(s, 201, "a finished seed leaves the disk free: {busy}");
    let seed2 = busy["id"].as_str().unwrap().to_string();
    let (s, v) = b.api("POST", "/v1/jobs", Some(&export));
    assert_eq!(s, 409, "an export while a seed of the disk runs: {v}");
    wait_phase(&b, &seed2, "done", 60);
    let ex = b.api_ok("POST", "/v1/jobs", Some(&export), 201);
    let ex_id = ex["id"].as_str().unwrap().to_string();
    let serving = wait_phase(&b, &ex_id, "serving", 30);
    let sock = b_state.join("exports/d.sock");
    let uri = common::nbd_uri(&sock, "d");
    common::run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
            &uri,
        ],
    );
    b.api_ok("POST", &format!("/v1/jobs/{ex_id}/cancel"), None, 200);
    let stopped = wait_phase(&b, &ex_id, "cancelled", 30);
    assert!(
        stopped["phase_reason"].as_str().unwrap().contains("synced"),
        "{stopped} (serving: {serving})"
    );
    assert!(!sock.exists(), "the export's socket was left behind");
    let metric = |agent: &TestAgent, prefix: &str| -> f64 {
        let text = agent.api_ok("GET", "/metrics", None, 200);
        let text = text.as_str().unwrap().to_string();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    };
    assert!(metric(&a, "helio_peer_sent_bytes_total{peer=\"b\"}") > 0.0);
    assert!(metric(&b, "helio_chunks_fetched_total{") > 0.0);
    assert!(
        metric(
            &b,
            "helio_nbd_request_seconds_count{export=\"d\",command=\"read\"}"
        ) > 0.0
    );
    b.proc.kill9(); // releases the store for the check
    verify_equal(&b_state.join("store"), "d", &img);

    // The stream carried the job's phases and progress, with increasing ids.
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&sse_file)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids not increasing: {ids:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "job.progress" && e["object"] == id.as_str()),
        "no progress events: {events:?}"
    );
    assert!(events
        .iter()
        .any(|e| e["kind"] == "job.phase" && e["data"]["phase"] == "transferring"));
    eprintln!("seed through the agent: {stored} chunks kept across kill -9, final {done}");
}

#[test]
fn events_resume_from_last_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestAgent::start("a", &dir.path().join("a"), &[]);
    for i in 0..3 {
        let p = serde_json::json!({"name": format!("p{i}"), "addr": "127.0.0.1:1"}).to_string();
        a.api_ok("POST", "/v1/peers", Some(&p), 201);
    }
    let read = |last: &str| -> Vec<u64> {
        let out = Command::new("curl")
            .args([
                "-sN",
                "--max-time",
                "2",
                "-H",
                &format!("Last-Event-ID: {last}"),
                "--unix-socket",
                a.sock().to_str().unwrap(),
                "http://agent/v1/events",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("id:"))
            .map(|i| i.trim().parse().unwrap())
            .collect()
    };
    let all = read("0");
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(read(&all[0].to_string()), all[1..].to_vec());
}

#[test]
fn roles_decide_what_a_certificate_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let img = dir.path().join("disk.img");
    sample_image(&img, "4MiB", 3);
    let port = free_port();
    let api = format!("127.0.0.1:{port}");
    let state = dir.path().join("a");
    let unix = format!("unix:{}", state.join("api.sock").display());
    let a = TestAgent::start(
        "a",
        &state,
        &[
            "--tls",
            pki.join("a").to_str().unwrap(),
            "--api",
            &unix,
            "--api",
            &api,
        ],
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(a.sock()).unwrap().permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the API socket must be the agent user's only"
    );

    let disk = serde_json::json!({"name": "d", "path": img}).to_string();
    let (s, v) = tls_api(&pki, "op", port, "POST", "/v1/disks", Some(&disk));
    assert_eq!(s, 201, "operator creates a disk: {v}");
    let (s, v) = tls_api(&pki, "sched", port, "GET", "/v1/disks", None);
    assert_eq!(s, 200, "scheduler reads: {v}");
    let seed = serde_json::json!({"kind": "seed", "disk": "d", "from": a.proc.addr}).to_string();
    let (s, v) = tls_api(&pki, "sched", port, "POST", "/v1/jobs", Some(&seed));
    assert_eq!(s, 201, "scheduler creates a seed: {v}");
    let (s, v) = tls_api(
        &pki,
        "sched",
        port,
        "POST",
        "/v1/vms",
        Some(r#"{"name":"v","memory_mib":64}"#),
    );
    assert_eq!(s, 403, "scheduler may not create VMs: {v}");
    assert!(v["detail"].as_str().unwrap().contains("scheduler"), "{v}");
    let (s, v) = tls_api(&pki, "sched", port, "DELETE", "/v1/disks/d", None);
    assert_eq!(s, 403, "scheduler may not delete disks: {v}");
    let (s, v) = tls_api(&pki, "a", port, "GET", "/v1/disks", None);
    assert_eq!(s, 403, "an agent certificate gets 403 on the API: {v}");
    assert!(v["detail"].as_str().unwrap().contains("replication"), "{v}");
    // The replication port serves disk data to agents, never to a scheduler.
    let seed_as = |who: &str| {
        let store = dir.path().join(format!("{who}-store"));
        let cert = pki.join(who);
        helio(&[
            "seed",
            "--from",
            &a.proc.addr,
            "--name",
            "d",
            "--store",
            store.to_str().unwrap(),
            "--tls",
            cert.to_str().unwrap(),
            "--retries",
            "0",
            "--timeout",
            "10s",
        ])
    };
    assert!(
        !seed_as("sched").status.success(),
        "a scheduler certificate read disk data"
    );
    let log = a.proc.log();
    assert!(
        log.contains("role may not use the replication protocol"),
        "{log}"
    );
    let out = seed_as("b");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_jobs_unreachable_peers_cancellation_and_busy_ports() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestAgent::start("a", &dir.path().join("a"), &[]);
    let refuse = |body: &str, want: u16, says: &str| {
        let (s, v) = a.api("POST", "/v1/jobs", Some(body));
        assert_eq!(s, want, "{body}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains(says),
            "{body}: {v}"
        );
    };
    refuse(
        r#"{"kind":"teleport","disk":"d","from":"127.0.0.1:1"}"#,
        422,
        "job kind",
    );
    refuse(
        r#"{"kind":"seed","disk":"d","from":"nowhere"}"#,
        404,
        "peer \"nowhere\"",
    );
    refuse(
        r#"{"kind":"seed","disk":"d","from":"127.0.0.1:1","bandwidth":"fast"}"#,
        422,
        "bandwidth",
    );
    refuse(
        r#"{"kind":"seed","disk":"d","from":"127.0.0.1:1","extra":1}"#,
        422,
        "extra",
    );
    let (s, v) = a.api("POST", "/v1/jobs", Some(r#"{"kind":"seed""#));
    assert_eq!(s, 400, "{v}");

    // An unreachable peer: the job fails and says which peer.
    let dead = format!("127.0.0.1:{}", free_port());
    let spec = serde_json::json!({"kind": "seed", "disk": "d", "from": dead}).to_string();
    let j = a.api_ok("POST", "/v1/jobs", Some(&spec), 201);
    let id = j["id"].as_str().unwrap();
    let failed = wait_phase(&a, id, "failed", 120);
    assert!(
        failed["error"].as_str().unwrap().contains(&dead),
        "{failed}"
    );
    // Cancelling an ended job changes nothing.
    let again = a.api_ok("POST", &format!("/v1/jobs/{id}/cancel"), None, 200);
    assert_eq!(again["phase"], "failed");

    // Cancelling a transfer in flight: a slow link keeps it transferring.
    let img = dir.path().join("disk.img");
    sample_image(&img, "32MiB", 5);
    let src = TestAgent::start("src", &dir.path().join("src"), &[]);
    src.api_ok(
        "POST",
        "/v1/disks",
        Some(&serde_json::json!({"name": "d", "path": img}).to_string()),
        201,
    );
    let wan = wan_proxy(
        &src.proc.addr,
        &["--bandwidth", "8Mbit"],
        &dir.path().join("wan.log"),
    );
    let spec = serde_json::json!({"kind": "seed", "disk": "d", "from": wan.addr}).to_string();
    let j = a.api_ok("POST", "/v1/jobs", Some(&spec), 201);
    let id = j["id"].as_str().unwrap();
    wait_phase(&a, id, "transferring", 30);
    let c1 = a.api_ok("POST", &format!("/v1/jobs/{id}/cancel"), None, 200);
    let cancelled = wait_phase(&a, id, "cancelled", 30);
    assert!(
        cancelled["phase_reason"].as_str().unwrap().contains("kept"),
        "{cancelled}"
    );
    let c2 = a.api_ok("POST", &format!("/v1/jobs/{id}/cancel"), None, 200);
    assert_eq!(
        c2["phase"], "cancelled",
        "second cancel: {c2} (first: {c1})"
    );

    // A replication port in use: the agent refuses to start and says why.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = helio(&[
        "agent",
        "--name",
        "c",
        "--state",
        dir.path().join("c").to_str().unwrap(),
        "--listen",
        &addr,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
}

#[test]
fn the_openapi_document_validates() {
    let dir = tempfile::tempdir().unwrap();
    let a = TestAgent::start("a", &dir.path().join("a"), &[]);
    let doc = a.api_ok("GET", "/v1/openapi.json", None, 200);
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    let tools = std::env::var("HELIO_TOOLS").unwrap_or_else(|_| "/opt/heliotrope-tools".into());
    let validator = Path::new(&tools).join("bin/openapi-spec-validator");
    if !validator.exists() {
        eprintln!("SKIPPED the_openapi_document_validates: {} is not installed (scripts/install-deps --test installs it)", validator.display());
        return;
    }
    let out = Command::new(&validator).arg(&file).output().unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator refused the document:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for path in [
        "/v1/disks",
        "/v1/vms",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/events",
        "/metrics",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the document"
        );
    }
    let metrics = a.api_ok("GET", "/metrics", None, 200);
    let text = metrics.as_str().unwrap();
    assert!(text.contains("helio_api_requests_total"), "{text}");
    assert!(text.contains("helio_jobs{phase=\"done\"}"), "{text}");
}

#[test]
fn the_config_declares_what_exists_and_api_changes_persist() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("declared.raw");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[peer]]\nname = \"site-b\"\naddr = \"127.0.0.1:7000\"\n\n[[disk]]\nname = \"web\"\npath = \"{}\"\nsize = 8388608\n",
            img.display()
        ),
    )
    .unwrap();
    let state = dir.path().join("a");
    let cfg = ["--config", config.to_str().unwrap()];
    let a = TestAgent::start("a", &state, &cfg);
    let disks = a.api_ok("GET", "/v1/disks", None, 200);
    assert_eq!(disks[0]["spec"]["name"], "web", "{disks}");
    assert_eq!(disks[0]["size"], 8 << 20, "{disks}");
    let p = serde_json::json!({"name": "site-c", "addr": "127.0.0.1:7001"}).to_string();
    a.api_ok("POST", "/v1/peers", Some(&p), 201);
    a.api_ok("DELETE", "/v1/disks/web", None, 200);
    a.proc.stop();

    let a = TestAgent::start("a", &state, &cfg);
    let peers = a.api_ok("GET", "/v1/peers", None, 200);
    let names: Vec<&str> = peers
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["site-b", "site-c"],
        "the API's peer persists beside the config's"
    );
    // The config says the disk must exist: a restart declares it again (its image was kept).
    assert_eq!(
        a.api_ok("GET", "/v1/disks", None, 200)[0]["spec"]["name"],
        "web"
    );
    // A job may name a configured peer.
    let job = serde_json::json!({"kind": "seed", "disk": "web", "from": "site-b"}).to_string();
    let j = a.api_ok("POST", "/v1/jobs", Some(&job), 201);
    assert_eq!(j["spec"]["from"], "site-b");
    let status = helio_ok(&["status", "--agent", &a.url, "--json"]);
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(status["agent"]["name"], "a", "{status}");
    assert_eq!(status["disks"][0]["spec"]["name"], "web", "{status}");
    // A config with an unknown key is refused, naming it.
    std::fs::write(
        &config,
        "[[disk]]\nname = \"x\"\npath = \"/x\"\ncolour = \"red\"\n",
    )
    .unwrap();
    a.proc.kill9();
    let out = helio(&[
        "agent",
        "--name",
        "a",
        "--state",
        state.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("colour"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
