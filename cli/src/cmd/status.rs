//! `helio status`: what a running export reports.

use crate::units::human;
use server::export::status::{self, Status};

/// `helio status` of an export: the store and disk.
struct Plain {
    disk: super::args::StoreDisk,
    json: bool,
}

/// Arguments of `helio status`.
#[derive(clap::Args)]
pub struct Args {
    /// The store of a running `helio export`.
    #[arg(long, required_unless_present = "agent")]
    store: Option<std::path::PathBuf>,
    /// The exported disk.
    #[arg(long, required_unless_present = "agent")]
    name: Option<String>,
    /// Instead: an agent's status (unix:PATH or https://HOST:PORT): its disks, replicas, VMs
    /// and jobs.
    #[arg(long, env = "HELIO_AGENT")]
    agent: Option<String>,
    /// With an https --agent: a directory with an operator or scheduler certificate.
    #[arg(long = "api-tls", env = "HELIO_AGENT_TLS")]
    api_tls: Option<std::path::PathBuf>,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

/// `helio status --agent`: everything the agent holds, in one object or a few lines.
pub async fn agent_status(a: &Args, url: &str) -> anyhow::Result<i32> {
    let client = super::remote::client(url, a.api_tls.as_deref())?;
    let mut all = serde_json::Map::new();
    for (key, path) in [
        ("agent", "/v1/agent"),
        ("disks", "/v1/disks"),
        ("replicas", "/v1/replicas"),
        ("vms", "/v1/vms"),
        ("jobs", "/v1/jobs"),
    ] {
        all.insert(key.into(), client.get(path).await?);
    }
    if a.json {
        println!("{}", serde_json::Value::Object(all));
        return Ok(0);
    }
    let info = &all["agent"];
    println!(
        "agent {} ({}), replication on {}, VMs use {}",
        info["name"].as_str().unwrap_or("?"),
        info["version"].as_str().unwrap_or("?"),
        info["listen"].as_str().unwrap_or("-"),
        info["accel"].as_str().unwrap_or("?"),
    );
    for d in all["disks"].as_array().into_iter().flatten() {
        println!(
            "  disk {:<16} {:>10} {}{}",
            d["spec"]["name"].as_str().unwrap_or("?"),
            human(d["size"].as_u64().unwrap_or(0)),
            d["spec"]["path"].as_str().unwrap_or("?"),
            d["attached_to"]
                .as_str()
                .map(|v| format!(" (VM {v})"))
                .unwrap_or_default()
        );
    }
    for r in all["replicas"].as_array().into_iter().flatten() {
        println!(
            "  replica {:<13} {}/{} chunks present{}",
            r["name"].as_str().unwrap_or("?"),
            r["chunks_present"],
            r["chunks"],
            if r["seeded"] == true { ", seeded" } else { "" }
        );
    }
    for v in all["vms"].as_array().into_iter().flatten() {
        println!(
            "  vm {:<18} {} (QEMU {})",
            v["spec"]["name"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            v["qemu_status"].as_str().unwrap_or("-")
        );
    }
    let jobs = all["jobs"].as_array().cloned().unwrap_or_default();
    let active: Vec<_> = jobs
        .iter()
        .filter(|j| !matches!(j["phase"].as_str(), Some("done" | "failed" | "cancelled")))
        .collect();
    println!("  jobs: {} in all, {} active", jobs.len(), active.len());
    for j in active {
        print!("  ");
        super::job::line(j);
    }
    Ok(0)
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    if let Some(url) = &a.agent {
        return agent_status(&a, url).await;
    }
    let disk = super::args::StoreDisk {
        // Invariant: clap requires both without --agent.
        store: a.store.clone().unwrap_or_default(),
        name: a.name.clone().unwrap_or_default(),
    };
    let a = Plain { disk, json: a.json };
    let path = status::path(&a.disk.store, &a.disk.name);
    let raw = std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "no status for {:?} in {} ({e}): is `helio export` running for it?",
            a.disk.name,
            a.disk.store.display()
        )
    })?;
    let s: Status = serde_json::from_slice(&raw)
        .map_err(|e| anyhow::anyhow!("status file {} is unreadable: {e}", path.display()))?;
    let running = nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), None).is_ok();
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        v["running"] = serde_json::Value::Bool(running);
        println!("{v}");
        return Ok(0);
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{} ({}) on {}{}",
        s.disk,
        if running {
            "running"
        } else {
            "not running: last report"
        },
        s.nbd,
        s.source
            .as_ref()
            .map(|x| format!(" from {x}"))
            .unwrap_or_default()
    );
    println!(
        "  present {:.1} MiB, absent {:.1} MiB, written locally {:.1} MiB of {:.1} MiB",
        mib(s.present_bytes),
        mib(s.absent_bytes),
        mib(s.written_bytes),
        mib(s.size_bytes)
    );
    println!(
        "  background {:.1} MiB/s, ETA {}; on-demand fetches {} (mean {:.1} ms, p50 {:.1} ms, p99 {:.1} ms); complete: {}",
        s.background_rate / 1048576.0,
        s.eta_s.map_or("-".to_string(), |e| format!("{e:.0} s")),
        s.on_demand_fetches,
        s.on_demand_mean_ms,
        s.on_demand_p50_ms,
        s.on_demand_p99_ms,
        s.complete
    );
    if let Some(why) = &s.failed {
        println!("  FAILED, acknowledging no writes or flushes until restarted: {why}");
        return Ok(1);
    }
    Ok(0)
}
