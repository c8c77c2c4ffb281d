//! `helio export`: serve a replica over NBD, filling it from a source when `--from` is given.

use anyhow::Context;
use client::session::Peer;
use server::export::{status, ExportOptions, Exported, ReplicaDevice};
use server::nbd::handshake::Export;
use server::nbd::listener::{NbdAddr, NbdListener};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use wan::Rate;

/// Arguments of `helio export`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    disk: super::args::StoreDisk,
    /// Where to serve: unix:PATH (mode 0600) or HOST:PORT (off loopback only with --tls).
    #[arg(long)]
    nbd: NbdAddr,
    /// Source agent to fetch absent chunks from (HOST:PORT).
    #[arg(long)]
    from: Option<String>,
    /// Directory with cert.pem, key.pem, ca.pem: for the source, and NBD STARTTLS on TCP.
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Cap on the background copier's rate, e.g. 1Gbit.
    #[arg(long)]
    bandwidth: Option<Rate>,
    /// Refuse writes.
    #[arg(long)]
    readonly: bool,
    /// How long reads of absent chunks retry an unreachable source before failing with EIO.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    fetch_timeout: Duration,
    /// Compress chunks from the source: auto (on a WAN), always, never.
    #[arg(long, default_value = "auto")]
    compress: client::Compress,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let store = a.disk.open()?;
    let peer = match &a.from {
        None => None,
        Some(addr) => Some(Peer {
            addr: addr.clone(),
            tls: super::tls_client(a.tls.as_deref())?,
            agent: "helio-export".into(),
            // A source silent this long while chunks are due is dropped and dialed again.
            timeout: a.fetch_timeout,
        }),
    };
    let compress = match (a.compress, &peer) {
        (client::Compress::Always, _) => true,
        (client::Compress::Never, _) | (_, None) => false,
        (client::Compress::Auto, Some(p)) => {
            let (mut conn, _) = p.open(&a.disk.name).await?;
            a.bandwidth.is_some()
                || client::session::round_trip(&mut conn).await? >= client::seed::WAN_RTT
        }
    };
    let opts = ExportOptions {
        read_only: a.readonly,
        fetch_timeout: a.fetch_timeout,
        bandwidth: a.bandwidth,
        compress,
    };
    let dev = ReplicaDevice::open(&store, &a.disk.name, peer, &opts)
        .await
        .with_context(|| format!("cannot export {:?}", a.disk.name))?;
    let tls = match (&a.nbd, &a.tls) {
        (NbdAddr::Tcp(_), Some(dir)) => super::tls_server(Some(dir))?,
        _ => None,
    };
    let listener = NbdListener::bind(&a.nbd, tls.is_some()).await?;
    let where_ = listener.describe();
    let exports = vec![Export {
        name: a.disk.name.clone(),
        device: Arc::new(Exported(dev.clone())),
    }];
    let serve = tokio::spawn(listener.run(exports, tls));
    let copier = tokio::spawn(dev.clone().background_copy());
    // Published before "listening on", so `helio status` works as soon as clients can connect.
    status::write(&a.disk.store, &dev.status(&where_, 0.0))
        .with_context(|| format!("cannot write the status file in {}", a.disk.store.display()))?;
    let status_task = tokio::spawn(publish_status(
        dev.clone(),
        a.disk.store.clone(),
        where_.clone(),
    ));
    tracing::info!(disk = %a.disk.name, nbd = %where_, absent_chunks = dev.absent_chunks(), source = a.from.as_deref().unwrap_or("-"), "exporting");
    println!("listening on {where_}");
    super::interrupted().await;
    serve.abort();
    copier.abort();
    status_task.abort();
    let d = dev.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || d.sync()).await {
        tracing::error!(disk = %a.disk.name, error = %e, "final sync failed");
    }
    let _ = std::fs::write(
        status::path(&a.disk.store, &a.disk.name),
        serde_json::to_vec(&dev.status(&where_, 0.0))?,
    );
    tracing::info!(disk = %a.disk.name, "export stopped");
    Ok(0)
}

async fn publish_status(dev: Arc<ReplicaDevice>, store: PathBuf, nbd: String) {
    let mut last = (
        std::time::Instant::now(),
        dev.stats.background_bytes.load(Ordering::Relaxed),
    );
    let mut rate = 0.0;
    loop {
        let now = (
            std::time::Instant::now(),
            dev.stats.background_bytes.load(Ordering::Relaxed),
        );
        let inst = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64().max(1e-3);
        // Smoothed over a few seconds so the ETA does not jump.
        rate = if rate == 0.0 {
            inst
        } else {
            rate * 0.7 + inst * 0.3
        };
        last = now;
        let s = dev.status(&nbd, rate);
        if let Err(e) = status::write(&store, &s) {
            tracing::warn!(error = %e, "cannot write the status file");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
