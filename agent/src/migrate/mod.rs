//! Migrations: a running QEMU VM moved to a peer agent in one job.
//!
//! The destination agent is asked (on the replication protocol, `VmIncoming`) to start QEMU
//! with the VM's spec waiting for a stream; the source QEMU migrates into a unix socket of the
//! source agent, which carries the stream to the destination agent over their mutual-TLS
//! connection (`Tunnel`); QEMU's `pause-before-switchover` stops the source at the cut, where
//! the agents act before `migrate-continue`; after completion the source QEMU is stopped and
//! the VM recorded as moved.
//!
//! This build moves VMs whose disks both hosts reach (`disk: shared`); replicating the disk in
//! the same job (seed, sync rounds, the coordinated cut) is the next step of issue 13.

use crate::error::{check_name, AgentError, Result};
use crate::events::{now, Events};
use crate::model::{Migration, MigrationSpec, PeerSpec, Progress};
use crate::state::State;
use crate::vm::{qmp, Vms};
use protocol::{Frame, Message};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod back;
mod disk;
mod hold;
mod pace;

use disk::Ctl;

const KIND: &str = "migration";
/// The task carrying a migration's stream: what it carried, once QEMU closed the stream.
type Tunnel = tokio::task::JoinHandle<std::result::Result<server::vmpeer::TunnelStats, String>>;

/// How often QEMU's migration status is read: at `pre-switchover` the guest is paused until
/// the agent notices, so half of this is added to the downtime on average (100 ms cost about
/// 50 ms of it in the migration benchmark); a query over the local QMP socket takes ~0.2 ms.
const POLL: Duration = Duration::from_millis(10);
/// Time for the destination's QEMU to connect its stream after `migrate`.
const TUNNEL_WAIT: Duration = Duration::from_secs(30);

/// The migrations of this (source) agent.
pub struct Migrations {
    state: Arc<State>,
    disks: Arc<crate::disks::Disks>,
    /// This agent's replication listener, which destinations seed from by default.
    listen: Option<String>,
    events: Arc<Events>,
    vms: Arc<Vms>,
    /// The jobs (a returning VM's disks are served by export jobs here).
    jobs: Arc<crate::jobs::Jobs>,
    tls: Option<protocol::tls::TlsClient>,
    agent: String,
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Manual switchovers waiting for their go.
    go: Mutex<HashMap<String, Arc<std::sync::atomic::AtomicBool>>>,
    create: tokio::sync::Mutex<()>,
}

