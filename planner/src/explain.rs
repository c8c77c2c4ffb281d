//! Why: every move in words and in fields (who gains how much for how long, what it costs,
//! the migration and seed jobs it needs with their windows), and every tempting move left out
//! with the rule or the cost that kept it out.

use crate::ledger::Ledger;
use crate::place::{Misfit, MovePlan};
use crate::predict::{predict_move, Refusal};
use crate::route::Route;
use crate::world::{Unit, World, HOUR_S};
use serde::Serialize;
use std::collections::BTreeMap;

/// A move in the plan.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedMove {
    /// The unit (group or VM).
    pub unit: String,
    /// Its VMs.
    pub vms: Vec<String>,
    /// From site.
    pub from: String,
    /// To site.
    pub to: String,
    /// It runs at `to` from this time (RFC 3339).
    pub arrive_by: String,
    /// Plan hour of `arrive_by`.
    pub hour: usize,
    /// The seed ahead of the move, when the destination lacks the disk.
    pub seed: Option<SeedStep>,
    /// The migration job.
    pub migration: MigrationStep,
    /// What the users gain.
    pub gain: Gain,
    /// What it costs.
    pub cost: Cost,
    /// In words.
    pub why: String,
}

/// A seed job's window.
#[derive(Debug, Clone, Serialize)]
pub struct SeedStep {
    /// Start no earlier than (RFC 3339).
    pub not_before: String,
    /// Be done by.
    pub deadline: String,
    /// Wire bytes.
    pub wan_bytes: f64,
    /// Of which in business hours.
    pub business_hours_bytes: f64,
    /// Hours it uses.
    pub hours: Vec<usize>,
    /// The cap that keeps it within the budget, bits/s.
    pub bandwidth_bps: f64,
}

/// The migration job.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStep {
    /// `not_before` of the job.
    pub not_before: String,
    /// `deadline` of the job.
    pub deadline: String,
    /// `live`, `postcopy` or `warm`.
    pub mode: String,
    /// The downtime cap (the smallest of its VMs), ms.
    pub max_downtime_ms: f64,
    /// Predicted time to running at the destination, s.
    pub predicted_duration_s: f64,
    /// Predicted downtime, ms.
    pub predicted_downtime_ms: f64,
    /// Predicted wire bytes (memory and the disk's last delta).
    pub predicted_wan_bytes: f64,
    /// Disk written since the seed, in those bytes.
    pub disk_delta_bytes: f64,
    /// The cap that keeps it within the link's budget in its hour, bits/s (the job's
    /// `bandwidth`).
    pub bandwidth_bps: f64,
}

/// The users' gain from a move, until the unit moves again or the plan ends.
#[derive(Debug, Clone, Serialize)]
pub struct Gain {
    /// Latency saved, user-ms·h.
    pub user_ms_h: f64,
    /// Hours the unit stays at the destination.
    pub hours: usize,
    /// Average saving per active user over those hours, ms.
    pub avg_ms: f64,
    /// Per region with users: the RTT change, ms (positive: faster).
    pub regions_ms: BTreeMap<String, f64>,
}

/// A move's cost.
#[derive(Debug, Clone, Serialize)]
pub struct Cost {
    /// Seed and move wire bytes.
    pub wan_bytes: f64,
    /// Of which in business hours at either end of the link.
    pub business_hours_bytes: f64,
    /// Predicted downtime, ms.
    pub downtime_ms: f64,
    /// The objective's price of the move, user-ms·h.
    pub user_ms_h: f64,
}

/// A move the planner wanted and did not make.
#[derive(Debug, Clone, Serialize)]
pub struct LeftOut {
    /// The unit.
    pub unit: String,
    /// Its VMs.
    pub vms: Vec<String>,
    /// Where it would have gone.
    pub to: String,
    /// The plan hour it would have arrived (0 when not tied to an hour).
    pub hour: usize,
    /// `capacity`, `budget`, `residency`, `downtime`, `no_link`, `move_limit` or `not_worth`.
    pub reason: String,
    /// What it would have saved, user-ms·h.
    pub gain_user_ms_h: f64,
    /// In words.
    pub why: String,
}

fn vms(w: &World, u: &Unit) -> Vec<String> {
    u.members
        .iter()
        .map(|m| w.fleet.vms[*m].name.clone())
        .collect()
}

