//! `helio job`: an agent's jobs, and watching one with a progress bar fed by the event stream.

use super::remote::{show, AgentArg, ListArgs};
use crate::progress::bytes_bar;
use crate::units::human;

/// `helio job` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List jobs.
    List(ListArgs),
    /// Show one job.
    Show(IdArgs),
    /// Cancel a job (idempotent).
    Cancel(IdArgs),
    /// Follow a job to its end with a progress bar; exit 0 when it is done, 1 otherwise.
    Watch(IdArgs),
}

/// A job by id.
#[derive(clap::Args)]
pub struct IdArgs {
    #[command(flatten)]
    agent: AgentArg,
    /// The job (job-N).
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// One line about a job.
pub fn line(v: &serde_json::Value) {
    let p = &v["progress"];
    println!(
        "{:<8} {:<5} {:<16} {:<13} {} / {}{}{}",
        v["id"].as_str().unwrap_or("?"),
        v["kind"].as_str().unwrap_or("?"),
        v["spec"]["disk"].as_str().unwrap_or("?"),
        v["phase"].as_str().unwrap_or("?"),
        human(p["bytes_done"].as_u64().unwrap_or(0)),
        human(p["bytes_total"].as_u64().unwrap_or(0)),
        v["error"]
            .as_str()
            .map(|e| format!(": {e}"))
            .unwrap_or_default(),
        v["phase_reason"]
            .as_str()
            .filter(|_| v["error"].is_null())
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
    );
}

/// Follows job `id` on the event stream until it ends; true when it is done.
pub async fn watch(client: &agent::client::ApiClient, id: &str) -> anyhow::Result<bool> {
    let job = client.get(&format!("/v1/jobs/{id}")).await?;
    let bar = bytes_bar(
        job["progress"]["bytes_total"].as_u64().unwrap_or(0),
        job["kind"].as_str().unwrap_or("job"),
    );
    bar.set_message(format!("{id} {}", job["phase"].as_str().unwrap_or("")));
    let ended = |phase: &str| matches!(phase, "done" | "failed" | "cancelled");
    let mut phase = job["phase"].as_str().unwrap_or("").to_string();
    if !ended(&phase) {
        // From event 0 is safe: stored events of other jobs are skipped, and this job's earlier
        // ones only move the bar to where it already is.
        let since = 0;
        client
            .events(since, |e| {
                if e.object != id {
                    return true;
                }
                let p = e.data.get("progress");
                if let Some(p) = p {
                    bar.set_length(p["bytes_total"].as_u64().unwrap_or(0));
                    bar.set_position(p["bytes_done"].as_u64().unwrap_or(0));
                }
                if let Some(ph) = e.data.get("phase").and_then(|p| p.as_str()) {
                    phase = ph.to_string();
                    bar.set_message(format!("{id} {ph}"));
                }
                !ended(&phase)
            })
            .await?;
    }
    bar.finish_and_clear();
    let job = client.get(&format!("/v1/jobs/{id}")).await?;
    line(&job);
    Ok(job["phase"] == "done")
}

pub async fn run(c: Command) -> anyhow::Result<i32> {
    match c {
        Command::List(a) => {
            let v = a.agent.client()?.get("/v1/jobs").await?;
            if a.json {
                show(&v, true);
            } else {
                v.as_array().into_iter().flatten().for_each(line);
            }
        }
        Command::Show(a) => {
            let v = a.agent.client()?.get(&format!("/v1/jobs/{}", a.id)).await?;
            if a.json {
                show(&v, true)
            } else {
                show(&v, false)
            }
        }
        Command::Cancel(a) => {
            let client = a.agent.client()?;
            let (_, v) = client
                .call("POST", &format!("/v1/jobs/{}/cancel", a.id), None, &[])
                .await?;
            if a.json {
                show(&v, true)
            } else {
                line(&v)
            }
        }
        Command::Watch(a) => {
            let client = a.agent.client()?;
            let done = watch(&client, &a.id).await?;
            return Ok(if done { 0 } else { 1 });
        }
    }
    Ok(0)
}
