//! `helio agent`: the per-host agent (every role, VMs, jobs, the control API).

use agent::{Agent, Options};
use anyhow::{bail, Context};
use std::path::PathBuf;

/// Arguments of `helio agent`.
#[derive(clap::Args)]
pub struct Args {
    /// This agent's name (peers and the event log use it).
    #[arg(long)]
    name: String,
    /// Directory for the agent's state (RocksDB, VM files, sockets).
    #[arg(long)]
    state: PathBuf,
    /// The destination store (default: STATE/store).
    #[arg(long)]
    store: Option<PathBuf>,
    /// The replication listener (HOST:PORT); plain TCP only on loopback, else give --tls.
    #[arg(long)]
    listen: Option<String>,
    /// The control API: unix:PATH (mode 0600) or HOST:PORT (needs --tls; clients present
    /// operator or scheduler certificates). Repeat for several. Default: unix:STATE/api.sock.
    #[arg(long)]
    api: Vec<String>,
    /// Directory with cert.pem, key.pem and ca.pem (from `helio pki issue`).
    #[arg(long)]
    tls: Option<PathBuf>,
    /// A TOML file declaring disks, VMs and peers that must exist.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let opts = Options {
        name: a.name.clone(),
        state: a.state.clone(),
        store: a.store.clone(),
        listen: a.listen.clone(),
        tls: a.tls.clone(),
        config: a.config.clone(),
    };
    let agent = Agent::start(opts)
        .await
        .with_context(|| format!("agent {:?} could not start", a.name))?;
    let apis = if a.api.is_empty() {
        vec![format!("unix:{}", agent.dir.join("api.sock").display())]
    } else {
        a.api.clone()
    };
    let mut tasks = Vec::new();
    for api in &apis {
        if let Some(path) = api.strip_prefix("unix:") {
            let listener = agent::api::bind_unix(std::path::Path::new(path))
                .with_context(|| format!("cannot listen on --api {api}"))?;
            tasks.push(tokio::spawn(agent::api::serve_unix(
                agent.clone(),
                listener,
            )));
            println!("api on unix:{}", api.trim_start_matches("unix:"));
        } else {
            let Some(tls) = agent.tls.clone() else {
                bail!("--api {api} needs --tls: the TCP API is mutual TLS only (unix:PATH needs none)");
            };
            let listener = tokio::net::TcpListener::bind(api)
                .await
                .with_context(|| format!("cannot listen on --api {api}"))?;
            println!("api on https://{}", listener.local_addr()?);
            tasks.push(tokio::spawn(agent::api::serve_tls(
                agent.clone(),
                listener,
                tls,
            )));
        }
    }
    if let Some(l) = &agent.listen {
        // Scripts and tests wait for this line to learn the bound port.
        println!("listening on {l}");
    }
    let info = agent.info()?;
    println!(
        "agent {} ready: {} disks, {} VMs, {} jobs running; VMs use {} ({})",
        info.name, info.disks, info.vms, info.jobs_active, info.accel, info.accel_reason
    );
    super::interrupted().await;
    for t in tasks {
        t.abort();
    }
    // VMs keep running: QEMU outlives the agent, which re-adopts it at its next start.
    tracing::info!("agent stopped; its VMs keep running");
    Ok(0)
}
