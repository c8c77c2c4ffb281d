//! A route made concrete against the books: each move's seed laid into the link's free hours
//! (outside business hours first, as late as possible so the copy is fresh), its disk counted
//! at the destination from the seed's first hour, the move's own bytes in the hour before it
//! arrives. A route that does not fit says which move and why; one that fits is booked.

use crate::fleet::Capacity;
use crate::ledger::{Ledger, Shortfall};
use crate::predict::{predict_move, MovePrediction, Refusal};
use crate::route::Route;
use crate::world::{Unit, World, HOUR_S};

/// A move's bytes and time are booked with this margin: memory is dirtied faster when its
/// users are busy than the declared rate says, and a late move costs its users an hour.
pub const MOVE_HEADROOM: f64 = 1.3;

/// A seed laid out in hours.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedPlan {
    /// Wire bytes.
    pub bytes: f64,
    /// (hour, bytes) it uses, ascending.
    pub hours: Vec<(usize, f64)>,
}

/// One move of a placed route.
#[derive(Debug, Clone, PartialEq)]
pub struct MovePlan {
    /// The hour it arrives by (the migration runs in the hour before).
    pub hour: usize,
    /// From, to (sites).
    pub from: usize,
    /// To.
    pub to: usize,
    /// The link and its direction.
    pub link: usize,
    /// 0: a → b.
    pub dir: usize,
    /// The seed ahead of it (empty when nothing needs seeding).
    pub seed: SeedPlan,
    /// Disk written since the seed, shipped by the last rounds.
    pub delta_bytes: f64,
    /// The migration itself.
    pub predicted: MovePrediction,
}

/// Why a move of a route does not fit.
#[derive(Debug, Clone, PartialEq)]
pub enum Misfit {
    /// A site is full.
    Capacity(Shortfall),
    /// The link's budget cannot carry the seed or the move before it must arrive.
    Budget {
        /// The link.
        link: usize,
        /// Bytes that did not fit.
        short_bytes: f64,
        /// The seed's or the move's.
        what: &'static str,
    },
    /// No mode keeps the downtime within the cap.
    Downtime(Refusal),
    /// No link joins the two sites.
    NoLink,
}

/// Places `route` on the books: its moves, booked; or the first that does not fit, and the
/// books as they were.
pub fn place(
    w: &World,
    u: &Unit,
    route: &Route,
    led: &mut Ledger,
) -> Result<Vec<MovePlan>, (usize, usize, Misfit)> {
    let m = led.mark();
    let out = book_route(w, u, route, led);
    if out.is_err() {
        led.rollback(m);
    }
    out
}

fn book_route(
    w: &World,
    u: &Unit,
    route: &Route,
    led: &mut Ledger,
) -> Result<Vec<MovePlan>, (usize, usize, Misfit)> {
    let mut compute = u.size;
    compute.disk_gib = 0;
    let disk = Capacity {
        disk_gib: u.size.disk_gib,
        ..Capacity::default()
    };
    let hours = w.horizon.hours;
    // The hour each copy went stale (before the plan for the replicas it starts with).
    let mut copies = vec![None::<f64>; w.fleet.sites.len()];
    let mut holds = vec![false; w.fleet.sites.len()];
    holds[u.site] = true;
    for &(s, age) in &u.replicas {
        copies[s] = Some(-age);
        holds[s] = true;
    }
    for s in (0..holds.len()).filter(|s| holds[*s]) {
        for hh in 0..hours {
            led.fits(s, hh, disk)
                .map_err(|e| (hh, s, Misfit::Capacity(e)))?;
            led.occupy(s, hh, disk, 1);
        }
    }
    let mut moves = Vec::new();
    let mut since = 0;
    for (h, s, t) in route.moves() {
        let fail = |m: Misfit| (h, t, m);
        let mv = place_move(w, u, led, (h, s, t), since, copies[t]).map_err(fail)?;
        if !holds[t] {
            let first = mv.seed.hours.first().map_or(h - 1, |x| x.0);
            for hh in first..hours {
                led.fits(t, hh, disk)
                    .map_err(|e| fail(Misfit::Capacity(e)))?;
                led.occupy(t, hh, disk, 1);
            }
            holds[t] = true;
        }
        led.fits(t, h - 1, compute)
            .map_err(|e| fail(Misfit::Capacity(e)))?;
        led.occupy(t, h - 1, compute, 1);
        if !w.fleet.policy.keep_replicas {
            for hh in h..hours {
                led.occupy(s, hh, disk, -1);
            }
            holds[s] = false;
        }
        copies[s] = Some(h as f64);
        since = h;
        moves.push(mv);
    }
    for (h, &s) in route.sites.iter().enumerate() {
        led.fits(s, h, compute)
            .map_err(|e| (h, s, Misfit::Capacity(e)))?;
        led.occupy(s, h, compute, 1);
    }
    Ok(moves)
}

