//! The planner: units settle one by one, the most to gain first, each on its cheapest route
//! that the books can carry; what they leave out is explained. The result is checked against
//! every hard rule again before it is returned.

use crate::clock::Horizon;
use crate::explain::{self, LeftOut, PlannedMove};
use crate::fleet::Fleet;
use crate::ledger::Ledger;
use crate::place::{place, Misfit, MovePlan};
use crate::route::{Route, Search};
use crate::world::{Unit, World};
use crate::PlanError;
use jiff::Timestamp;
use serde::Serialize;
use std::collections::BTreeSet;

/// Routes a unit may be refused before it stays where it is.
const MAX_TRIES: usize = 8;
/// The longest plan, hours.
pub const MAX_HOURS: usize = 24 * 31;

/// A plan: the moves, what was left out and why, and what it buys.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The first hour (RFC 3339, UTC).
    pub from: String,
    /// Hours covered.
    pub hours: usize,
    /// Moves, by arrival hour then unit.
    pub moves: Vec<PlannedMove>,
    /// Tempting moves not made, with the reason.
    pub left_out: Vec<LeftOut>,
    /// User-weighted average latency per hour, ms, with the plan and without moves.
    pub latency_ms: Latency,
    /// Sums.
    pub totals: Totals,
    /// Every hard rule broken (the planner's own check; empty unless it has a bug).
    pub violations: Vec<String>,
}

/// Latency by hour.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// With the plan.
    pub planned: Vec<f64>,
    /// If nothing moved.
    pub r#static: Vec<f64>,
}

/// Sums over the plan.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Moves (of units).
    pub moves: usize,
    /// VMs moved (a group counts its members).
    pub vm_moves: usize,
    /// Wire bytes of seeds and moves.
    pub wan_bytes: f64,
    /// Of which in business hours.
    pub business_hours_bytes: f64,
    /// Users' latency with the plan, user-ms·h.
    pub user_ms_h_planned: f64,
    /// Users' latency if nothing moved, user-ms·h.
    pub user_ms_h_static: f64,
}

/// Plans `fleet` for `hours` hours from `from` (rounded down to the hour).
pub fn plan(fleet: &Fleet, from: Timestamp, hours: usize) -> Result<Plan, PlanError> {
    if !(1..=MAX_HOURS).contains(&hours) {
        return Err(PlanError::Fleet(format!(
            "hours {hours}: plan 1 to {MAX_HOURS} hours"
        )));
    }
    fleet.check()?;
    let w = World::new(fleet, Horizon::new(from, hours))?;
    let mut led = Ledger::new(&w);
    book_static(&w, &mut led)?;
    let mut settled: Vec<(usize, Route, Vec<MovePlan>)> = Vec::new();
    let mut left_out = Vec::new();
    // The routes units would take alone do not depend on the books: searched on every core.
    let ideals: Vec<Route> = {
        use rayon::prelude::*;
        w.units
            .par_iter()
            .map(|u| explain::ideal_route(&w, u))
            .collect()
    };
    for ui in order(&w) {
        let u = &w.units[ui];
        occupy_static(&w, u, &mut led, -1);
        led.forget();
        let start = led.mark();
        let (route, moves, misfits) = settle(&w, u, &mut led);
        // The books as they were before the unit settled explain what it left out.
        let booked = led.take_since(start);
        led.undo(&booked);
        left_out.extend(explain::left_out(
            &w,
            u,
            &ideals[ui],
            &route,
            &misfits,
            &led,
        ));
        led.redo(&booked);
        settled.push((ui, route, moves));
    }
    Ok(report(&w, &led, settled, left_out))
}

/// Every unit where it is, for every hour: the fleet as it stands must fit.
fn book_static(w: &World, led: &mut Ledger) -> Result<(), PlanError> {
    for u in &w.units {
        if let Err(e) = led.fits(u.site, 0, u.size) {
            let site = &w.fleet.sites[u.site].name;
            let here: Vec<&str> = w
                .units
                .iter()
                .filter(|x| x.site == u.site)
                .flat_map(|x| x.members.iter().map(|m| w.fleet.vms[*m].name.as_str()))
                .collect();
            return Err(PlanError::Unsatisfiable(format!(
                "capacity: site {site:?} holds more {} than it has ({} free for {:?}, which needs {}); VMs there: {}",
                e.resource,
                e.free,
                u.name,
                e.need,
                here.join(", ")
            )));
        }
        for &(s, _) in &u.replicas {
            let disk = crate::fleet::Capacity {
                disk_gib: u.size.disk_gib,
                ..Default::default()
            };
            if let Err(e) = led.fits(s, 0, disk) {
                return Err(PlanError::Unsatisfiable(format!(
                    "capacity: site {:?} has {} GiB of disk free, too little for the replica of {:?} declared there ({} GiB)",
                    w.fleet.sites[s].name, e.free, u.name, u.size.disk_gib
                )));
            }
        }
        occupy_static(w, u, led, 1);
    }
    Ok(())
}

/// Books (`sign` 1) or releases (-1) a unit as it stands for every hour: where it runs, and
/// the disks of its replicas.
fn occupy_static(w: &World, u: &Unit, led: &mut Ledger, sign: i8) {
    let disk = crate::fleet::Capacity {
        disk_gib: u.size.disk_gib,
        ..Default::default()
    };
    for h in 0..w.horizon.hours {
        led.occupy(u.site, h, u.size, sign);
        for &(s, _) in &u.replicas {
            led.occupy(s, h, disk, sign);
        }
    }
}