/// QEMU's default `max-bandwidth` (bytes/s).
const QEMU_DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only if a holder panicked; entries are inserted and removed whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Migrations {
    /// The migrations of `state`, dialing peers as agent `agent`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: Arc<State>,
        disks: Arc<crate::disks::Disks>,
        listen: Option<String>,
        events: Arc<Events>,
        vms: Arc<Vms>,
        jobs: Arc<crate::jobs::Jobs>,
        tls: Option<protocol::tls::TlsClient>,
        agent: String,
    ) -> Migrations {
        Migrations {
            state,
            disks,
            listen,
            events,
            vms,
            jobs,
            tls,
            agent,
            running: Mutex::new(HashMap::new()),
            go: Mutex::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
        }
    }

    /// One migration.
    pub fn show(&self, id: &str) -> Result<Migration> {
        self.state.get::<Migration>(KIND, id)?.ok_or_else(|| {
            AgentError::not_found("migration", id, "list them with GET /v1/migrations")
        })
    }

    /// Every migration, oldest first.
    pub fn list(&self) -> Result<Vec<Migration>> {
        let mut all: Vec<Migration> = self
            .state
            .list::<Migration>(KIND)?
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        all.sort_by_key(|m| m.id.trim_start_matches("mig-").parse::<u64>().unwrap_or(0));
        Ok(all)
    }

    fn resolve(&self, to: &str) -> Result<String> {
        if to.contains(':') {
            return Ok(to.to_string());
        }
        match self.state.get::<PeerSpec>("peer", to)? {
            Some(p) => Ok(p.addr),
            None => Err(AgentError::not_found(
                "peer",
                to,
                "give HOST:PORT of its replication listener, or declare the peer",
            )),
        }
    }

    fn check(&self, spec: &MigrationSpec) -> Result<()> {
        check_name("vm", &spec.vm)?;
        let vm = self.vms.show(&spec.vm)?;
        if vm.state != "running" {
            return Err(AgentError::Conflict(format!(
                "VM {:?} is {}, not running: only a running VM migrates",
                spec.vm, vm.state
            )));
        }
        match spec.disk.as_deref().unwrap_or("replicate") {
            "shared" => {}
            "replicate" if spec.source_addr.is_none() && self.listen.is_none() => {
                return Err(AgentError::Invalid(
                    "disk \"replicate\" needs this agent's replication listener (--listen) or a source_addr the destination can reach".into(),
                ))
            }
            "replicate" => {}
            other => {
                return Err(AgentError::Invalid(format!(
                    "disk {other:?}: use \"replicate\" or \"shared\""
                )))
            }
        }
        if let Some(b) = &spec.bandwidth {
            b.parse::<wan::Rate>()
                .map_err(|e| AgentError::Invalid(format!("bandwidth {b:?}: {e} (e.g. 200Mbit)")))?;
        }
        let pick = |what: &str, v: &Option<String>, allowed: &[&str]| match v.as_deref() {
            Some(x) if !allowed.contains(&x) => Err(AgentError::Invalid(format!(
                "{what} {x:?}: use one of {allowed:?}"
            ))),
            _ => Ok(()),
        };
        pick("mode", &spec.mode, &["live", "warm", "postcopy"])?;
        pick(
            "on_diverge",
            &spec.on_diverge,
            &["throttle", "postcopy", "abort"],
        )?;
        pick("switchover", &spec.switchover, &["auto", "manual"])?;
        for (what, v) in [
            ("not_before", &spec.not_before),
            ("deadline", &spec.deadline),
        ] {
            if let Some(v) = v {
                pace::parse_time(what, v).map_err(AgentError::Invalid)?;
            }
        }
        if let Some(n) = spec.streams {
            if !(1..=16).contains(&n) {
                return Err(AgentError::Invalid(format!("streams {n}: use 1 to 16")));
            }
            let postcopy = spec.mode.as_deref() == Some("postcopy")
                || spec.on_diverge.as_deref() == Some("postcopy");
            if n > 1 && postcopy {
                return Err(AgentError::Invalid(
                    "streams above 1 (multifd) with post-copy is not supported here: pick one"
                        .into(),
                ));
            }
        }
        if spec
            .max_downtime_ms
            .is_some_and(|d| !(1..=600_000).contains(&d))
        {
            return Err(AgentError::Invalid(
                "max_downtime_ms: use 1 to 600000".into(),
            ));
        }
        self.resolve(&spec.to)?;
        Ok(())
    }

    /// Creates a migration and starts it. One migration per VM at a time.
    pub async fn create(self: &Arc<Self>, spec: MigrationSpec) -> Result<Migration> {
        self.check(&spec)?;
        let _create = self.create.lock().await;
        if let Some(busy) = self
            .list()?
            .into_iter()
            .find(|m| !m.ended() && m.spec.vm == spec.vm)
        {
            return Err(AgentError::Conflict(format!(
                "VM {:?} is moving already ({}, {}); cancel it or wait",
                spec.vm, busy.id, busy.phase
            )));
        }
        let n: u64 = self.state.get("meta", "migration_next")?.unwrap_or(1);
        self.state.put("meta", "migration_next", &(n + 1), true)?;
        let m = Migration {
            id: format!("mig-{n}"),
            spec,
            phase: "checking".into(),
            phase_reason: Some("created".into()),
            progress: Progress::default(),
            started_at: now(),
            ended_at: None,
            error: None,
            figures: serde_json::json!({}),
        };
        self.state.put(KIND, &m.id, &m, true)?;
        self.events.emit(
            "migration.phase",
            &m.id,
            serde_json::json!({"phase": "checking"}),
        );
        if m.spec.dry_run {
            // Answered when done: a few seconds (a ping, the destination's check, a dirty-rate
            // measurement).
            let id = m.id.clone();
            self.run(m, CancellationToken::new()).await?;
            return self.show(&id);
        }
        self.launch(m.clone());
        Ok(m)
    }

    /// Cancels a migration (idempotent). Before the switchover the VM keeps running here.
    pub fn cancel(&self, id: &str) -> Result<Migration> {
        let m = self.show(id)?;
        if let Some(t) = lock(&self.running).get(id) {
            t.cancel();
        }
        Ok(m)
    }

    /// Lets a manual switchover go (idempotent); refused for an automatic one or a migration
    /// that has none left to let go.
    pub fn switchover(&self, id: &str) -> Result<Migration> {
        let m = self.show(id)?;
        if m.spec.switchover.as_deref() != Some("manual") {
            return Err(AgentError::Conflict(format!(
                "{id} switches over by itself (switchover: auto)"
            )));
        }
        match lock(&self.go).get(id) {
            Some(go) => go.store(true, std::sync::atomic::Ordering::Relaxed),
            None => {
                return Err(AgentError::Conflict(format!(
                    "{id} is {}: there is no switchover to let go",
                    m.phase
                )))
            }
        }
        Ok(m)
    }

    /// Migrations that had not ended when the agent stopped: the stream died with the agent,
    /// so QEMU's migration failed and the VM runs here; each is recorded as failed.
    pub fn resume(self: &Arc<Self>) -> Result<()> {
        for mut m in self.list()? {
            if m.ended() {
                continue;
            }
            if m.phase == "running_at_destination" {
                // Past the cut: the VM runs at the destination; only the wait for its exports
                // and the source's clean-up are left.
                let token = CancellationToken::new();
                lock(&self.running).insert(m.id.clone(), token);
                let this = self.clone();
                tokio::spawn(async move {
                    let id = m.id.clone();
                    if let Err(e) = this.finish_moved(&mut m).await {
                        let why = "the destination's exports could not be followed after a restart of the source agent";
                        let _ = this.finish(&mut m, "failed", why, Some(e));
                    }
                    lock(&this.running).remove(&id);
                });
                continue;
            }
            let why = "the source agent restarted during the migration: its stream to the destination \
                       died with it, QEMU abandoned the migration and the VM runs here; start a new one";
            self.finish(&mut m, "failed", why, Some(why.into()))?;
        }
        Ok(())
    }

    /// After a restart in `running_at_destination`: waits for the destination's exports again,
    /// then stops the paused source QEMU and completes.
    async fn finish_moved(&self, m: &mut Migration) -> std::result::Result<(), String> {
        let addr = self.resolve(&m.spec.to).map_err(|e| e.to_string())?;
        let conn = protocol::connect(&addr, self.tls.as_ref(), &self.agent)
            .await
            .map_err(|e| format!("destination agent {addr}: {e}"))?;
        let exports: Vec<(String, String)> =
            serde_json::from_value(m.figures["export_jobs"].clone()).unwrap_or_default();
        let mut ctl = Ctl {
            conn,
            store_id: [0; 16],
            exports,
            returning: Vec::new(),
            addr: addr.clone(),
        };
        self.await_exports(m, &mut ctl).await?;
        self.vms
            .mark_moved(&m.spec.vm, &m.spec.to)
            .await
            .map_err(|e| e.to_string())?;
        let why = format!(
            "VM {:?} runs at {} (followed after a restart of this agent)",
            m.spec.vm, m.spec.to
        );
        self.finish(m, "completed", &why, None)
            .map_err(|e| e.to_string())
    }

    fn set_phase(&self, m: &mut Migration, phase: &str, why: &str) -> Result<()> {
        m.phase = phase.into();
        m.phase_reason = Some(why.into());
        self.state.put(KIND, &m.id, m, true)?;
        self.events.emit(
            "migration.phase",
            &m.id,
            serde_json::json!({"phase": phase, "reason": why, "figures": m.figures}),
        );
        Ok(())
    }

    fn finish(
        &self,
        m: &mut Migration,
        phase: &str,
        why: &str,
        error: Option<String>,
    ) -> Result<()> {
        m.ended_at = Some(now());
        m.error = error;
        m.progress.rate_bps = 0;
        m.progress.eta_s = None;
        self.set_phase(m, phase, why)
    }

    fn launch(self: &Arc<Self>, m: Migration) {
        let token = CancellationToken::new();
        lock(&self.running).insert(m.id.clone(), token.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let id = m.id.clone();
            if let Err(e) = this.run(m, token).await {
                tracing::error!(migration = %id, error = %e, "a migration's record could not be updated");
            }
            lock(&this.running).remove(&id);
        });
    }

    async fn run(&self, mut m: Migration, cancel: CancellationToken) -> Result<()> {
        let outcome = tokio::select! {
            r = self.drive(&mut m) => r,
            _ = cancel.cancelled() => Err("cancelled".to_string()),
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(e) => {
                let vm = m.spec.vm.clone();
                if let Ok(q) = self.vms.monitor(&vm).await {
                    let _ = q.json(qmp::MigrateCancel(serde_json::json!({}))).await;
                    self.resume_if_warm(&m, &q).await;
                    self.resume_if_refused(&m, &q).await;
                }
                if m.phase != "running_at_destination" {
                    self.clean_destination(&mut m).await;
                }
                if cancel.is_cancelled() {
                    let why = format!("cancelled on request in {}: QEMU's migration was cancelled and VM {vm:?} runs here, untouched; at the destination the incoming QEMU is stopped and this migration's jobs are cancelled; the replicas it seeded are kept for the next attempt", m.phase);
                    self.finish(&mut m, "cancelled", &why, None)
                } else {
                    let why = if m.figures.get("postcopy_after_iterations").is_some()
                        && m.phase == "running_at_destination"
                    {
                        format!("failed in post-copy; VM {vm:?} is paused here and at the destination, which holds part of its memory")
                    } else {
                        format!("failed in {}; VM {vm:?} keeps running here", m.phase)
                    };
                    self.finish(&mut m, "failed", &why, Some(e))
                }
            }
        }
    }

    /// Before the cut, a migration that ends leaves nothing of its own running at the
    /// destination (its replicas stay): its jobs are cancelled there and an incoming QEMU
    /// still waiting for its stream is stopped, on a connection of its own.
    async fn clean_destination(&self, m: &mut Migration) {
        let ids: Vec<String> =
            serde_json::from_value(m.figures["remote_jobs"].clone()).unwrap_or_default();
        let incoming = m.figures.get("destination_ready_ms").is_some();
        if ids.is_empty() && !incoming {
            return;
        }
        let dial = async {
            let addr = self.resolve(&m.spec.to).map_err(|e| e.to_string())?;
            protocol::connect(&addr, self.tls.as_ref(), &self.agent)
                .await
                .map_err(|e| e.to_string())
        };
        let mut conn = match dial.await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(migration = %m.id, error = %e, "cannot reach the destination to cancel this migration's jobs there; they end on their own or by DELETE there");
                return;
            }
        };
        let mut cancelled = Vec::new();
        for id in ids {
            match disk::ask(&mut conn, Message::JobCancel { id: id.clone() }).await {
                Ok(_) => cancelled.push(id),
                Err(e) => {
                    tracing::warn!(migration = %m.id, job = %id, error = %e, "cannot cancel a job at the destination")
                }
            }
        }
        m.figures["remote_jobs_cancelled"] = cancelled.into();
        if incoming {
            let vm = m.spec.vm.clone();
            match disk::ask(&mut conn, Message::VmIncomingAbort { vm }).await {
                Ok(Message::VmIncomingAborted { stopped }) => {
                    m.figures["destination_incoming_stopped"] = stopped.into()
                }
                Ok(other) => {
                    tracing::warn!(migration = %m.id, ?other, "unexpected answer to VmIncomingAbort")
                }
                Err(e) => {
                    tracing::warn!(migration = %m.id, error = %e, "cannot stop the incoming QEMU at the destination")
                }
            }
        }
    }

    /// A switchover the destination refused (its VM never ran there) after QEMU completed
    /// leaves the guest paused here (`postmigrate`): it runs here again.
    async fn resume_if_refused(&self, m: &Migration, q: &qmp::Qmp) {
        if m.figures.get("switchover_refused").is_none() {
            return;
        }
        if let Err(e) = q.resume().await {
            tracing::error!(migration = %m.id, vm = %m.spec.vm, error = %e, "the destination refused the switchover and the paused VM could not be resumed here; resume it with QMP cont");
        }
    }

    /// A warm migration that ends before the cut leaves its guest paused: it runs again here.
    /// After the cut the source stays paused (the destination owns the disk).
    async fn resume_if_warm(&self, m: &Migration, q: &qmp::Qmp) {
        let before_cut = matches!(
            m.phase.as_str(),
            "checking" | "seeding" | "syncing" | "precopy" | "ready"
        );
        if m.spec.mode.as_deref() != Some("warm") || !before_cut {
            return;
        }
        // QEMU leaves `paused` for `running` only on `cont`; wait for the cancel to settle.
        for _ in 0..50 {
            match q.status().await.as_deref() {
                Ok("paused") => break,
                Ok("finish-migrate") | Ok("pre-switchover") => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                _ => return,
            }
        }
        if let Err(e) = q.resume().await {
            tracing::error!(migration = %m.id, vm = %m.spec.vm, error = %e, "the warm migration ended before the cut but the paused VM could not be resumed; resume it with QMP cont");
        }
    }

    /// The phases, in order.
    async fn drive(&self, m: &mut Migration) -> std::result::Result<(), String> {
        self.wait_not_before(m).await?;
        let addr = self.resolve(&m.spec.to).map_err(|e| e.to_string())?;
        let spec = self.vms.show(&m.spec.vm).map_err(|e| e.to_string())?.spec;
        let returning = match m.spec.disk.as_deref() {
            Some("shared") => None,
            _ => self.returning_disks(&spec.disks)?,
        };
        // checking: the destination reachable, authorized, and able to start the VM.
        let mut conn = protocol::connect(&addr, self.tls.as_ref(), &self.agent)
            .await
            .map_err(|e| format!("destination agent {addr}: {e}"))?;
        self.check_destination(m, &mut conn, &spec, returning.is_some())
            .await?;
        self.plan_deadline(m)?;
        if m.spec.dry_run {
            let verdict = m.figures["prediction"]["verdict"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            let why = format!("dry run: nothing moved; the prediction says {verdict}");
            return self
                .finish(m, "completed", &why, None)
                .map_err(|e| e.to_string());
        }
        let store_id = m.figures["prediction"]["destination"]["store_id"]
            .as_str()
            .and_then(unhex)
            .ok_or("the destination did not say its store id")?;
        let mut ctl = Ctl {
            conn,
            store_id,
            exports: Vec::new(),
            returning: Vec::new(),
            addr: addr.clone(),
        };
        let manual = m.spec.switchover.as_deref() == Some("manual");
        let source = m
            .spec
            .source_addr
            .clone()
            .or(self.listen.clone())
            .unwrap_or_default();
        let replicate = m.spec.disk.as_deref() != Some("shared") && returning.is_none();
        if let Some(back) = returning {
            ctl.returning = back;
            self.return_disks(m, &mut ctl).await?;
        } else if replicate {
            self.copy_disks(m, &mut ctl, &spec.disks, &source).await?;
        }
        if manual {
            let disks = if replicate { &spec.disks[..] } else { &[] };
            self.hold(m, &mut ctl, disks, &source).await?;
        }
        if replicate {
            self.export_disks(m, &mut ctl, &spec.disks, &source).await?;
        }
        self.start_incoming(m, &mut ctl, &spec, &addr).await?;
        let tunnel = self.open_tunnel(&spec.name, &addr, channels(m)).await?;
        self.precopy(m, &spec.name, &mut ctl).await?;
        let t = tokio::time::timeout(Duration::from_secs(30), tunnel)
            .await
            .map_err(|_| "the stream did not end after QEMU completed".to_string())?
            .map_err(|e| format!("the tunnel task failed: {e}"))??;
        m.figures["tunnel_bytes_sent"] = t.sent.into();
        m.figures["tunnel_wire_bytes_sent"] = t.sent_wire.into();
        m.figures["tunnel_bytes_received"] = t.received.into();
        m.progress.bytes_done = m.progress.bytes_total.max(m.progress.bytes_done);
        if !ctl.exports.is_empty() {
            let why = "the VM runs at the destination; chunks it lacks come on demand and in the background";
            self.set_phase(m, "running_at_destination", why)
                .map_err(|e| e.to_string())?;
            self.await_exports(m, &mut ctl).await?;
        }
        self.vms
            .mark_moved(&spec.name, &m.spec.to)
            .await
            .map_err(|e| e.to_string())?;
        for r in &ctl.returning {
            let settled = self
                .jobs
                .retire_export(&r.disk)
                .await
                .map_err(|e| e.to_string())?;
            m.figures["return"]["settled_chunks"] = settled.into();
        }
        let why = format!("VM {:?} runs at {}; the source QEMU is stopped, its disks kept as the base for the way back", spec.name, m.spec.to);
        self.finish(m, "completed", &why, None)
            .map_err(|e| e.to_string())
    }

    /// The destination starts QEMU waiting for the stream (`precopy` begins).
    async fn start_incoming(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        spec: &crate::model::VmSpec,
        addr: &str,
    ) -> std::result::Result<(), String> {
        let started = std::time::Instant::now();
        let request = IncomingRequest {
            spec: spec.clone(),
            postcopy: may_postcopy(m),
            multifd: multifd(m),
        };
        let spec_json = serde_json::to_string(&request).map_err(|e| e.to_string())?;
        match disk::ask(&mut ctl.conn, Message::VmIncoming { spec: spec_json }).await {
            Ok(Message::VmIncomingReady) => {}
            Ok(other) => return Err(format!("the destination answered {other:?} to VmIncoming")),
            Err(e) => {
                return Err(format!(
                    "the destination cannot take VM {:?}: {e}",
                    spec.name
                ))
            }
        }
        m.figures["destination_ready_ms"] = (started.elapsed().as_millis() as u64).into();
        let why =
            format!("QEMU waits at {addr}; memory and device state stream through the agents");
        self.set_phase(m, "precopy", &why)
            .map_err(|e| e.to_string())
    }

    /// `checking`: the round trip to the destination, whether it can take the VM, the VM's
    /// measured dirty rate, and the d/r model's prediction (`figures.prediction`).
    async fn check_destination(
        &self,
        m: &mut Migration,
        conn: &mut protocol::Conn,
        spec: &crate::model::VmSpec,
        back: bool,
    ) -> std::result::Result<(), String> {
        let t = std::time::Instant::now();
        conn.send(&Frame::new(Message::Ping { id: 1 }))
            .await
            .map_err(|e| e.to_string())?;
        conn.recv().await.map_err(|e| e.to_string())?;
        let rtt = t.elapsed().as_secs_f64();
        let request = CheckRequest {
            spec: spec.clone(),
            replicate: m.spec.disk.as_deref() != Some("shared"),
            back,
        };
        let spec_json = serde_json::to_string(&request).map_err(|e| e.to_string())?;
        conn.send(&Frame::new(Message::VmCheck { spec: spec_json }))
            .await
            .map_err(|e| e.to_string())?;
        let found: serde_json::Value = match conn.recv().await.map_err(|e| e.to_string())?.msg {
            Message::VmCheckOk { report } => serde_json::from_str(&report).unwrap_or_default(),
            Message::Error { message, .. } => {
                return Err(format!(
                    "the destination cannot take VM {:?}: {message}",
                    spec.name
                ))
            }
            other => return Err(format!("the destination answered {other:?} to VmCheck")),
        };
        let dirty_mib_s = self.dirty_rate(&spec.name).await?;
        let moving = if request.replicate && !back {
            &spec.disks[..]
        } else {
            &[]
        };
        let store_id = found["store_id"].as_str().and_then(unhex);
        let disk_bytes = self.disk_delta(moving, &found, store_id);
        if let Some(free) = found["store_free_bytes"].as_u64() {
            // Chunks are stored compressed: the raw delta is the most they can take.
            if disk_bytes > free {
                return Err(format!(
                    "the destination's store has {free} bytes free; the disks of VM {:?} may need {disk_bytes} there (the chunks it lacks): free space there, or pre-seed the disks when it has room",
                    spec.name
                ));
            }
        }
        m.figures["prediction"] = predict(m, spec, rtt, dirty_mib_s, disk_bytes, found);
        self.state
            .put(KIND, &m.id, m, true)
            .map_err(|e| e.to_string())?;
        self.events
            .emit("migration.checked", &m.id, m.figures["prediction"].clone());
        Ok(())
    }

    /// The VM's dirty rate in MiB/s, measured by QEMU over one second (page sampling).
    async fn dirty_rate(&self, vm: &str) -> std::result::Result<f64, String> {
        let q = self.vms.monitor(vm).await.map_err(|e| e.to_string())?;
        // QEMU's most samples (4096 pages per GiB, against 512 by default): a small guest
        // dirtying a small buffer was sampled too thinly and measured at 0 now and then.
        let args =
            serde_json::json!({"calc-time": 1, "mode": "page-sampling", "sample-pages": 4096});
        q.json(qmp::CalcDirtyRate(args)).await?;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = q.json(qmp::QueryDirtyRate(serde_json::json!({}))).await?;
            if r["status"] == "measured" {
                return Ok(r["dirty-rate"].as_f64().unwrap_or(0.0));
            }
        }
        Err(format!(
            "QEMU did not measure VM {vm:?}'s dirty rate within 5 s"
        ))
    }

    /// Binds the VM's migration socket and carries each of the `channels` connections QEMU
    /// opens (the main stream, then one per multifd channel) to the destination agent on a
    /// connection of its own. The destination's connections are opened first, so that an
    /// unreachable destination fails here. The task ends with the bytes sent and received.
    async fn open_tunnel(
        &self,
        vm: &str,
        addr: &str,
        channels: usize,
    ) -> std::result::Result<Tunnel, String> {
        let path = self.vms.migrate_socket(vm);
        let _ = std::fs::remove_file(&path);
        let listener = server::listen::bind_unix_private(&path)
            .map_err(|e| format!("binding {}: {e}", path.display()))?;
        let mut conns = Vec::with_capacity(channels);
        for _ in 0..channels {
            let mut conn = protocol::connect(addr, self.tls.as_ref(), &self.agent)
                .await
                .map_err(|e| format!("destination agent {addr}: {e}"))?;
            conn.send(&Frame::new(Message::Tunnel { vm: vm.to_string() }))
                .await
                .map_err(|e| e.to_string())?;
            conns.push(conn);
        }
        let task = tokio::spawn(async move {
            let mut pumps = Vec::with_capacity(conns.len());
            for mut conn in conns {
                let (stream, _) = tokio::time::timeout(TUNNEL_WAIT, listener.accept())
                    .await
                    .map_err(|_| "QEMU did not connect its migration stream".to_string())?
                    .map_err(|e| e.to_string())?;
                conn.set_timeout(None);
                let (reader, writer) = conn.split();
                pumps.push(tokio::spawn(server::vmpeer::pump(stream, reader, writer)));
            }
            let _ = std::fs::remove_file(&path);
            let mut all = server::vmpeer::TunnelStats::default();
            for p in pumps {
                let s = p
                    .await
                    .map_err(|e| format!("a tunnel task failed: {e}"))?
                    .map_err(|e| e.to_string())?;
                all.sent += s.sent;
                all.sent_wire += s.sent_wire;
                all.received += s.received;
            }
            Ok(all)
        });
        Ok(task)
    }

    /// Capabilities and parameters from the spec: the pause before the switchover always;
    /// auto-converge when divergence throttles; post-copy when it may be asked for; the downtime
    /// limit (10 minutes for `warm`, whose guest is paused before `migrate`); the cap.
    async fn configure(&self, q: &qmp::Qmp, m: &Migration) -> std::result::Result<(), String> {
        let throttle = matches!(m.spec.on_diverge.as_deref(), None | Some("throttle"));
        let caps = serde_json::json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": true},
            {"capability": "auto-converge", "state": throttle},
            {"capability": "postcopy-ram", "state": may_postcopy(m)},
            {"capability": "multifd", "state": multifd(m).is_some()},
        ]});
        q.json(qmp::MigrateSetCapabilities(caps)).await?;
        let limit = if m.spec.mode.as_deref() == Some("warm") {
            600_000
        } else {
            m.spec.max_downtime_ms.unwrap_or(300)
        };
        // `avail-switchover-bandwidth` 0: QEMU's own estimate until the first iterations say
        // better (`on_iteration`).
        let mut params =
            serde_json::json!({ "downtime-limit": limit, "avail-switchover-bandwidth": 0 });
        if let Some(n) = multifd(m) {
            params["multifd-channels"] = n.into();
        }
        let cap = m
            .spec
            .bandwidth
            .as_deref()
            .and_then(|b| b.parse::<wan::Rate>().ok());
        // QEMU keeps its parameters from one migration to the next: a migration without a cap
        // sets QEMU's own default back (128 MiB/s), not the cap of an earlier attempt.
        params["max-bandwidth"] = cap
            .map_or(QEMU_DEFAULT_MAX_BANDWIDTH, |r| r.bytes_per_sec())
            .into();
        q.json(qmp::MigrateSetParameters(params)).await.map(|_| ())
    }

    /// Steers QEMU's migration to completion: `migrate`, then the status polled until
    /// `completed`, the switchover at `pre-switchover`, divergence handled as `on_diverge`
    /// says.
    async fn precopy(
        &self,
        m: &mut Migration,
        vm: &str,
        ctl: &mut Ctl,
    ) -> std::result::Result<(), String> {
        let q = self.vms.monitor(vm).await.map_err(|e| e.to_string())?;
        self.configure(&q, m).await?;
        let mut w = Watch::new();
        if m.spec.mode.as_deref() == Some("warm") {
            // Warm: the guest stops first and its whole memory moves while it is paused.
            q.pause().await?;
            w.paused_at = Some(std::time::Instant::now());
        }
        let uri = format!("unix:{}", self.vms.migrate_socket(vm).display());
        q.json(qmp::Migrate(serde_json::json!({ "uri": uri })))
            .await?;
        let result = loop {
            tokio::time::sleep(POLL).await;
            let query = qmp::QueryMigrate(serde_json::json!({}));
            let polled = q.run_within("query-migrate", query, qmp::MIGRATION_QMP_TIMEOUT);
            let info = match polled.await {
                Ok(i) => i,
                Err(e) => break Err(e),
            };
            match self.step(m, &q, &info, &mut w, ctl).await {
                Ok(true) => break Ok(()),
                Ok(false) => {}
                Err(e) => break Err(e),
            }
        };
        result
    }

    /// Switches QEMU to post-copy (once): the VM starts at the destination after the switchover
    /// and the pages it lacks come on demand, so the migration ends whatever the guest dirties.
    async fn start_postcopy(
        &self,
        m: &mut Migration,
        w: &mut Watch,
        q: &qmp::Qmp,
        why: &str,
    ) -> std::result::Result<(), String> {
        if w.postcopy {
            return Ok(());
        }
        w.postcopy = true;
        q.json(qmp::MigrateStartPostcopy(serde_json::json!({})))
            .await?;
        m.figures["postcopy_after_iterations"] = w.iterations.into();
        self.events.emit(
            "migration.postcopy",
            &m.id,
            serde_json::json!({"reason": why, "iteration": w.iterations}),
        );
        Ok(())
    }

    /// One look at QEMU's migration; true once it has completed.
    async fn step(
        &self,
        m: &mut Migration,
        q: &qmp::Qmp,
        info: &serde_json::Value,
        w: &mut Watch,
        ctl: &mut Ctl,
    ) -> std::result::Result<bool, String> {
        let status = info["status"].as_str().unwrap_or("unknown");
        if self.note_progress(m, info, w) {
            self.on_iteration(m, w, q).await?;
        }
        match status {
            "pre-switchover" => {
                let why = if !ctl.returning.is_empty() {
                    "the source VM is paused at the cut, its disks flushed: the chunks it wrote since the last round go back now"
                } else if ctl.exports.is_empty() {
                    "the source VM is paused at the cut; shared disks need nothing moved"
                } else {
                    "the source VM is paused at the cut, its disks flushed: the chunks written since the last round are made absent at the destination"
                };
                self.set_phase(m, "switchover", why)
                    .map_err(|e| e.to_string())?;
                let cut = if ctl.returning.is_empty() {
                    self.cut_lists(m, ctl)?
                } else {
                    self.return_cut(m, ctl).await?;
                    Vec::new()
                };
                // The destination's QEMU waits with -S: it runs once it has both its stream
                // and this cut, so the cut's round trip is not spent with the guest paused.
                disk::send_switchover(ctl, &m.spec.vm, &cut).await?;
                w.switchover = Some(cut);
                q.json(qmp::MigrateContinue(
                    serde_json::json!({"state": "pre-switchover"}),
                ))
                .await?;
                Ok(false)
            }
            "postcopy-active" if m.phase != "running_at_destination" => {
                let why = "post-copy: the VM runs at the destination; the memory pages it lacks come on demand from here";
                self.set_phase(m, "running_at_destination", why)
                    .map_err(|e| e.to_string())?;
                Ok(false)
            }
            "completed" => {
                if let Some(cut) = w.switchover.take() {
                    self.await_switched(m, ctl, &cut).await?;
                }
                for (k, v) in [
                    ("downtime_ms", "downtime"),
                    ("total_time_ms", "total-time"),
                    ("setup_time_ms", "setup-time"),
                    ("ram", "ram"),
                ] {
                    m.figures[k] = info[v].clone();
                }
                if let Some(at) = w.paused_at {
                    // QEMU counts only its final stop-and-copy; the guest was paused since `stop`.
                    m.figures["qemu_downtime_ms"] = info["downtime"].clone();
                    m.figures["downtime_ms"] = (at.elapsed().as_millis() as u64).into();
                }
                Ok(true)
            }
            "postcopy-paused" | "postcopy-recover-setup" | "postcopy-recover" => Err(
                "post-copy lost its stream: the VM's memory is split between the two hosts and QEMU holds both paused; bring the link back and recover it with QMP migrate-recover at the destination and migrate with resume at the source".to_string(),
            ),
            "failed" | "cancelled" => Err(format!(
                "QEMU's migration {status}: {}",
                info["error-desc"].as_str().unwrap_or("no reason given")
            )),
            _ => Ok(false),
        }
    }

    /// At each QEMU iteration: divergence (the remaining memory has not shrunk for 3
    /// iterations) handled as `on_diverge` says; post-copy after the first pass if asked.
    async fn on_iteration(
        &self,
        m: &mut Migration,
        w: &mut Watch,
        q: &qmp::Qmp,
    ) -> std::result::Result<(), String> {
        if w.diverging() && !w.said_diverging {
            w.said_diverging = true;
            let action = m.spec.on_diverge.as_deref().unwrap_or("throttle");
            self.events.emit(
                "migration.diverging",
                &m.id,
                serde_json::json!({"remaining": w.remaining, "action": action}),
            );
            match action {
                "abort" => return Err("pre-copy does not converge (the remaining memory stopped shrinking over 3 iterations) and on_diverge is abort".into()),
                "postcopy" => self.start_postcopy(m, w, q, "pre-copy does not converge (the remaining memory stopped shrinking over 3 iterations)").await?,
                _ => {}
            }
        }
        self.steer_switchover(m, w, q).await?;
        if m.spec.mode.as_deref() == Some("postcopy") && w.remaining.len() >= 2 {
            // After the first full pass: the guest's memory is mostly there already.
            self.start_postcopy(m, w, q, "mode postcopy, after the first pass over memory")
                .await?;
        }
        Ok(())
    }

    /// QEMU switches over once what remains would cross within the downtime limit at the
    /// bandwidth it measured over its last moments; through the tunnel's buffers (the unix
    /// socket, TLS, the link's queue) those moments can read several times the link's rate,
    /// and a switchover then carries 40 MB instead of 10 (1.4 s of downtime where 0.3 s was
    /// asked, seen in the migration benchmark). The average over the whole stream, which the
    /// link has really carried, is given instead (`avail-switchover-bandwidth`), again when
    /// it moves by more than a tenth.
    async fn steer_switchover(
        &self,
        m: &mut Migration,
        w: &mut Watch,
        q: &qmp::Qmp,
    ) -> std::result::Result<(), String> {
        let (avg, told) = (w.average_bps, w.told_bps);
        if avg == 0 || avg.abs_diff(told) * 10 < told {
            return Ok(());
        }
        let params = serde_json::json!({ "avail-switchover-bandwidth": avg });
        q.json(qmp::MigrateSetParameters(params)).await?;
        w.told_bps = avg;
        m.figures["switchover_bandwidth_bps"] = avg.into();
        Ok(())
    }

    /// Folds one `query-migrate` answer into the job (at most one progress event a second);
    /// true at a new QEMU iteration (a new dirty sync), which gets an event of its own.
    fn note_progress(&self, m: &mut Migration, info: &serde_json::Value, w: &mut Watch) -> bool {
        let ram = &info["ram"];
        let total = ram["total"].as_u64().unwrap_or(0);
        let remaining = ram["remaining"].as_u64().unwrap_or(total);
        m.progress.bytes_total = m.progress.bytes_total.max(total);
        m.progress.bytes_done = m.progress.bytes_done.max(total.saturating_sub(remaining));
        m.progress.rate_bps = (ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0) as u64;
        m.progress.eta_s = (m.progress.rate_bps > 0).then(|| remaining / m.progress.rate_bps);
        if w.last_event.elapsed() >= Duration::from_secs(1) {
            w.last_event = std::time::Instant::now();
            let _ = self.state.put(KIND, &m.id, m, false);
            self.events.emit(
                "migration.progress",
                &m.id,
                serde_json::json!({"progress": m.progress}),
            );
        }
        let (sent, ms) = (ram["transferred"].as_u64(), info["total-time"].as_u64());
        if let (Some(sent), Some(ms)) = (sent, ms.filter(|ms| *ms >= 1000)) {
            w.average_bps = sent.saturating_mul(1000) / ms;
        }
        let sync = ram["dirty-sync-count"].as_u64().unwrap_or(0);
        if sync <= w.iterations {
            return false;
        }
        w.iterations = sync;
        w.remaining.push(remaining);
        self.events.emit(
            "migration.iteration",
            &m.id,
            serde_json::json!({
                "iteration": sync,
                "transferred": ram["transferred"],
                "remaining": remaining,
                "dirty_pages_rate": ram["dirty-pages-rate"],
                "expected_downtime_ms": info["expected-downtime"],
                "cpu_throttle_percentage": info["cpu-throttle-percentage"],
            }),
        );
        true
    }
}

