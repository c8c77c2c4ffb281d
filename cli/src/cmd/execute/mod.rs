//! `helio plan --execute`: a plan carried out through the sites' agents. Each seed and
//! migration of the plan is created at its agent when its window opens (seeds at the
//! destination, migrations at the source, with the plan's deadline), followed on the agents'
//! event streams, and checked when it ends: a failed, late or slow move, or a VM whose dirty
//! rate is not the fleet's, makes a new plan from where the VMs really are, said with its
//! reason. `--clock-scale` runs the plan's clock faster than the wall's (a day in minutes).

mod drift;
mod report;
mod steps;

use agent::client::ApiClient;
use anyhow::Context;
use drift::Replan;
use jiff::Timestamp;
use planner::Fleet;
use report::{Done, Report};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use steps::{Clock, Kind, Step};

/// How often the executor looks at the clock and its running steps without an event.
const TICK: Duration = Duration::from_millis(250);
/// A running step is read again at least this often, events or not.
const POLL: Duration = Duration::from_secs(2);

/// How the plan is carried out.
pub struct Options {
    /// Plan seconds per wall second.
    pub clock_scale: f64,
    /// Print the calls instead of making them.
    pub dry_run: bool,
    /// Print the final report as JSON.
    pub json: bool,
    /// Hours planned (and planned again after drift, up to the same end).
    pub hours: usize,
    /// TLS material for https agents.
    pub api_tls: Option<std::path::PathBuf>,
}

/// A site's agent.
struct Agent {
    api: ApiClient,
    /// The `to` of migrations to this site (its replication listener, or its name).
    peer: String,
    /// Its replication listener as peers reach it, when the fleet says (the `source_addr` of
    /// migrations from this site: the destination seeds and fetches through it).
    replication: Option<String>,
}

/// A step created at an agent.
struct Running {
    step: Step,
    /// The site whose agent runs it.
    site: String,
    /// The job's or migration's id there.
    id: String,
    /// Wall time it was created (a move's duration is real whatever the clock's scale).
    started: std::time::Instant,
    /// Plan time it was created.
    started_plan: Timestamp,
    /// Wall time it was last read.
    read: std::time::Instant,
}

/// The executor's state.
struct Exec {
    fleet: Fleet,
    agents: HashMap<String, Agent>,
    clock: Clock,
    /// The end of the planned period (plan time).
    end: Timestamp,
    pending: Vec<Step>,
    running: Vec<Running>,
    /// Each VM's disks (from its agent).
    disks: HashMap<String, Vec<String>>,
    /// When each VM left each site (plan time): the age of the copy it left there.
    left: BTreeMap<(String, String), Timestamp>,
    report: Report,
}

/// Carries out the plan of `fleet` from plan time `from`.
pub async fn execute(fleet: Fleet, from: Timestamp, o: Options) -> anyhow::Result<i32> {
    let agents = agents(&fleet, o.api_tls.as_deref())?;
    let clock = Clock {
        from,
        start: Timestamp::now(),
        scale: o.clock_scale,
    };
    let end = steps::shift(from, o.hours as f64 * 3600.0);
    let mut x = Exec {
        fleet,
        agents,
        clock,
        end,
        pending: Vec::new(),
        running: Vec::new(),
        disks: HashMap::new(),
        left: BTreeMap::new(),
        report: Report::default(),
    };
    x.plan(from, None).await?;
    if o.dry_run {
        x.print_calls();
        return Ok(0);
    }
    x.run().await?;
    x.report.print(o.json);
    Ok(if x.report.failed() == 0 { 0 } else { 1 })
}

/// A client for each site that names an agent.
fn agents(fleet: &Fleet, tls: Option<&std::path::Path>) -> anyhow::Result<HashMap<String, Agent>> {
    let mut out = HashMap::new();
    for s in &fleet.sites {
        let Some(url) = &s.agent else { continue };
        let api = super::remote::client(url, tls)
            .with_context(|| format!("site {:?}: its agent {url}", s.name))?;
        let peer = s.replication.clone().unwrap_or_else(|| s.name.clone());
        let replication = s.replication.clone();
        out.insert(
            s.name.clone(),
            Agent {
                api,
                peer,
                replication,
            },
        );
    }
    Ok(out)
}