fn gb(b: f64) -> String {
    format!("{:.1} GB", b / 1e9)
}

/// The fields and words of move `m` of `u` on `route`.
pub fn planned_move(w: &World, u: &Unit, route: &Route, m: &MovePlan) -> PlannedMove {
    let site = |s: usize| w.fleet.sites[s].name.clone();
    let hz = &w.horizon;
    let gain = gain(w, u, route, m);
    let seed_business: f64 = m
        .seed
        .hours
        .iter()
        .filter(|(h, _)| w.business[m.link][*h])
        .map(|x| x.1)
        .sum();
    let move_business = if w.business[m.link][m.hour - 1] {
        m.predicted.wan_bytes
    } else {
        0.0
    };
    let seed = m.seed.hours.first().map(|first| {
        let last = m.seed.hours.last().map_or(first.0, |x| x.0);
        let peak = m.seed.hours.iter().map(|x| x.1).fold(0.0, f64::max);
        SeedStep {
            not_before: hz.at(first.0).to_string(),
            deadline: hz.at(last + 1).to_string(),
            wan_bytes: m.seed.bytes,
            business_hours_bytes: seed_business,
            hours: m.seed.hours.iter().map(|x| x.0).collect(),
            bandwidth_bps: peak * 8.0 / HOUR_S,
        }
    });
    let p = &m.predicted;
    // The job starts with a margin of half its predicted time again (at least 5 minutes).
    let lead = (p.duration_s * 1.5).clamp(300.0, HOUR_S) as i64;
    let arrive = hz.at(m.hour);
    let not_before = jiff::Timestamp::from_second(arrive.as_second() - lead).unwrap_or(arrive);
    let wan = m.seed.bytes + p.wan_bytes;
    let cost_user = crate::route::move_price(w, u, m.hour - 1, wan, p.downtime_ms);
    let why = move_words(w, u, m, &gain, wan, seed_business + move_business);
    PlannedMove {
        unit: u.name.clone(),
        vms: vms(w, u),
        from: site(m.from),
        to: site(m.to),
        arrive_by: arrive.to_string(),
        hour: m.hour,
        seed,
        migration: MigrationStep {
            not_before: not_before.to_string(),
            deadline: arrive.to_string(),
            mode: p.mode.clone(),
            max_downtime_ms: u.max_downtime_ms,
            predicted_duration_s: p.duration_s,
            predicted_downtime_ms: p.downtime_ms,
            predicted_wan_bytes: p.wan_bytes,
            disk_delta_bytes: m.delta_bytes,
            bandwidth_bps: p.bandwidth_bps,
        },
        gain,
        cost: Cost {
            wan_bytes: wan,
            business_hours_bytes: seed_business + move_business,
            downtime_ms: p.downtime_ms,
            user_ms_h: cost_user,
        },
        why,
    }
}

fn gain(w: &World, u: &Unit, route: &Route, m: &MovePlan) -> Gain {
    let end = route
        .moves()
        .iter()
        .map(|x| x.0)
        .find(|h| *h > m.hour)
        .unwrap_or(w.horizon.hours);
    let (mut saved, mut users) = (0.0, 0.0);
    for h in m.hour..end {
        saved += u.cost[h][m.from] - u.cost[h][m.to];
        users += u.active[h];
    }
    let mut regions_ms = BTreeMap::new();
    for mi in &u.members {
        for (r, weight) in &w.fleet.vms[*mi].users {
            if *weight <= 0.0 {
                continue;
            }
            if let Some(reg) = w.fleet.regions.iter().find(|x| &x.name == r) {
                let rtt = |s: usize| {
                    reg.rtt_ms
                        .get(&w.fleet.sites[s].name)
                        .copied()
                        .unwrap_or(0.0)
                };
                regions_ms.insert(r.clone(), rtt(m.from) - rtt(m.to));
            }
        }
    }
    Gain {
        user_ms_h: saved,
        hours: end - m.hour,
        avg_ms: if users > 0.0 { saved / users } else { 0.0 },
        regions_ms,
    }
}

