//! One unit's best route through the plan's hours: a dynamic program over (hour, site, moves
//! used today) that adds the users' latency of every hour and the cost of every move, within
//! the rules the books can answer hour by hour (residency, links, compute capacity, the move's
//! own hour on the link, downtime caps, the daily move limit). Seeds and disk are checked on
//! the route it returns (`place`), which bans what did not fit and asks again.

use crate::ledger::Ledger;
use crate::place::MOVE_HEADROOM;
use crate::predict::predict_move;
use crate::world::{Unit, World, HOUR_S};
use std::collections::{BTreeMap, BTreeSet};

/// How many sites besides its own a unit considers (the best by latency over the plan).
const CANDIDATES: usize = 4;

/// A route: the site in each hour, and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// `sites[h]`: where the unit runs during hour h.
    pub sites: Vec<usize>,
    /// Latency plus move costs, user-ms·h.
    pub cost: f64,
}

impl Route {
    /// Staying where it is.
    pub fn stay(w: &World, u: &Unit) -> Route {
        Route {
            sites: vec![u.site; w.horizon.hours],
            cost: u.total(u.site),
        }
    }

    /// The hours at which it arrives somewhere new, with from and to.
    pub fn moves(&self) -> Vec<(usize, usize, usize)> {
        (1..self.sites.len())
            .filter(|h| self.sites[*h] != self.sites[h - 1])
            .map(|h| (h, self.sites[h - 1], self.sites[h]))
            .collect()
    }
}

/// Sites `u` considers: its own and the best few it may run at.
pub fn candidates(u: &Unit) -> Vec<usize> {
    let mut by_latency: Vec<usize> = u.allowed.clone();
    by_latency.sort_by(|a, b| u.total(*a).total_cmp(&u.total(*b)).then(a.cmp(b)));
    let mut out: Vec<usize> = by_latency.into_iter().take(CANDIDATES).collect();
    if !out.contains(&u.site) {
        out.push(u.site);
    }
    out.sort_unstable();
    out
}

/// The route search for one unit against the books (`None`: as if the fleet were empty and
/// links idle, which gives the route the unit would take if nothing stood in its way).
pub struct Search<'a, 'f> {
    pub w: &'a World<'f>,
    pub u: &'a Unit,
    pub ledger: Option<&'a Ledger>,
    /// (arrival hour, site) pairs refused by `place`.
    pub banned: &'a BTreeSet<(usize, usize)>,
    cache: BTreeMap<(usize, usize, u64), Option<Predicted>>,
    /// Per link and direction, the bytes free on it before each hour, in all hours and in
    /// those outside business hours (prefix sums).
    free_before: BTreeMap<(usize, usize), Vec<(f64, f64)>>,
}

impl<'a, 'f> Search<'a, 'f> {
    pub fn new(
        w: &'a World<'f>,
        u: &'a Unit,
        ledger: Option<&'a Ledger>,
        banned: &'a BTreeSet<(usize, usize)>,
    ) -> Self {
        Search {
            w,
            u,
            ledger,
            banned,
            cache: BTreeMap::new(),
            free_before: BTreeMap::new(),
        }
    }

    /// The cheapest route.
    pub fn best(&mut self) -> Route {
        let (w, u) = (self.w, self.u);
        let sites = candidates(u);
        let limit = u.max_moves_per_day as usize;
        let states = sites.len() * (limit + 1);
        let idx = |s: usize, m: usize| s * (limit + 1) + m;
        let mut cost = vec![f64::INFINITY; states];
        let mut parent = vec![vec![usize::MAX; states]; w.horizon.hours];
        let Some(home) = sites.iter().position(|s| *s == u.site) else {
            return Route::stay(w, u); // candidates() always holds the unit's site
        };
        cost[idx(home, 0)] = u.cost[0][u.site];
        for (h, parent_h) in parent.iter_mut().enumerate().skip(1) {
            cost = self.step(h, &sites, limit, &cost, parent_h);
        }
        self.trace(&sites, limit, &cost, &parent)
    }

    /// One hour of the program: from the costs at hour h-1 to those at h (stay, or move to
    /// another candidate when today's moves allow), recording each state's parent.
    fn step(
        &mut self,
        h: usize,
        sites: &[usize],
        limit: usize,
        cost: &[f64],
        parent: &mut [usize],
    ) -> Vec<f64> {
        let idx = |s: usize, m: usize| s * (limit + 1) + m;
        let mut next = vec![f64::INFINITY; cost.len()];
        // A move counts on the day its migration runs (hour h-1, the hour before it arrives),
        // as the simulator and the executor count it: arriving at midnight is yesterday's.
        let new_day = h % 24 == 1;
        // Each hour's step costs, once per pair of sites (not once per move count).
        let stay: Vec<Option<f64>> = sites.iter().map(|t| self.stay_cost(h, *t)).collect();
        for (si, &s) in sites.iter().enumerate() {
            let steps: Vec<Option<f64>> = sites
                .iter()
                .enumerate()
                .map(|(ti, &t)| {
                    if t == s {
                        stay[ti]
                    } else {
                        Some(self.move_cost(h, s, t)? + stay[ti]?)
                    }
                })
                .collect();
            for m in 0..=limit {
                let c = cost[idx(si, m)];
                if !c.is_finite() {
                    continue;
                }
                let m0 = if new_day { 0 } else { m };
                for (ti, &t) in sites.iter().enumerate() {
                    if t != s && m0 >= limit {
                        continue;
                    }
                    let Some(step) = steps[ti] else { continue };
                    let j = idx(ti, if t == s { m0 } else { m0 + 1 });
                    if c + step < next[j] {
                        next[j] = c + step;
                        parent[j] = idx(si, m);
                    }
                }
            }
        }
        next
    }