/// What the steering loop remembers between looks at QEMU.
struct Watch {
    iterations: u64,
    /// Remaining bytes at the start of each iteration.
    remaining: Vec<u64>,
    last_event: std::time::Instant,
    said_diverging: bool,
    /// When a warm migration paused the guest.
    paused_at: Option<std::time::Instant>,
    /// Post-copy was asked of QEMU.
    postcopy: bool,
    /// The stream's average rate so far (QEMU's bytes over its time), bytes/s.
    average_bps: u64,
    /// The switchover bandwidth last given to QEMU.
    told_bps: u64,
    /// The cut sent to the destination at the switchover, until it answers.
    switchover: Option<Vec<(String, Vec<u64>)>>,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            iterations: 0,
            remaining: Vec::new(),
            last_event: std::time::Instant::now(),
            said_diverging: false,
            paused_at: None,
            postcopy: false,
            average_bps: 0,
            told_bps: 0,
            switchover: None,
        }
    }

    /// The remaining memory has not gone below its earlier minimum for the last 3 iterations.
    fn diverging(&self) -> bool {
        let n = self.remaining.len();
        if n < 5 {
            return false;
        }
        // The first iteration sends all of memory: compare from the second on.
        let best_before = self.remaining[1..n - 3]
            .iter()
            .min()
            .copied()
            .unwrap_or(u64::MAX);
        self.remaining[n - 3..].iter().all(|r| *r >= best_before)
    }
}