fn move_words(w: &World, u: &Unit, m: &MovePlan, g: &Gain, wan: f64, business: f64) -> String {
    let site = |s: usize| &w.fleet.sites[s].name;
    let who: Vec<String> = g
        .regions_ms
        .iter()
        .filter(|(_, ms)| **ms > 0.0)
        .map(|(r, ms)| format!("users in {r} gain {ms:.0} ms"))
        .collect();
    let seed = if m.seed.bytes > 0.0 {
        format!(
            "{} seeded ahead ({} in business hours)",
            gb(m.seed.bytes),
            gb(business
                - if w.business[m.link][m.hour - 1] {
                    m.predicted.wan_bytes
                } else {
                    0.0
                })
        )
    } else {
        "nothing to seed (its disk is there)".to_string()
    };
    format!(
        "{} moves {} → {}, running there from {} for {} h: {}; {:.0} user-ms·h saved ({:.0} ms per active user). Costs {} in all: {}, then {} moved in {:.0} s ({}, predicted downtime {:.0} ms of {:.0} allowed).",
        u.name,
        site(m.from),
        site(m.to),
        w.horizon.at(m.hour),
        g.hours,
        if who.is_empty() { "no region gains".to_string() } else { who.join(", ") },
        g.user_ms_h,
        g.avg_ms,
        gb(wan),
        seed,
        gb(m.predicted.wan_bytes),
        m.predicted.duration_s,
        m.predicted.mode,
        m.predicted.downtime_ms,
        u.max_downtime_ms,
    )
}

/// The route `u` would take if nothing stood in its way (no other unit on the books, links
/// at their budgets): the moves left out are those of this route it did not make.
pub fn ideal_route(w: &World, u: &Unit) -> Route {
    // A unit that gains less anywhere than a move's fixed cost has no move to explain: its
    // ideal route stays (the search is the costliest part of planning a large fleet).
    if crate::plan::worth_a_search(w, u) {
        let none = std::collections::BTreeSet::new();
        crate::route::Search::new(w, u, None, &none).best()
    } else {
        Route::stay(w, u)
    }
}

/// Tempting moves `u` does not make on `route` (those of `ideal`, its [`ideal_route`], and
/// the misfits met on the way), and why, against the books as they were before it settled.
pub fn left_out(
    w: &World,
    u: &Unit,
    ideal: &Route,
    route: &Route,
    misfits: &[(usize, usize, Misfit)],
    books: &Ledger,
) -> Vec<LeftOut> {
    let mut out = Vec::new();
    let name = |s: usize| w.fleet.sites[s].name.clone();
    let planned: f64 = (0..w.horizon.hours)
        .map(|h| u.cost[h][route.sites[h]])
        .sum();
    let item = |to: usize, hour: usize, reason: &str, gain: f64, why: String| LeftOut {
        unit: u.name.clone(),
        vms: vms(w, u),
        to: name(to),
        hour,
        reason: reason.into(),
        gain_user_ms_h: gain,
        why,
    };
    let mut said = std::collections::BTreeSet::new();
    for (h, t, m) in misfits {
        let (reason, why) = misfit_words(w, m);
        // One line per destination and reason: the planner may try several hours.
        if !said.insert((*t, reason)) {
            continue;
        }
        let gain = (*h..w.horizon.hours)
            .map(|x| u.cost[x][route.sites[x]] - u.cost[x][*t])
            .sum();
        out.push(item(
            *t,
            *h,
            reason,
            gain,
            format!("{} → {} by {}: {why}", u.name, name(*t), w.horizon.at(*h)),
        ));
    }
    // Moves the unit would make if nothing stood in its way, and what stood there.
    let made = route.moves();
    for (h, s, t) in ideal.moves() {
        if made.contains(&(h, s, t)) || misfits.iter().any(|m| (m.0, m.1) == (h, t)) {
            continue;
        }
        let (reason, why) = probe(w, u, books, ideal, (h, s, t));
        let gain = ideal_gain(u, ideal, h, s, t);
        out.push(item(
            t,
            h,
            reason,
            gain,
            format!("{} → {} by {}: {why}", u.name, name(t), w.horizon.at(h)),
        ));
    }
    // The best site of all, if residency keeps the unit out of it.
    let best_any =
        (0..w.fleet.sites.len()).min_by(|a, b| u.total(*a).total_cmp(&u.total(*b)).then(a.cmp(b)));
    if let Some(b) = best_any.filter(|b| !u.allowed.contains(b)) {
        let gain = planned - u.total(b);
        if gain > w.fleet.policy.move_cost {
            out.push(item(b, 0, "residency", gain, format!(
                "{} would serve its users best from {} ({gain:.0} user-ms·h less), but its allowed_sites exclude it",
                u.name, name(b)
            )));
        }
    }
    if route.moves().is_empty() && out.is_empty() {
        if let Some(x) = not_worth(w, u, books) {
            out.push(x);
        }
    }
    out
}