/// Units by what they could gain (user-ms·h at their best allowed sites against staying),
/// most first; ties by name, so the plan is the same for the same fleet.
fn order(w: &World) -> Vec<usize> {
    let mut idx: Vec<(f64, usize)> = w
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| (most_to_gain(w, u), i))
        .collect();
    idx.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| w.units[a.1].name.cmp(&w.units[b.1].name))
    });
    idx.into_iter().map(|(_, i)| i).collect()
}

/// Routes refused on the way: (hour, site, why).
type Misfits = Vec<(usize, usize, Misfit)>;

/// The unit's cheapest route that fits, booked on `led`, and the misfits met on the way.
fn settle(w: &World, u: &Unit, led: &mut Ledger) -> (Route, Vec<MovePlan>, Misfits) {
    let mut banned = BTreeSet::new();
    let mut misfits = Vec::new();
    let stay = Route::stay(w, u);
    let worth = worth_a_search(w, u);
    for _ in 0..MAX_TRIES {
        if !worth {
            break;
        }
        let route = Search::new(w, u, Some(led), &banned).best();
        if route.moves().is_empty() {
            break;
        }
        match place(w, u, &route, led) {
            Ok(moves) => return (route, moves, misfits),
            Err((h, t, m)) => {
                banned.insert((h, t));
                misfits.push((h, t, m));
            }
        }
    }
    // It cannot fail: the unit's own static booking was just released.
    if let Err(e) = place(w, u, &stay, led) {
        tracing::error!(unit = %u.name, misfit = ?e, "a unit cannot stay where it is");
    }
    (stay, Vec::new(), misfits)
}

/// Whether `u` could gain anywhere more than one move costs: a unit that cannot stays
/// without a route search.
pub(crate) fn worth_a_search(w: &World, u: &Unit) -> bool {
    most_to_gain(w, u) > w.fleet.policy.move_cost
}

/// What the unit would gain, user-ms·h, at its best allowed site every hour for free.
fn most_to_gain(w: &World, u: &Unit) -> f64 {
    u.total(u.site) - ideal_floor(w, u)
}

/// The unit's latency if it could be at its best allowed site every hour for free.
fn ideal_floor(w: &World, u: &Unit) -> f64 {
    (0..w.horizon.hours)
        .map(|h| {
            u.allowed
                .iter()
                .map(|s| u.cost[h][*s])
                .fold(f64::INFINITY, f64::min)
        })
        .sum()
}

fn report(
    w: &World,
    led: &Ledger,
    settled: Vec<(usize, Route, Vec<MovePlan>)>,
    mut left_out: Vec<LeftOut>,
) -> Plan {
    let hours = w.horizon.hours;
    let (mut planned, mut stat, mut users) = (vec![0.0; hours], vec![0.0; hours], vec![0.0; hours]);
    let mut totals = Totals::default();
    let mut moves = Vec::new();
    for (ui, route, mvs) in &settled {
        let u = &w.units[*ui];
        for h in 0..hours {
            planned[h] += u.cost[h][route.sites[h]];
            stat[h] += u.cost[h][u.site];
            users[h] += u.active[h];
        }
        for m in mvs {
            let pm = explain::planned_move(w, u, route, m);
            totals.moves += 1;
            totals.vm_moves += u.members.len();
            totals.wan_bytes += pm.cost.wan_bytes;
            totals.business_hours_bytes += pm.cost.business_hours_bytes;
            moves.push(pm);
        }
    }
    totals.user_ms_h_planned = planned.iter().sum();
    totals.user_ms_h_static = stat.iter().sum();
    let avg = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .zip(&users)
            .map(|(c, n)| if *n > 0.0 { c / n } else { 0.0 })
            .collect()
    };
    moves.sort_by(|a, b| a.arrive_by.cmp(&b.arrive_by).then(a.unit.cmp(&b.unit)));
    left_out.sort_by(|a, b| a.unit.cmp(&b.unit).then(a.hour.cmp(&b.hour)));
    Plan {
        from: w.horizon.at(0).to_string(),
        hours,
        latency_ms: Latency {
            planned: avg(&planned),
            r#static: avg(&stat),
        },
        violations: audit(w, led, &settled),
        moves,
        left_out,
        totals,
    }
}

/// Every hard rule, checked on the books and routes as booked.
fn audit(w: &World, led: &Ledger, settled: &[(usize, Route, Vec<MovePlan>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (s, site) in w.fleet.sites.iter().enumerate() {
        for h in 0..w.horizon.hours {
            let (u, c) = (led.used(s, h), led.cap(s));
            if u.vcpus > c.vcpus || u.memory_mib > c.memory_mib || u.disk_gib > c.disk_gib {
                out.push(format!(
                    "capacity of {} exceeded in hour {h}: {u:?} of {c:?}",
                    site.name
                ));
            }
        }
    }
    for (l, link) in w.fleet.links.iter().enumerate() {
        for h in 0..w.horizon.hours {
            for dir in 0..2 {
                if led.link_used(l, dir, h) > led.link_cap(l, h) * (1.0 + 1e-9) + 1.0 {
                    out.push(format!(
                        "budget of link {}–{} exceeded in hour {h}",
                        link.a, link.b
                    ));
                }
            }
        }
    }
    for (ui, route, _) in settled {
        let u = &w.units[*ui];
        if route.sites.iter().any(|s| !u.allowed.contains(s)) {
            out.push(format!("residency of {} broken", u.name));
        }
        let per_day =
            route
                .moves()
                .iter()
                .fold(vec![0u32; w.horizon.hours / 24 + 1], |mut d, m| {
                    d[(m.0 - 1) / 24] += 1; // by the migration's hour, the one before arrival
                    d
                });
        if per_day.iter().any(|n| *n > u.max_moves_per_day) {
            out.push(format!("move limit of {} broken", u.name));
        }
    }
    out
}
