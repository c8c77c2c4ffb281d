//! The follow-the-sun planner. It owns the fleet description (sites, links with budget
//! windows, user regions and their day, VMs with their rules), the plan (where each VM runs
//! hour by hour, each move's seed and migration with their windows and predictions), the
//! hard rules a plan keeps (capacity at every moment, link budgets, residency, groups,
//! downtime caps, move limits) and the explanation of every move made or left out.
//! Predictions come from `memory::model` (pre-copy rounds, post-copy, warm) and the disk's
//! size and write rate. It runs no job itself: `helio plan --execute` turns a plan into agent
//! API calls.

pub mod clock;
pub mod explain;
pub mod fleet;
pub mod ledger;
pub mod place;
pub mod plan;
pub mod predict;
pub mod route;
pub mod sim;
pub mod world;

pub use fleet::Fleet;
pub use plan::{plan, Plan};

/// What can go wrong before a plan exists.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    /// The fleet file is malformed or refers to what it does not declare.
    #[error("fleet: {0}")]
    Fleet(String),
    /// The fleet as it stands breaks a hard rule no plan can repair.
    #[error("no plan satisfies the fleet: {0}")]
    Unsatisfiable(String),
}

/// Bytes per second of a rate such as `200Mbit` or `20MiB/s`.
pub fn rate(text: &str) -> Result<u64, String> {
    text.parse::<wan::Rate>()
        .map(|r| r.bytes_per_sec())
        .map_err(|e| format!("{text:?}: {e}"))
}
