//! The simulation loop: decide (by strategy), carry bytes minute by minute, land moves, book
//! latency, capacity and link use hour by hour.

use super::links::{run_minute, Transfer, STEPS};
use super::report::{LinkUse, SimMove, SimReport, SiteUse};
use super::Strategy;
use crate::clock::Horizon;
use crate::fleet::{Capacity, Fleet};
use crate::place::seed_size;
use crate::predict::predict_move;
use crate::world::{World, HOUR_S};
use crate::PlanError;
use jiff::Timestamp;
use rand::{Rng, SeedableRng};

/// Replays `fleet` for `days` days from `from` under `strategy`; `seed` drives the noise.
pub fn simulate(
    fleet: &Fleet,
    from: Timestamp,
    days: usize,
    strategy: Strategy,
    seed: u64,
) -> Result<SimReport, PlanError> {
    if !(1..=31).contains(&days) {
        return Err(PlanError::Fleet(format!(
            "days {days}: simulate 1 to 31 days"
        )));
    }
    fleet.check()?;
    let started = std::time::Instant::now();
    let w = World::new(fleet, Horizon::new(from, days * 24))?;
    let mut sim = Sim::new(&w, strategy, seed);
    for h in 0..w.horizon.hours {
        sim.decide(h)?;
        sim.hour(h);
    }
    Ok(sim.report(started.elapsed().as_secs_f64()))
}

struct Move {
    unit: usize,
    from: usize,
    to: usize,
    started_h: f64,
    arrived_h: Option<f64>,
    planned_h: Option<usize>,
    downtime_ms: f64,
    wan_bytes: f64,
    business_bytes: f64,
    seeds_left: usize,
}

struct Sim<'w, 'f> {
    w: &'w World<'f>,
    strategy: Strategy,
    rng: rand::rngs::StdRng,
    site: Vec<usize>,
    moving: Vec<Option<usize>>,
    /// Later moves of today's plan, per unit, started when the one before lands.
    pending: Vec<std::collections::VecDeque<(usize, crate::explain::PlannedMove)>>,
    holds: Vec<Vec<bool>>,
    /// When each unit left each site (its copy there stopped following it), hours; before the
    /// run for the replicas the fleet declares.
    left_at: Vec<Vec<Option<f64>>>,
    moves: Vec<Move>,
    transfers: Vec<Transfer>,
    carried: Vec<[Vec<f64>; 2]>,
    latency: Vec<f64>,
    users: Vec<f64>,
    used: Vec<Vec<Capacity>>,
    business_bytes: f64,
    off_bytes: f64,
}

impl<'w, 'f> Sim<'w, 'f> {
    fn new(w: &'w World<'f>, strategy: Strategy, seed: u64) -> Self {
        let hours = w.horizon.hours;
        let sites = w.fleet.sites.len();
        Sim {
            w,
            strategy,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            site: w.units.iter().map(|u| u.site).collect(),
            moving: vec![None; w.units.len()],
            pending: vec![Default::default(); w.units.len()],
            holds: w
                .units
                .iter()
                .map(|u| {
                    (0..sites)
                        .map(|s| s == u.site || u.replicas.iter().any(|r| r.0 == s))
                        .collect()
                })
                .collect(),
            left_at: w
                .units
                .iter()
                .map(|u| {
                    (0..sites)
                        .map(|s| u.replicas.iter().find(|r| r.0 == s).map(|r| -r.1))
                        .collect()
                })
                .collect(),
            moves: Vec::new(),
            transfers: Vec::new(),
            carried: w
                .fleet
                .links
                .iter()
                .map(|_| [vec![0.0; hours], vec![0.0; hours]])
                .collect(),
            latency: vec![0.0; hours],
            users: vec![0.0; hours],
            used: vec![vec![Capacity::default(); hours]; sites],
            business_bytes: 0.0,
            off_bytes: 0.0,
        }
    }

    /// 1 ± 10%.
    fn noise(&mut self) -> f64 {
        1.0 + self.rng.gen_range(-0.1..=0.1)
    }

