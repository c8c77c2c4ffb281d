//! `helio seed`: pre-seed a disk from a source agent.

use crate::progress::bytes_bar;
use crate::units::{check_name, human};
use anyhow::Context;
use client::session::Peer;
use client::{SeedOptions, SeedProgress, SeedReport};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use wan::Rate;

/// Arguments of `helio seed`.
#[derive(clap::Args)]
pub struct Args {
    /// The source agent (HOST:PORT).
    #[arg(long)]
    from: String,
    /// The disk to seed.
    #[arg(long)]
    name: String,
    /// The destination store directory.
    #[arg(long)]
    store: PathBuf,
    /// Directory with cert.pem, key.pem and ca.pem (from `helio pki issue`).
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Cap on the WAN rate, e.g. 100Mbit, 1Gbit, 20MiB/s, 50MB/s.
    #[arg(long)]
    bandwidth: Option<Rate>,
    /// Parallel TCP connections.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Reconnection attempts per stream before giving up on the source.
    #[arg(long, default_value_t = 4)]
    retries: u32,
    /// Compress chunks on the wire: auto (on a WAN: 2 ms+ round trip or --bandwidth), always, never.
    #[arg(long, default_value = "auto")]
    compress: client::Compress,
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
    check_name(&a.name)?;
    if a.tls.is_none() && !protocol::tls::is_loopback(&a.from) {
        tracing::warn!(from = %a.from, "connecting without --tls to a non-loopback address: the source will most likely refuse, and nothing would be encrypted");
    }
    let tls = super::tls_client(a.tls.as_deref())?;
    let store = blockstore::Store::open(&a.store)
        .with_context(|| format!("cannot open store {}", a.store.display()))?;
    let opts = SeedOptions {
        peer: Peer {
            addr: a.from.clone(),
            tls,
            agent: "helio-seed".into(),
        },
        name: a.name.clone(),
        bandwidth: a.bandwidth,
        streams: a.streams.clamp(1, 64),
        retries: a.retries,
        compress: a.compress,
    };
    let cancel = CancellationToken::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            super::interrupted().await;
            cancel.cancel();
        })
    };
    let report = seed_with_progress(&store, opts, cancel).await;
    watcher.abort();
    let report = report?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
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
