//! Jobs: seeds and sync rounds pulled from peer agents into this agent's store, and NBD
//! exports of its replicas; each with a phase, progress that never goes backwards, and final
//! figures kept after it ends.
//!
//! - [`export`]: the export job.
//!
//! A job is persisted at every phase change; at start the agent resumes every job that had not
//! ended (a seed keeps every chunk it installed, so the resumed run fetches none twice).

use crate::error::{check_name, AgentError, Result};
use crate::events::{now, Events};
use crate::model::{Job, JobSpec, PeerSpec, Progress};
use crate::state::State;
use client::session::Peer;
use client::{SeedOptions, SeedProgress};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

mod export;

pub(crate) const KIND: &str = "job";

/// What a job's last progress report saw (rates and metric increments are differences).
struct Last {
    at: Instant,
    done: u64,
    wire: u64,
    fetched: u64,
    dedup: u64,
    peer: crate::metrics::PeerLabels,
}

fn job_peer(job: &Job) -> String {
    job.spec.from.clone().unwrap_or_default()
}
/// How often a running job's progress is published and stored.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The jobs.
pub struct Jobs {
    state: Arc<State>,
    events: Arc<Events>,
    store: blockstore::Store,
    tls: Option<protocol::tls::TlsClient>,
    agent: String,
    running: Mutex<HashMap<String, CancellationToken>>,
    metrics: crate::metrics::Metrics,
    /// Serialises creation (id allocation and name lookup).
    create: tokio::sync::Mutex<()>,
    /// Where exports' default sockets go.
    exports_dir: std::path::PathBuf,
    /// Running exports by disk: the device and its unix socket.
    exports: Mutex<HashMap<String, ExportEntry>>,
}

