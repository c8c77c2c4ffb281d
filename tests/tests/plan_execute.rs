//! `helio plan --execute` end to end: three agents on this host (three sites, each behind an
//! emulated WAN link, mutual TLS), two sample-guest VMs, eight hours of a plan run in two
//! minutes (`--clock-scale 240`). The executor creates the plan's seeds and migrations at the
//! agents as their windows open, follows them, and the VMs end where the plan put them,
//! running, having moved as planned (one of them out and back: the way back ships only what
//! changed, no seed). The fleet understates one VM's dirty rate: its first move measures it,
//! and the executor plans again, saying why.

mod common;

use common::agent::{console, sample_guest, wait_for, QemuReaper, TestAgent};
use common::{helio, helio_ok, wan_proxy};
use std::path::Path;

/// The sites: name, time zone.
const SITES: [(&str, &str); 3] = [
    ("paris", "Europe/Paris"),
    ("newyork", "America/New_York"),
    ("tokyo", "Asia/Tokyo"),
];
/// Each site's link as its peers reach it.
const LINK: [&str; 4] = ["--rtt", "20ms", "--bandwidth", "200Mbit"];
/// The plan: eight hours from 20:00 UTC (Europe's evening, America's afternoon, Asia's early
/// morning), at 240 plan seconds per second.
const FROM: &str = "2026-12-03T20:00:00Z";

/// The fleet: the three sites with their agents, users in Europe, America and Asia; VM g1 at
/// paris serving Europe and America, g2 at tokyo serving Asia and America, each allowed only
/// its home and newyork (the agents move a VM between its home and one other site).
fn fleet(agents: &[(String, String)]) -> String {
    let mut f = String::from("[policy]\nmove_cost = 100\n");
    for ((name, tz), (url, repl)) in SITES.iter().zip(agents) {
        f += &format!(
            "[[sites]]\nname = \"{name}\"\ntz = \"{tz}\"\nagent = \"{url}\"\nreplication = \"{repl}\"\n\
             capacity = {{ vcpus = 8, memory_mib = 4096, disk_gib = 10 }}\n"
        );
    }
    for (a, b) in [
        ("paris", "newyork"),
        ("newyork", "tokyo"),
        ("paris", "tokyo"),
    ] {
        f +=
            &format!("[[links]]\na = \"{a}\"\nb = \"{b}\"\nbandwidth = \"200Mbit\"\nrtt_ms = 20\n");
    }
    f += r#"
[[regions]]
name = "europe"
tz = "Europe/Paris"
rtt_ms = { "paris" = 5, "newyork" = 80, "tokyo" = 200 }
[[regions]]
name = "america"
tz = "America/New_York"
rtt_ms = { "paris" = 80, "newyork" = 5, "tokyo" = 150 }
[[regions]]
name = "asia"
tz = "Asia/Tokyo"
rtt_ms = { "paris" = 200, "newyork" = 150, "tokyo" = 5 }
[[vms]]
name = "g1"
memory_mib = 192
disk_gib = 1
vcpus = 1
site = "paris"
dirty_rate_mib_s = 8
disk_write_mib_s = 0.1
users = { "europe" = 100, "america" = 100 }
allowed_sites = ["paris", "newyork"]
[[vms]]
name = "g2"
memory_mib = 192
disk_gib = 1
vcpus = 1
site = "tokyo"
dirty_rate_mib_s = 2
disk_write_mib_s = 0.1
users = { "asia" = 100, "america" = 100 }
allowed_sites = ["tokyo", "newyork"]
"#;
    f
}

/// VM `name` on disk `disk` (64 MiB) at `agent`, booted until its first disk records.
fn boot(agent: &TestAgent, name: &str, disk: &str, kernel: &Path, initrd: &Path, dir: &Path) {
    let img = dir.join(format!("{disk}.raw"));
    let d = serde_json::json!({"name": disk, "path": img, "size": 64 << 20}).to_string();
    agent.api_ok("POST", "/v1/disks", Some(&d), 201);
    let cmdline = "console=ttyS0 quiet helio.disk=/dev/vda helio.disk_rate=50 helio.mem_mib=32 helio.mem_rate=2000";
    let spec = serde_json::json!({
        "name": name, "memory_mib": 192,
        "boot": {"kernel": kernel, "initrd": initrd, "cmdline": cmdline},
        "disks": [disk],
    });
    agent.api_ok("POST", "/v1/vms", Some(&spec.to_string()), 201);
    let serial = agent.state.join(format!("vms/{name}/serial.log"));
    wait_for(120, "the guest's first disk records", || {
        console(&serial).1 > 0
    });
}

/// (vm, from, to) of each migration, in order.
fn moves(v: &serde_json::Value, list: &str, what: Option<&str>) -> Vec<(String, String, String)> {
    let s = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_string();
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| what.is_none_or(|w| m["what"] == w))
        .map(|m| {
            let vm = if m["vm"].is_null() {
                s(&m["vms"][0])
            } else {
                s(&m["vm"])
            };
            (vm, s(&m["from"]), s(&m["to"]))
        })
        .collect()
}