impl Exec {
    /// Plans from plan time `at` to the end and makes the plan's steps the pending ones;
    /// `why`: the reasons of a new plan, reported.
    async fn plan(&mut self, at: Timestamp, why: Option<Vec<Replan>>) -> anyhow::Result<()> {
        self.age_copies(at);
        let hours = (steps::seconds(self.end, at) / 3600.0).ceil().max(0.0) as usize;
        if hours == 0 {
            self.pending.clear();
            return Ok(());
        }
        let plan = planner::plan(&self.fleet, at, hours)?;
        let busy: Vec<String> = self.running.iter().map(|r| r.step.vm.clone()).collect();
        for m in &plan.moves {
            for vm in &m.vms {
                self.learn_disks(vm, &m.from).await?;
            }
        }
        let disks = &self.disks;
        let mut next = steps::steps(&plan.moves, |vm| disks.get(vm).cloned().unwrap_or_default())
            .map_err(anyhow::Error::msg)?;
        // A VM on the move keeps its running step; the new plan starts from where it lands.
        next.retain(|s| !busy.contains(&s.vm));
        let before = self.pending.len();
        self.pending = next;
        let moves = plan.moves.len();
        match why {
            None => self.report.planned(at, moves, &plan.violations),
            Some(why) => self.report.replanned(at, why, before, self.pending.len()),
        }
        Ok(())
    }

    /// The copies VMs left behind, aged to plan time `at`.
    fn age_copies(&mut self, at: Timestamp) {
        for ((vm, site), t) in &self.left {
            if let Some(v) = self.fleet.vms.iter_mut().find(|v| &v.name == vm) {
                if let Some(age) = v.replicas.get_mut(site) {
                    *age = (steps::seconds(at, *t) / 3600.0).max(0.0);
                }
            }
        }
    }