/// The best allowed site other than home, when moving there was not worth its cost or could
/// not be done at all (probed against the books as they were before the unit settled).
fn not_worth(w: &World, u: &Unit, books: &Ledger) -> Option<LeftOut> {
    // What a site would save in the hours it is closer to the unit's users (a unit whose
    // users span the world gains somewhere every hour, though no site is best all day).
    let saves = |t: usize| -> f64 {
        (0..w.horizon.hours)
            .map(|h| (u.cost[h][u.site] - u.cost[h][t]).max(0.0))
            .sum()
    };
    let best = u
        .allowed
        .iter()
        .copied()
        .filter(|s| *s != u.site)
        .max_by(|a, b| saves(*a).total_cmp(&saves(*b)).then(b.cmp(a)))?;
    let gain = saves(best);
    if gain <= w.fleet.policy.move_cost {
        return None;
    }
    let to = w.fleet.sites[best].name.clone();
    let (reason, why) = why_not(w, u, books, best, gain);
    Some(LeftOut {
        unit: u.name.clone(),
        vms: vms(w, u),
        to: to.clone(),
        hour: 0,
        reason: reason.into(),
        gain_user_ms_h: gain,
        why: format!("{} stays rather than go to {to}: {why}", u.name),
    })
}

/// The first rule that keeps `u` from `t`, else the cost that outweighs `gain`.
fn why_not(w: &World, u: &Unit, books: &Ledger, t: usize, gain: f64) -> (&'static str, String) {
    let home = &w.fleet.sites[u.site].name;
    let Some((l, dir)) = w.link_dir(u.site, t) else {
        return (
            "no_link",
            format!("no link joins {home} and {}", w.fleet.sites[t].name),
        );
    };
    // The hours it would rather be there.
    let wanted: Vec<usize> = (1..w.horizon.hours)
        .filter(|h| u.cost[*h][t] < u.cost[*h][u.site])
        .collect();
    if let Some(e) = wanted.iter().find_map(|h| books.fits(t, *h, u.size).err()) {
        return misfit_words(w, &Misfit::Capacity(e));
    }
    let free: f64 = (0..w.horizon.hours)
        .map(|h| books.link_free(l, dir, h))
        .sum();
    let seed = crate::place::seed_size(w, u);
    let peak = (0..w.horizon.hours)
        .map(|h| books.link_free(l, dir, h))
        .fold(0.0, f64::max);
    match predict_move(w, u, l, peak / HOUR_S, 0.0) {
        Err(r) => return budget_or_downtime(w, u, l, r),
        Ok(p) if p.duration_s > HOUR_S || seed + p.wan_bytes > free => {
            let short = (seed + p.wan_bytes - free).max(0.0);
            let what = if p.duration_s > HOUR_S {
                "move (longer than an hour)"
            } else {
                "seed"
            };
            return misfit_words(
                w,
                &Misfit::Budget {
                    link: l,
                    short_bytes: short,
                    what,
                },
            );
        }
        Ok(_) => {}
    }
    let limit = u.max_moves_per_day;
    let cost = crate::route::move_price(w, u, 0, seed, 0.0);
    let words = format!(
        "being there for the {} hours its users are closer would save at most {gain:.0} user-ms·h; moving costs about {cost:.0} (fixed {:.0}, plus {:.0} per GB, {:.0} more per GB sent in business hours) and at most {limit} moves a day are allowed: no route paid",
        wanted.len(),
        w.fleet.policy.move_cost,
        w.fleet.policy.cost_per_gb,
        w.fleet.policy.business_cost_per_gb
    );
    ("not_worth", words)
}

/// What the ideal route's move gains until the ideal route leaves `t`.
fn ideal_gain(u: &Unit, ideal: &Route, h: usize, s: usize, t: usize) -> f64 {
    (h..ideal.sites.len())
        .take_while(|x| ideal.sites[*x] == t)
        .map(|x| u.cost[x][s] - u.cost[x][t])
        .sum()
}

