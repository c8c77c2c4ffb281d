//! `helio migrate`: move a running VM to another agent, through its agent (`--agent`).

use super::remote::{show, AgentArg};

/// Arguments of `helio migrate`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    agent: AgentArg,
    /// The VM (running on --agent).
    vm: String,
    /// The destination agent: a peer's name or HOST:PORT of its replication listener.
    #[arg(long)]
    to: String,
    /// `shared`: both hosts reach the VM's disks; only memory and device state move.
    #[arg(long)]
    disk: Option<String>,
    /// QEMU's downtime limit in milliseconds (default 300).
    #[arg(long)]
    max_downtime_ms: Option<u64>,
    /// Cap on the migration stream, e.g. 200Mbit.
    #[arg(long)]
    bandwidth: Option<String>,
    /// `live` (default), `warm` (paused for the whole transfer) or `postcopy` (runs at the
    /// destination after the first pass; missing pages come on demand).
    #[arg(long)]
    mode: Option<String>,
    /// Start no earlier than this time (RFC 3339).
    #[arg(long)]
    not_before: Option<String>,
    /// Finish by this time (RFC 3339): disk jobs are paced to the window; a window too short
    /// is said at checking.
    #[arg(long)]
    deadline: Option<String>,
    /// Parallel streams for the memory (QEMU multifd channels, 2 to 16).
    #[arg(long)]
    streams: Option<u32>,
    /// When pre-copy stops converging: `throttle` (default), `postcopy` or `abort`.
    #[arg(long)]
    on_diverge: Option<String>,
    /// Check and predict only: prerequisites at the destination, the VM's dirty rate, and the
    /// d/r model's verdict, downtime, time and WAN bytes; nothing moves.
    #[arg(long)]
    dry_run: bool,
    /// Follow the migration to its end (exit 0 when completed).
    #[arg(long)]
    watch: bool,
    /// Print JSON (with --watch: the final migration).
    #[arg(long)]
    json: bool,
}

fn line(m: &serde_json::Value) {
    println!(
        "{} {} -> {}: {}{}{}",
        m["id"].as_str().unwrap_or("?"),
        m["spec"]["vm"].as_str().unwrap_or("?"),
        m["spec"]["to"].as_str().unwrap_or("?"),
        m["phase"].as_str().unwrap_or("?"),
        m["phase_reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        m["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default(),
    );
}

fn prediction(m: &serde_json::Value) {
    let Some(p) = m["figures"].get("prediction") else {
        return;
    };
    let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
    println!(
        "  prediction: {}, d/r {:.2}, downtime {:.0} ms, total {:.1} s, {} WAN bytes (dirty rate {:.1} MiB/s, RTT {:.1} ms)",
        p["verdict"].as_str().unwrap_or("?"),
        f("d_over_r"),
        f("downtime_ms"),
        f("total_ms") / 1000.0,
        p["wan_bytes"],
        f("dirty_rate_mib_s"),
        f("rtt_ms"),
    );
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let client = a.agent.client()?;
    let spec = serde_json::json!({
        "vm": a.vm, "to": a.to, "disk": a.disk,
        "max_downtime_ms": a.max_downtime_ms, "bandwidth": a.bandwidth, "dry_run": a.dry_run,
        "mode": a.mode, "on_diverge": a.on_diverge, "streams": a.streams,
        "not_before": a.not_before, "deadline": a.deadline,
    });
    let (_, m) = client
        .call("POST", "/v1/migrations", Some(&spec), &[])
        .await?;
    let id = m["id"].as_str().unwrap_or_default().to_string();
    if !a.watch || a.dry_run {
        if a.json {
            show(&m, true)
        } else {
            line(&m);
            prediction(&m);
        }
        return Ok(if m["phase"] == "failed" { 1 } else { 0 });
    }
    let ended = |p: &str| matches!(p, "completed" | "failed" | "cancelled");
    let mut phase = m["phase"].as_str().unwrap_or("").to_string();
    if !a.json {
        line(&m);
    }
    client
        .events(0, |e| {
            if e.object != id || e.kind != "migration.phase" {
                return true;
            }
            phase = e.data["phase"].as_str().unwrap_or("").to_string();
            if !a.json {
                println!("  {phase}: {}", e.data["reason"].as_str().unwrap_or(""));
            }
            !ended(&phase)
        })
        .await?;
    let m = client.get(&format!("/v1/migrations/{id}")).await?;
    if a.json {
        show(&m, true);
    } else {
        line(&m);
        let f = &m["figures"];
        if m["phase"] == "completed" {
            println!(
                "  downtime {} ms (QEMU), total {} ms, {} bytes through the tunnel",
                f["downtime_ms"], f["total_time_ms"], f["tunnel_bytes_sent"]
            );
        }
    }
    Ok(if m["phase"] == "completed" { 0 } else { 1 })
}
