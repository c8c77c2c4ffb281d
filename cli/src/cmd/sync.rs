//! `helio sync`: ship what the source wrote since the last round.

use crate::units::{human, parse_size};
use anyhow::Context;
use client::sync::{SyncOptions, SyncReport};

/// Arguments of `helio sync`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    link: super::args::SourceLink,
    /// The destination store (holding a seeded replica) and the disk.
    #[command(flatten)]
    disk: super::args::StoreDisk,
    /// Repeat rounds until at most --max-dirty is left (or the writer outpaces the link).
    #[arg(long)]
    until_converged: bool,
    /// Dirty bytes left at which the disk counts as converged.
    #[arg(long, default_value = "64MiB")]
    max_dirty: String,
    /// Print a JSON report as the last line of stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let store = a.disk.open()?;
    store.replica(&a.disk.name)?;
    tracing::debug!(store = %store.dir().display(), "store open");
    let opts = SyncOptions {
        seed: a.link.options(&a.disk.name, "helio-sync")?,
        until_converged: a.until_converged,
        max_dirty: parse_size(&a.max_dirty)?,
    };
    let (cancel, watcher) = super::cancel_on_interrupt();
    let report = client::sync::sync(&store, opts, cancel)
        .await
        .with_context(|| format!("syncing {:?} failed", a.disk.name));
    watcher.abort();
    super::print(a.json, &report?, print_report)
}

/// A human summary of sync rounds.
pub fn print_report(r: &SyncReport) {
    for (i, round) in r.rounds.iter().enumerate() {
        println!(
            "round {}: {} dirty ({} chunks), {} on the wire, {:.2} s; dirty rate {}/s, transfer rate {}/s",
            i + 1,
            human(round.dirty_bytes),
            round.chunks,
            human(round.wire_bytes),
            round.elapsed_s,
            human(round.dirty_rate as u64),
            human(round.transfer_rate as u64),
        );
    }
    println!(
        "{}: {} left dirty; {}",
        r.disk,
        human(r.remaining_dirty_bytes),
        r.stopped
    );
}
