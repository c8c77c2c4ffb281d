//! The agent's VMs: real QEMU processes whose disks are the agent's tracking NBD exports.
//!
//! - [`accel`]: KVM or TCG, and why.
//! - [`qemu`]: QEMU's command line, process and files.
//! - [`qmp`]: the monitor client (`qapi`), with deadlines.
//!
//! A VM's record (spec, whether it should run, its pid) is in the state database; QEMU runs in
//! its own session and outlives the agent, which re-adopts it at start (pidfile + QMP).

pub mod accel;
pub mod qemu;
pub mod qmp;

use crate::disks::Disks;
use crate::error::{check_name, AgentError, Result};
use crate::events::{now, Events};
use crate::model::{Vm, VmSpec};
use crate::state::State;
use qemu::VmDir;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KIND: &str = "vm";
/// How long QEMU has to open its monitor after it is started.
const START_WAIT: Duration = Duration::from_secs(20);
/// How often a VM's supervisor looks at its process and run state.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);
/// How often an incoming VM is looked at.
const INCOMING_EVERY: Duration = Duration::from_millis(50);

/// What the state database keeps of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: VmSpec,
    /// The operator wants it running (false after a stop).
    want_running: bool,
    accel: Option<String>,
    accel_reason: Option<String>,
    pid: Option<u32>,
    started_at: Option<String>,
    /// QEMU starts waiting for a migration stream (`-incoming defer`); cleared once the VM
    /// runs here.
    #[serde(default)]
    incoming: bool,
    /// The agent the VM moved to, after a completed migration away from here.
    #[serde(default)]
    moved_to: Option<String>,
    /// Migration capabilities an incoming QEMU needs before it listens (`postcopy-ram`: the
    /// source may switch to post-copy).
    #[serde(default)]
    incoming_caps: Vec<String>,
    /// Multifd channels an incoming QEMU expects (with the `multifd` capability).
    #[serde(default)]
    incoming_channels: Option<u32>,
    /// The incoming VM took its migration's switchover (the cut was applied and QEMU told to
    /// run): until then its QEMU, started with `-S`, must not run, and after it no cut may be
    /// applied again.
    #[serde(default)]
    switched: bool,
}

/// What the agent knows of a VM right now.
#[derive(Debug, Clone, Default)]
struct Live {
    state: String,
    qemu_status: Option<String>,
    last_words: Option<String>,
    adopted: bool,
}