    /// Memory dirtied faster when the unit's users are busier: 0.75× to 1.25× the declared rate.
    fn dirty_factor(&self, u: usize, h: usize) -> f64 {
        let active = &self.w.units[u].active;
        let peak = active.iter().copied().fold(0.0, f64::max);
        if peak > 0.0 {
            0.75 + 0.5 * active[h] / peak
        } else {
            1.0
        }
    }

    fn decide(&mut self, h: usize) -> Result<(), PlanError> {
        match self.strategy {
            Strategy::Static => Ok(()),
            Strategy::Oracle => {
                for (i, u) in self.w.units.iter().enumerate() {
                    let best = u
                        .allowed
                        .iter()
                        .copied()
                        .min_by(|a, b| u.cost[h][*a].total_cmp(&u.cost[h][*b]).then(a.cmp(b)));
                    self.site[i] = best.unwrap_or(u.site);
                }
                Ok(())
            }
            Strategy::Naive => {
                self.naive(h);
                Ok(())
            }
            Strategy::Planner if h % 24 == 0 => self.replan(h),
            Strategy::Planner => Ok(()),
        }
    }

    /// Starts a move of unit `u` to `to` now: a stream of `bytes` (and seeds, by the caller).
    fn start_move(
        &mut self,
        u: usize,
        to: usize,
        h: usize,
        planned_h: Option<usize>,
    ) -> Option<usize> {
        let from = self.site[u];
        self.w.link(from, to)?;
        self.moves.push(Move {
            unit: u,
            from,
            to,
            started_h: h as f64,
            arrived_h: None,
            planned_h,
            downtime_ms: 0.0,
            wan_bytes: 0.0,
            business_bytes: 0.0,
            seeds_left: 0,
        });
        self.moving[u] = Some(self.moves.len() - 1);
        self.holds[u][to] = true;
        Some(self.moves.len() - 1)
    }

    /// Naive: at 08:00 local of each region holding at least a quarter of a unit's users, the
    /// unit goes to that region's closest site, copying its disk and memory then, at whatever
    /// the link gives (budgets are not its concern).
    fn naive(&mut self, h: usize) {
        let w = self.w;
        for i in 0..w.units.len() {
            if self.moving[i].is_some() {
                continue;
            }
            let Some(to) = naive_target(w, i, h) else {
                continue;
            };
            if to != self.site[i] {
                self.naive_move(i, to, h);
            }
        }
    }

    fn naive_move(&mut self, i: usize, to: usize, h: usize) {
        let w = self.w;
        let u = &w.units[i];
        let Some((l, dir)) = self.w.link_dir(self.site[i], to) else {
            return;
        };
        let full = w.bandwidth[l];
        let (bytes, downtime) = match predict_move(w, u, l, full, 0.0) {
            Ok(p) => (p.wan_bytes, p.downtime_ms),
            // Naive moves anyway: the guest pauses while its memory crosses.
            Err(_) => (memory_bytes(w, i), memory_bytes(w, i) / full * 1000.0),
        };
        let n = self.noise() * self.dirty_factor(i, h);
        let disk = seed_size(w, u);
        let Some(mv) = self.start_move(i, to, h, None) else {
            return;
        };
        self.moves[mv].downtime_ms = downtime * self.noise();
        self.transfers.push(Transfer {
            link: l,
            dir,
            remaining: disk + bytes * n,
            start_h: h,
            until_h: None,
            cap_bps: None,
            mv,
            seed: false,
            budgeted: false,
        });
    }
}

/// Where naive sends unit `u` in hour `h`: the closest allowed site of a region whose working
/// day starts now and that holds at least a quarter of the unit's users.
fn naive_target(w: &World, u: usize, h: usize) -> Option<usize> {
    let unit = &w.units[u];
    let mut weights: std::collections::BTreeMap<&str, f64> = Default::default();
    for m in &unit.members {
        for (r, x) in &w.fleet.vms[*m].users {
            *weights.entry(r.as_str()).or_default() += x;
        }
    }
    let total: f64 = weights.values().sum();
    let r = w.fleet.regions.iter().find(|r| {
        let share = weights.get(r.name.as_str()).copied().unwrap_or(0.0) / total.max(1e-9);
        let starts = crate::clock::zone(&r.tz).is_ok_and(|tz| w.horizon.local_hour(h, &tz) == 8);
        share >= 0.25 && starts
    })?;
    let rtt = |s: usize| {
        r.rtt_ms
            .get(&w.fleet.sites[s].name)
            .copied()
            .unwrap_or(f64::MAX)
    };
    unit.allowed
        .iter()
        .copied()
        .min_by(|a, b| rtt(*a).total_cmp(&rtt(*b)).then(a.cmp(b)))
}