/// The destination side of VM moves, answered on the replication protocol.
pub struct Incoming {
    /// The VMs.
    pub vms: Arc<Vms>,
    /// The jobs (seeds, syncs and exports the source asks for).
    pub jobs: Arc<crate::jobs::Jobs>,
    /// This agent's store id (the source cuts the disk's dirty list for this replica).
    pub store_id: [u8; 16],
    /// The disks (a way back patches them).
    pub disks: Arc<crate::disks::Disks>,
}

/// What `VmIncoming` carries: the spec, and whether the source may switch to post-copy (the
/// incoming QEMU must allow it before it listens).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IncomingRequest {
    spec: crate::model::VmSpec,
    postcopy: bool,
    /// QEMU multifd channels (the stream's parallel connections), when more than one.
    multifd: Option<u32>,
}

/// The multifd channels of migration `m`, if it asked for parallel streams.
fn multifd(m: &Migration) -> Option<u32> {
    m.spec.streams.filter(|n| *n > 1)
}

/// The connections QEMU opens for migration `m`: the main one, and one per multifd channel.
fn channels(m: &Migration) -> usize {
    1 + multifd(m).unwrap_or(0) as usize
}

/// Whether migration `m` may switch to post-copy (asked for, or the answer to divergence).
fn may_postcopy(m: &Migration) -> bool {
    m.spec.mode.as_deref() == Some("postcopy") || m.spec.on_diverge.as_deref() == Some("postcopy")
}

