//! The fleet an operator describes (TOML, or the same as JSON over the API): sites, the links
//! between them, where the users are and when they are awake, and the VMs with their rules.
//! Everything is checked here, once, so the planner works on names that exist and numbers in
//! range.

use crate::PlanError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A whole fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// How moves are weighed against latency (defaults suit most fleets).
    #[serde(default)]
    pub policy: Policy,
    /// Datacenters.
    pub sites: Vec<Site>,
    /// WAN links between sites (both directions, each with the link's bandwidth).
    #[serde(default)]
    pub links: Vec<Link>,
    /// Where users are.
    pub regions: Vec<Region>,
    /// The VMs.
    pub vms: Vec<Vm>,
}

/// Weights of the objective: latency is counted in user-milliseconds per hour (users active in
/// the hour times their round trip to the VM), and a move costs what it moves and stops.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// A move's fixed cost, in user-ms·h: below this a move is not worth making.
    pub move_cost: f64,
    /// The cost of each GB a move sends over a link, in user-ms·h.
    pub cost_per_gb: f64,
    /// What each GB a move sends in business hours (at either end of its link) costs on top
    /// of `cost_per_gb`, in user-ms·h: the price of sharing a link its users are busy on.
    pub business_cost_per_gb: f64,
    /// The cost of a move's downtime: this times the users active then times the seconds the
    /// VM is paused, in user-ms·h.
    pub downtime_weight: f64,
    /// Wire bytes per disk byte when a disk is seeded (chunks compressed, zeros skipped).
    pub disk_wire_ratio: f64,
    /// Wire bytes per memory byte (QEMU's stream is not compressed: 1).
    pub memory_wire_ratio: f64,
    /// Keep a VM's disk copy at a site it leaves, so that coming back moves only what changed
    /// (the copy keeps counting against the site's disk capacity).
    pub keep_replicas: bool,
    /// Local hours (of either end of a link) that count as business hours for the report.
    pub business_hours: (u32, u32),
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            move_cost: 2_000.0,
            cost_per_gb: 50.0,
            business_cost_per_gb: 200.0,
            downtime_weight: 1.0,
            disk_wire_ratio: 0.6,
            memory_wire_ratio: 1.0,
            keep_replicas: true,
            business_hours: (8, 18),
        }
    }
}

/// A datacenter with an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Unique name.
    pub name: String,
    /// IANA time zone, e.g. `Europe/Paris`.
    pub tz: String,
    /// The site's agent (`unix:PATH` or `https://HOST:PORT`), used by `plan --execute`.
    #[serde(default)]
    pub agent: Option<String>,
    /// The agent's replication listener as peers dial it (`HOST:PORT`), the `to` of migrations.
    #[serde(default)]
    pub replication: Option<String>,
    /// What the site can hold.
    pub capacity: Capacity,
}

/// Resources of a site, or used by a VM.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Virtual CPUs.
    pub vcpus: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
}

/// A WAN link between two sites.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// One end.
    pub a: String,
    /// The other end.
    pub b: String,
    /// Each direction's bandwidth, e.g. `1Gbit`.
    pub bandwidth: String,
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Windows in which migrations may use less than the whole link (local time of `zone`).
    #[serde(default)]
    pub budget: Vec<Window>,
    /// Whose local time the windows are in: a site name or an IANA zone; default site `a`.
    #[serde(default)]
    pub zone: Option<String>,
}

/// A daily window of a link's budget: `from` to `to` local time (`to` may wrap past midnight).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start, `HH:MM` (whole hours).
    pub from: String,
    /// End, `HH:MM` (whole hours, exclusive).
    pub to: String,
    /// What migrations may use in the window, e.g. `200Mbit`.
    pub bandwidth: String,
}

/// Users in one part of the world.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Unique name.
    pub name: String,
    /// IANA time zone of its users.
    pub tz: String,
    /// Share of the users active in each local hour 0..23 (default: a working-day curve).
    #[serde(default)]
    pub curve: Option<Vec<f64>>,
    /// Round-trip time from these users to each site, ms.
    pub rtt_ms: BTreeMap<String, f64>,
}

