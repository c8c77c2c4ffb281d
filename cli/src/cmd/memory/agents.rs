//! The two memory migration agents: `helio memory source` runs a guest and migrates it;
//! `helio memory dest` receives one guest, resumes it and verifies it.

use super::guest_args::GuestArgs;
use crate::units::human;
use anyhow::{bail, Context};
use memory::engine::report::Report;
use memory::engine::{dest, source, MigrationSpec};
use protocol::Conn;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;
use wan::Rate;

/// Arguments of `helio memory source`.
#[derive(clap::Args)]
pub struct SourceArgs {
    /// The destination agent (HOST:PORT).
    #[arg(long)]
    connect: String,
    /// Mutual TLS material (cert.pem, key.pem, ca.pem); required off loopback.
    #[arg(long)]
    tls: Option<PathBuf>,
    /// The link's bandwidth, when known: for the prediction and to pace the post-copy push.
    #[arg(long)]
    bandwidth: Option<Rate>,
    #[command(flatten)]
    guest: GuestArgs,
    /// Print the report as one JSON object (the last line).
    #[arg(long)]
    json: bool,
}

/// Arguments of `helio memory dest`.
#[derive(clap::Args)]
pub struct DestArgs {
    /// Address to listen on; the bound address is printed as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Mutual TLS material; required off loopback.
    #[arg(long)]
    tls: Option<PathBuf>,
    /// Print the outcome as one JSON object (the last line).
    #[arg(long)]
    json: bool,
}

/// Whether the guest still writes: its counter advances within a short while.
fn still_running(guest: &dyn memory::Guest) -> bool {
    let before = guest.counter();
    std::thread::sleep(Duration::from_millis(200));
    guest.is_running() && guest.counter() > before
}

pub async fn source(a: SourceArgs) -> anyhow::Result<i32> {
    let workload = a.guest.workload()?;
    if a.tls.is_none() && !protocol::tls::is_loopback(&a.connect) {
        bail!(
            "{} is not on loopback: give --tls DIR (see `helio pki`)",
            a.connect
        );
    }
    let tls = super::super::tls_client(a.tls.as_deref())?;
    let backend = a.guest.backend;
    let started = std::time::Instant::now();
    let w = workload.clone();
    let mut guest = tokio::task::spawn_blocking(move || memory::guest::launch(backend, &w))
        .await?
        .with_context(|| format!("cannot start the {backend} guest"))?;
    eprintln!(
        "{backend} guest with {} filled its memory in {:.2} s",
        human(workload.memory_bytes),
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(a.guest.warmup).await;
    let spec = MigrationSpec {
        backend,
        workload,
        run_after_ms: a.guest.run_after.as_millis() as u64,
    };
    let opts = a.guest.options(a.bandwidth);
    let conn = protocol::connect(&a.connect, tls.as_ref(), "helio memory source").await;
    let mut report = match conn {
        Ok(conn) => source::migrate(guest.as_mut(), &spec, conn, &opts).await,
        Err(e) => Report {
            backend: backend.to_string(),
            mode: opts.mode.to_string(),
            memory_bytes: spec.workload.memory_bytes,
            outcome: "failed".into(),
            error: Some(format!("{e}; the guest keeps running at the source")),
            ..Report::default()
        },
    };
    if report.outcome != "migrated" {
        let g = guest.as_ref();
        report.source_guest_running = tokio::task::block_in_place(|| still_running(g));
    }
    let code = i32::from(!(report.outcome == "migrated" || report.outcome == "aborted"));
    super::super::print(a.json, &report, print_report)?;
    Ok(code)
}

pub fn print_report(r: &Report) {
    println!(
        "{} {} migration of {}: {}",
        r.backend,
        r.mode,
        human(r.memory_bytes),
        r.outcome
    );
    println!("round  kind           pages      wire   elapsed  dirty/s   MB/s  held  predicted");
    for x in &r.rounds {
        println!(
            "{:>5}  {:<13} {:>6} {:>9} {:>7.1}ms {:>8.0} {:>6.1} {:>5} {:>7.1}ms",
            x.round,
            x.kind,
            x.pages,
            human(x.bytes),
            x.elapsed_ms,
            x.dirty_rate,
            x.wire_bandwidth / 1e6,
            x.held_pages,
            x.predicted_downtime_ms
        );
    }
    println!(
        "downtime {:.1} ms, total {:.1} ms, {} on the wire, rtt {:.1} ms, converged: {}, policy: {}",
        r.downtime_ms,
        r.total_ms,
        human(r.wire_bytes),
        r.rtt_ms,
        r.converged,
        r.policy_applied
    );
    if let Some(p) = &r.predicted {
        println!(
            "model predicted: downtime {:.1} ms, total {:.1} ms, {} live rounds (d/r {:.2})",
            p.downtime_ms, p.total_ms, p.rounds, p.d_over_r
        );
    }
    if let Some(pc) = &r.postcopy {
        println!(
            "post-copy: {} faults (p50 {:?} ms, p99 {:?} ms), {} pages pushed",
            pc.faults, pc.fault_p50_ms, pc.fault_p99_ms, pc.pushed_pages
        );
    }
    let v = &r.verified;
    println!(
        "verified: {} (memory equal: {}, guest ran on: {}, counter {} -> {} -> {})",
        v.ok,
        v.memory_hash_equal,
        v.guest_ran_on,
        v.counter_at_pause,
        v.counter_at_resume,
        v.counter_after
    );
    if let Some(e) = &r.error {
        println!("error: {e}");
    }
}

pub async fn dest(a: DestArgs) -> anyhow::Result<i32> {
    // The agents' shared acceptor: plain TCP only on loopback, TLS handshake on accept.
    let acceptor =
        server::Acceptor::bind(&a.listen, super::super::tls_server(a.tls.as_deref())?).await?;
    println!("listening on {}", acceptor.local_addr()?);
    std::io::stdout().flush()?;
    let (tcp, peer) = acceptor.accept().await?;
    let Some(io) = acceptor.secure(tcp, peer).await else {
        bail!("TLS handshake with {peer} failed (see the log)");
    };
    let mut conn = Conn::new(io, peer.to_string());
    conn.server_hello("helio memory dest").await?;
    match dest::receive(conn).await {
        Ok(dest::Outcome::Migrated(r)) => {
            let ok = r.memory_hash_equal && r.guest_ran_on;
            super::super::print(a.json, &r, |r| {
                println!(
                    "guest received: memory equal to the source's at the pause: {}; ran on: {} (counter {} -> {})",
                    r.memory_hash_equal, r.guest_ran_on, r.counter_at_resume, r.counter_after
                );
            })?;
            Ok(i32::from(!ok))
        }
        Ok(dest::Outcome::Aborted(reason)) => {
            println!("the source aborted the migration: {reason}");
            Ok(0)
        }
        Err(e) => bail!("receiving the guest failed: {e}"),
    }
}
