//! `helio plan`: where each VM of a fleet should run hour by hour, the moves that get it there
//! (each seed and migration with its window and predictions), and why.

use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `helio plan`.
#[derive(clap::Args)]
pub struct Args {
    /// The fleet: sites, links, user regions, VMs (TOML, or JSON).
    #[arg(long)]
    fleet: PathBuf,
    /// The plan's first hour (RFC 3339, rounded down to the hour); default now.
    #[arg(long)]
    from: Option<String>,
    /// Hours to plan.
    #[arg(long, default_value_t = 24)]
    hours: usize,
    /// Print the plan (with --execute: the final report) as JSON.
    #[arg(long)]
    json: bool,
    /// Carry the plan out through the sites' agents (each site's `agent`): seeds and
    /// migrations created as their windows open, followed, and the plan made again when a
    /// move fails, is late or slow, or a VM's measured dirty rate departs from the fleet's.
    #[arg(long)]
    execute: bool,
    /// With --execute: print the calls it would make, and when, without making them.
    #[arg(long, requires = "execute")]
    dry_run: bool,
    /// With --execute: plan seconds per wall second (e.g. 360: an hour of the plan in 10 s),
    /// to try a day in minutes.
    #[arg(long, default_value_t = 1.0, requires = "execute")]
    clock_scale: f64,
    /// With https agents: a directory with a scheduler or operator certificate (cert.pem,
    /// key.pem, ca.pem).
    #[arg(long = "api-tls", env = "HELIO_AGENT_TLS")]
    api_tls: Option<PathBuf>,
}

/// The fleet file, read and checked.
pub fn load_fleet(path: &std::path::Path) -> anyhow::Result<planner::Fleet> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the fleet file {}", path.display()))?;
    planner::Fleet::parse(&text).with_context(|| format!("fleet file {}", path.display()))
}

/// `--from`: an RFC 3339 time, or now.
pub fn start_time(from: Option<&str>) -> anyhow::Result<jiff::Timestamp> {
    match from {
        Some(t) => t.parse::<jiff::Timestamp>().with_context(|| {
            format!("--from {t:?}: give an RFC 3339 time, e.g. 2026-12-03T00:00:00Z")
        }),
        None => Ok(jiff::Timestamp::now()),
    }
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let fleet = load_fleet(&a.fleet)?;
    let from = start_time(a.from.as_deref())?;
    if a.execute {
        if !(a.clock_scale.is_finite() && a.clock_scale > 0.0) {
            anyhow::bail!(
                "--clock-scale {}: give a positive number of plan seconds per wall second",
                a.clock_scale
            );
        }
        let o = super::execute::Options {
            clock_scale: a.clock_scale,
            dry_run: a.dry_run,
            json: a.json,
            hours: a.hours,
            api_tls: a.api_tls,
        };
        return super::execute::execute(fleet, from, o).await;
    }
    let started = std::time::Instant::now();
    let plan = planner::plan(&fleet, from, a.hours)?;
    tracing::info!(
        vms = fleet.vms.len(),
        sites = fleet.sites.len(),
        hours = a.hours,
        ms = started.elapsed().as_millis() as u64,
        "planned"
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print_plan(&plan);
    }
    Ok(if plan.violations.is_empty() { 0 } else { 3 })
}

fn print_plan(p: &planner::Plan) {
    let t = &p.totals;
    println!(
        "plan from {} for {} h: {} moves ({} VM moves), {:.1} GB over the WAN ({:.1} GB in business hours)",
        p.from,
        p.hours,
        t.moves,
        t.vm_moves,
        t.wan_bytes / 1e9,
        t.business_hours_bytes / 1e9
    );
    let saved = t.user_ms_h_static - t.user_ms_h_planned;
    let pct = if t.user_ms_h_static > 0.0 {
        100.0 * saved / t.user_ms_h_static
    } else {
        0.0
    };
    println!(
        "users' latency: {:.0} user-ms·h without moves, {:.0} with the plan ({pct:.0}% less)",
        t.user_ms_h_static, t.user_ms_h_planned
    );
    for m in &p.moves {
        println!("\n- {}", m.why);
        if let Some(s) = &m.seed {
            println!(
                "  seed {}: {} to {} (at most {:.0} Mbit/s)",
                m.vms.join(", "),
                s.not_before,
                s.deadline,
                s.bandwidth_bps / 1e6
            );
        }
        println!(
            "  migrate {} to {}: not before {}, deadline {} ({}, max downtime {:.0} ms, at most {:.0} Mbit/s)",
            m.vms.join(", "),
            m.to,
            m.migration.not_before,
            m.migration.deadline,
            m.migration.mode,
            m.migration.max_downtime_ms,
            m.migration.bandwidth_bps / 1e6
        );
    }
    if !p.left_out.is_empty() {
        println!("\nleft out:");
        for l in &p.left_out {
            println!("- [{}] {}", l.reason, l.why);
        }
    }
    for v in &p.violations {
        println!("VIOLATION: {v}");
    }
}