/// Why the ideal route's move `s → t` arriving at `h` could not be made on `books`.
fn probe(
    w: &World,
    u: &Unit,
    books: &Ledger,
    ideal: &Route,
    (h, s, t): (usize, usize, usize),
) -> (&'static str, String) {
    let Some((l, dir)) = w.link_dir(s, t) else {
        return ("no_link", "no link joins the two sites".into());
    };
    let stay: Vec<usize> = (h - 1..ideal.sites.len())
        .take_while(|x| *x == h - 1 || ideal.sites[*x] == t)
        .collect();
    if let Some(e) = stay.iter().find_map(|x| books.fits(t, *x, u.size).err()) {
        return misfit_words(w, &Misfit::Capacity(e));
    }
    let free = books.link_free(l, dir, h - 1);
    match predict_move(w, u, l, free / HOUR_S, 0.0) {
        Err(r) => return budget_or_downtime(w, u, l, r),
        Ok(p) if p.duration_s > HOUR_S || p.wan_bytes > free => {
            let short = (p.wan_bytes - free).max(0.0);
            return misfit_words(
                w,
                &Misfit::Budget {
                    link: l,
                    short_bytes: short,
                    what: "move",
                },
            );
        }
        Ok(_) => {}
    }
    let before: f64 = (0..h).map(|x| books.link_free(l, dir, x)).sum();
    let seed = crate::place::seed_size(w, u);
    if t != u.site && seed > before {
        let short = seed - before;
        return misfit_words(
            w,
            &Misfit::Budget {
                link: l,
                short_bytes: short,
                what: "seed",
            },
        );
    }
    (
        "move_limit",
        format!(
            "the moves other units made first left this one no route with at most {} moves a day that paid",
            u.max_moves_per_day
        ),
    )
}

/// A move refused at the budget's bandwidth: the budget's fault when the whole link would
/// carry it, the downtime cap's otherwise.
fn budget_or_downtime(w: &World, u: &Unit, l: usize, r: Refusal) -> (&'static str, String) {
    if predict_move(w, u, l, w.bandwidth[l], 0.0).is_ok() {
        let link = &w.fleet.links[l];
        return (
            "budget",
            format!(
                "the budget of link {}–{} leaves too little bandwidth for the move to keep within its downtime cap (the whole link would)",
                link.a, link.b
            ),
        );
    }
    ("downtime", refusal_words(&r, u))
}

fn refusal_words(r: &Refusal, u: &Unit) -> String {
    match r {
        Refusal::Downtime { vm, predicted_ms } if predicted_ms.is_finite() => format!(
            "VM {vm} would be down {predicted_ms:.0} ms at the least in the modes it allows ({}), over its cap of {:.0} ms",
            u.modes.join(", "),
            u.max_downtime_ms
        ),
        Refusal::Downtime { vm, .. } => format!(
            "VM {vm} dirties its memory faster than the link carries it: pre-copy never converges, and the modes it allows ({}) have no other way",
            u.modes.join(", ")
        ),
    }
}

fn misfit_words(w: &World, m: &Misfit) -> (&'static str, String) {
    match m {
        Misfit::Capacity(s) => (
            "capacity",
            format!(
                "{} lacks {} in hour {} ({} needed, {} free)",
                w.fleet.sites[s.site].name, s.resource, s.hour, s.need, s.free
            ),
        ),
        Misfit::Budget {
            link,
            short_bytes,
            what,
        } => {
            let l = &w.fleet.links[*link];
            (
                "budget",
                if *short_bytes > 0.0 {
                    format!(
                        "the budget of link {}–{} cannot carry the {what} in time ({} short)",
                        l.a,
                        l.b,
                        gb(*short_bytes)
                    )
                } else {
                    format!(
                        "the budget of link {}–{} leaves too little bandwidth in that hour for the {what}",
                        l.a, l.b
                    )
                },
            )
        }
        Misfit::Downtime(Refusal::Downtime { vm, predicted_ms }) => (
            "downtime",
            if predicted_ms.is_finite() {
                format!("VM {vm} would be down {predicted_ms:.0} ms at the least, over its cap")
            } else {
                format!("VM {vm}'s pre-copy would not converge at the bandwidth left in that hour")
            },
        ),
        Misfit::NoLink => ("no_link", "no link joins the two sites".into()),
    }
}