#[test]
fn plan_execute_moves_the_vms_as_planned_and_they_keep_running() {
    let Some((kernel, initrd)) = sample_guest("plan_execute") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    helio_ok(&["pki", "init", pki.join("ca").to_str().unwrap()]);
    let mut agents = Vec::new();
    let mut reapers = Vec::new();
    let mut links = Vec::new();
    for (name, _) in SITES {
        let (ca, out) = (pki.join("ca"), pki.join(name));
        let (ca, out) = (ca.to_str().unwrap(), out.to_str().unwrap());
        helio_ok(&["pki", "issue", "--ca", ca, "--name", name, "--out", out]);
        let state = dir.path().join(name);
        reapers.push(QemuReaper(state.clone()));
        let a = TestAgent::start(name, &state, &["--tls", out]);
        links.push(wan_proxy(
            &a.proc.addr,
            &LINK,
            &dir.path().join(format!("wan-{name}.log")),
        ));
        agents.push(a);
    }
    let (paris, newyork, tokyo) = (&agents[0], &agents[1], &agents[2]);
    boot(paris, "g1", "d1", &kernel, &initrd, dir.path());
    boot(tokyo, "g2", "d2", &kernel, &initrd, dir.path());
    let urls: Vec<(String, String)> = agents
        .iter()
        .zip(&links)
        .map(|(a, l)| (a.url.clone(), l.addr.clone()))
        .collect();
    let fleet_file = dir.path().join("fleet.toml");
    std::fs::write(&fleet_file, fleet(&urls)).unwrap();
    let f = fleet_file.to_str().unwrap();
    let base = ["plan", "--fleet", f, "--from", FROM, "--hours", "8"];
    let planned: serde_json::Value =
        serde_json::from_str(&helio_ok(&[&base[..], &["--json"]].concat())).unwrap();
    let want = moves(&planned, "moves", None);
    eprintln!("planned: {want:?}");
    assert!(
        want.len() >= 3 && want.iter().any(|m| m.0 == "g2" && m.2 == "tokyo"),
        "the test fleet must plan g1 out and g2 out and back: {want:?}"
    );
    let dry = helio_ok(
        &[
            &base[..],
            &["--execute", "--dry-run", "--clock-scale", "240"],
        ]
        .concat(),
    );
    assert!(
        dry.contains("/v1/migrations") && dry.contains("/v1/jobs"),
        "{dry}"
    );
    let started = std::time::Instant::now();
    let out = helio(&[&base[..], &["--execute", "--clock-scale", "240", "--json"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "plan --execute failed");
    eprintln!("executed in {:?}", started.elapsed());
    let report = common::last_json(&stdout);
    let done = moves(&report, "steps", Some("migration"));
    // g2 dirties about 8 MiB/s (the guest's 2000 pages a second) where the fleet says 2: its
    // first migration measures it, and the executor plans again with the measured rate.
    let plans = report["plans"].as_array().unwrap();
    assert!(
        plans.iter().any(|p| p["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap_or_default().starts_with("g2 dirties"))),
        "no new plan for g2's measured dirty rate: {plans:?}"
    );
    let replanned = plans.len() > 1;
    if !replanned {
        // Moves of different VMs run side by side and may end in either order; each VM's own
        // moves keep the plan's.
        let per_vm = |m: &[(String, String, String)]| {
            let mut by: std::collections::BTreeMap<String, Vec<(String, String)>> =
                Default::default();
            for (vm, from, to) in m {
                by.entry(vm.clone())
                    .or_default()
                    .push((from.clone(), to.clone()));
            }
            by
        };
        assert_eq!(
            per_vm(&done),
            per_vm(&want),
            "the moves made are the plan's"
        );
    }
    assert!(report["refused"].as_array().unwrap().is_empty(), "{report}");
    for s in report["steps"].as_array().unwrap() {
        assert!(
            s["phase"] == "completed" || s["phase"] == "done",
            "every step ends well: {s}"
        );
    }
    // Each migration carried the plan's window and the cap that keeps it within the budget.
    let site = |name: &str| &agents[SITES.iter().position(|s| s.0 == name).unwrap()];
    for s in report["steps"].as_array().unwrap() {
        if s["what"] != "migration" {
            continue;
        }
        let path = format!("/v1/migrations/{}", s["id"].as_str().unwrap());
        let m = site(s["from"].as_str().unwrap()).api_ok("GET", &path, None, 200);
        let spec = &m["spec"];
        assert!(
            spec["bandwidth"]
                .as_str()
                .is_some_and(|b| b.ends_with("kbit"))
                && spec["deadline"].is_string()
                && spec["not_before"].is_string(),
            "{m}"
        );
    }
    // Where the (last) plan leaves them: g1 at newyork, g2 home at tokyo; both running on.
    for (agent, vm) in [(newyork, "g1"), (tokyo, "g2")] {
        let v = agent.api_ok("GET", &format!("/v1/vms/{vm}"), None, 200);
        assert_eq!(v["state"], "running", "{vm}: {v}");
        let serial = agent.state.join(format!("vms/{vm}/serial.log"));
        let (tick, _) = console(&serial);
        wait_for(30, "the guest ticking on after its moves", || {
            console(&serial).0 > tick + 50
        });
    }
    let g1_home = paris.api_ok("GET", "/v1/vms/g1", None, 200);
    assert_eq!(g1_home["state"], "moved", "{g1_home}");
    drop(links);
    drop(agents);
    drop(reapers);
}