/// Hours past the day that the daily plan looks ahead.
const LOOKAHEAD_H: usize = 12;

fn memory_bytes(w: &World, u: usize) -> f64 {
    w.units[u].size.memory_mib as f64 * 1048576.0
}

impl Sim<'_, '_> {
    /// The planner at the start of a day: plans the next 24 hours from where the units are and
    /// turns its moves into transfers (seeds in their hours at their rate, then the stream).
    fn replan(&mut self, h: usize) -> Result<(), PlanError> {
        let w = self.w;
        let mut now = w.fleet.clone();
        for (i, u) in w.units.iter().enumerate() {
            // A unit still moving is planned from where it is going (it lands within the
            // hour, and today's moves start from there), its source then a fresh copy.
            let (site, leaving) = match self.moving[i] {
                Some(mv) => (self.moves[mv].to, Some(self.moves[mv].from)),
                None => (self.site[i], None),
            };
            // The copies its earlier moves left behind, as old as the time since it left.
            let replicas: std::collections::BTreeMap<String, f64> = (0..w.fleet.sites.len())
                .filter(|s| *s != site && self.holds[i][*s])
                .filter_map(|s| {
                    let left = if leaving == Some(s) {
                        h as f64
                    } else {
                        self.left_at[i][s]?
                    };
                    Some((w.fleet.sites[s].name.clone(), (h as f64 - left).max(0.0)))
                })
                .collect();
            for m in &u.members {
                now.vms[*m].site = w.fleet.sites[site].name.clone();
                now.vms[*m].replicas = replicas.clone();
            }
        }
        // The plan looks past the day so that tomorrow morning's users are worth a move
        // tonight; only the moves whose migration runs today are carried out, the rest are
        // planned again tomorrow from where the units are then.
        let hours = (w.horizon.hours - h).min(24 + LOOKAHEAD_H);
        let plan = crate::plan::plan(&now, w.horizon.at(h), hours)?;
        for pm in plan.moves.into_iter().filter(|pm| pm.hour <= 24) {
            let Some(u) = w.units.iter().position(|u| u.name == pm.unit) else {
                continue;
            };
            if self.moving[u].is_some() || !self.pending[u].is_empty() {
                self.pending[u].push_back((h, pm));
            } else {
                self.planned_move(u, h, &pm);
            }
        }
        Ok(())
    }

    fn planned_move(&mut self, u: usize, day: usize, pm: &crate::explain::PlannedMove) {
        let w = self.w;
        let (Some(from), Some(to)) = (w.fleet.site_index(&pm.from), w.fleet.site_index(&pm.to))
        else {
            return;
        };
        let Some((l, dir)) = self.w.link_dir(from, to) else {
            return;
        };
        let arrive = day + pm.hour;
        let first = pm
            .seed
            .as_ref()
            .and_then(|s| s.hours.first().copied())
            .map_or(arrive - 1, |x| day + x);
        if self.site[u] != from {
            return; // an earlier move ran late or did not land: this one no longer applies
        }
        let Some(mv) = self.start_move(u, to, first, Some(arrive)) else {
            return;
        };
        self.moves[mv].downtime_ms = pm.migration.predicted_downtime_ms * self.noise();
        if let Some(seed) = &pm.seed {
            let per_hour = seed.wan_bytes / seed.hours.len().max(1) as f64;
            for sh in &seed.hours {
                let cap = Some(seed.bandwidth_bps / 8.0);
                self.transfers.push(Transfer {
                    link: l,
                    dir,
                    remaining: per_hour,
                    start_h: day + sh,
                    until_h: None,
                    cap_bps: cap,
                    mv,
                    seed: true,
                    budgeted: true,
                });
                self.moves[mv].seeds_left += 1;
            }
        }
        let n = self.noise() * self.dirty_factor(u, arrive - 1);
        let bytes = pm.migration.predicted_wan_bytes * n;
        self.transfers.push(Transfer {
            link: l,
            dir,
            remaining: bytes,
            start_h: arrive - 1,
            until_h: None,
            cap_bps: None,
            mv,
            seed: false,
            budgeted: true,
        });
    }

