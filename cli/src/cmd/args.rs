//! Option groups shared by several subcommands (flattened into their arguments).

use anyhow::Context;
use client::session::Peer;
use client::SeedOptions;
use std::path::PathBuf;
use wan::Rate;

/// A disk in a destination store: `--store DIR --name NAME`.
#[derive(clap::Args, Clone)]
pub struct StoreDisk {
    /// The destination store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// The disk.
    #[arg(long)]
    pub name: String,
}

impl StoreDisk {
    /// Checks the name and opens the store.
    pub fn open(&self) -> anyhow::Result<blockstore::Store> {
        crate::units::check_name(&self.name)?;
        blockstore::Store::open(&self.store)
            .with_context(|| format!("cannot open store {}", self.store.display()))
    }
}

/// How a destination reaches its source and uses the link (`helio seed`, `helio sync`).
#[derive(clap::Args)]
pub struct SourceLink {
    /// The source agent (HOST:PORT).
    #[arg(long)]
    pub from: String,
    /// Directory with cert.pem, key.pem and ca.pem (from `helio pki issue`).
    #[arg(long)]
    pub tls: Option<PathBuf>,
    /// Cap on the WAN rate, e.g. 100Mbit, 1Gbit, 20MiB/s, 50MB/s.
    #[arg(long)]
    pub bandwidth: Option<Rate>,
    /// Parallel TCP connections.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Reconnection attempts per stream before giving up on the source.
    #[arg(long, default_value_t = 4)]
    pub retries: u32,
    /// Compress chunks on the wire: auto (on a WAN: 2 ms+ round trip or --bandwidth), always, never.
    #[arg(long, default_value = "auto")]
    pub compress: client::Compress,
    /// How long the source may stay silent while an answer is due (a blackholed link, a hung
    /// source) before the command fails; what was transferred is kept.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

impl SourceLink {
    /// The transfer options for disk `name`, as agent `agent`.
    pub fn options(&self, name: &str, agent: &str) -> anyhow::Result<SeedOptions> {
        if self.tls.is_none() && !protocol::tls::is_loopback(&self.from) {
            tracing::warn!(from = %self.from, "connecting without --tls to a non-loopback address: the source will most likely refuse, and nothing would be encrypted");
        }
        Ok(SeedOptions {
            peer: Peer {
                addr: self.from.clone(),
                tls: super::tls_client(self.tls.as_deref())?,
                agent: agent.into(),
                timeout: self.timeout,
            },
            name: name.to_string(),
            bandwidth: self.bandwidth,
            streams: self.streams.clamp(1, 64),
            retries: self.retries,
            compress: self.compress,
        })
    }
}
