//! The fleet turned into tables over the plan's hours: users active per region and hour, the
//! latency each unit's users would see at each site, what each link lets migrations use, and
//! the units that move (a group, or a VM on its own).

use crate::clock::{self, Horizon};
use crate::fleet::{Capacity, Fleet, DEFAULT_CURVE};
use crate::PlanError;
use std::collections::BTreeMap;

/// Seconds in a plan hour.
pub const HOUR_S: f64 = 3600.0;

/// What moves as one: a group's VMs, or one VM.
#[derive(Debug, Clone)]
pub struct Unit {
    /// The group's name, or the VM's.
    pub name: String,
    /// Its VMs (indexes into `Fleet::vms`), sorted by name.
    pub members: Vec<usize>,
    /// Where it runs at the plan's start.
    pub site: usize,
    /// Sites it may run at, ascending.
    pub allowed: Vec<usize>,
    /// What it occupies.
    pub size: Capacity,
    /// The smallest downtime cap of its VMs, ms.
    pub max_downtime_ms: f64,
    /// The smallest move limit of its VMs, per day.
    pub max_moves_per_day: u32,
    /// Modes every member allows.
    pub modes: Vec<String>,
    /// Users' latency at each site in each hour, user-ms: `cost[h][s]`.
    pub cost: Vec<Vec<f64>>,
    /// Users active in each hour.
    pub active: Vec<f64>,
    /// Sites other than `site` holding a copy of every member's disks, with the copy's age in
    /// hours at the plan's start (the oldest member's), by site.
    pub replicas: Vec<(usize, f64)>,
}

impl Unit {
    /// Its users' latency over the whole plan if it stayed at `s`, user-ms·h.
    pub fn total(&self, s: usize) -> f64 {
        self.cost.iter().map(|c| c[s]).sum()
    }
}

/// The fleet's tables.
pub struct World<'f> {
    /// The fleet.
    pub fleet: &'f Fleet,
    /// Its hours.
    pub horizon: Horizon,
    /// Units, in the fleet's order of their first VM.
    pub units: Vec<Unit>,
    /// Link index by (site, site), both orders.
    pub link_of: BTreeMap<(usize, usize), usize>,
    /// `ways[from * sites + to]`: the link and direction from one site to another (the
    /// planner asks this in its innermost loops).
    ways: Vec<Option<(usize, usize)>>,
    /// Each link's bandwidth, bytes/s (each direction).
    pub bandwidth: Vec<f64>,
    /// What migrations may use on each link in each hour, bytes/s: `budget[l][h]`.
    pub budget: Vec<Vec<f64>>,
    /// Whether hour `h` is a business hour at either end of link `l`: `business[l][h]`.
    pub business: Vec<Vec<bool>>,
}