    /// One hour: latency at the hour's start, bytes minute by minute, arrivals, then the books.
    fn hour(&mut self, h: usize) {
        let w = self.w;
        for (i, u) in w.units.iter().enumerate() {
            self.latency[h] += u.cost[h][self.site[i]];
            self.users[h] += u.active[h];
        }
        for step in 0..STEPS {
            let moves = &self.moves;
            let (carried, done) =
                run_minute(&mut self.transfers, &w.bandwidth, &w.budget, h, |t| {
                    t.seed || moves[t.mv].seeds_left == 0
                });
            for (t, b) in carried {
                let tr = &self.transfers[t];
                self.carried[tr.link][tr.dir][h] += b;
                let mv = &mut self.moves[tr.mv];
                mv.wan_bytes += b;
                if w.business[tr.link][h] {
                    self.business_bytes += b;
                    mv.business_bytes += b;
                } else {
                    self.off_bytes += b;
                }
            }
            for t in done {
                self.transfer_done(t, h, (step + 1) as f64 / STEPS as f64);
            }
        }
        // Finished transfers are done with (nothing refers to them by index past the minute):
        // the next hour's minutes walk only what is still moving.
        self.transfers.retain(|t| t.remaining > 0.0);
        self.book_sites(h);
    }

    fn transfer_done(&mut self, t: usize, h: usize, frac: f64) {
        let (seed, mv) = (self.transfers[t].seed, self.transfers[t].mv);
        let mv = &mut self.moves[mv];
        if seed {
            mv.seeds_left = mv.seeds_left.saturating_sub(1);
            return;
        }
        mv.arrived_h = Some(h as f64 + frac);
        let (u, from, to) = (mv.unit, mv.from, mv.to);
        // The rest of this hour at the destination.
        self.latency[h] +=
            (self.w.units[u].cost[h][to] - self.w.units[u].cost[h][from]) * (1.0 - frac);
        self.site[u] = to;
        self.moving[u] = None;
        self.left_at[u][from] = Some(h as f64 + frac);
        if !self.w.fleet.policy.keep_replicas {
            self.holds[u][from] = false;
        }
        if let Some((day, pm)) = self.pending[u].pop_front() {
            self.planned_move(u, day, &pm);
        }
    }

    /// What each site holds in hour `h`: units where they run, moving units at both ends, disks
    /// wherever a copy is kept or being seeded.
    fn book_sites(&mut self, h: usize) {
        for (i, u) in self.w.units.iter().enumerate() {
            let compute = Capacity {
                disk_gib: 0,
                ..u.size
            };
            add(&mut self.used[self.site[i]][h], compute);
            if let Some(mv) = self.moving[i] {
                if self.moves[mv].started_h <= h as f64 {
                    add(&mut self.used[self.moves[mv].to][h], compute);
                }
            }
            for (s, held) in self.holds[i].iter().enumerate() {
                if *held {
                    self.used[s][h].disk_gib += u.size.disk_gib;
                }
            }
        }
    }
}

fn add(c: &mut Capacity, x: Capacity) {
    c.vcpus += x.vcpus;
    c.memory_mib += x.memory_mib;
    c.disk_gib += x.disk_gib;
}

