//! `helio predict`: what the planner predicts for one move of a fleet's VM (its group with
//! it) over one link: mode, duration, downtime and wire bytes, from `memory::model` and the
//! disk's last delta, as `helio plan` books it. For an operator asking what a move would cost
//! now, and for checking the model against measured moves (`benches/scripts/predict.py`).

use planner::clock::Horizon;
use planner::predict::{predict_move, Refusal};
use planner::world::World;
use std::path::PathBuf;

/// Arguments of `helio predict`.
#[derive(clap::Args)]
pub struct Args {
    /// The fleet (TOML, or JSON).
    #[arg(long)]
    fleet: PathBuf,
    /// The VM to move (a group moves whole).
    #[arg(long)]
    vm: String,
    /// The site it goes to.
    #[arg(long)]
    to: String,
    /// The rate the move may use; default the whole link.
    #[arg(long)]
    bandwidth: Option<wan::Rate>,
    /// Disk written since the destination's copy was last in step (shipped by the move's
    /// last rounds), e.g. `80MB`.
    #[arg(long, default_value = "0")]
    disk_delta: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Output<'a> {
    unit: &'a str,
    from: &'a str,
    to: &'a str,
    #[serde(flatten)]
    prediction: &'a planner::predict::MovePrediction,
}

pub async fn run(a: Args) -> anyhow::Result<i32> {
    let fleet = super::plan::load_fleet(&a.fleet)?;
    // On the wire as a seed's chunks are: compressed, zeros skipped.
    let delta = crate::units::parse_size(&a.disk_delta)? as f64 * fleet.policy.disk_wire_ratio;
    let w = World::new(&fleet, Horizon::new(jiff::Timestamp::now(), 1))?;
    let vm = fleet
        .vms
        .iter()
        .position(|v| v.name == a.vm)
        .ok_or_else(|| anyhow::anyhow!("no VM {:?} in {}", a.vm, a.fleet.display()))?;
    let u = w
        .units
        .iter()
        .find(|u| u.members.contains(&vm))
        .ok_or_else(|| anyhow::anyhow!("VM {:?} belongs to no unit (a bug)", a.vm))?;
    let to = fleet
        .site_index(&a.to)
        .ok_or_else(|| anyhow::anyhow!("no site {:?} in {}", a.to, a.fleet.display()))?;
    let from = &fleet.sites[u.site].name;
    let (l, _) = w
        .link_dir(u.site, to)
        .ok_or_else(|| anyhow::anyhow!("no link joins {from} and {}", a.to))?;
    let bw = a
        .bandwidth
        .map_or(w.bandwidth[l], |r| r.bytes_per_sec() as f64);
    let p = predict_move(&w, u, l, bw, delta).map_err(|r| {
        let Refusal::Downtime { vm, predicted_ms } = r;
        let why = if predicted_ms.is_finite() {
            format!("VM {vm} would be down {predicted_ms:.0} ms at the least, over its max_downtime_ms")
        } else {
            format!("VM {vm}'s pre-copy would not converge at this bandwidth and its modes allow no other")
        };
        anyhow::anyhow!("{} cannot move {from} → {}: {why}", u.name, a.to)
    })?;
    let out = Output {
        unit: &u.name,
        from,
        to: &a.to,
        prediction: &p,
    };
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "{} {from} → {}: {} in {:.1} s, downtime {:.0} ms, {:.1} MB on the wire at {:.0} Mbit/s",
            u.name,
            a.to,
            p.mode,
            p.duration_s,
            p.downtime_ms,
            p.wan_bytes / 1e6,
            p.bandwidth_bps / 1e6
        );
    }
    Ok(0)
}
