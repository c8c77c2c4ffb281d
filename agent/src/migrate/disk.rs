//! Moving a VM's disks in its migration (`disk: replicate`): the destination agent seeds and
//! syncs the disks from this agent and serves each replica through an export job, on which its
//! QEMU starts; at the switchover this agent tells it which chunks the VM wrote since the last
//! round, which its exports then fetch on demand: the disk's last round costs one round trip
//! of downtime, not its data.

use super::{Migration, Migrations};
use crate::model::Job;
use protocol::{Conn, Frame, Message};
use std::time::Duration;

/// How often a lost destination is dialled again after the cut.
const REDIAL: Duration = Duration::from_secs(1);
/// How often a job at the destination is asked about (one round trip each): every phase that
/// waits for one ends on average half of this late.
const JOB_POLL: Duration = Duration::from_millis(50);
/// Sync rounds at most before the memory moves.
pub(super) const MAX_ROUNDS: usize = 5;
/// A round that shipped no more than this is small enough to move on.
pub(super) const SMALL_ROUND: u64 = 8 << 20;

/// The control connection to the destination agent and what the disks' move needs.
pub struct Ctl {
    /// The connection (the replication protocol, mutual TLS).
    pub conn: Conn,
    /// The destination store's id (the replica the dirty lists are cut for).
    pub store_id: [u8; 16],
    /// The export job serving each disk at the destination.
    pub exports: Vec<(String, String)>,
    /// A way back: the disks going back, whose chunks written here are patched there.
    pub returning: Vec<super::back::Returning>,
    /// The destination agent's address (to dial it again after the link failed).
    pub addr: String,
}

/// How long the destination has to answer a switchover once QEMU completed before the
/// connection is taken for lost (it applies the cut and tells its QEMU to run: milliseconds).
const SWITCHOVER_ANSWER: Duration = Duration::from_secs(30);

/// Sends the switchover of `vm` cutting `cut` to the destination, without waiting for its
/// answer ([`Migrations::await_switched`] reads it).
pub async fn send_switchover(
    ctl: &mut Ctl,
    vm: &str,
    cut: &[(String, Vec<u64>)],
) -> Result<(), String> {
    let (disks, payload) = protocol::encode_cut(cut);
    let msg = Message::VmSwitchover {
        vm: vm.to_string(),
        disks,
    };
    ctl.conn
        .send(&Frame::with_payload(msg, payload))
        .await
        .map_err(|e| format!("sending the switchover: {e}"))
}

/// Sends `msg` and returns the answer; an error answer is an `Err` with its words.
pub async fn ask(conn: &mut Conn, msg: Message) -> Result<Message, String> {
    conn.send(&Frame::new(msg))
        .await
        .map_err(|e| e.to_string())?;
    match conn.recv().await.map_err(|e| e.to_string())?.msg {
        Message::Error { message, .. } => Err(message),
        other => Ok(other),
    }
}

async fn job_call(conn: &mut Conn, msg: Message) -> Result<Job, String> {
    match ask(conn, msg).await? {
        Message::JobState { job } => serde_json::from_str(&job).map_err(|e| format!("job: {e}")),
        other => Err(format!("the destination answered {other:?} about a job")),
    }
}

impl Migrations {
    /// Runs a job at the destination until it ends (`until` phases also count as the end);
    /// its progress is this migration's.
    async fn remote_job(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        spec: serde_json::Value,
        until: &[&str],
    ) -> Result<Job, String> {
        let job = job_call(
            &mut ctl.conn,
            Message::JobStart {
                spec: spec.to_string(),
            },
        )
        .await?;
        let mut ids: Vec<String> =
            serde_json::from_value(m.figures["remote_jobs"].clone()).unwrap_or_default();
        ids.push(job.id.clone());
        m.figures["remote_jobs"] = ids.into();
        loop {
            let j = job_call(&mut ctl.conn, Message::JobQuery { id: job.id.clone() }).await?;
            m.progress.bytes_total = m.progress.bytes_total.max(j.progress.bytes_total);
            m.progress.rate_bps = j.progress.rate_bps;
            match j.phase.as_str() {
                "done" => return Ok(j),
                p if until.contains(&p) => return Ok(j),
                "failed" | "cancelled" => {
                    return Err(format!(
                        "the destination's {} job {} {}: {}",
                        j.kind,
                        j.id,
                        j.phase,
                        j.error.clone().unwrap_or_default()
                    ))
                }
                _ => tokio::time::sleep(JOB_POLL).await,
            }
        }
    }

    /// `seeding` and `syncing` of every disk.
    pub(super) async fn copy_disks(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        disks: &[String],
        source: &str,
    ) -> Result<(), String> {
        for d in disks {
            let why = format!("disk {d:?}: the chunks the destination lacks");
            self.set_phase(m, "seeding", &why)
                .map_err(|e| e.to_string())?;
            let spec = serde_json::json!({"kind": "seed", "disk": d, "from": source, "bandwidth": self.disk_bandwidth(m)});
            let j = self.remote_job(m, ctl, spec, &[]).await?;
            m.figures["seed"][d] = j.figures;
            for round in 1..=MAX_ROUNDS {
                let why = format!("disk {d:?}: round {round}");
                self.set_phase(m, "syncing", &why)
                    .map_err(|e| e.to_string())?;
                let shipped = self
                    .sync_round(m, ctl, d, source, &round.to_string())
                    .await?;
                if shipped <= SMALL_ROUND {
                    break;
                }
            }
        }
        Ok(())
    }