/// Seed and move of the arrival at `t` from `s` by hour `h`; books their bytes on `led`.
/// `since`: the first hour the seed may use; `stale_since`: when the unit left `t` (its copy
/// there is that old), if it was there before.
fn place_move(
    w: &World,
    u: &Unit,
    led: &mut Ledger,
    (h, s, t): (usize, usize, usize),
    since: usize,
    stale_since: Option<f64>,
) -> Result<MovePlan, Misfit> {
    let (l, dir) = w.link_dir(s, t).ok_or(Misfit::NoLink)?;
    let write_rate = disk_write_rate(w, u);
    let wire = w.fleet.policy.disk_wire_ratio;
    let need = seed_need(w, u, stale_since, h);
    // The seed ends before the migration starts (the job then ships the disk's last delta,
    // not a seed still running): it uses the hours up to the one before the move's, which
    // keeps the move's hour for the move.
    let last = h.checked_sub(2).filter(|e| *e >= since);
    let seed = lay_seed(w, led, l, dir, since, last, need)?;
    // Hours of writes the migration ships: since the seed's last hour (which is at most
    // h - 2), or its own hour when nothing was seeded.
    let written_h = seed.hours.last().map_or(1, |x| h - 1 - x.0);
    let delta = (write_rate * written_h as f64 * HOUR_S * wire).min(disk_bytes(u));
    let free = led.link_free(l, dir, h - 1);
    let p = predict_move(w, u, l, free / HOUR_S, delta).map_err(|r| {
        // The budget's fault when the whole link would have carried it.
        if predict_move(w, u, l, w.bandwidth[l], delta).is_ok() {
            Misfit::Budget {
                link: l,
                short_bytes: 0.0,
                what: "move within its downtime cap",
            }
        } else {
            Misfit::Downtime(r)
        }
    })?;
    let booked = p.wan_bytes * MOVE_HEADROOM;
    if p.duration_s * MOVE_HEADROOM > HOUR_S || booked > free {
        return Err(Misfit::Budget {
            link: l,
            short_bytes: (booked - free).max(0.0),
            what: "move",
        });
    }
    led.book(l, dir, h - 1, booked);
    Ok(MovePlan {
        hour: h,
        from: s,
        to: t,
        link: l,
        dir,
        seed,
        delta_bytes: delta,
        predicted: p,
    })
}

/// Wire bytes to seed `u`'s disks at a site for an arrival at hour `h`: the whole disks, or,
/// over a kept copy that stopped following the unit at hour `stale_since` (negative for a
/// replica older than the plan), only what was written since.
pub fn seed_need(w: &World, u: &Unit, stale_since: Option<f64>, h: usize) -> f64 {
    let full = seed_size(w, u);
    match stale_since.filter(|_| w.fleet.policy.keep_replicas) {
        Some(left) => {
            let written = disk_write_rate(w, u) * (h as f64 - left) * HOUR_S;
            (written * w.fleet.policy.disk_wire_ratio).min(full)
        }
        None => full,
    }
}

/// Bytes of the unit's disks.
pub fn disk_bytes(u: &Unit) -> f64 {
    u.size.disk_gib as f64 * (1u64 << 30) as f64
}

/// Wire bytes of seeding the unit's disks whole.
pub fn seed_size(w: &World, u: &Unit) -> f64 {
    disk_bytes(u) * w.fleet.policy.disk_wire_ratio
}

/// Disk bytes/s the unit's VMs write.
pub fn disk_write_rate(w: &World, u: &Unit) -> f64 {
    u.members
        .iter()
        .map(|m| w.fleet.vms[*m].disk_write_mib_s * 1048576.0)
        .sum()
}

/// Lays `need` bytes into hours `[from, until]` of link `l` (`None`: no hour at all):
/// hours outside business hours first, latest first within each kind (the copy is then fresh
/// when the move comes).
fn lay_seed(
    w: &World,
    led: &mut Ledger,
    l: usize,
    dir: usize,
    from: usize,
    until: Option<usize>,
    need: f64,
) -> Result<SeedPlan, Misfit> {
    let mut order: Vec<usize> = until.map_or(Vec::new(), |u| (from..=u).collect());
    order.sort_by_key(|h| (w.business[l][*h], std::cmp::Reverse(*h)));
    let mut left = need;
    let mut hours = Vec::new();
    for h in order {
        if left <= 0.0 {
            break;
        }
        let take = led.link_free(l, dir, h).min(left);
        if take > 0.0 {
            hours.push((h, take));
            left -= take;
        }
    }
    if left > 0.5 {
        return Err(Misfit::Budget {
            link: l,
            short_bytes: left,
            what: "seed",
        });
    }
    for (h, b) in &hours {
        led.book(l, dir, *h, *b);
    }
    hours.sort_by_key(|x| x.0);
    Ok(SeedPlan { bytes: need, hours })
}
