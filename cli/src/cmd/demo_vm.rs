//! `helio demo`: the whole story on the sample guest. Two agents (sites A and B) run in this
//! process, each behind an emulated WAN link, with mutual TLS from a fresh CA. A real QEMU VM
//! (Debian's kernel, a busybox initrd whose workload writes checksummed records to its data
//! disk and prints a tick every 10 ms) boots at A; its disks are pre-seeded to B; one migration
//! moves it there; a second brings it back moving only what it wrote at B. The report gives
//! phases, WAN bytes, downtime as QEMU counts it and as the guest's ticks show it, and checks
//! the tick sequence and every disk record at both sites.

use super::demo_watch::{self, Ticks};
use crate::sample;
use crate::units::human;
use agent::{Agent, Options};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wan::{Link, LinkSpec, Rate};

/// One site: an agent and the link in front of its replication listener.
struct Site {
    agent: Arc<Agent>,
    link: Link,
}

impl Site {
    /// The address peers reach this site at: through its emulated link.
    fn addr(&self) -> String {
        self.link.local_addr().to_string()
    }

    fn serial(&self) -> PathBuf {
        self.agent.dir.join("vms/g1/serial.log")
    }

    fn wan_bytes(&self) -> u64 {
        let s = self.link.stats();
        s.to_target + s.to_client
    }
}

/// What the story needs besides the sites.
pub struct Setup {
    /// Working directory.
    pub dir: PathBuf,
    /// Size of the VM's system disk (mixed content).
    pub os_size: u64,
    /// Emulated round trip time and bandwidth.
    pub rtt: Duration,
    /// Emulated bandwidth.
    pub bandwidth: Rate,
}

pub async fn run(s: Setup) -> anyhow::Result<i32> {
    let (kernel, initrd) = sample_guest().await?;
    println!("2. two agents, A and B, each behind an emulated WAN link ({} RTT, {}), mutual TLS from a fresh CA", humantime::format_duration(s.rtt), s.bandwidth);
    let pki = s.dir.join("pki");
    let ca = pki.join("ca");
    protocol::pki::init_ca(&ca)?;
    let spec = LinkSpec {
        rtt: s.rtt,
        bandwidth: Some(s.bandwidth),
        corrupt_every: None,
    };
    let mut sites = Vec::new();
    for name in ["a", "b"] {
        protocol::pki::issue(&ca, name, &pki.join(name), &[])?;
        sites.push(site(name, &s.dir, &pki, spec.clone()).await?);
    }
    let b = sites.pop().context("site b")?;
    let a = sites.pop().context("site a")?;
    let outcome = story(&s, &a, &b, &kernel, &initrd).await;
    for site in [&a, &b] {
        let _ = site.agent.vms.stop("g1").await;
    }
    outcome
}

async fn site(name: &'static str, dir: &Path, pki: &Path, spec: LinkSpec) -> anyhow::Result<Site> {
    let agent = Agent::start(Options {
        name: name.to_string(),
        state: dir.join(name),
        store: None,
        listen: Some("127.0.0.1:0".into()),
        tls: Some(pki.join(name)),
        config: None,
    })
    .await
    .with_context(|| format!("agent {name} could not start"))?;
    let listen = agent.listen.clone().context("the agent has no listener")?;
    let link = Link::start("127.0.0.1:0", &listen, spec).await?;
    Ok(Site { agent, link })
}

