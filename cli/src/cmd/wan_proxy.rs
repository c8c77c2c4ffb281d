//! `helio wan-proxy`: put an emulated WAN link in front of a TCP service.

use std::time::Duration;
use wan::{Link, LinkSpec, Rate};

/// Arguments of `helio wan-proxy`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (HOST:PORT).
    #[arg(long)]
    listen: String,
    /// Address to forward to (HOST:PORT).
    #[arg(long)]
    to: String,
    /// Round-trip time added (half in each direction), e.g. 80ms.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    rtt: Duration,
    /// Bandwidth of each direction, e.g. 100Mbit; unlimited if absent.
    #[arg(long)]
    bandwidth: Option<Rate>,
    /// Another route over the same link, LISTEN=TARGET (repeatable): its connections share the
    /// link's bandwidth and delay, as two services at one site behind one WAN do.
    #[arg(long = "route", value_name = "LISTEN=TARGET", value_parser = parse_route)]
    routes: Vec<(String, String)>,
    /// Flip one byte per N bytes towards the client, on average (to test corruption handling).
    #[arg(long, hide = true)]
    corrupt_every: Option<u64>,
    /// Blackhole the link while this file exists (connections stay up, nothing crosses):
    /// to test how peers handle a dead route.
    #[arg(long, value_name = "FILE")]
    blackhole_while: Option<std::path::PathBuf>,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let spec = LinkSpec {
        rtt: a.rtt,
        bandwidth: a.bandwidth,
        corrupt_every: a.corrupt_every,
    };
    let link = Link::start(&a.listen, &a.to, spec).await?;
    println!("listening on {}", link.local_addr());
    for (listen, to) in &a.routes {
        let addr = link
            .add_route(listen, to)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {listen} for the route to {to}: {e}"))?;
        println!("listening on {addr} (to {to})");
    }
    tracing::info!(
        to = %a.to, rtt = ?a.rtt,
        bandwidth = %a.bandwidth.map_or("unlimited".to_string(), |r| r.to_string()),
        "emulating WAN link"
    );
    match &a.blackhole_while {
        None => super::interrupted().await,
        Some(file) => tokio::select! {
            _ = super::interrupted() => {}
            _ = follow_blackhole(&link, file) => {}
        },
    }
    let s = link.stats();
    tracing::info!(
        to_target = s.to_target,
        to_client = s.to_client,
        connections = s.connections,
        "link stopped"
    );
    Ok(0)
}

fn parse_route(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((l, t)) if !l.is_empty() && !t.is_empty() => Ok((l.to_string(), t.to_string())),
        _ => Err(format!(
            "route {s:?}: write LISTEN=TARGET, e.g. 127.0.0.1:0=127.0.0.1:10809"
        )),
    }
}

/// Blackholes `link` while `file` exists, checked every 50 ms; never returns.
async fn follow_blackhole(link: &Link, file: &std::path::Path) {
    let mut was = false;
    loop {
        let now = file.exists();
        if now != was {
            link.set_blackhole(now);
            tracing::info!(blackholed = now, "link state changed");
            was = now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
