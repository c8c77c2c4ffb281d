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
    let opts = SyncOptions {
        seed: a.link.options(&a.disk.name, "helio-sync")?,
        until_converged: a.until_converged,
        max_dirty: parse_size(&a.max_dirty)?,
    };
    // The first round's plan is asked for while the store opens: the source spends that time
    // reading and hashing the round's chunks. Any failure here is met again, and reported, by
    // the round itself.
    let opening = {
        let disk = a.disk.clone();
        tokio::task::spawn_blocking(move || disk.open())
    };
    let early = async {
        let id = blockstore::Store::peek_id(&a.disk.store)?;
        client::sync::begin_round(&opts.seed.peer, &a.disk.name, id)
            .await
            .ok()
    };
    let (store, first) = tokio::join!(opening, early);
    let store = store.context("store opening task failed")??;
    tracing::debug!(store = %store.dir().display(), early = first.is_some(), "store open");
    store.replica(&a.disk.name)?;
    let (cancel, watcher) = super::cancel_on_interrupt();
    let report = client::sync::sync_from(&store, opts, first, cancel)
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
            round
                .dirty_rate
                .map_or("unknown ".to_string(), |r| human(r as u64)),
            human(round.transfer_rate as u64),
        );
    }
    println!(
        "{}: {} left dirty; {}",
        r.disk,
        r.remaining_dirty_bytes.map_or("unknown".to_string(), human),
        r.stopped
    );
}