/// Builds (or finds up to date) the sample guest with `scripts/sample-guest`.
async fn sample_guest() -> anyhow::Result<(PathBuf, PathBuf)> {
    let qemu = std::env::var("HELIO_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if std::process::Command::new(&qemu)
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("{qemu} is not installed: run scripts/install-deps (it installs QEMU 10 from bookworm-backports)");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = root.join("target/sample-guest");
    println!(
        "1. the sample guest: Debian's cloud kernel and a busybox initrd with its workload ({})",
        out.display()
    );
    let built = tokio::process::Command::new("bash")
        .arg(root.join("scripts/sample-guest"))
        .arg(&out)
        .output()
        .await
        .context("running scripts/sample-guest")?;
    if !built.status.success() {
        bail!(
            "scripts/sample-guest failed: {}",
            String::from_utf8_lossy(&built.stderr)
        );
    }
    Ok((out.join("vmlinuz"), out.join("initrd.img")))
}

async fn story(s: &Setup, a: &Site, b: &Site, kernel: &Path, initrd: &Path) -> anyhow::Result<i32> {
    boot(s, a, kernel, initrd).await?;
    preseed(a, b).await?;
    let ticks = Ticks::watch([a.serial(), b.serial()]);
    let wan0 = a.wan_bytes() + b.wan_bytes();
    let there = migrate(a, b, "3. moving g1 from A to B").await?;
    let wan = a.wan_bytes() + b.wan_bytes() - wan0;
    let gap = ticks.gap_since_last_reset();
    let tick_ok = demo_watch::continuous(&a.serial(), &b.serial());
    report_move(&there, wan, gap, tick_ok);
    demo_watch::wait_acked(&b.serial(), 200, Duration::from_secs(60)).await?;

    ticks.reset();
    let wan0 = a.wan_bytes() + b.wan_bytes();
    let back = migrate(b, a, "4. the next day: g1 back from B to A").await?;
    let wan = a.wan_bytes() + b.wan_bytes() - wan0;
    let gap = ticks.gap_since_last_reset();
    let tick_ok_back = demo_watch::continuous(&b.serial(), &a.serial());
    report_move(&back, wan, gap, tick_ok_back);
    let r = &back.figures["return"];
    println!(
        "   the way back moved {} of disk for {} chunks written at B ({} compressed): {:.2}x",
        human(r["disk_wire_bytes"].as_u64().unwrap_or(0)),
        r["chunks_written_here"],
        human(r["written_compressed_bytes"].as_u64().unwrap_or(0)),
        r["disk_wire_bytes"].as_f64().unwrap_or(0.0)
            / r["written_compressed_bytes"]
                .as_f64()
                .unwrap_or(1.0)
                .max(1.0),
    );
    demo_watch::wait_acked(&a.serial(), 100, Duration::from_secs(60)).await?;
    ticks.stop();
    verify(a, b, tick_ok && tick_ok_back).await
}

/// Creates the VM's disks at A (a system disk of mixed content, an empty data disk the guest
/// writes its records to) and boots it.
async fn boot(s: &Setup, a: &Site, kernel: &Path, initrd: &Path) -> anyhow::Result<()> {
    let os = s.dir.join("os.img");
    let size = s.os_size;
    let path = os.clone();
    tokio::task::spawn_blocking(move || sample::write_image(&path, size, 1)).await??;
    let disk = |name: &str, path: &Path, size: Option<u64>| {
        serde_json::from_value(serde_json::json!({"name": name, "path": path, "size": size}))
    };
    a.agent.disks.create(disk("os", &os, None)?)?;
    a.agent
        .disks
        .create(disk("data", &s.dir.join("data.img"), Some(64 << 20))?)?;
    let spec = serde_json::json!({
        "name": "g1", "memory_mib": 256,
        "boot": {"kernel": kernel, "initrd": initrd,
                 "cmdline": "console=ttyS0 quiet panic=-1 helio.disk=/dev/vda helio.disk_rate=50 helio.mem_mib=64 helio.mem_rate=1000"},
        "disks": ["data", "os"],
    });
    let (vm, _) = a.agent.vms.create(serde_json::from_value(spec)?).await?;
    println!(
        "   g1 boots at A ({}, 256 MiB, disks: data 64 MiB for its records, os {} of mixed content)",
        vm.accel.as_deref().unwrap_or("?"),
        human(s.os_size)
    );
    demo_watch::wait_acked(&a.serial(), 50, Duration::from_secs(120)).await?;
    println!("   the guest ticks every 10 ms and writes 50 checksummed records a second");
    Ok(())
}

/// B seeds both disks from A while the VM runs: the bulk moves ahead of the migration.
async fn preseed(a: &Site, b: &Site) -> anyhow::Result<()> {
    let started = Instant::now();
    let wan0 = a.wan_bytes();
    for d in ["os", "data"] {
        let spec = serde_json::json!({"kind": "seed", "disk": d, "from": a.addr()});
        let (job, _) = b
            .agent
            .jobs
            .create(serde_json::from_value(spec)?, None)
            .await?;
        loop {
            let j = b.agent.jobs.show(&job.id)?;
            match j.phase.as_str() {
                "done" => break,
                "failed" | "cancelled" => bail!("pre-seeding {d}: {}", j.error.unwrap_or_default()),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    println!(
        "   pre-seeded both disks to B ahead of the move: {} on the WAN in {:.1} s",
        human(a.wan_bytes() - wan0),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs one migration from `from` to `to`, printing its phases as they come.
async fn migrate(from: &Site, to: &Site, title: &str) -> anyhow::Result<agent::model::Migration> {
    println!("{title}");
    let spec = serde_json::json!({"vm": "g1", "to": to.addr(), "source_addr": from.addr()});
    let m = from
        .agent
        .migrations
        .create(serde_json::from_value(spec)?)
        .await?;
    let started = Instant::now();
    let mut phase = String::new();
    loop {
        let m = from.agent.migrations.show(&m.id)?;
        if m.phase != phase {
            phase = m.phase.clone();
            println!(
                "   {:>6.1} s  {:<24} {}",
                started.elapsed().as_secs_f64(),
                phase,
                m.phase_reason.clone().unwrap_or_default()
            );
        }
        match m.phase.as_str() {
            "completed" => return Ok(m),
            "failed" | "cancelled" => {
                bail!("the migration {}: {}", m.phase, m.error.unwrap_or_default())
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn report_move(m: &agent::model::Migration, wan: u64, gap: Duration, ticks_ok: bool) {
    let f = &m.figures;
    println!(
        "   WAN: {} both ways; QEMU's stream {}; downtime: QEMU {} ms, the guest's ticks stopped {} ms; tick sequence {}",
        human(wan),
        human(f["tunnel_bytes_sent"].as_u64().unwrap_or(0)),
        f["downtime_ms"],
        gap.as_millis(),
        if ticks_ok { "continuous" } else { "BROKEN" },
    );
}

/// Stops the VM and checks every record on A's image and on B's replica.
async fn verify(a: &Site, b: &Site, ticks_ok: bool) -> anyhow::Result<i32> {
    a.agent.vms.stop("g1").await?;
    let (_, acked) = demo_watch::console(&a.serial());
    let at_a = PathBuf::from(&a.agent.disks.show("data")?.spec.path);
    let at_b = b.agent.disks.store().replica("data")?.data_path().clone();
    let ra = agent::guest::check(&at_a)?;
    let rb = agent::guest::check(&at_b)?;
    println!("5. records on A's data disk: {} valid, {} corrupt, newest {} (last acknowledged by the guest: {acked})", ra.valid, ra.corrupt, ra.max_seq);
    println!(
        "   records on B's replica, frozen when g1 left: {} valid, {} corrupt, newest {}",
        rb.valid, rb.corrupt, rb.max_seq
    );
    let ok = ticks_ok && ra.corrupt == 0 && rb.corrupt == 0 && ra.max_seq >= acked && rb.valid > 0;
    println!(
        "{}",
        if ok {
            "demo OK: g1 went to B and came back, no tick skipped, no record lost"
        } else {
            "demo FAILED: see above"
        }
    );
    Ok(if ok { 0 } else { 1 })
}
