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

/// Use per site and hour, and bytes per link direction and hour. The planner copies the books
/// for every route it tries: what changes lives in two flat vectors, what does not is shared.
#[derive(Debug, Clone)]
pub struct Ledger {
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
        let u = &mut self.used[site * self.hours + hour];
        if sign >= 0 {
            u.vcpus += size.vcpus;
            u.memory_mib += size.memory_mib;
            u.disk_gib += size.disk_gib;
        } else {
            u.vcpus = u.vcpus.saturating_sub(size.vcpus);
            u.memory_mib = u.memory_mib.saturating_sub(size.memory_mib);
            u.disk_gib = u.disk_gib.saturating_sub(size.disk_gib);
        }
    }

    /// Bytes still free on link `l` in direction `dir` in `hour`.
    pub fn link_free(&self, l: usize, dir: usize, hour: usize) -> f64 {
        (self.link_cap(l, hour) - self.link_used(l, dir, hour)).max(0.0)
    }

    /// Books `bytes` on link `l`, direction `dir`, in `hour`.
    pub fn book(&mut self, l: usize, dir: usize, hour: usize, bytes: f64) {
        self.link_used[(l * 2 + dir) * self.hours + hour] += bytes;
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
