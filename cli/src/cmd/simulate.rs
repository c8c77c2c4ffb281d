//! `helio simulate`: replay a fleet for days under the planner and its baselines, and report
//! latency, link use against budgets, capacity, moves, business-hours bytes and violations.

use anyhow::Context;
use planner::sim::{simulate, SimReport, Strategy};
use std::path::PathBuf;

/// Arguments of `helio simulate`.
#[derive(clap::Args)]
pub struct Args {
    /// The fleet (TOML, or JSON).
    #[arg(long)]
    fleet: PathBuf,
    /// Days to simulate.
    #[arg(long, default_value_t = 7)]
    days: usize,
    /// Strategies, comma-separated: planner, static, naive, oracle.
    #[arg(long, default_value = "planner,static,naive,oracle")]
    strategy: String,
    /// The first hour (RFC 3339); default now.
    #[arg(long)]
    from: Option<String>,
    /// Seed of the noise on moves' times and bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write report.json (every strategy's full report) and report.html (plots and tables,
    /// one self-contained page) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let fleet = super::plan::load_fleet(&a.fleet)?;
    let from = super::plan::start_time(a.from.as_deref())?;
    let strategies: Vec<Strategy> = a
        .strategy
        .split(',')
        .map(|s| s.trim().parse::<Strategy>().map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let mut reports = Vec::new();
    for s in strategies {
        let f = fleet.clone();
        let (days, seed) = (a.days, a.seed);
        let r = tokio::task::spawn_blocking(move || simulate(&f, from, days, s, seed)).await??;
        reports.push(r);
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("report.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&reports)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
        let page = planner::sim::html(&reports).map_err(anyhow::Error::msg)?;
        let path = dir.join("report.html");
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        print_summary(&reports);
    }
    let planner_broke = reports
        .iter()
        .any(|r| r.strategy == "planner" && !r.violations.is_empty());
    Ok(if planner_broke { 3 } else { 0 })
}

fn print_summary(reports: &[SimReport]) {
    let base = reports
        .iter()
        .find(|r| r.strategy == "static")
        .map(|r| r.user_ms_h);
    let best = reports
        .iter()
        .find(|r| r.strategy == "oracle")
        .map(|r| r.user_ms_h);
    println!("strategy  avg latency  moves  WAN GB  business-hours GB  over budget GB  violations  share of oracle's gain  took");
    for r in reports {
        let users: f64 = r.latency_ms.iter().sum::<f64>() / r.latency_ms.len().max(1) as f64;
        let wan = (r.business_hours_bytes + r.off_hours_bytes) / 1e9;
        let over: f64 = r.links.iter().map(|l| l.over_budget_bytes).sum::<f64>() / 1e9;
        let share = match (base, best) {
            (Some(b), Some(o)) if b > o => format!("{:.0}%", 100.0 * (b - r.user_ms_h) / (b - o)),
            _ => "-".into(),
        };
        println!(
            "{:<9} {:>8.1} ms  {:>5}  {:>6.1}  {:>17.1}  {:>14.1}  {:>10}  {:>22}  {:.2} s",
            r.strategy,
            users,
            r.moves.len(),
            wan,
            r.business_hours_bytes / 1e9,
            over,
            r.violations.len(),
            share,
            r.elapsed_s
        );
    }
    for r in reports {
        for v in &r.violations {
            println!("{}: {v}", r.strategy);
        }
    }
}