    fn trace(&self, sites: &[usize], limit: usize, cost: &[f64], parent: &[Vec<usize>]) -> Route {
        let Some((mut j, total)) = cost
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, c)| c.is_finite())
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        else {
            return Route::stay(self.w, self.u);
        };
        let hours = self.w.horizon.hours;
        let mut out = vec![0; hours];
        for h in (0..hours).rev() {
            out[h] = sites[j / (limit + 1)];
            if h > 0 {
                j = parent[h][j];
            }
        }
        Route {
            sites: out,
            cost: total,
        }
    }

    /// Latency of hour `h` at `t`, or `None` when the unit does not fit there then.
    fn stay_cost(&self, h: usize, t: usize) -> Option<f64> {
        if let Some(l) = self.ledger {
            let mut compute = self.u.size;
            compute.disk_gib = 0; // disk is checked on the placed route
            l.fits(t, h, compute).ok()?;
        }
        Some(self.u.cost[h][t])
    }

    /// The cost of arriving at `t` from `s` at the start of hour `h` (the move runs in hour
    /// h-1), or `None` when it cannot be made then.
    fn move_cost(&mut self, h: usize, s: usize, t: usize) -> Option<f64> {
        if self.banned.contains(&(h, t)) {
            return None;
        }
        let (l, dir) = self.w.link_dir(s, t)?;
        let free = match self.ledger {
            Some(led) => {
                let mut compute = self.u.size;
                compute.disk_gib = 0;
                led.fits(t, h - 1, compute).ok()?;
                led.link_free(l, dir, h - 1)
            }
            None => self.w.budget[l][h - 1] * HOUR_S,
        };
        let p = self.predicted(l, dir, free)?;
        let seed = seed_bytes(self.w, self.u, t, h);
        // A seed the link cannot carry in the hours before the move's cannot precede it
        // (`place` lays it out exactly; this keeps the search from offering arrivals hour
        // after hour that are bound to be refused).
        let (free, off) = self.free_before(l, dir, h - 1);
        if seed > 0.0 && free < seed {
            return None;
        }
        // Bytes in business hours: the seed's that off hours cannot take, and the move's own
        // when its hour is one.
        let mut busy = (seed - off).max(0.0);
        if self.w.business[l][h - 1] {
            busy += p.wan_bytes;
        }
        let busy_price = self.w.fleet.policy.business_cost_per_gb * busy / 1e9;
        Some(busy_price + move_price(self.w, self.u, h - 1, seed + p.wan_bytes, p.downtime_ms))
    }

    /// Bytes free on link `l` in direction `dir` in the hours before `h`: in all, and
    /// outside business hours.
    fn free_before(&mut self, l: usize, dir: usize, h: usize) -> (f64, f64) {
        let (w, ledger) = (self.w, self.ledger);
        let sums = self.free_before.entry((l, dir)).or_insert_with(|| {
            let (mut all, mut off) = (0.0, 0.0);
            let mut out = vec![(0.0, 0.0)];
            for x in 0..w.horizon.hours {
                let free = match ledger {
                    Some(led) => led.link_free(l, dir, x),
                    None => w.budget[l][x] * HOUR_S,
                };
                all += free;
                if !w.business[l][x] {
                    off += free;
                }
                out.push((all, off));
            }
            out
        });
        sums[h.min(sums.len() - 1)]
    }

    /// The move's prediction at what the hour has free (cached by bandwidth).
    fn predicted(&mut self, l: usize, dir: usize, free_bytes: f64) -> Option<Predicted> {
        let key = (l, dir, free_bytes as u64);
        if let Some(p) = self.cache.get(&key) {
            return *p;
        }
        let p = predict_move(self.w, self.u, l, free_bytes / HOUR_S, 0.0)
            .ok()
            // As `place` books it: with its headroom.
            .filter(|p| {
                p.duration_s * MOVE_HEADROOM <= HOUR_S && p.wan_bytes * MOVE_HEADROOM <= free_bytes
            })
            .map(|p| Predicted {
                wan_bytes: p.wan_bytes,
                downtime_ms: p.downtime_ms,
            });
        self.cache.insert(key, p);
        p
    }
}

/// What the search needs of a move's prediction.
#[derive(Debug, Clone, Copy)]
struct Predicted {
    wan_bytes: f64,
    downtime_ms: f64,
}

/// Wire bytes of seeding `u`'s disks to `t` for an arrival at hour `h`: nothing at its own
/// site, what was written since at a site holding a replica, else the whole disks.
pub fn seed_bytes(w: &World, u: &Unit, t: usize, h: usize) -> f64 {
    if t == u.site {
        return 0.0;
    }
    let stale_since = u.replicas.iter().find(|r| r.0 == t).map(|r| -r.1);
    crate::place::seed_need(w, u, stale_since, h)
}

/// The objective's price of a move made in hour `h` that sends `wire_bytes` and pauses the
/// unit `downtime_ms`, user-ms·h.
pub fn move_price(w: &World, u: &Unit, h: usize, wire_bytes: f64, downtime_ms: f64) -> f64 {
    let policy = &w.fleet.policy;
    policy.move_cost
        + policy.cost_per_gb * wire_bytes / 1e9
        + policy.downtime_weight * u.active[h] * downtime_ms / 1000.0
}
