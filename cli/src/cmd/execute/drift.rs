//! When what the agents measured departs from what the plan assumed far enough to plan again,
//! and how the fleet is corrected before it is. Pure: the executor feeds it the migrations'
//! records.

use planner::Fleet;

/// A measured figure this far from the plan's (as a ratio either way) calls for a new plan.
pub const DRIFT: f64 = 1.5;
/// A move that took this much longer than predicted calls for a new plan (the link or the VM
/// is not what the fleet says).
pub const SLOW: f64 = 2.0;

/// Why a plan is made again.
#[derive(Debug, Clone, PartialEq)]
pub enum Replan {
    /// A move failed or was refused: the VM stays where it is, and that destination is no
    /// longer tried for it in this run.
    Failed {
        vm: String,
        to: String,
        error: String,
    },
    /// A move ended after its deadline.
    Late { vm: String, late_s: f64 },
    /// The VM's dirty rate, as the migration measured it, is not the fleet's.
    DirtyRate {
        vm: String,
        declared: f64,
        measured: f64,
    },
    /// The move took much longer than predicted.
    Slow {
        vm: String,
        predicted_s: f64,
        took_s: f64,
    },
}

impl std::fmt::Display for Replan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replan::Failed { vm, to, error } => {
                write!(f, "the move of {vm} to {to} failed ({error}); {vm} stays where it is and {to} is not tried for it again")
            }
            Replan::Late { vm, late_s } => {
                write!(
                    f,
                    "the move of {vm} ended {late_s:.0} s (plan time) after its deadline"
                )
            }
            Replan::DirtyRate {
                vm,
                declared,
                measured,
            } => write!(
                f,
                "{vm} dirties {measured:.1} MiB/s as measured, the fleet said {declared:.1}"
            ),
            Replan::Slow {
                vm,
                predicted_s,
                took_s,
            } => write!(
                f,
                "the move of {vm} took {took_s:.0} s, {predicted_s:.0} s were predicted"
            ),
        }
    }
}

impl Replan {
    /// The VM it concerns.
    pub fn vm(&self) -> &str {
        match self {
            Replan::Failed { vm, .. }
            | Replan::Late { vm, .. }
            | Replan::DirtyRate { vm, .. }
            | Replan::Slow { vm, .. } => vm,
        }
    }
}

/// How an ended migration went, in plan time.
#[derive(Debug, Clone, PartialEq)]
pub struct Ended {
    /// The VM.
    pub vm: String,
    /// The destination site.
    pub to: String,
    /// `completed`, `failed` or `cancelled`.
    pub phase: String,
    /// The agent's error, if it failed.
    pub error: Option<String>,
    /// Seconds from its creation to its end (wall time: a move's duration is real whatever
    /// the clock's scale).
    pub took_s: f64,
    /// Plan seconds past its deadline (negative: early).
    pub late_s: f64,
    /// The dirty rate it measured at `checking`, MiB/s.
    pub dirty_mib_s: Option<f64>,
}

/// What calls for a new plan after `e` (the fleet as it stands, the step's prediction), most
/// important first.
pub fn assess(e: &Ended, fleet: &Fleet, predicted_s: f64) -> Vec<Replan> {
    let vm = e.vm.clone();
    if e.phase != "completed" {
        let error = e.error.clone().unwrap_or_else(|| e.phase.clone());
        return vec![Replan::Failed {
            vm,
            to: e.to.clone(),
            error,
        }];
    }
    let mut why = Vec::new();
    if e.late_s > 0.0 {
        why.push(Replan::Late {
            vm: vm.clone(),
            late_s: e.late_s,
        });
    }
    if predicted_s > 0.0 && e.took_s > SLOW * predicted_s {
        why.push(Replan::Slow {
            vm: vm.clone(),
            predicted_s,
            took_s: e.took_s,
        });
    }
    let declared = fleet
        .vms
        .iter()
        .find(|v| v.name == e.vm)
        .map(|v| v.dirty_rate_mib_s);
    if let (Some(declared), Some(measured)) = (declared, e.dirty_mib_s) {
        // Rates below 1 MiB/s cost a move almost nothing either way: not worth a plan.
        let (hi, lo) = (declared.max(measured), declared.min(measured).max(1.0));
        if hi >= 1.0 && hi / lo >= DRIFT {
            why.push(Replan::DirtyRate {
                vm,
                declared,
                measured,
            });
        }
    }
    why
}

/// The fleet corrected by `r` before planning again.
pub fn correct(fleet: &mut Fleet, r: &Replan) {
    let Some(v) = fleet.vms.iter_mut().find(|v| v.name == r.vm()) else {
        return;
    };
    match r {
        Replan::Failed { to, .. } => {
            let sites: Vec<String> = match &v.allowed_sites {
                Some(a) => a.clone(),
                None => fleet.sites.iter().map(|s| s.name.clone()).collect(),
            };
            v.allowed_sites = Some(sites.into_iter().filter(|s| s != to).collect());
        }
        Replan::DirtyRate { measured, .. } => v.dirty_rate_mib_s = *measured,
        Replan::Late { .. } | Replan::Slow { .. } => {}
    }
}

/// The fleet after `vm` arrived at `to` from `from`: it runs there, and `from` keeps a copy
/// of its disks as they were (age 0 hours, growing as the plan goes on).
pub fn moved(fleet: &mut Fleet, vm: &str, from: &str, to: &str) {
    if let Some(v) = fleet.vms.iter_mut().find(|v| v.name == vm) {
        v.site = to.to_string();
        v.replicas.remove(to);
        v.replicas.insert(from.to_string(), 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(phase: &str, took_s: f64, late_s: f64, dirty: Option<f64>) -> Ended {
        Ended {
            vm: "app".into(),
            to: "west".into(),
            phase: phase.into(),
            error: (phase != "completed").then(|| "no QEMU there".into()),
            took_s,
            late_s,
            dirty_mib_s: dirty,
        }
    }

    fn fleet() -> Fleet {
        Fleet::parse(super::super::steps::TEST_FLEET).unwrap()
    }

    #[test]
    fn a_move_as_predicted_calls_for_nothing() {
        assert!(assess(&ended("completed", 100.0, -30.0, Some(1.3)), &fleet(), 80.0).is_empty());
    }

    #[test]
    fn a_failed_move_excludes_its_destination_from_the_next_plan() {
        let mut f = fleet();
        let why = assess(&ended("failed", 10.0, 0.0, None), &f, 80.0);
        assert!(matches!(&why[..], [Replan::Failed { to, .. }] if to == "west"));
        correct(&mut f, &why[0]);
        assert_eq!(f.vms[0].allowed_sites, Some(vec!["east".to_string()]));
        assert!(why[0].to_string().contains("no QEMU there"));
    }

    #[test]
    fn late_slow_and_a_drifting_dirty_rate_are_each_reasons() {
        let mut f = fleet();
        let why = assess(&ended("completed", 500.0, 20.0, Some(12.0)), &f, 80.0);
        assert!(matches!(why[0], Replan::Late { .. }));
        assert!(matches!(why[1], Replan::Slow { .. }));
        assert!(matches!(why[2], Replan::DirtyRate { measured, .. } if measured == 12.0));
        correct(&mut f, &why[2]);
        assert_eq!(f.vms[0].dirty_rate_mib_s, 12.0);
    }

    #[test]
    fn an_arrival_moves_the_vm_and_leaves_a_fresh_copy_behind() {
        let mut f = fleet();
        moved(&mut f, "app", "east", "west");
        assert_eq!(f.vms[0].site, "west");
        assert_eq!(f.vms[0].replicas.get("east"), Some(&0.0));
    }
}
