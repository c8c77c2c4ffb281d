//! What a simulation reports: latency per hour, each link's use against its budget, each
//! site's peak use against its capacity, the moves as they happened, business-hours bytes and
//! every rule broken.

use crate::fleet::Capacity;
use serde::Serialize;

/// One strategy's run.
#[derive(Debug, Clone, Serialize)]
pub struct SimReport {
    /// `planner`, `static`, `naive` or `oracle`.
    pub strategy: String,
    /// The first hour (RFC 3339).
    pub from: String,
    /// Days simulated.
    pub days: usize,
    /// User-weighted average latency per hour, ms.
    pub latency_ms: Vec<f64>,
    /// Users' latency over the run, user-ms·h.
    pub user_ms_h: f64,
    /// Moves as they happened.
    pub moves: Vec<SimMove>,
    /// Link use per hour.
    pub links: Vec<LinkUse>,
    /// Site use.
    pub sites: Vec<SiteUse>,
    /// Bytes moved in business hours (either end of the link).
    pub business_hours_bytes: f64,
    /// Bytes moved outside them.
    pub off_hours_bytes: f64,
    /// Every rule broken, with by how much.
    pub violations: Vec<String>,
    /// Seconds the simulation took.
    pub elapsed_s: f64,
}

/// A move as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct SimMove {
    /// The unit.
    pub unit: String,
    /// Its VMs.
    pub vms: Vec<String>,
    /// From site.
    pub from: String,
    /// To site.
    pub to: String,
    /// Hour its transfers began (fractional: minutes).
    pub started_h: f64,
    /// Hour it ran at the destination (`None`: still moving at the end).
    pub arrived_h: Option<f64>,
    /// The hour the plan wanted it there, if planned.
    pub planned_h: Option<usize>,
    /// Downtime, ms.
    pub downtime_ms: f64,
    /// Wire bytes (seed and stream).
    pub wan_bytes: f64,
    /// Of which in business hours.
    pub business_hours_bytes: f64,
}

/// A link's use.
#[derive(Debug, Clone, Serialize)]
pub struct LinkUse {
    /// `a–b`.
    pub link: String,
    /// Budget per hour, bytes (each direction).
    pub budget_bytes: Vec<f64>,
    /// Bytes carried per hour, the busier direction.
    pub used_bytes: Vec<f64>,
    /// Bytes over the budget, summed over hours.
    pub over_budget_bytes: f64,
}

/// A site's use.
#[derive(Debug, Clone, Serialize)]
pub struct SiteUse {
    /// The site.
    pub site: String,
    /// Its capacity.
    pub capacity: Capacity,
    /// Peak use over the run.
    pub peak: Capacity,
    /// vCPUs used per hour.
    pub vcpus_used: Vec<u64>,
}
