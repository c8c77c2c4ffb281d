//! The books the hard rules are kept in: what each site holds in each hour (vCPUs, memory,
//! disk) and what each link direction has carried in each hour against its budget. Units are
//! booked as the planner settles them; nothing is booked that does not fit.

use crate::fleet::Capacity;
use crate::world::{World, HOUR_S};

/// Which resource ran out.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    /// The site.
    pub site: usize,
    /// The plan hour.
    pub hour: usize,
    /// `vcpus`, `memory_mib` or `disk_gib`.
    pub resource: &'static str,
    /// What was needed.
    pub need: u64,
    /// What was free.
    pub free: u64,
}

/// One cell's change, kept so that a route that does not fit can be taken off the books (and
/// a unit's booking set aside to explain it against the books as they were) without copying
/// them: the planner tries thousands of routes, and the books of a large fleet are large.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// `used[i]` from, to.
    Used(usize, Capacity, Capacity),
    /// `link_used[i]` from, to.
    Link(usize, f64, f64),
}

/// A position in the books' journal.
#[derive(Debug, Clone, Copy)]
pub struct Mark(usize);

/// Changes made since a [`Mark`], to set aside and put back.
#[derive(Debug, Clone, Default)]
pub struct Changes(Vec<Change>);

/// Use per site and hour, and bytes per link direction and hour, with a journal of changes
/// since the last [`Ledger::forget`].
#[derive(Debug, Clone)]
pub struct Ledger {
    journal: Vec<Change>,
    hours: usize,
    cap: std::sync::Arc<Vec<Capacity>>,
    /// `used[site * hours + h]`.
    used: Vec<Capacity>,
    /// `link_used[(l * 2 + dir) * hours + h]`: bytes booked; dir 0 is a → b.
    link_used: Vec<f64>,
    /// `link_cap[l * hours + h]`: bytes the budget allows.
    link_cap: std::sync::Arc<Vec<f64>>,
}

impl Ledger {
    /// Empty books for `w`'s sites and links.
    pub fn new(w: &World) -> Ledger {
        let hours = w.horizon.hours;
        Ledger {
            journal: Vec::new(),
            hours,
            cap: std::sync::Arc::new(w.fleet.sites.iter().map(|s| s.capacity).collect()),
            used: vec![Capacity::default(); hours * w.fleet.sites.len()],
            link_used: vec![0.0; w.budget.len() * 2 * hours],
            link_cap: std::sync::Arc::new(
                w.budget
                    .iter()
                    .flat_map(|b| b.iter().map(|bps| bps * HOUR_S))
                    .collect(),
            ),
        }
    }

    /// Whether `size` more fits at `site` in `hour` (disk counted only when `disk`).
    pub fn fits(&self, site: usize, hour: usize, size: Capacity) -> Result<(), Shortfall> {
        let (c, u) = (self.cap[site], self.used[site * self.hours + hour]);
        for (resource, need, have, cap) in [
            ("vcpus", size.vcpus, u.vcpus, c.vcpus),
            ("memory_mib", size.memory_mib, u.memory_mib, c.memory_mib),
            ("disk_gib", size.disk_gib, u.disk_gib, c.disk_gib),
        ] {
            if need > 0 && have + need > cap {
                return Err(Shortfall {
                    site,
                    hour,
                    resource,
                    need,
                    free: cap.saturating_sub(have),
                });
            }
        }
        Ok(())
    }

    /// Books `size` at `site` in `hour` (`sign` -1 releases it).
    pub fn occupy(&mut self, site: usize, hour: usize, size: Capacity, sign: i8) {
        let i = site * self.hours + hour;
        let before = self.used[i];
        let u = &mut self.used[i];
        if sign >= 0 {
            u.vcpus += size.vcpus;
            u.memory_mib += size.memory_mib;
            u.disk_gib += size.disk_gib;
        } else {
            u.vcpus = u.vcpus.saturating_sub(size.vcpus);
            u.memory_mib = u.memory_mib.saturating_sub(size.memory_mib);
            u.disk_gib = u.disk_gib.saturating_sub(size.disk_gib);
        }
        let after = *u;
        self.journal.push(Change::Used(i, before, after));
    }

    /// The journal's current position.
    pub fn mark(&self) -> Mark {
        Mark(self.journal.len())
    }

    /// Takes back every change since `m`.
    pub fn rollback(&mut self, m: Mark) {
        let changes = self.take_since(m);
        self.undo(&changes);
    }

    /// The changes since `m`, out of the journal (still on the books).
    pub fn take_since(&mut self, m: Mark) -> Changes {
        Changes(self.journal.split_off(m.0.min(self.journal.len())))
    }

    /// Sets `c` aside: the books as they were before it.
    pub fn undo(&mut self, c: &Changes) {
        for x in c.0.iter().rev() {
            match *x {
                Change::Used(i, before, _) => self.used[i] = before,
                Change::Link(i, before, _) => self.link_used[i] = before,
            }
        }
    }

    /// Puts `c` back after [`Ledger::undo`].
    pub fn redo(&mut self, c: &Changes) {
        for x in &c.0 {
            match *x {
                Change::Used(i, _, after) => self.used[i] = after,
                Change::Link(i, _, after) => self.link_used[i] = after,
            }
        }
    }

    /// Empties the journal: what is booked stays booked.
    pub fn forget(&mut self) {
        self.journal.clear();
    }

    /// Bytes still free on link `l` in direction `dir` in `hour`.
    pub fn link_free(&self, l: usize, dir: usize, hour: usize) -> f64 {
        (self.link_cap(l, hour) - self.link_used(l, dir, hour)).max(0.0)
    }

    /// Books `bytes` on link `l`, direction `dir`, in `hour`.
    pub fn book(&mut self, l: usize, dir: usize, hour: usize, bytes: f64) {
        let i = (l * 2 + dir) * self.hours + hour;
        let before = self.link_used[i];
        self.link_used[i] += bytes;
        self.journal
            .push(Change::Link(i, before, self.link_used[i]));
    }

    /// Bytes booked on link `l`, direction `dir`, in `hour`.
    pub fn link_used(&self, l: usize, dir: usize, hour: usize) -> f64 {
        self.link_used[(l * 2 + dir) * self.hours + hour]
    }

    /// Bytes link `l` may carry in `hour` (each direction).
    pub fn link_cap(&self, l: usize, hour: usize) -> f64 {
        self.link_cap[l * self.hours + hour]
    }

    /// Use at `site` in `hour`.
    pub fn used(&self, site: usize, hour: usize) -> Capacity {
        self.used[site * self.hours + hour]
    }

    /// Capacity of `site`.
    pub fn cap(&self, site: usize) -> Capacity {
        self.cap[site]
    }
}
