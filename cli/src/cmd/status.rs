//! `helio status`: what a running export reports.

use server::export::status::{self, Status};

/// Arguments of `helio status`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    disk: super::args::StoreDisk,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
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