    /// The disks of `vm`, asked once of the agent at `site`.
    async fn learn_disks(&mut self, vm: &str, site: &str) -> anyhow::Result<()> {
        if self.disks.contains_key(vm) {
            return Ok(());
        }
        let a = self.agent(site)?;
        let v = a
            .api
            .get(&format!("/v1/vms/{vm}"))
            .await
            .with_context(|| format!("VM {vm:?} at site {site:?}"))?;
        let disks = v["spec"]["disks"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        self.disks.insert(vm.to_string(), disks);
        Ok(())
    }

    fn agent(&self, site: &str) -> anyhow::Result<&Agent> {
        self.agents.get(site).with_context(|| {
            format!("site {site:?} names no agent in the fleet (agent = \"unix:PATH\" or \"https://HOST:PORT\")")
        })
    }

    /// `--dry-run`: each call, when it would be made.
    fn print_calls(&self) {
        for s in &self.pending {
            let (site, path, body) = match self.call(s) {
                Ok(c) => c,
                Err(e) => {
                    println!("{}: cannot be made: {e:#}", s.vm);
                    continue;
                }
            };
            println!(
                "at {} (plan time {}): POST {site} {path} {body}",
                self.clock.wall_of(s.not_before),
                s.not_before
            );
        }
    }

    /// The site, path and body of the call that starts `s`.
    fn call(&self, s: &Step) -> anyhow::Result<(String, &'static str, serde_json::Value)> {
        match &s.kind {
            Kind::Seed {
                disk,
                bandwidth_bps,
            } => {
                let mut body = serde_json::json!({
                    "kind": "seed", "disk": disk, "from": self.agent(&s.from)?.peer,
                });
                // A window the clock's scale shortens needs its rate raised as much.
                let bps = bandwidth_bps * self.clock.scale;
                if bps > 0.0 {
                    body["bandwidth"] = format!("{:.0}kbit", (bps / 1e3).max(1.0)).into();
                }
                Ok((s.to.clone(), "/v1/jobs", body))
            }
            Kind::Migrate {
                mode,
                max_downtime_ms,
                bandwidth_bps,
                ..
            } => {
                // The move's own window keeps its real length: a migration takes the time it
                // takes whatever the plan's clock does.
                let start = self.clock.wall_of(s.not_before);
                let window = steps::seconds(s.deadline, s.not_before);
                let mut body = serde_json::json!({
                    "vm": s.vm, "to": self.agent(&s.to)?.peer, "mode": mode,
                    "max_downtime_ms": max_downtime_ms,
                    "not_before": start.to_string(),
                    "deadline": steps::shift(start, window).to_string(),
                });
                // Not scaled: the move runs at real speed whatever the plan's clock does.
                if *bandwidth_bps >= 1e3 {
                    body["bandwidth"] = format!("{:.0}kbit", bandwidth_bps / 1e3).into();
                }
                if let Some(addr) = &self.agent(&s.from)?.replication {
                    body["source_addr"] = addr.clone().into();
                }
                Ok((s.from.clone(), "/v1/migrations", body))
            }
        }
    }

    /// Until every step has ended and none is left to start.
    async fn run(&mut self) -> anyhow::Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, String)>(256);
        let followers: Vec<_> = self
            .agents
            .iter()
            .map(|(site, a)| follow(site.clone(), a.api.clone(), tx.clone()))
            .collect();
        drop(tx);
        while !self.pending.is_empty() || !self.running.is_empty() {
            let touched = tokio::select! {
                ev = rx.recv() => ev,
                _ = tokio::time::sleep(TICK) => None,
            };
            let now = self.clock.plan_at(Timestamp::now());
            self.start_due(now).await;
            self.read_running(touched).await?;
        }
        for f in followers {
            f.abort();
        }
        Ok(())
    }

    /// Creates the steps whose window has opened; a VM's migration waits for its seeds.
    async fn start_due(&mut self, now: Timestamp) {
        let mut i = 0;
        while i < self.pending.len() {
            let s = &self.pending[i];
            let busy = self.running.iter().any(|r| r.step.vm == s.vm);
            if s.not_before > now || (busy && matches!(s.kind, Kind::Migrate { .. })) {
                i += 1;
                continue;
            }
            let s = self.pending.remove(i);
            if let Err(e) = self.start(s.clone(), now).await {
                let why = format!("{e:#}");
                self.report.refused(&s, now, &why);
                if matches!(s.kind, Kind::Migrate { .. }) {
                    let r = Replan::Failed {
                        vm: s.vm.clone(),
                        to: s.to.clone(),
                        error: why,
                    };
                    self.replan_after(now, vec![r]).await;
                    i = 0;
                }
            }
        }
    }

    async fn start(&mut self, s: Step, now: Timestamp) -> anyhow::Result<()> {
        let (site, path, body) = self.call(&s)?;
        let a = self.agent(&site)?;
        if let Kind::Seed { disk, .. } = &s.kind {
            // The way back: the destination holds the disk the VM left (an image disk there);
            // the migration ships only what changed, so nothing is seeded.
            if a.api.get(&format!("/v1/disks/{disk}")).await.is_ok() {
                let note = format!("{} to {}: no seed of {disk}: {} holds the disk the VM left, the move ships what changed", s.vm, s.to, s.to);
                self.report.note(note);
                return Ok(());
            }
        }
        let (_, created) = a
            .api
            .call("POST", path, Some(&body), &[])
            .await
            .with_context(|| format!("POST {path} at site {site:?}"))?;
        let id = created["id"]
            .as_str()
            .with_context(|| format!("the agent of site {site:?} answered {created} with no id"))?
            .to_string();
        self.report.started(&s, &site, &id, now);
        self.running.push(Running {
            step: s,
            site,
            id,
            started: std::time::Instant::now(),
            started_plan: now,
            read: std::time::Instant::now(),
        });
        Ok(())
    }

    /// Reads the running steps that an event touched or that were not read for a while.
    async fn read_running(&mut self, touched: Option<(String, String)>) -> anyhow::Result<()> {
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            let hit = touched
                .as_ref()
                .is_some_and(|(site, id)| site == &r.site && id == &r.id);
            if !hit && r.read.elapsed() < POLL {
                i += 1;
                continue;
            }
            let path = match r.step.kind {
                Kind::Seed { .. } => format!("/v1/jobs/{}", r.id),
                Kind::Migrate { .. } => format!("/v1/migrations/{}", r.id),
            };
            let v = match self.agent(&r.site)?.api.get(&path).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(site = %r.site, %path, error = %e, "cannot read a running step; trying again");
                    self.running[i].read = std::time::Instant::now();
                    i += 1;
                    continue;
                }
            };
            self.running[i].read = std::time::Instant::now();
            if v["ended_at"].is_null() {
                i += 1;
                continue;
            }
            let r = self.running.remove(i);
            self.ended(r, &v).await;
        }
        Ok(())
    }

    /// A step ended (`v`: its record at the agent).
    async fn ended(&mut self, r: Running, v: &serde_json::Value) {
        let phase = v["phase"].as_str().unwrap_or("unknown").to_string();
        let error = v["error"].as_str().map(str::to_string);
        let took_s = r.started.elapsed().as_secs_f64();
        // Late as it would be on a clock at real speed: a move cannot run faster because the
        // plan's clock does (with a scale of 1 this is the time past the deadline).
        let end = steps::shift(r.started_plan, took_s);
        let late_s = steps::seconds(end, r.step.deadline);
        let Kind::Migrate { predicted_s, .. } = r.step.kind else {
            self.report
                .done(Done::of(&r.step, &r.id, &phase, error, took_s, late_s, v));
            return;
        };
        let e = drift::Ended {
            vm: r.step.vm.clone(),
            to: r.step.to.clone(),
            phase: phase.clone(),
            error: error.clone(),
            took_s,
            late_s,
            dirty_mib_s: v["figures"]["prediction"]["dirty_rate_mib_s"].as_f64(),
        };
        if phase == "completed" {
            drift::moved(&mut self.fleet, &r.step.vm, &r.step.from, &r.step.to);
            let now = self.clock.plan_at(Timestamp::now());
            self.left
                .insert((r.step.vm.clone(), r.step.from.clone()), now);
        }
        let why = drift::assess(&e, &self.fleet, predicted_s);
        self.report
            .done(Done::of(&r.step, &r.id, &phase, error, took_s, late_s, v));
        if !why.is_empty() {
            let now = self.clock.plan_at(Timestamp::now());
            self.replan_after(now, why).await;
        }
    }

    /// Corrects the fleet by `why` and plans again; a plan that cannot be made ends the rest.
    async fn replan_after(&mut self, now: Timestamp, why: Vec<Replan>) {
        for r in &why {
            drift::correct(&mut self.fleet, r);
        }
        if let Err(e) = self.plan(now, Some(why)).await {
            tracing::error!(error = %format!("{e:#}"), "cannot plan again; the moves not yet started are dropped");
            self.report.note(format!(
                "planning again failed ({e:#}): nothing more is started"
            ));
            self.pending.clear();
        }
    }
}

/// Follows an agent's event stream: the (site, object) of every job or migration event, until
/// the receiver is gone. A stream that breaks is opened again from where it stopped.
fn follow(
    site: String,
    api: ApiClient,
    tx: tokio::sync::mpsc::Sender<(String, String)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            let mut gone = false;
            let r = api
                .events(last, |e| {
                    last = e.id;
                    let ours = e.kind.starts_with("job.") || e.kind.starts_with("migration.");
                    if ours && tx.try_send((site.clone(), e.object.clone())).is_err() {
                        gone = tx.is_closed();
                    }
                    !gone
                })
                .await;
            if gone || tx.is_closed() {
                return;
            }
            if let Err(e) = r {
                tracing::debug!(%site, error = %e, "event stream ended; opening it again");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}
