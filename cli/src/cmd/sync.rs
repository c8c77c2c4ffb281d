//! `helio sync`: ship what the source wrote since the last round.

use crate::units::{check_name, human, parse_size};
use anyhow::Context;
use client::session::Peer;
use client::sync::{SyncOptions, SyncReport};
use client::SeedOptions;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use wan::Rate;

/// Arguments of `helio sync`.
#[derive(clap::Args)]
pub struct Args {
    /// The source agent (HOST:PORT).
    #[arg(long)]
    from: String,
    /// The disk.
    #[arg(long)]
    name: String,
    /// The destination store (holding a seeded replica).
    #[arg(long)]
    store: PathBuf,
    /// Directory with cert.pem, key.pem and ca.pem.
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Repeat rounds until at most --max-dirty is left (or the writer outpaces the link).
    #[arg(long)]
    until_converged: bool,
    /// Dirty bytes left at which the disk counts as converged.
    #[arg(long, default_value = "64MiB")]
    max_dirty: String,
    /// Cap on the WAN rate.
    #[arg(long)]
    bandwidth: Option<Rate>,
    /// Parallel TCP connections.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Compress chunks on the wire: auto, always, never.
    #[arg(long, default_value = "auto")]
    compress: client::Compress,
    /// Print a JSON report as the last line of stdout.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    check_name(&a.name)?;
    let store = blockstore::Store::open(&a.store)
        .with_context(|| format!("cannot open store {}", a.store.display()))?;
    store.replica(&a.name)?;
    let opts = SyncOptions {
        seed: SeedOptions {
            peer: Peer {
                addr: a.from.clone(),
                tls: super::tls_client(a.tls.as_deref())?,
                agent: "helio-sync".into(),
            },
            name: a.name.clone(),
            bandwidth: a.bandwidth,
            streams: a.streams.clamp(1, 64),
            retries: 4,
            compress: a.compress,
        },
        until_converged: a.until_converged,
        max_dirty: parse_size(&a.max_dirty)?,
    };
    let cancel = CancellationToken::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            super::interrupted().await;
            cancel.cancel();
        })
    };
    let report = client::sync::sync(&store, opts, cancel)
        .await
        .with_context(|| format!("syncing {:?} failed", a.name));
    watcher.abort();
    let report = report?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
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
