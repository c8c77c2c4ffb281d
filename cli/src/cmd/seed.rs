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
    #[command(flatten)]
    disk: super::args::StoreDisk,
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
    let store = a.disk.open()?;
    let opts = a.link.options(&a.disk.name, "helio-seed")?;
    let (cancel, watcher) = super::cancel_on_interrupt();
    let report = seed_with_progress(&store, opts, cancel).await;
    watcher.abort();
    super::print(a.json, &report?, print_report)
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
