//! `helio memory demo`: a source and a destination process on this machine, joined by the
//! emulated WAN (and mutual TLS), migrate a guest; the source's report is printed.

use super::agents::print_report;
use super::guest_args::GuestArgs;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use wan::{Link, LinkSpec, Rate};

/// Arguments of `helio memory demo`.
#[derive(clap::Args, Clone)]
pub struct Args {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Emulated link bandwidth (each direction).
    #[arg(long, default_value = "1Gbit")]
    pub bandwidth: Rate,
    /// Emulated round-trip time.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub rtt: Duration,
    /// Plain TCP between the agents instead of mutual TLS.
    #[arg(long)]
    pub plain: bool,
    /// Cut the link this long after the migration starts (to see a failure handled).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cut_after: Option<Duration>,
    /// Working directory for certificates (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print the source's report as one JSON object (the last line).
    #[arg(long)]
    pub json: bool,
}

impl Args {
    /// The memory part of `helio demo`: a 128 MiB guest of `backend` over the disk demo's link.
    pub fn for_demo(
        backend: &str,
        rtt: Duration,
        bandwidth: Rate,
        dir: &Path,
    ) -> anyhow::Result<Args> {
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            args: Args,
        }
        std::fs::create_dir_all(dir)?;
        let parsed = <Wrap as clap::Parser>::try_parse_from([
            "demo".to_string(),
            format!("--backend={backend}"),
            "--memory=128MiB".into(),
            "--dirty-rate=5000".into(),
            format!("--rtt={}", humantime::format_duration(rtt)),
            format!("--bandwidth={}", bandwidth.bytes_per_sec()),
            format!("--dir={}", dir.display()),
        ])?;
        Ok(parsed.args)
    }
}

/// Runs the demo; returns the source's report and whether everything checked out.
pub async fn migrate(a: &Args) -> anyhow::Result<(memory::engine::report::Report, bool)> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("helio-memory-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    if !a.plain {
        super::super::pki::demo_pki(&dir.join("pki"))?;
    }
    let exe = std::env::current_exe().context("cannot find the helio binary")?;
    let mut dest = Command::new(&exe);
    dest.args(["memory", "dest", "--json", "--listen", "127.0.0.1:0"]);
    if !a.plain {
        dest.arg("--tls").arg(dir.join("pki").join("destination"));
    }
    // The agents' routine logs would drown the report; HELIO_LOG still wins when set.
    let log = std::env::var("HELIO_LOG").unwrap_or_else(|_| "warn".into());
    let mut dest = dest
        .env("HELIO_LOG", &log)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the destination agent")?;
    let mut dest_out = BufReader::new(dest.stdout.take().context("destination stdout")?);
    let mut line = String::new();
    dest_out.read_line(&mut line).await?;
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        bail!("the destination agent did not start: {line:?}");
    };
    let link = Link::start(
        "127.0.0.1:0",
        addr,
        LinkSpec {
            rtt: a.rtt,
            bandwidth: Some(a.bandwidth),
            corrupt_every: None,
        },
    )
    .await?;
    let mut source = Command::new(&exe);
    source
        .args(["memory", "source", "--json"])
        .arg(format!("--connect=localhost:{}", link.local_addr().port()))
        .arg(format!("--bandwidth={}", a.bandwidth.bytes_per_sec()))
        .args(a.guest.to_flags());
    if !a.plain {
        source.arg("--tls").arg(dir.join("pki").join("source"));
    }
    let mut source = source
        .env("HELIO_LOG", &log)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the source agent")?;
    let mut source_out = source.stdout.take().context("source stdout")?;
    if let Some(after) = a.cut_after {
        // The source first fills its guest; cut once the migration has had `after` to run.
        let before = link.stats().connections;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while link.stats().connections == before && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(after).await;
        link.set_up(false);
    }
    let mut out = String::new();
    source_out.read_to_string(&mut out).await?;
    let status = source.wait().await?;
    let dest_status = tokio::time::timeout(Duration::from_secs(30), dest.wait()).await;
    let last = out.lines().last().unwrap_or_default();
    let report: memory::engine::report::Report = serde_json::from_str(last)
        .with_context(|| format!("the source agent ({status}) printed no report: {out:?}"))?;
    let dest_ok = matches!(dest_status, Ok(Ok(s)) if s.success());
    let ok = status.success() && (report.outcome == "aborted" || (report.verified.ok && dest_ok));
    Ok((report, ok))
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let (report, ok) = migrate(&a).await?;
    super::super::print(a.json, &report, print_report)?;
    Ok(i32::from(!ok))
}
