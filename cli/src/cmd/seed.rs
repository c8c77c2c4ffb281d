//! `helio seed`: pre-seed a disk from a source agent.

use crate::progress::bytes_bar;
use crate::units::human;
use anyhow::Context;
use client::{SeedOptions, SeedProgress, SeedReport};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Arguments of `helio seed`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    link: super::args::SourceLink,
    /// The destination store directory (not with --agent: the agent's store is used).
    #[arg(long, required_unless_present = "agent")]
    store: Option<std::path::PathBuf>,
    /// The disk.
    #[arg(long)]
    name: String,
    /// Run the seed as a job of this agent (unix:PATH or https://HOST:PORT) and follow it;
    /// --from is then the source as the agent reaches it (HOST:PORT or a peer's name).
    #[arg(long, env = "HELIO_AGENT")]
    agent: Option<String>,
    /// With an https --agent: a directory with an operator or scheduler certificate.
    #[arg(long = "api-tls", env = "HELIO_AGENT_TLS")]
    api_tls: Option<std::path::PathBuf>,
    /// A name for the agent's job: running the command again returns that job instead of
    /// starting another.
    #[arg(long)]
    job_name: Option<String>,
    /// Print a JSON report as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Runs one seed with a progress bar; shared with the demo.
pub async fn seed_with_progress(
    store: &blockstore::Store,
    opts: SeedOptions,
    cancel: CancellationToken,
) -> anyhow::Result<SeedReport> {
    let progress = Arc::new(SeedProgress::default());
    let bar = bytes_bar(0, "seed");
    bar.set_message(opts.name.clone());
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                bar.set_length(progress.logical_total.load(Ordering::Relaxed));
                bar.set_position(progress.logical_done.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "wire {}",
                    human(progress.wire_bytes.load(Ordering::Relaxed))
                ));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    let name = opts.name.clone();
    let result = client::seed(store, opts, progress, cancel).await;
    ticker.abort();
    bar.finish_and_clear();
    result.with_context(|| format!("seeding {name:?} failed"))
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    if let Some(url) = &a.agent {
        return through_agent(&a, url).await;
    }
    let disk = super::args::StoreDisk {
        // Invariant: clap requires --store without --agent.
        store: a.store.clone().unwrap_or_default(),
        name: a.name.clone(),
    };
    let store = disk.open()?;
    let opts = a.link.options(&disk.name, "helio-seed")?;
    let (cancel, watcher) = super::cancel_on_interrupt();
    let report = seed_with_progress(&store, opts, cancel).await;
    watcher.abort();
    super::print(a.json, &report?, print_report)
}

/// `helio seed --agent`: a seed job on the agent, followed to its end.
async fn through_agent(a: &Args, url: &str) -> anyhow::Result<i32> {
    let client = super::remote::client(url, a.api_tls.as_deref())?;
    let spec = serde_json::json!({
        "kind": "seed",
        "disk": a.name,
        "from": a.link.from,
        "name": a.job_name,
        "bandwidth": a.link.bandwidth.map(|b| b.to_string()),
        "streams": a.link.streams,
    });
    let (status, job) = client.call("POST", "/v1/jobs", Some(&spec), &[]).await?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    if !a.json {
        println!(
            "{} {id} on the agent",
            if status == 201 {
                "started"
            } else {
                "following existing job"
            }
        );
    }
    let done = super::job::watch(&client, &id).await?;
    if a.json {
        println!("{}", client.get(&format!("/v1/jobs/{id}")).await?);
    }
    Ok(if done { 0 } else { 1 })
}

/// A human summary of a seed.
pub fn print_report(r: &SeedReport) {
    let rate = r.logical_bytes as f64 / r.elapsed_s.max(1e-9);
    println!(
        "seeded {}: {} logical, {} on the wire ({:.1}%), {} chunks: {} fetched, {} deduplicated, {} zero, {} already present; {:.1} s, {}/s logical",
        r.disk,
        human(r.logical_bytes),
        human(r.wire_bytes),
        100.0 * r.wire_bytes as f64 / r.logical_bytes.max(1) as f64,
        r.chunks_total,
        r.chunks_fetched,
        r.chunks_deduplicated,
        r.chunks_zero,
        r.chunks_present,
        r.elapsed_s,
        human(rate as u64),
    );
    if r.chunks_refetched > 0 {
        println!(
            "  {} chunks failed verification in transit and were fetched again",
            r.chunks_refetched
        );
    }
    if r.chunks_changed > 0 {
        println!(
            "  {} chunks changed at the source during the seed; run `helio sync` to catch up",
            r.chunks_changed
        );
    }
}