/// The VMs.
pub struct Vms {
    state: Arc<State>,
    events: Arc<Events>,
    disks: Arc<Disks>,
    dir: PathBuf,
    nbd: PathBuf,
    host: accel::Accel,
    live: Arc<Mutex<HashMap<String, Live>>>,
    /// Running export jobs: a disk that is not an image here may be one of them (a VM arriving
    /// from a peer runs on its replica).
    jobs: std::sync::OnceLock<Arc<crate::jobs::Jobs>>,
    /// One QMP connection per VM, shared (QEMU's monitor socket takes one client at a time).
    monitors: tokio::sync::Mutex<HashMap<String, Arc<qmp::Qmp>>>,
    /// Serialises create/start/stop/delete (each is short; QMP calls carry deadlines).
    ops: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only if a holder panicked; entries are replaced whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vms {
    /// The VMs of `state`, with files under `dir` and disks on the NBD socket `nbd`.
    pub fn new(
        state: Arc<State>,
        events: Arc<Events>,
        disks: Arc<Disks>,
        dir: PathBuf,
        nbd: PathBuf,
    ) -> Vms {
        Vms {
            state,
            events,
            disks,
            dir,
            nbd,
            host: accel::detect(),
            live: Default::default(),
            monitors: Default::default(),
            jobs: std::sync::OnceLock::new(),
            ops: tokio::sync::Mutex::new(()),
        }
    }

    /// Lets VMs run on the exports of `jobs` (set once, after the jobs exist).
    pub fn set_jobs(&self, jobs: Arc<crate::jobs::Jobs>) {
        let _ = self.jobs.set(jobs);
    }

    /// Where disk `d` is served to QEMU: the agent's socket for an image disk, else the socket
    /// of a running export of the replica.
    fn disk_socket(&self, d: &str) -> Option<PathBuf> {
        if self.disks.exists(d) {
            return Some(self.nbd.clone());
        }
        self.jobs.get().and_then(|j| j.export_socket(d))
    }

    /// The accelerator `auto` gives on this host.
    pub fn host_accel(&self) -> &accel::Accel {
        &self.host
    }

    fn vm_dir(&self, name: &str) -> VmDir {
        VmDir {
            dir: self.dir.join(name),
        }
    }

    fn record(&self, name: &str) -> Result<Record> {
        self.state
            .get::<Record>(KIND, name)?
            .ok_or_else(|| AgentError::not_found("vm", name, "list VMs with GET /v1/vms"))
    }

    fn set_live(&self, name: &str, state: &str, last_words: Option<String>) {
        let changed = {
            let mut live = lock(&self.live);
            let l = live.entry(name.to_string()).or_default();
            let changed = l.state != state;
            l.state = state.to_string();
            if last_words.is_some() {
                l.last_words = last_words.clone();
            }
            changed
        };
        if changed {
            self.events.emit(
                "vm.state",
                name,
                serde_json::json!({"state": state, "last_words": last_words}),
            );
        }
    }

    /// Re-adopts the VMs that should be running: a live QEMU is supervised again, a dead one
    /// is reported as died with its last words.
    pub fn adopt(self: &Arc<Self>) -> Result<()> {
        for (name, rec) in self.state.list::<Record>(KIND)? {
            if rec.moved_to.is_some() && !rec.want_running {
                self.set_live(&name, "moved", None);
                continue;
            }
            if !rec.want_running && !rec.incoming {
                self.set_live(&name, "stopped", None);
                continue;
            }
            let dir = self.vm_dir(&name);
            match qemu::read_pid(&dir).or(rec.pid) {
                Some(pid) if qemu::alive(pid, &dir) => {
                    tracing::info!(vm = %name, pid, "re-adopted a running VM");
                    lock(&self.live).entry(name.clone()).or_default().adopted = true;
                    self.set_live(&name, "running", None);
                    self.supervise(name, pid);
                }
                _ => {
                    let words = qemu::last_words(&dir);
                    tracing::warn!(vm = %name, %words, "a VM that should run has no QEMU");
                    self.set_live(&name, "died", Some(words));
                }
            }
        }
        Ok(())
    }

    fn check_spec(&self, spec: &VmSpec) -> Result<()> {
        check_name("vm", &spec.name)?;
        let invalid = |m: String| Err(AgentError::Invalid(m));
        if !(16..=1 << 20).contains(&spec.memory_mib) {
            return invalid(format!(
                "memory_mib {} of VM {:?}: use 16 to 1048576",
                spec.memory_mib, spec.name
            ));
        }
        if !(1..=256).contains(&spec.vcpus) {
            return invalid(format!(
                "vcpus {} of VM {:?}: use 1 to 256",
                spec.vcpus, spec.name
            ));
        }
        accel::choose(&spec.accel, &self.host).map_err(AgentError::Invalid)?;
        for f in [&spec.boot.kernel, &spec.boot.initrd].into_iter().flatten() {
            if !std::path::Path::new(f).is_file() {
                return invalid(format!(
                    "boot file {f} of VM {:?} does not exist on this host (build the sample guest with scripts/sample-guest DIR)",
                    spec.name
                ));
            }
        }
        if spec.boot.kernel.is_none() && (spec.boot.initrd.is_some() || spec.boot.cmdline.is_some())
        {
            return invalid(format!(
                "VM {:?}: initrd and cmdline need a kernel",
                spec.name
            ));
        }
        for nic in &spec.nics {
            qemu::check_nic(nic).map_err(AgentError::Invalid)?;
        }
        let attached = self.attachments()?;
        for d in &spec.disks {
            if self.disk_socket(d).is_none() {
                return Err(AgentError::not_found(
                    "disk",
                    d,
                    format!(
                        "VM {:?} names it; create it first with POST /v1/disks",
                        spec.name
                    ),
                ));
            }
            if let Some(other) = attached.get(d).filter(|o| **o != spec.name) {
                return Err(AgentError::Conflict(format!(
                    "disk {d:?} is attached to VM {other:?} already; a disk belongs to one VM"
                )));
            }
        }
        Ok(())
    }

    /// Checks `spec` and records a new VM (not started; `incoming`: waiting for a stream).
    fn record_new(&self, spec: &VmSpec, incoming: bool) -> Result<()> {
        self.check_spec(spec)?;
        let dir = self.vm_dir(&spec.name);
        std::fs::create_dir_all(&dir.dir)
            .map_err(AgentError::io(format!("creating {}", dir.dir.display())))?;
        let rec = Record {
            spec: spec.clone(),
            want_running: false,
            accel: None,
            accel_reason: None,
            pid: None,
            started_at: None,
            incoming,
            moved_to: None,
            incoming_caps: Vec::new(),
            incoming_channels: None,
            switched: false,
        };
        self.state.put(KIND, &spec.name, &rec, true)?;
        self.set_live(
            &spec.name,
            if incoming { "incoming" } else { "stopped" },
            None,
        );
        Ok(())
    }

    /// Disk name -> the VM it is attached to.
    pub fn attachments(&self) -> Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        for (name, rec) in self.state.list::<Record>(KIND)? {
            for d in rec.spec.disks {
                out.insert(d, name.clone());
            }
        }
        Ok(out)
    }

