//! What a plan asks of the agents: one seed job per disk ahead of a move (at the destination,
//! pulling from the source) and one migration per VM (at the source), each with its window in
//! plan time. Pure: the calls are made elsewhere.

use jiff::Timestamp;
use planner::explain::PlannedMove;

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A seed job at the destination's agent: disk `disk` pulled from the source's agent,
    /// capped at `bandwidth_bps` (bits/s) to stay within the link's budget.
    Seed { disk: String, bandwidth_bps: f64 },
    /// A migration at the source's agent.
    Migrate {
        /// `live`, `warm` or `postcopy`.
        mode: String,
        /// The downtime cap, ms.
        max_downtime_ms: u64,
        /// Predicted time to running at the destination, s.
        predicted_s: f64,
        /// Predicted downtime, ms.
        predicted_downtime_ms: f64,
        /// The cap that keeps it within the link's budget, bits/s.
        bandwidth_bps: f64,
    },
}

/// One API call of the plan and its window.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The VM it serves.
    pub vm: String,
    /// From site.
    pub from: String,
    /// To site.
    pub to: String,
    /// Start no earlier than (plan time).
    pub not_before: Timestamp,
    /// Be done by (plan time).
    pub deadline: Timestamp,
    /// What it does.
    pub kind: Kind,
}

impl Step {
    /// `seed` or `migration`.
    pub fn what(&self) -> &'static str {
        match self.kind {
            Kind::Seed { .. } => "seed",
            Kind::Migrate { .. } => "migration",
        }
    }
}

fn ts(text: &str, what: &str) -> Result<Timestamp, String> {
    text.parse()
        .map_err(|e| format!("the plan's {what} {text:?} is not a time: {e}"))
}

/// The steps of `moves`, given each VM's disks (`disks(vm)`): for every VM of a move, a seed
/// per disk when the move has one, then its migration. Sorted by start, seeds first.
pub fn steps(
    moves: &[PlannedMove],
    disks: impl Fn(&str) -> Vec<String>,
) -> Result<Vec<Step>, String> {
    let mut out = Vec::new();
    for m in moves {
        let mig = &m.migration;
        for vm in &m.vms {
            let step = |not_before: &str, deadline: &str, kind: Kind| -> Result<Step, String> {
                Ok(Step {
                    vm: vm.clone(),
                    from: m.from.clone(),
                    to: m.to.clone(),
                    not_before: ts(not_before, "not_before")?,
                    deadline: ts(deadline, "deadline")?,
                    kind,
                })
            };
            if let Some(s) = &m.seed {
                for disk in disks(vm) {
                    let kind = Kind::Seed {
                        disk,
                        bandwidth_bps: s.bandwidth_bps,
                    };
                    out.push(step(&s.not_before, &s.deadline, kind)?);
                }
            }
            let kind = Kind::Migrate {
                mode: mig.mode.clone(),
                max_downtime_ms: mig.max_downtime_ms.round() as u64,
                predicted_s: mig.predicted_duration_s,
                predicted_downtime_ms: mig.predicted_downtime_ms,
                bandwidth_bps: mig.bandwidth_bps,
            };
            out.push(step(&mig.not_before, &mig.deadline, kind)?);
        }
    }
    out.sort_by(|a, b| {
        let seed_first = |s: &Step| matches!(s.kind, Kind::Migrate { .. });
        (a.not_before, seed_first(a)).cmp(&(b.not_before, seed_first(b)))
    });
    Ok(out)
}

/// Plan time mapped to wall time: `scale` plan seconds pass in one wall second from `start`
/// (plan time `from`), so that a day can be tried in minutes.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The plan's first instant.
    pub from: Timestamp,
    /// The wall time it maps to.
    pub start: Timestamp,
    /// Plan seconds per wall second (> 0).
    pub scale: f64,
}

impl Clock {
    /// Plan time at wall time `wall`.
    pub fn plan_at(&self, wall: Timestamp) -> Timestamp {
        shift(self.from, seconds(wall, self.start) * self.scale)
    }

    /// Wall time of plan time `plan`.
    pub fn wall_of(&self, plan: Timestamp) -> Timestamp {
        shift(self.start, seconds(plan, self.from) / self.scale)
    }
}

/// `t` moved by `seconds` (`t` itself if that leaves jiff's range, which no plan of at most
/// `MAX_HOURS` from a valid time does).
pub fn shift(t: Timestamp, seconds: f64) -> Timestamp {
    jiff::SignedDuration::try_from_secs_f64(seconds)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(t)
}

/// Seconds from `earlier` to `later` (negative when `later` is earlier).
pub fn seconds(later: Timestamp, earlier: Timestamp) -> f64 {
    later.duration_since(earlier).as_secs_f64()
}

/// Two sites 12 hours apart, one VM (dirtying 1 MiB/s) with users at both.
#[cfg(test)]
pub const TEST_FLEET: &str = r#"
[[sites]]
name = "east"
tz = "Asia/Tokyo"
capacity = { vcpus = 64, memory_mib = 65536, disk_gib = 1000 }
[[sites]]
name = "west"
tz = "America/Chicago"
capacity = { vcpus = 64, memory_mib = 65536, disk_gib = 1000 }
[[links]]
a = "east"
b = "west"
bandwidth = "1Gbit"
rtt_ms = 150
[[regions]]
name = "tokyo"
tz = "Asia/Tokyo"
rtt_ms = { "east" = 5, "west" = 150 }
[[regions]]
name = "chicago"
tz = "America/Chicago"
rtt_ms = { "east" = 150, "west" = 5 }
[[vms]]
name = "app"
memory_mib = 1024
disk_gib = 10
vcpus = 2
site = "east"
dirty_rate_mib_s = 1
disk_write_mib_s = 0.1
users = { "tokyo" = 1000, "chicago" = 1000 }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(fleet: &str) -> planner::Plan {
        let f = planner::Fleet::parse(fleet).unwrap();
        planner::plan(&f, "2026-12-03T00:00:00Z".parse().unwrap(), 24).unwrap()
    }

    #[test]
    fn a_planned_move_becomes_seeds_per_disk_then_its_migration() {
        let p = plan(super::TEST_FLEET);
        assert!(!p.moves.is_empty(), "the test fleet must plan a move");
        let s = steps(&p.moves, |vm| {
            vec![format!("{vm}-root"), format!("{vm}-data")]
        })
        .unwrap();
        let m = &p.moves[0];
        let first: Vec<_> = s.iter().filter(|s| s.vm == m.vms[0]).take(3).collect();
        assert!(matches!(&first[0].kind, Kind::Seed { disk, .. } if disk.ends_with("-root")));
        assert!(matches!(&first[1].kind, Kind::Seed { disk, .. } if disk.ends_with("-data")));
        assert!(matches!(first[2].kind, Kind::Migrate { .. }));
        assert_eq!(first[2].to, m.to);
        assert!(first[0].not_before <= first[2].not_before);
        assert!(s.windows(2).all(|w| w[0].not_before <= w[1].not_before));
    }

    #[test]
    fn the_clock_maps_plan_hours_to_scaled_wall_seconds_and_back() {
        let c = Clock {
            from: "2026-12-03T00:00:00Z".parse().unwrap(),
            start: "2030-01-01T00:00:00Z".parse().unwrap(),
            scale: 360.0,
        };
        let wall = c.wall_of("2026-12-03T06:00:00Z".parse().unwrap());
        assert_eq!(wall.to_string(), "2030-01-01T00:01:00Z");
        assert_eq!(c.plan_at(wall).to_string(), "2026-12-03T06:00:00Z");
    }
}