impl<'f> World<'f> {
    /// Builds the tables; fails when a group is split or a VM runs where it may not.
    pub fn new(fleet: &'f Fleet, horizon: Horizon) -> Result<World<'f>, PlanError> {
        let active = region_activity(fleet, &horizon)?;
        let units = units(fleet, &horizon, &active)?;
        let mut link_of = BTreeMap::new();
        let n = fleet.sites.len();
        let mut ways = vec![None; n * n];
        let mut bandwidth = Vec::new();
        let mut budget = Vec::new();
        let mut business = Vec::new();
        for (i, l) in fleet.links.iter().enumerate() {
            // Checked by Fleet::check: both ends exist.
            let (a, b) = (site(fleet, &l.a)?, site(fleet, &l.b)?);
            if link_of.insert((a, b), i).is_some() || link_of.insert((b, a), i).is_some() {
                return Err(PlanError::Fleet(format!(
                    "link {}–{} is declared twice",
                    l.a, l.b
                )));
            }
            ways[a * n + b] = Some((i, 0));
            ways[b * n + a] = Some((i, 1));
            let full = crate::rate(&l.bandwidth).map_err(PlanError::Fleet)? as f64;
            bandwidth.push(full);
            budget.push(link_budget(fleet, i, full, &horizon)?);
            business.push(link_business(fleet, i, &horizon)?);
        }
        Ok(World {
            fleet,
            horizon,
            units,
            link_of,
            ways,
            bandwidth,
            budget,
            business,
        })
    }

    /// The link between two sites, if any.
    pub fn link(&self, a: usize, b: usize) -> Option<usize> {
        self.link_dir(a, b).map(|(l, _)| l)
    }

    /// The link from `from` to `to` and the direction of that way on it (0: a → b).
    pub fn link_dir(&self, from: usize, to: usize) -> Option<(usize, usize)> {
        let n = self.fleet.sites.len();
        if from >= n || to >= n {
            return None;
        }
        self.ways[from * n + to]
    }

    /// The RTT of link `l`, seconds.
    pub fn rtt_s(&self, l: usize) -> f64 {
        self.fleet.links[l].rtt_ms / 1000.0
    }
}

fn site(fleet: &Fleet, name: &str) -> Result<usize, PlanError> {
    fleet
        .site_index(name)
        .ok_or_else(|| PlanError::Fleet(format!("no site {name:?}")))
}

/// Share of each region's users active in each plan hour: `active[r][h]`.
fn region_activity(fleet: &Fleet, hz: &Horizon) -> Result<Vec<Vec<f64>>, PlanError> {
    let mut out = Vec::new();
    for r in &fleet.regions {
        let tz = clock::zone(&r.tz).map_err(PlanError::Fleet)?;
        let curve = r.curve.as_deref().unwrap_or(&DEFAULT_CURVE);
        out.push(
            (0..hz.hours)
                .map(|h| curve[hz.local_hour(h, &tz) as usize % 24])
                .collect(),
        );
    }
    Ok(out)
}

/// Groups VMs into units and computes each unit's latency table.
fn units(fleet: &Fleet, hz: &Horizon, active: &[Vec<f64>]) -> Result<Vec<Unit>, PlanError> {
    let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut order = Vec::new();
    let alone: std::collections::HashSet<&str> = fleet
        .vms
        .iter()
        .filter(|v| v.group.is_none())
        .map(|v| v.name.as_str())
        .collect();
    for (i, v) in fleet.vms.iter().enumerate() {
        let key = v.group.clone().unwrap_or_else(|| v.name.clone());
        if v.group.is_some() && alone.contains(key.as_str()) {
            return Err(PlanError::Fleet(format!(
                "group {key:?} has the name of a VM outside it: rename one"
            )));
        }
        let e = by_name.entry(key.clone()).or_default();
        if e.is_empty() {
            order.push(key);
        }
        e.push(i);
    }
    order
        .into_iter()
        .map(|name| {
            let members = by_name.remove(&name).unwrap_or_default();
            unit(fleet, hz, active, name, members)
        })
        .collect()
}

fn unit(
    fleet: &Fleet,
    hz: &Horizon,
    active: &[Vec<f64>],
    name: String,
    mut members: Vec<usize>,
) -> Result<Unit, PlanError> {
    members.sort_by(|a, b| fleet.vms[*a].name.cmp(&fleet.vms[*b].name));
    let first = &fleet.vms[members[0]];
    let site = site(fleet, &first.site)?;
    if let Some(o) = members.iter().find(|m| fleet.vms[**m].site != first.site) {
        return Err(PlanError::Unsatisfiable(format!(
            "group {name:?} is split: VM {:?} runs at {:?}, VM {:?} at {:?} (a group runs at one site)",
            first.name, first.site, fleet.vms[*o].name, fleet.vms[*o].site
        )));
    }
    let allowed: Vec<usize> = (0..fleet.sites.len())
        .filter(|s| {
            members.iter().all(|m| {
                fleet.vms[*m]
                    .allowed_sites
                    .as_ref()
                    .map_or(true, |a| a.contains(&fleet.sites[*s].name))
            })
        })
        .collect();
    if !allowed.contains(&site) {
        return Err(PlanError::Unsatisfiable(format!(
            "residency: {} runs at {:?}, which its allowed_sites exclude (move it by hand first)",
            if members.len() > 1 {
                format!("group {name:?}")
            } else {
                format!("VM {name:?}")
            },
            first.site
        )));
    }
    let mut size = Capacity::default();
    for m in &members {
        let s = fleet.vms[*m].size();
        size.vcpus += s.vcpus;
        size.memory_mib += s.memory_mib;
        size.disk_gib += s.disk_gib;
    }
    let vms = || members.iter().map(|m| &fleet.vms[*m]);
    let modes = ["live", "postcopy", "warm"]
        .into_iter()
        .filter(|m| vms().all(|v| v.modes.iter().any(|x| x == m)))
        .map(String::from)
        .collect();
    let (cost, active_users) = latency_table(fleet, hz, active, &members);
    let replicas = replicas(fleet, site, &members);
    Ok(Unit {
        replicas,
        name,
        site,
        allowed,
        size,
        max_downtime_ms: vms()
            .map(|v| v.max_downtime_ms)
            .fold(f64::INFINITY, f64::min),
        max_moves_per_day: vms().map(|v| v.max_moves_per_day).min().unwrap_or(0),
        modes,
        cost,
        active: active_users,
        members,
    })
}

/// The sites where every member keeps a replica (a partial copy of a group is not a base),
/// with the oldest member's age.
fn replicas(fleet: &Fleet, site: usize, members: &[usize]) -> Vec<(usize, f64)> {
    (0..fleet.sites.len())
        .filter(|s| *s != site)
        .filter_map(|s| {
            let name = &fleet.sites[s].name;
            members
                .iter()
                .map(|m| fleet.vms[*m].replicas.get(name).copied())
                .try_fold(0.0, |oldest: f64, age| age.map(|a| oldest.max(a)))
                .map(|age| (s, age))
        })
        .collect()
}

/// `cost[h][s]`: users active in hour h times their RTT to site s, summed over the members;
/// and the users active in each hour.
fn latency_table(
    fleet: &Fleet,
    hz: &Horizon,
    active: &[Vec<f64>],
    members: &[usize],
) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut cost = vec![vec![0.0; fleet.sites.len()]; hz.hours];
    let mut users = vec![0.0; hz.hours];
    for m in members {
        for (region, weight) in &fleet.vms[*m].users {
            let Some(r) = fleet.regions.iter().position(|x| &x.name == region) else {
                continue; // Fleet::check refused undeclared regions
            };
            // The region's round trips by site index, looked up once rather than per hour.
            let rtt: Vec<f64> = fleet
                .sites
                .iter()
                .map(|site| {
                    fleet.regions[r]
                        .rtt_ms
                        .get(&site.name)
                        .copied()
                        .unwrap_or(0.0)
                })
                .collect();
            for h in 0..hz.hours {
                let n = weight * active[r][h];
                users[h] += n;
                for (c, t) in cost[h].iter_mut().zip(&rtt) {
                    *c += n * t;
                }
            }
        }
    }
    (cost, users)
}