/// What `VmCheck` carries: the spec, and whether the disks are to be replicated.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    spec: crate::model::VmSpec,
    replicate: bool,
    /// A way back: the disks are image disks there, the base the VM left.
    #[serde(default)]
    back: bool,
}

impl server::vmpeer::VmPeer for Incoming {
    fn incoming(
        &self,
        spec: String,
    ) -> futures::future::BoxFuture<'static, std::result::Result<(), String>> {
        let vms = self.vms.clone();
        Box::pin(async move {
            let req: IncomingRequest =
                serde_json::from_str(&spec).map_err(|e| format!("VM spec: {e}"))?;
            vms.create_incoming(req.spec, req.postcopy, req.multifd)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn check(
        &self,
        spec: String,
    ) -> futures::future::BoxFuture<'static, std::result::Result<String, String>> {
        let (vms, disks) = (self.vms.clone(), self.disks.clone());
        let store_id = hex(&self.store_id);
        Box::pin(async move {
            let req: CheckRequest =
                serde_json::from_str(&spec).map_err(|e| format!("VM check: {e}"))?;
            let mut found = vms
                .check_incoming(&req.spec, req.replicate && !req.back)
                .await
                .map_err(|e| e.to_string())?;
            found["store_id"] = store_id.into();
            // What the replicas may still take here (the source holds it against their size).
            let dir = disks.store().dir().to_path_buf();
            found["store_free_bytes"] = free_bytes(&dir)
                .map_err(|e| format!("the free space of store {}: {e}", dir.display()))?
                .into();
            for r in disks.replicas().map_err(|e| e.to_string())? {
                if req.spec.disks.contains(&r.name) {
                    found["replicas"][&r.name] =
                        serde_json::json!({"seeded": r.seeded, "chunks_present": r.chunks_present});
                }
            }
            Ok(found.to_string())
        })
    }

    fn start_job(
        &self,
        spec: String,
    ) -> futures::future::BoxFuture<'static, std::result::Result<String, String>> {
        let jobs = self.jobs.clone();
        Box::pin(async move {
            let spec: crate::model::JobSpec =
                serde_json::from_str(&spec).map_err(|e| format!("job spec: {e}"))?;
            let (job, _) = jobs.create(spec, None).await.map_err(|e| e.to_string())?;
            serde_json::to_string(&job).map_err(|e| e.to_string())
        })
    }

