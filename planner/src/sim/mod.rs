//! The simulator: a fleet replayed hour by hour, minute by minute on its links, under one
//! strategy. Transfers share link bandwidth; a move takes the model's time and bytes, with
//! noise from a seed and memory dirtied faster when the VM's users are busier; a move's stream
//! waits for its seed, and a VM runs at the destination only once its stream is done. What
//! happened is booked as it happened, and every hard rule is checked on that record.
//!
//! Strategies on the same fleet and run: `planner` (the planner, re-planned at the start of
//! every day from where the VMs are), `static` (never move), `naive` (at the start of the
//! working day of a VM's largest active region, move it to that region's best site, copying
//! disk and memory then, as copy-storage-all does), `oracle` (every hour at the best allowed
//! site, moved instantly and free: a lower bound on latency).

mod html;
mod links;
mod report;
mod run;

pub use html::html;
pub use report::{LinkUse, SimMove, SimReport, SiteUse};
pub use run::simulate;

/// How moves are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The planner, once a day.
    Planner,
    /// Never move.
    Static,
    /// Follow the largest region's working day, copying everything at move time.
    Naive,
    /// Best site every hour, instantly, for free.
    Oracle,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        match s {
            "planner" => Ok(Strategy::Planner),
            "static" => Ok(Strategy::Static),
            "naive" => Ok(Strategy::Naive),
            "oracle" => Ok(Strategy::Oracle),
            _ => Err(format!(
                "strategy {s:?}: use planner, static, naive or oracle"
            )),
        }
    }
}

impl Strategy {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Planner => "planner",
            Strategy::Static => "static",
            Strategy::Naive => "naive",
            Strategy::Oracle => "oracle",
        }
    }
}