/// Bytes/s migrations may use on link `l` in each hour: a window's bandwidth inside it, the
/// whole link outside.
fn link_budget(fleet: &Fleet, l: usize, full: f64, hz: &Horizon) -> Result<Vec<f64>, PlanError> {
    let link = &fleet.links[l];
    let tz = link_zone(fleet, l)?;
    let mut out = Vec::with_capacity(hz.hours);
    for h in 0..hz.hours {
        let local = hz.local_hour(h, &tz);
        let mut bw = full;
        for w in &link.budget {
            let (from, to) = (
                clock::hour_of(&w.from).map_err(PlanError::Fleet)?,
                clock::hour_of(&w.to).map_err(PlanError::Fleet)?,
            );
            if clock::in_window(local, from, to) {
                bw = bw.min(crate::rate(&w.bandwidth).map_err(PlanError::Fleet)? as f64);
            }
        }
        out.push(bw);
    }
    Ok(out)
}

fn link_zone(fleet: &Fleet, l: usize) -> Result<jiff::tz::TimeZone, PlanError> {
    let link = &fleet.links[l];
    let z = link.zone.as_deref().unwrap_or(&link.a);
    let tz = match fleet.sites.iter().find(|s| s.name == z) {
        Some(s) => &s.tz,
        None => z,
    };
    clock::zone(tz).map_err(PlanError::Fleet)
}

fn link_business(fleet: &Fleet, l: usize, hz: &Horizon) -> Result<Vec<bool>, PlanError> {
    let link = &fleet.links[l];
    let (from, to) = fleet.policy.business_hours;
    let mut zones = Vec::new();
    for end in [&link.a, &link.b] {
        let s = &fleet.sites[site(fleet, end)?];
        zones.push(clock::zone(&s.tz).map_err(PlanError::Fleet)?);
    }
    Ok((0..hz.hours)
        .map(|h| {
            zones
                .iter()
                .any(|tz| clock::in_window(hz.local_hour(h, tz), from, to))
        })
        .collect())
}