    /// One sync round of disk `d` at the destination, recorded as `sync_rounds.d.label`; the
    /// bytes it shipped.
    pub(super) async fn sync_round(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        d: &str,
        source: &str,
        label: &str,
    ) -> Result<u64, String> {
        let spec = serde_json::json!({"kind": "sync", "disk": d, "from": source, "bandwidth": self.disk_bandwidth(m)});
        let j = self.remote_job(m, ctl, spec, &[]).await?;
        m.figures["sync_rounds"][d][label] = j.figures["rounds"][0].clone();
        Ok(j.figures["rounds"][0]["dirty_bytes"].as_u64().unwrap_or(0))
    }

    /// An export of every disk at the destination, for its QEMU.
    pub(super) async fn export_disks(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        disks: &[String],
        source: &str,
    ) -> Result<(), String> {
        for d in disks {
            let spec = serde_json::json!({"kind": "export", "disk": d, "from": source, "bandwidth": self.disk_bandwidth(m)});
            let j = self
                .remote_job(m, ctl, spec, &["transferring", "serving"])
                .await?;
            ctl.exports.push((d.clone(), j.id));
            m.figures["export_jobs"] = serde_json::to_value(&ctl.exports).unwrap_or_default();
        }
        Ok(())
    }

    /// The cut: for each disk exported at the destination, the chunks written here since its
    /// last round (its export fetches them again on demand).
    pub(super) fn cut_lists(
        &self,
        m: &mut Migration,
        ctl: &Ctl,
    ) -> Result<Vec<(String, Vec<u64>)>, String> {
        let t = std::time::Instant::now();
        let mut lists = Vec::new();
        for (d, _) in &ctl.exports {
            let chunks = self
                .disks
                .dirty_since(d, &ctl.store_id)
                .map_err(|e| e.to_string())?;
            lists.push((d.clone(), chunks));
        }
        let total: usize = lists.iter().map(|(_, c)| c.len()).sum();
        m.figures["switchover_chunks"] = total.into();
        m.figures["switchover_disk_ms"] = (t.elapsed().as_millis() as u64).into();
        Ok(lists)
    }

    /// Waits for the destination's answer to the switchover sent at the cut (`VmSwitchover`,
    /// sent before QEMU was let go and not waited for then), once QEMU has completed. A lost
    /// connection is dialled again and the switchover sent again (the destination takes it
    /// once). An error answer means the destination did not take it: its VM never ran.
    pub(super) async fn await_switched(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        cut: &[(String, Vec<u64>)],
    ) -> Result<(), String> {
        loop {
            let answer = tokio::time::timeout(SWITCHOVER_ANSWER, ctl.conn.recv()).await;
            let error = match answer {
                Ok(Ok(f)) => match f.msg {
                    Message::VmSwitched {
                        invalidated,
                        repeat,
                    } => {
                        m.figures["switchover_invalidated"] = invalidated.into();
                        m.figures["switchover_resent"] = repeat.into();
                        return Ok(());
                    }
                    Message::Error { message, .. } => {
                        m.figures["switchover_refused"] = true.into();
                        return Err(format!(
                            "the destination did not take the switchover: {message}"
                        ));
                    }
                    other => format!("the destination answered {other:?} to VmSwitchover"),
                },
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer to the switchover within {SWITCHOVER_ANSWER:?}"),
            };
            self.redial(m, ctl, &error).await?;
            send_switchover(ctl, &m.spec.vm, cut).await.ok();
        }
    }

    /// Past the cut the VM runs at the destination whatever the link does: a lost connection
    /// is dialled again until it comes back (the destination's exports wait for it too, and
    /// serve the chunks they hold meanwhile). Said on the event stream both ways.
    async fn redial(&self, m: &mut Migration, ctl: &mut Ctl, error: &str) -> Result<(), String> {
        tracing::warn!(migration = %m.id, %error, "lost the destination agent after the cut; dialling it again");
        self.events.emit(
            "migration.link",
            &m.id,
            serde_json::json!({"state": "lost", "error": error}),
        );
        let why = format!("the link to the destination is down ({error}); the VM runs there on the chunks it holds, and this agent dials again");
        self.set_phase(m, "running_at_destination", &why)
            .map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(REDIAL).await;
            if let Ok(conn) = protocol::connect(&ctl.addr, self.tls.as_ref(), &self.agent).await {
                ctl.conn = conn;
                break;
            }
        }
        let down = started.elapsed().as_millis() as u64;
        self.events.emit(
            "migration.link",
            &m.id,
            serde_json::json!({"state": "back", "down_ms": down}),
        );
        let was = m.figures["link_down_ms"].as_u64().unwrap_or(0);
        m.figures["link_down_ms"] = (was + down).into();
        let why = "the link is back: the destination fetches the chunks it lacks";
        self.set_phase(m, "running_at_destination", why)
            .map_err(|e| e.to_string())
    }

    /// `running_at_destination`: until every export at the destination holds every chunk.
    pub(super) async fn await_exports(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
    ) -> Result<(), String> {
        for (d, id) in ctl.exports.clone() {
            loop {
                let j = match job_call(&mut ctl.conn, Message::JobQuery { id: id.clone() }).await {
                    Ok(j) => j,
                    Err(e) => {
                        self.redial(m, ctl, &e).await?;
                        continue;
                    }
                };
                match j.phase.as_str() {
                    "serving" => {
                        m.figures["export"][&d] = j.figures;
                        break;
                    }
                    "transferring" => tokio::time::sleep(JOB_POLL).await,
                    p => {
                        return Err(format!(
                            "the destination's export of {d:?} is {p}: {}",
                            j.error.unwrap_or_default()
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}