    fn job(&self, id: &str) -> std::result::Result<String, String> {
        let job = self.jobs.show(id).map_err(|e| e.to_string())?;
        serde_json::to_string(&job).map_err(|e| e.to_string())
    }

    fn abort_incoming(
        &self,
        vm: String,
    ) -> futures::future::BoxFuture<'static, std::result::Result<bool, String>> {
        let vms = self.vms.clone();
        Box::pin(async move { vms.abort_incoming(&vm).await.map_err(|e| e.to_string()) })
    }

    fn cancel_job(&self, id: &str) -> std::result::Result<String, String> {
        let job = self.jobs.cancel(id).map_err(|e| e.to_string())?;
        serde_json::to_string(&job).map_err(|e| e.to_string())
    }

    fn invalidate(&self, disk: &str, chunks: &[u64]) -> std::result::Result<u64, String> {
        self.jobs
            .invalidate(disk, chunks)
            .map_err(|e| e.to_string())
    }

    fn patch(
        &self,
        disk: String,
        chunks: Vec<protocol::PatchedChunk>,
        data: bytes::Bytes,
    ) -> futures::future::BoxFuture<'static, std::result::Result<(), String>> {
        let (vms, disks) = (self.vms.clone(), self.disks.clone());
        Box::pin(async move {
            vms.check_patchable(&disk).map_err(|e| e.to_string())?;
            disks
                .patch(&disk, &chunks, &data)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn patch_commit(
        &self,
        disk: String,
    ) -> futures::future::BoxFuture<'static, std::result::Result<u64, String>> {
        let disks = self.disks.clone();
        Box::pin(async move { disks.patch_commit(&disk).await.map_err(|e| e.to_string()) })
    }

    fn switchover(
        &self,
        vm: String,
        cut: Vec<(String, Vec<u64>)>,
    ) -> futures::future::BoxFuture<'static, std::result::Result<(u64, bool), String>> {
        let (vms, jobs) = (self.vms.clone(), self.jobs.clone());
        Box::pin(async move {
            let apply = move || {
                cut.iter().try_fold(
                    0,
                    |n, (disk, chunks)| Ok(n + jobs.invalidate(disk, chunks)?),
                )
            };
            vms.switchover(&vm, apply).await.map_err(|e| e.to_string())
        })
    }

    fn tunnel_target(&self, vm: &str) -> std::result::Result<std::path::PathBuf, String> {
        if !self.vms.is_incoming(vm) {
            return Err(format!("no VM {vm:?} waits for a migration stream here"));
        }
        Ok(self.vms.incoming_socket(vm))
    }
}

