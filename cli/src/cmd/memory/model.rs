//! `helio memory model`: what the d/r model predicts, for a scheduler to plan with.

use crate::units::parse_size;
use memory::model::{ModelInput, Prediction};
use memory::page::PAGE_SIZE;
use std::time::Duration;
use wan::Rate;

/// Arguments of `helio memory model`.
#[derive(clap::Args)]
pub struct Args {
    /// Guest memory to move (its non-zero part, if known).
    #[arg(long)]
    memory: String,
    /// Page writes per second.
    #[arg(long)]
    dirty_rate: f64,
    /// Link bandwidth.
    #[arg(long)]
    bandwidth: Rate,
    /// Hot set (writable working set) size.
    #[arg(long, default_value = "0")]
    hot_set: String,
    /// Fraction of writes that go to the hot set.
    #[arg(long, default_value_t = 0.9)]
    hot_fraction: f64,
    /// Round-trip time (each round waits one for its acknowledgement).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    rtt: Duration,
    /// Page bytes per wire byte (compression); 1 for none.
    #[arg(long, default_value_t = 1.0)]
    compression: f64,
    /// Downtime target of the stop-and-copy.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    downtime_target: Duration,
    /// Model hot pages held back for the stop-and-copy.
    #[arg(long)]
    hold_hot: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    memory_bytes: u64,
    dirty_rate: f64,
    bandwidth: u64,
    first_round_ms: f64,
    #[serde(flatten)]
    prediction: &'a Prediction,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let memory = parse_size(&a.memory)?;
    let hot = parse_size(&a.hot_set)?;
    if a.bandwidth.bytes_per_sec() == 0 || a.dirty_rate < 0.0 || a.compression <= 0.0 {
        anyhow::bail!(
            "--bandwidth and --compression must be positive and --dirty-rate not negative"
        );
    }
    let input = ModelInput {
        memory_bytes: memory,
        total_pages: memory / PAGE_SIZE as u64,
        dirty_rate: a.dirty_rate,
        bandwidth: a.bandwidth.bytes_per_sec() as f64,
        compression: a.compression,
        hot_pages: hot / PAGE_SIZE as u64,
        hot_fraction: a.hot_fraction,
        rtt: a.rtt.as_secs_f64(),
        downtime_target: a.downtime_target.as_secs_f64(),
        hold_hot: a.hold_hot,
    };
    let p = input.predict();
    let out = Output {
        memory_bytes: memory,
        dirty_rate: a.dirty_rate,
        bandwidth: a.bandwidth.bytes_per_sec(),
        first_round_ms: p.rounds.first().map_or(0.0, |r| r.elapsed_ms),
        prediction: &p,
    };
    super::super::print(a.json, &out, |o| {
        println!(
            "d/r = {:.3}: {}",
            o.prediction.d_over_r,
            if o.prediction.converges {
                "pre-copy converges"
            } else {
                "pre-copy does not converge by itself"
            }
        );
        println!("round      pages   elapsed");
        for r in &o.prediction.rounds {
            println!("{:>5} {:>10} {:>9.1} ms", r.round, r.pages, r.elapsed_ms);
        }
        println!(
            "stop-and-copy: downtime {:.1} ms; total {:.1} ms (stopped: {})",
            o.prediction.downtime_ms, o.prediction.total_ms, o.prediction.stop_reason
        );
    })
}
