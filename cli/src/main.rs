//! `helio`: the heliotrope command. Each subcommand lives in its own module under `cmd/`.

mod cmd;
mod progress;
mod sample;
mod units;

use clap::{Parser, Subcommand};

/// Move virtual machines between datacenters over a WAN with almost no downtime.
#[derive(Parser)]
#[command(name = "helio", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve disks to destination agents (the replication source).
    Source(cmd::source::Args),
    /// Replicate a disk from a source agent into a local store (pre-seeding).
    Seed(cmd::seed::Args),
    /// Ship what the source wrote since the last round (incremental disk pre-copy).
    Sync(cmd::sync::Args),
    /// Serve a replica over NBD; with --from, absent chunks are fetched on demand.
    Export(cmd::export::Args),
    /// Report on a running export (present/absent bytes, copy rate, fetch latency), or with
    /// --agent on an agent (disks, replicas, VMs, jobs).
    Status(cmd::status::Args),
    /// Write a replica out as a raw (sparse) image.
    Materialize(cmd::materialize::Args),
    /// Re-hash a replica, optionally comparing it with an image; non-zero exit on any mismatch.
    Verify(cmd::verify::Args),
    /// Certificates for mutual TLS between agents.
    #[command(subcommand)]
    Pki(cmd::pki::Command),
    /// Emulate a WAN link (latency, bandwidth) in front of a TCP service.
    WanProxy(cmd::wan_proxy::Args),
    /// Generate a sample disk image (random, zero and text regions) for tests and benchmarks.
    SampleImage(cmd::sample_image::Args),
    /// Migrate a guest's memory and vCPU state (pre-copy, warm, post-copy), or model it.
    #[command(subcommand)]
    Memory(cmd::memory::Command),
    /// The per-host agent: every role, QEMU VMs, jobs, and the control API.
    Agent(cmd::agent::Args),
    /// An agent's VMs (through --agent).
    #[command(subcommand)]
    Vm(cmd::vm::Command),
    /// An agent's jobs (through --agent).
    #[command(subcommand)]
    Job(cmd::job::Command),
    /// Move a running VM to another agent (through --agent, the VM's agent).
    Migrate(cmd::migrate::Args),
    /// Plan where each VM of a fleet runs hour by hour (follow the sun), and why.
    Plan(cmd::plan::Args),
    /// Replay a fleet for days under the planner and its baselines (static, naive, oracle).
    Simulate(cmd::simulate::Args),
    /// What the planner predicts for one move of a fleet's VM: mode, time, downtime, bytes.
    Predict(cmd::predict::Args),
    /// Run the built-in demonstration end to end.
    Demo(cmd::demo::Args),
}

fn main() {
    let cli = Cli::parse();
    // The demo narrates on stdout; agents' routine logs (and the warnings its story provokes on
    // purpose, such as chunks written after a seed) would drown it. HELIO_LOG=warn shows them.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "error"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HELIO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("helio: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Source(a) => cmd::source::run(a).await,
            Command::Seed(a) => cmd::seed::run(a).await,
            Command::Sync(a) => cmd::sync::run(a).await,
            Command::Export(a) => cmd::export::run(a).await,
            Command::Status(a) => cmd::status::run(a).await,
            Command::Materialize(a) => cmd::materialize::run(a),
            Command::Verify(a) => cmd::verify::run(a),
            Command::Pki(c) => cmd::pki::run(c),
            Command::WanProxy(a) => cmd::wan_proxy::run(a).await,
            Command::SampleImage(a) => cmd::sample_image::run(a),
            Command::Memory(c) => cmd::memory::run(c).await,
            Command::Demo(a) => cmd::demo::run(a).await,
            Command::Agent(a) => cmd::agent::run(a).await,
            Command::Vm(c) => cmd::vm::run(c).await,
            Command::Job(c) => cmd::job::run(c).await,
            Command::Migrate(a) => cmd::migrate::run(a).await,
            Command::Plan(a) => cmd::plan::run(a).await,
            Command::Simulate(a) => cmd::simulate::run(a).await,
            Command::Predict(a) => cmd::predict::run(a).await,
        }
    });
    // Background tasks (accept loops, link pipes) must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("helio: {e:#}");
            std::process::exit(1);
        }
    }
}