    /// Whether a peer may patch disk `disk` (a migration's way back): not while a VM runs on
    /// it here (an incoming one, not yet running, may).
    pub fn check_patchable(&self, disk: &str) -> Result<()> {
        let Some(vm) = self.attachments()?.remove(disk) else {
            return Ok(());
        };
        let rec = self.record(&vm)?;
        let alive = rec.pid.is_some_and(|p| qemu::alive(p, &self.vm_dir(&vm)));
        if alive && !rec.incoming {
            return Err(AgentError::Conflict(format!(
                "disk {disk:?} belongs to VM {vm:?}, which runs here: a peer cannot write it"
            )));
        }
        Ok(())
    }

    /// Creates a VM (starting it unless `spec.start` is false). The same spec again returns
    /// the existing VM (`false`: nothing created).
    pub async fn create(self: &Arc<Self>, spec: VmSpec) -> Result<(Vm, bool)> {
        let _op = self.ops.lock().await;
        if let Some(rec) = self.state.get::<Record>(KIND, &spec.name)? {
            if rec.spec == spec {
                return Ok((self.show(&spec.name)?, false));
            }
            return Err(AgentError::Conflict(format!(
                "VM {:?} exists with another spec; delete it first or pick another name",
                spec.name
            )));
        }
        self.record_new(&spec, false)?;
        if spec.start {
            if let Err(e) = self.start_locked(&spec.name).await {
                // Nothing half-made: the VM that could not start is not left behind.
                let _ = self.state.delete(KIND, &spec.name);
                lock(&self.live).remove(&spec.name);
                return Err(e);
            }
        }
        Ok((self.show(&spec.name)?, true))
    }

