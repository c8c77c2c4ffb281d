//! What an execution did: each step as it starts and ends (a line each on standard error, as
//! it happens), each new plan with its reasons, and at the end the whole on standard output,
//! as lines or as one line of JSON.

use super::drift::Replan;
use super::steps::{Kind, Step};
use jiff::Timestamp;
use serde::Serialize;

/// One ended step.
#[derive(Debug, Clone, Serialize)]
pub struct Done {
    /// `seed` or `migration`.
    pub what: &'static str,
    /// The VM.
    pub vm: String,
    /// From site.
    pub from: String,
    /// To site.
    pub to: String,
    /// The agent's id of the job or migration.
    pub id: String,
    /// Its last phase (`done`/`completed`, `failed`, `cancelled`).
    pub phase: String,
    /// The agent's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds from creation to end (wall time).
    pub took_s: f64,
    /// Plan seconds past its deadline (negative: early).
    pub late_s: f64,
    /// Predicted duration (migrations), seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_s: Option<f64>,
    /// Downtime QEMU reported (migrations), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Predicted downtime (migrations), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_downtime_ms: Option<f64>,
}

impl Done {
    /// The record of step `s` (agent id `id`) from its final state `v` at the agent.
    pub fn of(
        s: &Step,
        id: &str,
        phase: &str,
        error: Option<String>,
        took_s: f64,
        late_s: f64,
        v: &serde_json::Value,
    ) -> Done {
        let (predicted_s, predicted_downtime_ms) = match s.kind {
            Kind::Migrate {
                predicted_s,
                predicted_downtime_ms,
                ..
            } => (Some(predicted_s), Some(predicted_downtime_ms)),
            Kind::Seed { .. } => (None, None),
        };
        Done {
            what: s.what(),
            vm: s.vm.clone(),
            from: s.from.clone(),
            to: s.to.clone(),
            id: id.to_string(),
            phase: phase.to_string(),
            error,
            took_s,
            late_s,
            predicted_s,
            downtime_ms: v["figures"]["downtime_ms"].as_f64(),
            predicted_downtime_ms,
        }
    }

    fn ok(&self) -> bool {
        matches!(self.phase.as_str(), "done" | "completed")
    }
}

/// A plan made during the execution.
#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    /// Plan time it was made.
    pub at: String,
    /// Why (empty for the first).
    pub reasons: Vec<String>,
    /// Steps waiting before, after.
    pub pending_before: usize,
    /// Steps waiting now.
    pub pending_after: usize,
}

/// The whole execution.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Plans, the first and each new one.
    pub plans: Vec<Planned>,
    /// Ended steps, in the order they ended.
    pub steps: Vec<Done>,
    /// Steps an agent refused to create.
    pub refused: Vec<String>,
    /// Anything else worth saying.
    pub notes: Vec<String>,
}

impl Report {
    /// The first plan.
    pub fn planned(&mut self, at: Timestamp, moves: usize, violations: &[String]) {
        eprintln!("{at}: planned {moves} moves");
        for v in violations {
            self.note(format!("the plan breaks a rule (a planner bug): {v}"));
        }
        self.plans.push(Planned {
            at: at.to_string(),
            reasons: Vec::new(),
            pending_before: 0,
            pending_after: 0,
        });
    }

    /// A new plan and why.
    pub fn replanned(&mut self, at: Timestamp, why: Vec<Replan>, before: usize, after: usize) {
        let reasons: Vec<String> = why.iter().map(ToString::to_string).collect();
        eprintln!(
            "{at}: planned again ({}): {after} steps ahead, were {before}",
            reasons.join("; ")
        );
        self.plans.push(Planned {
            at: at.to_string(),
            reasons,
            pending_before: before,
            pending_after: after,
        });
    }

    /// A step created at an agent.
    pub fn started(&self, s: &Step, site: &str, id: &str, at: Timestamp) {
        eprintln!(
            "{at}: {} {} {} -> {} started at {site} as {id}",
            s.what(),
            s.vm,
            s.from,
            s.to
        );
    }

    /// A step its agent would not create.
    pub fn refused(&mut self, s: &Step, at: Timestamp, why: &str) {
        let line = format!("{} of {} to {}: {why}", s.what(), s.vm, s.to);
        eprintln!("{at}: refused: {line}");
        self.refused.push(line);
    }

    /// A step ended.
    pub fn done(&mut self, d: Done) {
        let error = d
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        eprintln!(
            "{} {} {} -> {} {} after {:.1} s{error}",
            d.what, d.vm, d.from, d.to, d.phase, d.took_s
        );
        self.steps.push(d);
    }

    /// A remark for the report.
    pub fn note(&mut self, text: String) {
        eprintln!("note: {text}");
        self.notes.push(text);
    }

    /// Steps that did not end well.
    pub fn failed(&self) -> usize {
        self.steps.iter().filter(|d| !d.ok()).count() + self.refused.len()
    }

    /// The report at the end.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).unwrap_or_default());
            return;
        }
        let moves = self.steps.iter().filter(|d| d.what == "migration");
        let ok = moves.clone().filter(|d| d.ok()).count();
        println!(
            "\n{ok} of {} moves completed, {} new plans, {} steps refused",
            moves.clone().count(),
            self.plans.len().saturating_sub(1),
            self.refused.len()
        );
        for d in moves {
            println!(
                "- {} {} -> {}: {} in {:.1} s (predicted {:.1} s), downtime {} ms (predicted {:.0} ms)",
                d.vm,
                d.from,
                d.to,
                d.phase,
                d.took_s,
                d.predicted_s.unwrap_or(0.0),
                d.downtime_ms.map_or("?".into(), |v| format!("{v:.0}")),
                d.predicted_downtime_ms.unwrap_or(0.0)
            );
        }
    }
}