type ExportEntry = (
    Arc<server::export::ReplicaDevice>,
    Option<std::path::PathBuf>,
);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only if a holder panicked; entries are inserted and removed whole.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Jobs {
    /// The jobs of `state`, transferring into `store` as agent `agent`.
    pub fn new(
        state: Arc<State>,
        events: Arc<Events>,
        store: blockstore::Store,
        tls: Option<protocol::tls::TlsClient>,
        agent: String,
        metrics: crate::metrics::Metrics,
        exports_dir: std::path::PathBuf,
    ) -> Jobs {
        Jobs {
            exports_dir,
            exports: Mutex::new(HashMap::new()),
            metrics,
            state,
            events,
            store,
            tls,
            agent,
            running: Mutex::new(HashMap::new()),
            create: tokio::sync::Mutex::new(()),
        }
    }

    /// One job.
    pub fn show(&self, id: &str) -> Result<Job> {
        self.state
            .get::<Job>(KIND, id)?
            .ok_or_else(|| AgentError::not_found("job", id, "list jobs with GET /v1/jobs"))
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Result<Vec<Job>> {
        let mut jobs: Vec<Job> = self
            .state
            .list::<Job>(KIND)?
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        jobs.sort_by_key(|j| j.id.trim_start_matches("job-").parse::<u64>().unwrap_or(0));
        Ok(jobs)
    }

    /// Jobs not ended.
    pub fn active(&self) -> usize {
        lock(&self.running).len()
    }

    /// Counts by phase (for metrics).
    pub fn by_phase(&self) -> Result<HashMap<String, u64>> {
        let mut out = HashMap::new();
        for j in self.list()? {
            *out.entry(j.phase).or_insert(0) += 1;
        }
        Ok(out)
    }

    fn resolve_peer(&self, from: &str) -> Result<String> {
        if from.contains(':') {
            return Ok(from.to_string());
        }
        match self.state.get::<PeerSpec>("peer", from)? {
            Some(p) => Ok(p.addr),
            None => Err(AgentError::not_found(
                "peer",
                from,
                "give HOST:PORT, or declare the peer (POST /v1/peers or the config file)",
            )),
        }
    }

    /// Refuses a spec that cannot run, before anything is recorded.
    fn check_spec(&self, spec: &JobSpec, key: Option<&str>) -> Result<()> {
        if !matches!(spec.kind.as_str(), "seed" | "sync" | "export") {
            return Err(AgentError::Invalid(format!(
                "job kind {:?}: this agent runs \"seed\", \"sync\" and \"export\" jobs",
                spec.kind
            )));
        }
        check_name("disk", &spec.disk)?;
        match (&spec.from, spec.kind.as_str()) {
            (None, "seed" | "sync") => {
                return Err(AgentError::Invalid(format!(
                    "a {} job needs `from`: the peer agent serving disk {:?}",
                    spec.kind, spec.disk
                )))
            }
            (Some(from), _) => {
                self.resolve_peer(from)?;
            }
            (None, _) => {}
        }
        if let Some(nbd) = &spec.nbd {
            if spec.kind != "export" {
                return Err(AgentError::Invalid("`nbd` is for export jobs".into()));
            }
            nbd.parse::<server::nbd::listener::NbdAddr>()
                .map_err(|e| AgentError::Invalid(format!("nbd: {e}")))?;
        }
        if let Some(b) = &spec.bandwidth {
            b.parse::<wan::Rate>().map_err(|e| {
                AgentError::Invalid(format!("bandwidth {b:?}: {e} (e.g. 100Mbit, 20MiB/s)"))
            })?;
        }
        if spec.streams.is_some_and(|s| !(1..=64).contains(&s)) {
            return Err(AgentError::Invalid("streams: use 1 to 64".into()));
        }
        if let Some(name) = &spec.name {
            check_name("job", name)?;
        }
        if key.is_some_and(|k| k.is_empty() || k.len() > 200 || k.chars().any(|c| c.is_control())) {
            return Err(AgentError::Invalid(
                "Idempotency-Key: use 1 to 200 printable characters".into(),
            ));
        }
        Ok(())
    }

    /// The job one of `handles` (a name, an idempotency key) made, if any; another spec under
    /// a taken handle is a conflict.
    fn existing(&self, handles: &[String], spec: &JobSpec) -> Result<Option<Job>> {
        for h in handles {
            if let Some(id) = self.state.get::<String>("job-handle", h)? {
                let job = self.show(&id)?;
                if job.spec == *spec {
                    return Ok(Some(job));
                }
                return Err(AgentError::Conflict(format!(
                    "{} is taken by {id} with another spec; pick another",
                    h.replacen(':', " ", 1)
                )));
            }
        }
        Ok(None)
    }

    /// Creates a job and starts it; a job with the same `name` (or idempotency key, mapped to
    /// a name by the API) is returned instead (`false`: nothing created).
    pub async fn create(self: &Arc<Self>, spec: JobSpec, key: Option<&str>) -> Result<(Job, bool)> {
        self.check_spec(&spec, key)?;
        let _create = self.create.lock().await;
        // A name and an idempotency key are looked up alike: either finds the job it made.
        let handles: Vec<String> = spec
            .name
            .iter()
            .map(|n| format!("name:{n}"))
            .chain(key.map(|k| format!("key:{k}")))
            .collect();
        if let Some(job) = self.existing(&handles, &spec)? {
            return Ok((job, false));
        }
        if let Some(busy) = self
            .list()?
            .into_iter()
            .find(|j| !j.ended() && j.spec.disk == spec.disk)
        {
            return Err(AgentError::Conflict(format!(
                "disk {:?} is in {} ({} job, {}); cancel it or wait for it to end",
                spec.disk, busy.id, busy.kind, busy.phase
            )));
        }
        let n: u64 = self.state.get("meta", "job_next")?.unwrap_or(1);
        self.state.put("meta", "job_next", &(n + 1), true)?;
        let job = Job {
            id: format!("job-{n}"),
            kind: spec.kind.clone(),
            spec: spec.clone(),
            phase: "queued".into(),
            phase_reason: Some("created".into()),
            progress: Progress::default(),
            started_at: now(),
            ended_at: None,
            error: None,
            figures: serde_json::json!({}),
            resumed: 0,
        };
        self.state.put(KIND, &job.id, &job, true)?;
        for h in &handles {
            self.state.put("job-handle", h, &job.id, true)?;
        }
        self.events.emit(
            "job.phase",
            &job.id,
            serde_json::json!({"phase": "queued", "kind": job.kind, "disk": spec.disk}),
        );
        self.launch(job.clone());
        Ok((job, true))
    }

    /// Resumes every job that had not ended when the agent stopped.
    pub fn resume(self: &Arc<Self>) -> Result<()> {
        for mut job in self.list()? {
            if job.ended() {
                continue;
            }
            job.resumed += 1;
            tracing::info!(job = %job.id, phase = %job.phase, "resuming a job the agent was running when it stopped");
            self.set_phase(&mut job, "queued", "resumed after an agent restart")?;
            self.launch(job);
        }
        Ok(())
    }

    /// Cancels a job; cancelling an ended job changes nothing (idempotent).
    pub fn cancel(&self, id: &str) -> Result<Job> {
        let job = self.show(id)?;
        if job.ended() {
            return Ok(job);
        }
        match lock(&self.running).get(id) {
            Some(token) => token.cancel(),
            None => {
                let mut job = job;
                self.finish(&mut job, "cancelled", "cancelled before it ran", None)?;
            }
        }
        self.show(id)
    }

    fn set_phase(&self, job: &mut Job, phase: &str, why: &str) -> Result<()> {
        job.phase = phase.to_string();
        job.phase_reason = Some(why.to_string());
        self.state.put(KIND, &job.id, job, true)?;
        self.events.emit(
            "job.phase",
            &job.id,
            serde_json::json!({"phase": phase, "reason": why, "progress": job.progress}),
        );
        Ok(())
    }

    fn finish(&self, job: &mut Job, phase: &str, why: &str, error: Option<String>) -> Result<()> {
        job.ended_at = Some(now());
        job.error = error;
        job.progress.rate_bps = 0;
        job.progress.eta_s = None;
        self.set_phase(job, phase, why)
    }

    /// The peer of a job, when it names one.
    fn peer(&self, spec: &JobSpec) -> Result<Option<Peer>> {
        let Some(from) = &spec.from else {
            return Ok(None);
        };
        Ok(Some(Peer {
            addr: self.resolve_peer(from)?,
            tls: self.tls.clone(),
            agent: self.agent.clone(),
            timeout: client::session::DEFAULT_TIMEOUT,
        }))
    }

    fn options(&self, spec: &JobSpec) -> Result<SeedOptions> {
        let peer = self
            .peer(spec)?
            .ok_or_else(|| AgentError::Invalid(format!("a {} job needs `from`", spec.kind)))?;
        Ok(SeedOptions {
            peer,
            name: spec.disk.clone(),
            // Checked at creation.
            bandwidth: spec.bandwidth.as_deref().and_then(|b| b.parse().ok()),
            streams: spec.streams.unwrap_or(4),
            retries: 4,
            compress: client::Compress::Auto,
        })
    }

    fn launch(self: &Arc<Self>, job: Job) {
        let token = CancellationToken::new();
        lock(&self.running).insert(job.id.clone(), token.clone());
        let this = self.clone();
        tokio::spawn(async move {
            let id = job.id.clone();
            if let Err(e) = this.run(job, token).await {
                tracing::error!(job = %id, error = %e, "a job's record could not be updated");
            }
            lock(&this.running).remove(&id);
        });
    }

    async fn run(&self, mut job: Job, cancel: CancellationToken) -> Result<()> {
        if job.kind == "export" {
            return self.run_export(job, cancel).await;
        }
        let opts = match self.options(&job.spec) {
            Ok(o) => o,
            Err(e) => return self.finish(&mut job, "failed", "bad options", Some(e.to_string())),
        };
        self.set_phase(
            &mut job,
            "transferring",
            &format!("pulling from {}", opts.peer.addr),
        )?;
        let outcome = match job.kind.as_str() {
            "seed" => self.run_seed(&mut job, opts, cancel.clone()).await,
            _ => self.run_sync(&mut job, opts, cancel.clone()).await,
        };
        match outcome {
            Ok(figures) => {
                job.figures = figures;
                job.progress.bytes_done = job.progress.bytes_done.max(job.progress.bytes_total);
                self.finish(&mut job, "done", "completed", None)
            }
            Err(_) if cancel.is_cancelled() => self.finish(
                &mut job,
                "cancelled",
                "cancelled on request; the chunks installed so far are kept (a new job resumes from them)",
                None,
            ),
            Err(e) => self.finish(&mut job, "failed", "the transfer failed", Some(e)),
        }
    }

    async fn run_seed(
        &self,
        job: &mut Job,
        opts: SeedOptions,
        cancel: CancellationToken,
    ) -> std::result::Result<serde_json::Value, String> {
        let progress = Arc::new(SeedProgress::default());
        let transfer = client::seed(&self.store, opts, progress.clone(), cancel);
        tokio::pin!(transfer);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let mut last = Last {
            at: Instant::now(),
            done: 0,
            wire: 0,
            fetched: 0,
            dedup: 0,
            peer: crate::metrics::PeerLabels {
                peer: job_peer(job),
            },
        };
        loop {
            tokio::select! {
                r = &mut transfer => {
                    self.publish(job, &progress, &mut last);
                    return r.map(|rep| serde_json::to_value(rep).unwrap_or_default())
                        .map_err(|e| e.to_string());
                }
                _ = tick.tick() => self.publish(job, &progress, &mut last),
            }
        }
    }

    /// Folds the seed's counters into the job (never backwards), stores and announces them.
    fn publish(&self, job: &mut Job, p: &SeedProgress, last: &mut Last) {
        let done = p.logical_done.load(Ordering::Relaxed);
        let total = p.logical_total.load(Ordering::Relaxed);
        let dt = last.at.elapsed().as_secs_f64();
        if dt > 0.0 && done > last.done {
            job.progress.rate_bps = ((done - last.done) as f64 / dt) as u64;
        }
        last.at = Instant::now();
        last.done = done;
        let m = &self.metrics;
        let wire = p.wire_bytes.load(Ordering::Relaxed);
        let fetched = p.chunks_fetched.load(Ordering::Relaxed);
        let dedup = p.chunks_deduplicated.load(Ordering::Relaxed);
        m.peer_bytes_received
            .get_or_create(&last.peer)
            .inc_by(wire.saturating_sub(last.wire));
        m.chunks_fetched
            .get_or_create(&last.peer)
            .inc_by(fetched.saturating_sub(last.fetched));
        m.chunks_deduplicated
            .get_or_create(&last.peer)
            .inc_by(dedup.saturating_sub(last.dedup));
        (last.wire, last.fetched, last.dedup) = (wire, fetched, dedup);
        job.progress.bytes_done = job.progress.bytes_done.max(done);
        job.progress.bytes_total = job.progress.bytes_total.max(total);
        job.progress.eta_s = (job.progress.rate_bps > 0).then(|| {
            job.progress
                .bytes_total
                .saturating_sub(job.progress.bytes_done)
                / job.progress.rate_bps
        });
        job.figures = serde_json::json!({
            "wire_bytes": p.wire_bytes.load(Ordering::Relaxed),
            "chunks_total": p.chunks_total.load(Ordering::Relaxed),
            "chunks_fetched": p.chunks_fetched.load(Ordering::Relaxed),
            "chunks_deduplicated": p.chunks_deduplicated.load(Ordering::Relaxed),
            "chunks_present": p.chunks_present.load(Ordering::Relaxed),
            "chunks_zero": p.chunks_zero.load(Ordering::Relaxed),
        });
        if let Err(e) = self.state.put(KIND, &job.id, job, false) {
            tracing::warn!(job = %job.id, error = %e, "cannot store a job's progress");
        }
        self.events.emit(
            "job.progress",
            &job.id,
            serde_json::json!({"progress": job.progress, "figures": job.figures}),
        );
    }

    /// One sync round; its figures go on the event stream (`job.round`) and into the job.
    async fn run_sync(
        &self,
        job: &mut Job,
        opts: SeedOptions,
        cancel: CancellationToken,
    ) -> std::result::Result<serde_json::Value, String> {
        let opts = client::sync::SyncOptions {
            seed: opts,
            until_converged: false,
            max_dirty: 0,
        };
        let report = client::sync::sync(&self.store, opts, cancel)
            .await
            .map_err(|e| e.to_string())?;
        for (i, round) in report.rounds.iter().enumerate() {
            job.progress.bytes_done += round.dirty_bytes;
            job.progress.bytes_total += round.dirty_bytes;
            self.events.emit(
                "job.round",
                &job.id,
                serde_json::json!({"round": i + 1, "figures": round}),
            );
        }
        Ok(serde_json::to_value(report).unwrap_or_default())
    }
}