    /// Starts a stopped (or died) VM; a running one is left as it is.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<Vm> {
        let _op = self.ops.lock().await;
        self.start_locked(name).await?;
        self.show(name)
    }

    async fn start_locked(self: &Arc<Self>, name: &str) -> Result<()> {
        let mut rec = self.record(name)?;
        let dir = self.vm_dir(name);
        if let Some(pid) = rec.pid.filter(|p| qemu::alive(*p, &dir)) {
            tracing::debug!(vm = %name, pid, "start: already running");
            return Ok(());
        }
        if let Some(to) = &rec.moved_to {
            // Its disks here are the base for the way back: a VM started on them would diverge
            // from the one running there.
            return Err(AgentError::Conflict(format!(
                "VM {name:?} moved to {to} and runs there; migrate it back rather than start this copy"
            )));
        }
        for d in &rec.spec.disks {
            if self.disk_socket(d).is_none() {
                return Err(AgentError::not_found(
                    "disk",
                    d,
                    format!("VM {name:?} needs it"),
                ));
            }
        }
        let acc = accel::choose(&rec.spec.accel, &self.host).map_err(AgentError::Invalid)?;
        let sockets: Vec<PathBuf> = rec
            .spec
            .disks
            .iter()
            .filter_map(|d| self.disk_socket(d))
            .collect();
        let mut args = qemu::args(&rec.spec, acc.name, &dir, &sockets);
        if rec.incoming {
            // -S: the guest stays paused after its stream is loaded until the switchover says
            // the disks are cut (`switchover`), whichever of the two comes first.
            args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
        }
        self.set_live(name, "starting", None);
        let pid = match qemu::spawn(&args, &dir, START_WAIT).await {
            Ok(pid) => pid,
            Err(e) => {
                self.set_live(name, "stopped", Some(e.clone()));
                return Err(AgentError::Qemu(format!("VM {name:?} did not start: {e}")));
            }
        };
        if rec.incoming {
            self.listen_incoming(name, pid).await?;
        }
        rec.want_running = true;
        rec.pid = Some(pid);
        rec.accel = Some(acc.name.to_string());
        rec.accel_reason = Some(acc.reason.clone());
        rec.started_at = Some(now());
        self.state.put(KIND, name, &rec, true)?;
        tracing::info!(vm = %name, pid, accel = acc.name, "VM started");
        {
            let mut live = lock(&self.live);
            let l = live.entry(name.to_string()).or_default();
            l.adopted = false;
            l.last_words = None;
        }
        self.set_live(name, "running", None);
        self.supervise(name.to_string(), pid);
        Ok(())
    }

    /// The VM's monitor, connecting when there is no live connection.
    pub async fn monitor(&self, name: &str) -> Result<Arc<qmp::Qmp>> {
        let mut monitors = self.monitors.lock().await;
        if let Some(m) = monitors.get(name).filter(|m| m.usable()) {
            return Ok(m.clone());
        }
        // A broken connection is closed first: QEMU's monitor serves one client at a time.
        monitors.remove(name);
        let m = Arc::new(
            qmp::Qmp::connect(&self.vm_dir(name).qmp())
                .await
                .map_err(|e| AgentError::Qemu(format!("VM {name:?}: {e}")))?,
        );
        monitors.insert(name.to_string(), m.clone());
        Ok(m)
    }

    /// Forgets a VM's monitor connection after it failed (the next use connects again).
    pub async fn drop_monitor(&self, name: &str) {
        self.monitors.lock().await.remove(name);
    }

    /// The socket the source agent carries a VM's outgoing migration stream from.
    pub fn migrate_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).dir.join("migrate.sock")
    }

    /// The socket an incoming VM's QEMU reads its migration stream from.
    pub fn incoming_socket(&self, name: &str) -> PathBuf {
        self.vm_dir(name).dir.join("incoming.sock")
    }

    /// Whether a VM of `spec` could come here: the spec checks out (its disks exist), no VM of
    /// that name runs here, QEMU runs, and the host has the memory free. What was found.
    /// With `replicate` the disks come later (seeded into the store, served by an export job):
    /// they must only not be image disks here, which QEMU would be given instead.
    pub async fn check_incoming(
        &self,
        spec: &VmSpec,
        replicate: bool,
    ) -> Result<serde_json::Value> {
        if replicate {
            if let Some(d) = spec.disks.iter().find(|d| self.disks.exists(d)) {
                return Err(AgentError::Conflict(format!(
                    "disk {d:?} is an image disk here: a replicated disk of that name cannot come"
                )));
            }
            let mut bare = spec.clone();
            bare.disks.clear();
            self.check_spec(&bare)?;
        } else {
            self.check_spec(spec)?;
        }
        if let Ok(rec) = self.record(&spec.name) {
            if rec
                .pid
                .is_some_and(|p| qemu::alive(p, &self.vm_dir(&spec.name)))
            {
                return Err(AgentError::Conflict(format!(
                    "VM {:?} runs here already",
                    spec.name
                )));
            }
        }
        let version = tokio::process::Command::new(qemu::binary())
            .arg("--version")
            .output()
            .await
            .map_err(|e| AgentError::Qemu(format!("cannot run {}: {e}", qemu::binary())))?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let free_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib / 1024);
        if free_mib < spec.memory_mib {
            return Err(AgentError::Conflict(format!(
                "VM {:?} needs {} MiB; this host has {free_mib} MiB available",
                spec.name, spec.memory_mib
            )));
        }
        let accel = accel::choose(&spec.accel, &self.host).map_err(AgentError::Invalid)?;
        Ok(
            serde_json::json!({"qemu": version, "accel": accel.name, "memory_available_mib": free_mib}),
        )
    }

    /// Whether VM `name` waits for a migration stream here.
    pub fn is_incoming(&self, name: &str) -> bool {
        self.record(name).is_ok_and(|r| r.incoming)
    }

    /// Asks a QEMU started with `-incoming defer` to listen on the VM's incoming socket; kills
    /// it if it cannot.
    async fn listen_incoming(&self, name: &str, pid: u32) -> Result<()> {
        let sock = self.incoming_socket(name);
        let _ = std::fs::remove_file(&sock);
        let uri = format!("unix:{}", sock.display());
        let rec = self.record(name)?;
        let caps: Vec<serde_json::Value> = rec
            .incoming_caps
            .iter()
            .map(|c| serde_json::json!({"capability": c, "state": true}))
            .collect();
        let listened = match self.monitor(name).await {
            Ok(q) => {
                let set = match caps.is_empty() {
                    true => Ok(serde_json::Value::Null),
                    false => {
                        let caps = serde_json::json!({ "capabilities": caps });
                        q.json(qmp::MigrateSetCapabilities(caps)).await
                    }
                };
                let set = match (set, rec.incoming_channels) {
                    (Ok(_), Some(n)) => {
                        let params = serde_json::json!({ "multifd-channels": n });
                        q.json(qmp::MigrateSetParameters(params)).await
                    }
                    (set, _) => set,
                };
                match set {
                    Ok(_) => q
                        .json(qmp::MigrateIncoming(serde_json::json!({ "uri": uri })))
                        .await
                        .map_err(AgentError::Qemu),
                    Err(e) => Err(AgentError::Qemu(e)),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = listened {
            // Not a VM that can run: it has no state until a stream arrives.
            let _ = qemu::kill(pid);
            return Err(e);
        }
        Ok(())
    }

    /// Creates and starts a VM that waits for a migration stream from a peer agent (same name
    /// and spec as at the source). An incoming VM of the same name that never ran is replaced.
    pub async fn create_incoming(
        self: &Arc<Self>,
        mut spec: VmSpec,
        postcopy: bool,
        multifd: Option<u32>,
    ) -> Result<()> {
        let _op = self.ops.lock().await;
        if let Some(rec) = self.state.get::<Record>(KIND, &spec.name)? {
            let alive = rec
                .pid
                .is_some_and(|p| qemu::alive(p, &self.vm_dir(&spec.name)));
            if alive && !rec.incoming {
                return Err(AgentError::Conflict(format!(
                    "VM {:?} runs here already; a VM cannot move onto itself",
                    spec.name
                )));
            }
            if let Some(pid) = rec.pid.filter(|_| alive) {
                let _ = qemu::kill(pid);
            }
        }
        spec.start = true;
        self.record_new(&spec, true)?;
        if postcopy || multifd.is_some() {
            let mut rec = self.record(&spec.name)?;
            if postcopy {
                rec.incoming_caps.push("postcopy-ram".into());
            }
            if multifd.is_some() {
                rec.incoming_caps.push("multifd".into());
                rec.incoming_channels = multifd;
            }
            self.state.put(KIND, &spec.name, &rec, true)?;
        }
        self.start_locked(&spec.name).await
    }

    /// After a completed migration away: QEMU (paused in `postmigrate`) is stopped and the VM
    /// is recorded as moved to `to`; its disks stay, the base for the way back.
    pub async fn mark_moved(self: &Arc<Self>, name: &str, to: &str) -> Result<()> {
        self.stop(name).await?;
        let _op = self.ops.lock().await;
        let mut rec = self.record(name)?;
        rec.moved_to = Some(to.to_string());
        self.state.put(KIND, name, &rec, true)?;
        self.set_live(name, "moved", None);
        Ok(())
    }

    /// Stops a VM: QMP `quit` (QEMU flushes its disks), then SIGKILL if it lingers.
    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<Vm> {
        let _op = self.ops.lock().await;
        let mut rec = self.record(name)?;
        rec.want_running = false;
        self.state.put(KIND, name, &rec, true)?;
        let dir = self.vm_dir(name);
        if let Some(pid) = rec.pid.filter(|p| qemu::alive(*p, &dir)) {
            let asked = match self.monitor(name).await {
                Ok(q) => q.quit().await,
                Err(e) => Err(e.to_string()),
            };
            self.drop_monitor(name).await;
            // QEMU that took `quit` gets 10 s to flush and exit; one that did not is killed now.
            let grace = match asked {
                Ok(()) => Duration::from_secs(10),
                Err(e) => {
                    tracing::warn!(vm = %name, error = %e, "QMP quit failed; killing QEMU");
                    Duration::ZERO
                }
            };
            let deadline = tokio::time::Instant::now() + grace;
            while qemu::alive(pid, &dir) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if qemu::alive(pid, &dir) {
                // The pid is this VM's QEMU (alive() checked its command line).
                let _ = qemu::kill(pid);
            }
        }
        self.set_live(name, "stopped", None);
        self.show(name)
    }

    /// Stops the QEMU of an incoming VM that has not run here (its migration ended before its
    /// stream began, so nothing would end it); its supervisor then removes the VM. Whether
    /// there was one to stop.
    pub async fn abort_incoming(self: &Arc<Self>, name: &str) -> Result<bool> {
        let _op = self.ops.lock().await;
        let Ok(rec) = self.record(name) else {
            return Ok(false);
        };
        if !rec.incoming {
            return Ok(false);
        }
        let dir = self.vm_dir(name);
        let Some(pid) = rec.pid.filter(|p| qemu::alive(*p, &dir)) else {
            return Ok(false);
        };
        // Only a QEMU still waiting for its stream: one that runs (post-copy) or holds the
        // whole guest (a paused, warm arrival) is the VM now, whatever the source thinks.
        let status = match self.monitor(name).await {
            Ok(m) => m.status().await.ok(),
            Err(_) => None,
        };
        // A QEMU whose stream is loaded but that never took its switchover has not run either:
        // the source still holds the VM (and resumes it there).
        let waiting = status.as_deref() == Some("inmigrate")
            || (status.as_deref() == Some("paused") && !rec.switched);
        if !waiting {
            tracing::warn!(vm = %name, ?status, "asked to stop an incoming QEMU that is past waiting; left alone");
            return Ok(false);
        }
        tracing::info!(vm = %name, pid, "stopping an incoming QEMU whose migration ended");
        // The pid is this VM's QEMU (alive() checked its command line); it holds no guest
        // state of its own yet, so nothing is lost.
        let _ = qemu::kill(pid);
        Ok(true)
    }

    /// A migration's switchover for the incoming VM `name`: `cut` makes the chunks the source
    /// wrote since its last round absent, then QEMU (started with `-S`) is told to run: at once
    /// if its stream is loaded, else the moment it is (`cont` while `inmigrate` sets QEMU's
    /// autostart). Recorded before QEMU is told, so that neither a repeat (the source sending
    /// again after a lost connection) nor a restarted agent applies a cut once the guest may
    /// have run. (what `cut` returned, whether this was a repeat.)
    pub async fn switchover(
        self: &Arc<Self>,
        name: &str,
        cut: impl FnOnce() -> Result<u64> + Send + 'static,
    ) -> Result<(u64, bool)> {
        let t = std::time::Instant::now();
        let _op = self.ops.lock().await;
        let mut rec = self.record(name)?;
        if rec.switched {
            return Ok((0, true));
        }
        if !rec.incoming {
            return Err(AgentError::Conflict(format!(
                "VM {name:?} does not wait for a migration here: no switchover to take"
            )));
        }
        // Synced writes (the cut's records, then the VM's): off the runtime's threads, which
        // carry the migration stream meanwhile.
        rec.switched = true;
        let (state, key) = (self.state.clone(), name.to_string());
        let applied = tokio::task::spawn_blocking(move || {
            let n = cut()?;
            state.put(KIND, &key, &rec, true)?;
            Ok::<_, AgentError>(n)
        })
        .await
        .map_err(|e| AgentError::Internal(format!("the switchover of VM {name:?}: {e}")))?;
        let invalidated = applied?;
        let cut_ms = t.elapsed().as_millis() as u64;
        // The cut is taken: from here the VM is this agent's to run, so a QEMU that does not
        // take `cont` now is left to the supervisor, which resumes a switched VM it finds
        // paused.
        // QEMU's status is read after `cont` (for the log only: `inmigrate` says the cut came
        // before the stream was loaded), not on the way to it.
        let (resumed, status) = match self.monitor(name).await {
            Ok(q) => (q.resume().await, q.status().await.ok()),
            Err(e) => (Err(e.to_string()), None),
        };
        tracing::info!(vm = %name, invalidated, cut_ms, total_ms = t.elapsed().as_millis() as u64, ?status, "switchover taken");
        if let Err(e) = resumed {
            tracing::warn!(vm = %name, error = %e, "the switchover's QMP cont failed; the supervisor resumes the VM once its stream is loaded");
        }
        Ok((invalidated, false))
    }

    /// Deletes a stopped VM (its directory with the console log is kept).
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<()> {
        let _op = self.ops.lock().await;
        let rec = self.record(name)?;
        if rec.pid.is_some_and(|p| qemu::alive(p, &self.vm_dir(name))) {
            return Err(AgentError::Conflict(format!(
                "VM {name:?} is running; stop it first (POST /v1/vms/{name}/stop)"
            )));
        }
        self.state.delete(KIND, name)?;
        lock(&self.live).remove(name);
        self.events.emit("vm.deleted", name, serde_json::json!({}));
        Ok(())
    }

    /// One VM.
    pub fn show(&self, name: &str) -> Result<Vm> {
        let rec = self.record(name)?;
        let live = lock(&self.live).get(name).cloned().unwrap_or_default();
        let dir = self.vm_dir(name);
        let running = matches!(live.state.as_str(), "running" | "starting");
        Ok(Vm {
            spec: rec.spec,
            state: if live.state.is_empty() {
                "stopped".into()
            } else {
                live.state
            },
            qemu_status: live.qemu_status.filter(|_| running),
            accel: rec.accel,
            accel_reason: rec.accel_reason,
            pid: rec.pid.filter(|_| running),
            serial_log: dir.serial().display().to_string(),
            last_words: live.last_words,
            started_at: rec.started_at,
            adopted: live.adopted,
            moved_to: rec.moved_to,
        })
    }

    /// Every VM.
    pub fn list(&self) -> Result<Vec<Vm>> {
        let names: Vec<String> = self
            .state
            .list::<Record>(KIND)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.iter().map(|n| self.show(n)).collect()
    }

    /// An incoming VM whose QEMU exited before the VM ran here (the stream failed or was
    /// cancelled): nothing is left of it but its directory's logs; the disks stay.
    async fn incoming_failed(&self, name: &str) {
        let words = qemu::last_words(&self.vm_dir(name));
        tracing::warn!(vm = %name, %words, "an incoming migration ended before the VM ran here; removing the VM");
        self.drop_monitor(name).await;
        let _op = self.ops.lock().await;
        if self.record(name).is_ok_and(|r| r.incoming) {
            let _ = self.state.delete(KIND, name);
            lock(&self.live).remove(name);
            self.events.emit(
                "vm.deleted",
                name,
                serde_json::json!({"reason": "its incoming migration ended before it ran here", "last_words": words}),
            );
        }
    }

    /// An incoming VM runs: it is an ordinary VM from now on (a restart boots it normally).
    fn arrived(&self, name: &str) {
        if let Ok(mut rec) = self.record(name) {
            rec.incoming = false;
            rec.want_running = true;
            if let Err(e) = self.state.put(KIND, name, &rec, true) {
                tracing::warn!(vm = %name, error = %e, "cannot record an arrived VM");
            }
            tracing::info!(vm = %name, "the VM arrived and runs here");
            self.events.emit("vm.arrived", name, serde_json::json!({}));
        }
    }

    /// Watches a VM's QEMU until it exits or is stopped: keeps its run state current and
    /// reports a death the agent did not ask for, with QEMU's last words.
    fn supervise(self: &Arc<Self>, name: String, pid: u32) {
        let this = self.clone();
        tokio::spawn(async move {
            let dir = this.vm_dir(&name);
            let mut every = SUPERVISE_EVERY;
            loop {
                tokio::time::sleep(every).await;
                let Ok(rec) = this.record(&name) else { return };
                // An arriving VM is watched closely: its start ends the migration's downtime.
                every = if rec.incoming {
                    INCOMING_EVERY
                } else {
                    SUPERVISE_EVERY
                };
                if rec.pid != Some(pid) {
                    return; // restarted under another pid: that one has its own supervisor
                }
                if !qemu::alive(pid, &dir) {
                    if rec.incoming {
                        this.incoming_failed(&name).await;
                    } else if rec.want_running {
                        let words = qemu::last_words(&dir);
                        tracing::warn!(vm = %name, pid, %words, "QEMU died");
                        this.set_live(&name, "died", Some(words));
                    }
                    return;
                }
                let status = match this.monitor(&name).await {
                    Ok(m) => m.status().await.ok(),
                    Err(_) => None,
                };
                if status.is_none() {
                    this.drop_monitor(&name).await; // reconnect next time
                }
                if rec.incoming && rec.switched && status.as_deref() == Some("paused") {
                    // The stream of a guest paused at the source (a warm move) ends paused:
                    // an agent's VMs run, so it starts here (once its disks were cut).
                    if let Ok(m) = this.monitor(&name).await {
                        if let Err(e) = m.resume().await {
                            tracing::warn!(vm = %name, error = %e, "cannot resume an arrived VM");
                        }
                    }
                    continue;
                }
                if status.as_deref() == Some("running") && rec.incoming {
                    this.arrived(&name);
                }
                let mut live = lock(&this.live);
                if let Some(l) = live.get_mut(&name) {
                    l.qemu_status = status;
                }
            }
        });
    }
}