/// A VM and its rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Unique name.
    pub name: String,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Disk, GiB.
    pub disk_gib: u64,
    /// Virtual CPUs.
    #[serde(default = "one")]
    pub vcpus: u64,
    /// Where it runs now.
    pub site: String,
    /// Memory dirtied, MiB/s (measured by the agent when live, declared otherwise).
    #[serde(default)]
    pub dirty_rate_mib_s: f64,
    /// Disk written, MiB/s.
    #[serde(default)]
    pub disk_write_mib_s: f64,
    /// Users by region (weights, e.g. user counts).
    pub users: BTreeMap<String, f64>,
    /// VMs of one group move together and never run at different sites.
    #[serde(default)]
    pub group: Option<String>,
    /// Sites it may run at (residency); default any.
    #[serde(default)]
    pub allowed_sites: Option<Vec<String>>,
    /// The downtime a move may cost it, ms.
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: f64,
    /// At most this many moves a day.
    #[serde(default = "default_moves")]
    pub max_moves_per_day: u32,
    /// Migration modes it allows: `live` (pre-copy), `postcopy`, `warm`.
    #[serde(default = "default_modes")]
    pub modes: Vec<String>,
    /// Copies of its disks kept at other sites (what an earlier move left behind, the base of
    /// a way back), each with how many hours ago it was last in step with the VM: a move
    /// there seeds only what was written since.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas: BTreeMap<String, f64>,
}

fn one() -> u64 {
    1
}
fn default_downtime() -> f64 {
    300.0
}
fn default_moves() -> u32 {
    2
}
fn default_modes() -> Vec<String> {
    vec!["live".into()]
}

impl Vm {
    /// What it occupies at a site.
    pub fn size(&self) -> Capacity {
        Capacity {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
        }
    }
}

/// A working day: quiet at night, busy 9-17, an evening tail (share of users active by local
/// hour).
pub const DEFAULT_CURVE: [f64; 24] = [
    0.03, 0.02, 0.02, 0.02, 0.02, 0.04, 0.10, 0.30, 0.65, 0.90, 1.0, 1.0, 0.9, 0.95, 1.0, 1.0, 0.9,
    0.7, 0.45, 0.35, 0.25, 0.15, 0.08, 0.05,
];

impl Fleet {
    /// Reads a fleet from TOML (or JSON when the text starts with `{`) and checks it.
    pub fn parse(text: &str) -> Result<Fleet, PlanError> {
        let fleet: Fleet = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| PlanError::Fleet(format!("JSON: {e}")))?
        } else {
            toml::from_str(text).map_err(|e| PlanError::Fleet(format!("TOML: {e}")))?
        };
        fleet.check()?;
        Ok(fleet)
    }

    /// Checks names, references and ranges (not yet whether a plan exists).
    pub fn check(&self) -> Result<(), PlanError> {
        let sites = unique("site", self.sites.iter().map(|s| s.name.as_str()))?;
        let regions = unique("region", self.regions.iter().map(|r| r.name.as_str()))?;
        unique("VM", self.vms.iter().map(|v| v.name.as_str()))?;
        if self.sites.is_empty() {
            return Err(PlanError::Fleet("the fleet has no sites".into()));
        }
        for s in &self.sites {
            crate::clock::zone(&s.tz).map_err(|e| bad(format!("site {:?}: {e}", s.name)))?;
        }
        for l in &self.links {
            check_link(l, &sites)?;
        }
        for r in &self.regions {
            check_region(r, &sites)?;
        }
        for v in &self.vms {
            check_vm(v, &sites, &regions)?;
        }
        self.check_policy()
    }

    fn check_policy(&self) -> Result<(), PlanError> {
        let p = &self.policy;
        let finite = [
            p.move_cost,
            p.cost_per_gb,
            p.business_cost_per_gb,
            p.downtime_weight,
            p.disk_wire_ratio,
            p.memory_wire_ratio,
        ];
        if finite.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(bad("policy: costs and ratios must be finite and ≥ 0".into()));
        }
        if p.business_hours.0 > 24 || p.business_hours.1 > 24 {
            return Err(bad("policy.business_hours: hours 0 to 24".into()));
        }
        Ok(())
    }

    /// The site named `name` (checked to exist).
    pub fn site_index(&self, name: &str) -> Option<usize> {
        self.sites.iter().position(|s| s.name == name)
    }
}

fn bad(m: String) -> PlanError {
    PlanError::Fleet(m)
}

fn unique<'a>(
    what: &str,
    names: impl Iterator<Item = &'a str>,
) -> Result<BTreeSet<String>, PlanError> {
    let mut seen = BTreeSet::new();
    for n in names {
        if n.is_empty() || n.len() > 128 {
            return Err(bad(format!("{what} name {n:?}: use 1 to 128 characters")));
        }
        if !seen.insert(n.to_string()) {
            return Err(bad(format!("{what} {n:?} is declared twice")));
        }
    }
    Ok(seen)
}