impl Sim<'_, '_> {
    fn report(self, elapsed_s: f64) -> SimReport {
        let w = self.w;
        let hours = w.horizon.hours;
        let mut violations = Vec::new();
        let links = self.link_use(&mut violations);
        let sites = self.site_use(&mut violations);
        self.move_limits(&mut violations);
        let site = |s: usize| w.fleet.sites[s].name.clone();
        let moves = self
            .moves
            .iter()
            .map(|m| SimMove {
                unit: w.units[m.unit].name.clone(),
                vms: w.units[m.unit]
                    .members
                    .iter()
                    .map(|x| w.fleet.vms[*x].name.clone())
                    .collect(),
                from: site(m.from),
                to: site(m.to),
                started_h: m.started_h,
                arrived_h: m.arrived_h,
                planned_h: m.planned_h,
                downtime_ms: m.downtime_ms,
                wan_bytes: m.wan_bytes,
                business_hours_bytes: m.business_bytes,
            })
            .collect();
        SimReport {
            strategy: self.strategy.name().into(),
            from: w.horizon.at(0).to_string(),
            days: hours / 24,
            latency_ms: (0..hours)
                .map(|h| {
                    if self.users[h] > 0.0 {
                        self.latency[h] / self.users[h]
                    } else {
                        0.0
                    }
                })
                .collect(),
            user_ms_h: self.latency.iter().sum(),
            moves,
            links,
            sites,
            business_hours_bytes: self.business_bytes,
            off_hours_bytes: self.off_bytes,
            violations,
            elapsed_s,
        }
    }

    fn link_use(&self, violations: &mut Vec<String>) -> Vec<LinkUse> {
        let w = self.w;
        let mut out = Vec::new();
        for (l, link) in w.fleet.links.iter().enumerate() {
            let budget: Vec<f64> = w.budget[l].iter().map(|b| b * HOUR_S).collect();
            let used: Vec<f64> = (0..w.horizon.hours)
                .map(|h| self.carried[l][0][h].max(self.carried[l][1][h]))
                .collect();
            let over_by_hour: Vec<f64> = (0..w.horizon.hours)
                .map(|h| {
                    (0..2)
                        .map(|d| (self.carried[l][d][h] - budget[h] * (1.0 + 1e-9)).max(0.0))
                        .sum()
                })
                .collect();
            let over: f64 = over_by_hour.iter().sum();
            if over > 1.0 {
                let hours = over_by_hour.iter().filter(|x| **x > 1.0).count();
                violations.push(format!(
                    "link {}–{}: {:.1} GB over its budget in {hours} hours",
                    link.a,
                    link.b,
                    over / 1e9
                ));
            }
            out.push(LinkUse {
                link: format!("{}–{}", link.a, link.b),
                budget_bytes: budget,
                used_bytes: used,
                over_budget_bytes: over,
            });
        }
        out
    }

    fn site_use(&self, violations: &mut Vec<String>) -> Vec<SiteUse> {
        let w = self.w;
        let mut out = Vec::new();
        for (s, site) in w.fleet.sites.iter().enumerate() {
            let cap = site.capacity;
            let mut peak = Capacity::default();
            let mut over = 0;
            for u in &self.used[s] {
                peak.vcpus = peak.vcpus.max(u.vcpus);
                peak.memory_mib = peak.memory_mib.max(u.memory_mib);
                peak.disk_gib = peak.disk_gib.max(u.disk_gib);
                if u.vcpus > cap.vcpus || u.memory_mib > cap.memory_mib || u.disk_gib > cap.disk_gib
                {
                    over += 1;
                }
            }
            if over > 0 {
                violations.push(format!(
                    "site {}: over capacity in {over} hours (peak {peak:?} of {cap:?})",
                    site.name
                ));
            }
            out.push(SiteUse {
                site: site.name.clone(),
                capacity: cap,
                peak,
                vcpus_used: self.used[s].iter().map(|u| u.vcpus).collect(),
            });
        }
        out
    }

    fn move_limits(&self, violations: &mut Vec<String>) {
        if self.strategy != Strategy::Planner {
            return;
        }
        for (i, u) in self.w.units.iter().enumerate() {
            let mut per_day = vec![0u32; self.w.horizon.hours / 24 + 1];
            for m in self.moves.iter().filter(|m| m.unit == i) {
                per_day[m.planned_h.unwrap_or(0).saturating_sub(1) / 24] += 1;
            }
            if per_day.iter().any(|n| *n > u.max_moves_per_day) {
                violations.push(format!(
                    "{}: more than {} moves in a day",
                    u.name, u.max_moves_per_day
                ));
            }
        }
    }
}