/// Bytes an unprivileged writer may still put on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> std::result::Result<u64, String> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(|e| e.to_string())?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// Lower-case hex of a store id.
pub fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A store id from [`hex`].
fn unhex(s: &str) -> Option<[u8; 16]> {
    let mut id = [0u8; 16];
    if s.len() != 32 {
        return None;
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Assumed when the migration names no bandwidth (said in the prediction).
const ASSUMED_BANDWIDTH: f64 = 125e6;

/// The d/r model's prediction for moving `spec`'s memory: the verdict, downtime, total time and
/// WAN bytes, with what it was told.
fn predict(
    m: &Migration,
    spec: &crate::model::VmSpec,
    rtt: f64,
    dirty_mib_s: f64,
    disk_bytes: u64,
    destination: serde_json::Value,
) -> serde_json::Value {
    let cap = m
        .spec
        .bandwidth
        .as_deref()
        .and_then(|b| b.parse::<wan::Rate>().ok());
    let bandwidth = cap.map_or(ASSUMED_BANDWIDTH, |r| r.bytes_per_sec() as f64);
    let page = memory::page::PAGE_SIZE as u64;
    let input = memory::model::ModelInput {
        memory_bytes: spec.memory_mib << 20,
        total_pages: (spec.memory_mib << 20) / page,
        dirty_rate: dirty_mib_s * 1048576.0 / page as f64,
        bandwidth,
        compression: 1.0,
        hot_pages: 0,
        hot_fraction: 0.0,
        rtt,
        downtime_target: m.spec.max_downtime_ms.unwrap_or(300) as f64 / 1000.0,
        hold_hot: false,
    };
    let p = input.predict();
    let verdict = if p.converges {
        "converges"
    } else if p.d_over_r < 1.0 {
        "needs throttle"
    } else {
        "needs postcopy"
    };
    let sent: u64 = p.rounds.iter().map(|r| r.bytes).sum();
    let downtime_bytes = (p.downtime_ms / 1000.0 * bandwidth) as u64;
    // The disk's delta moves before the memory, at the same rate (uncompressed: an upper bound).
    let disk_ms = disk_bytes as f64 / bandwidth * 1000.0;
    serde_json::json!({
        "verdict": verdict,
        "d_over_r": p.d_over_r,
        "downtime_ms": p.downtime_ms,
        "total_ms": p.total_ms + disk_ms,
        "memory_ms": p.total_ms,
        "disk_bytes": disk_bytes,
        "wan_bytes": sent + downtime_bytes + disk_bytes,
        "rounds": p.rounds.len(),
        "stop_reason": p.stop_reason,
        "dirty_rate_mib_s": dirty_mib_s,
        "rtt_ms": rtt * 1000.0,
        "bandwidth_bytes_per_s": bandwidth,
        "bandwidth_assumed": cap.is_none(),
        "destination": destination,
    })
}
