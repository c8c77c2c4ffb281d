//! `helio vm`: an agent's VMs (real QEMU).

use super::remote::{show, AgentArg, ListArgs};
use anyhow::Context;
use std::path::PathBuf;

/// `helio vm` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a VM (and start it unless --no-start).
    Create(CreateArgs),
    /// Start a VM.
    Start(NameArgs),
    /// Stop a VM (QMP quit; SIGKILL after 10 s).
    Stop(NameArgs),
    /// Delete a stopped VM (its disks stay).
    Delete(NameArgs),
    /// List VMs.
    List(ListArgs),
    /// Show one VM.
    Show(NameArgs),
}

/// A VM by name.
#[derive(clap::Args)]
pub struct NameArgs {
    #[command(flatten)]
    agent: AgentArg,
    /// The VM.
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `helio vm create`.
#[derive(clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    agent: AgentArg,
    /// The VM's name.
    name: String,
    /// A JSON spec file (the body of POST /v1/vms); the other flags are then not used.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Kernel to boot (without it: firmware from the first disk).
    #[arg(long)]
    kernel: Option<String>,
    /// Its initrd.
    #[arg(long)]
    initrd: Option<String>,
    /// Its command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// A heliotrope disk to attach (repeat; in order).
    #[arg(long)]
    disk: Vec<String>,
    /// A NIC: user or tap:IFNAME (repeat).
    #[arg(long)]
    nic: Vec<String>,
    /// auto, kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// An extra QEMU argument (repeat).
    #[arg(long = "qemu-arg", allow_hyphen_values = true)]
    qemu_arg: Vec<String>,
    /// Create it stopped.
    #[arg(long)]
    no_start: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn spec(a: &CreateArgs) -> anyhow::Result<serde_json::Value> {
    if let Some(path) = &a.spec {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read spec {}", path.display()))?;
        let mut v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("spec {} is not JSON", path.display()))?;
        v["name"] = a.name.clone().into();
        return Ok(v);
    }
    Ok(serde_json::json!({
        "name": a.name,
        "memory_mib": a.memory,
        "vcpus": a.vcpus,
        "boot": {"kernel": a.kernel, "initrd": a.initrd, "cmdline": a.cmdline},
        "disks": a.disk,
        "nics": a.nic.iter().map(|n| serde_json::json!({"network": n})).collect::<Vec<_>>(),
        "accel": a.accel,
        "qemu_args": a.qemu_arg,
        "start": !a.no_start,
    }))
}

fn line(v: &serde_json::Value) {
    println!(
        "{:<20} {:<8} {:<10} pid {:<8} {} MiB, {} vCPU, disks {}{}",
        v["spec"]["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        v["qemu_status"].as_str().unwrap_or("-"),
        v["pid"]
            .as_u64()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
        v["spec"]["memory_mib"],
        v["spec"]["vcpus"],
        v["spec"]["disks"],
        v["accel"]
            .as_str()
            .map(|a| format!(", {a}"))
            .unwrap_or_default(),
    );
    if let Some(w) = v["last_words"].as_str() {
        println!("    last words: {w}");
    }
}

pub async fn run(c: Command) -> anyhow::Result<i32> {
    let (agent, method, path, body, json) = match &c {
        Command::Create(a) => (
            &a.agent,
            "POST",
            "/v1/vms".to_string(),
            Some(spec(a)?),
            a.json,
        ),
        Command::Start(a) => (
            &a.agent,
            "POST",
            format!("/v1/vms/{}/start", a.name),
            None,
            a.json,
        ),
        Command::Stop(a) => (
            &a.agent,
            "POST",
            format!("/v1/vms/{}/stop", a.name),
            None,
            a.json,
        ),
        Command::Delete(a) => (
            &a.agent,
            "DELETE",
            format!("/v1/vms/{}", a.name),
            None,
            a.json,
        ),
        Command::Show(a) => (&a.agent, "GET", format!("/v1/vms/{}", a.name), None, a.json),
        Command::List(a) => (&a.agent, "GET", "/v1/vms".to_string(), None, a.json),
    };
    let client = agent.client()?;
    let (_, v) = client.call(method, &path, body.as_ref(), &[]).await?;
    match (&c, json) {
        (_, true) => show(&v, true),
        (Command::List(_), false) => v.as_array().into_iter().flatten().for_each(line),
        (Command::Delete(a), false) => println!("VM {} deleted", a.name),
        (_, false) => line(&v),
    }
    Ok(0)
}