fn check_link(l: &Link, sites: &BTreeSet<String>) -> Result<(), PlanError> {
    let name = format!("link {}–{}", l.a, l.b);
    for end in [&l.a, &l.b] {
        if !sites.contains(end) {
            return Err(bad(format!("{name}: no site {end:?}")));
        }
    }
    if l.a == l.b {
        return Err(bad(format!("{name}: a link joins two different sites")));
    }
    crate::rate(&l.bandwidth).map_err(|e| bad(format!("{name}: bandwidth: {e}")))?;
    if !(0.0..=10_000.0).contains(&l.rtt_ms) {
        return Err(bad(format!("{name}: rtt_ms {} out of 0..10000", l.rtt_ms)));
    }
    if let Some(z) = &l.zone {
        if !sites.contains(z) {
            crate::clock::zone(z).map_err(|e| bad(format!("{name}: zone: {e}")))?;
        }
    }
    for w in &l.budget {
        crate::clock::hour_of(&w.from).map_err(|e| bad(format!("{name}: window: {e}")))?;
        crate::clock::hour_of(&w.to).map_err(|e| bad(format!("{name}: window: {e}")))?;
        crate::rate(&w.bandwidth).map_err(|e| bad(format!("{name}: window: {e}")))?;
    }
    Ok(())
}

fn check_region(r: &Region, sites: &BTreeSet<String>) -> Result<(), PlanError> {
    crate::clock::zone(&r.tz).map_err(|e| bad(format!("region {:?}: {e}", r.name)))?;
    if let Some(c) = &r.curve {
        if c.len() != 24 || c.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(bad(format!(
                "region {:?}: curve needs 24 shares ≥ 0 (local hours 0 to 23)",
                r.name
            )));
        }
    }
    for s in sites {
        match r.rtt_ms.get(s) {
            Some(x) if x.is_finite() && (0.0..=10_000.0).contains(x) => {}
            Some(x) => return Err(bad(format!("region {:?}: rtt_ms {x} to {s:?}", r.name))),
            None => {
                return Err(bad(format!(
                    "region {:?}: no rtt_ms to site {s:?} (give one for every site)",
                    r.name
                )))
            }
        }
    }
    if let Some(s) = r.rtt_ms.keys().find(|s| !sites.contains(*s)) {
        return Err(bad(format!(
            "region {:?}: rtt_ms names no site {s:?}",
            r.name
        )));
    }
    Ok(())
}

fn check_vm(v: &Vm, sites: &BTreeSet<String>, regions: &BTreeSet<String>) -> Result<(), PlanError> {
    let name = format!("VM {:?}", v.name);
    if !sites.contains(&v.site) {
        return Err(bad(format!(
            "{name}: its site {:?} is not declared",
            v.site
        )));
    }
    if v.memory_mib == 0 || v.vcpus == 0 {
        return Err(bad(format!("{name}: memory_mib and vcpus must be > 0")));
    }
    for x in [v.dirty_rate_mib_s, v.disk_write_mib_s, v.max_downtime_ms] {
        if !x.is_finite() || x < 0.0 {
            return Err(bad(format!(
                "{name}: rates and max_downtime_ms must be ≥ 0"
            )));
        }
    }
    if let Some(r) = v.users.keys().find(|r| !regions.contains(*r)) {
        return Err(bad(format!("{name}: users in an undeclared region {r:?}")));
    }
    if v.users.values().any(|w| !w.is_finite() || *w < 0.0) {
        return Err(bad(format!("{name}: user weights must be ≥ 0")));
    }
    if let Some(s) = v
        .allowed_sites
        .iter()
        .flatten()
        .find(|s| !sites.contains(*s))
    {
        return Err(bad(format!("{name}: allowed_sites names no site {s:?}")));
    }
    for (s, age) in &v.replicas {
        if !sites.contains(s) || *s == v.site {
            return Err(bad(format!(
                "{name}: replicas name {s:?}, which is not another declared site"
            )));
        }
        if !age.is_finite() || *age < 0.0 {
            return Err(bad(format!(
                "{name}: the replica at {s:?} must be ≥ 0 hours old"
            )));
        }
    }
    if let Some(m) = v
        .modes
        .iter()
        .find(|m| !matches!(m.as_str(), "live" | "postcopy" | "warm"))
    {
        return Err(bad(format!(
            "{name}: mode {m:?}: use live, postcopy or warm"
        )));
    }
    Ok(())
}
