//! What a move costs, before it is made: the seed of the disk (ahead of time) and the move
//! itself (memory pre-copy by `memory::model`, the disk's last delta), per unit and link.

use crate::fleet::Vm;
use crate::world::{Unit, World};
use memory::model::ModelInput;
use serde::Serialize;

/// The move of one unit over one link at a given bandwidth.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MovePrediction {
    /// `live`, `postcopy` or `warm`.
    pub mode: String,
    /// From the migration's start to the unit running at the destination, seconds.
    pub duration_s: f64,
    /// The longest downtime of its VMs, ms.
    pub downtime_ms: f64,
    /// Memory and disk-delta bytes on the wire.
    pub wan_bytes: f64,
    /// The rate it was predicted at (what the link's budget leaves in its hour), bits/s: the
    /// migration's cap.
    pub bandwidth_bps: f64,
}

/// Why a move cannot be made at all.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// No mode allowed keeps every VM's downtime within its cap.
    Downtime {
        /// The VM that cannot.
        vm: String,
        /// The least downtime predicted for it, ms.
        predicted_ms: f64,
    },
}

/// Predicts moving `unit` over link `l` at `bandwidth` bytes/s, with `delta_bytes` of disk
/// written since its seed to ship in the last rounds. VMs of a group move one after another.
pub fn predict_move(
    w: &World,
    unit: &Unit,
    l: usize,
    bandwidth: f64,
    delta_bytes: f64,
) -> Result<MovePrediction, Refusal> {
    let mut out = MovePrediction {
        mode: "live".into(),
        duration_s: 0.0,
        downtime_ms: 0.0,
        wan_bytes: delta_bytes,
        bandwidth_bps: bandwidth * 8.0,
    };
    let bw = bandwidth.max(1.0);
    // The disk's last delta crosses first (sync rounds), at the link's rate.
    out.duration_s += delta_bytes / bw;
    let mut modes = Vec::new();
    for m in &unit.members {
        let vm = &w.fleet.vms[*m];
        let (mode, p, bytes) = one_vm(w, unit, vm, l, bw)?;
        modes.push(mode);
        out.duration_s += p.total_ms / 1000.0;
        out.downtime_ms = out.downtime_ms.max(p.downtime_ms);
        out.wan_bytes += bytes;
    }
    // A group moves in the least gentle mode any member needed (they switch over together).
    for m in ["warm", "postcopy"] {
        if modes.contains(&m) {
            out.mode = m.into();
            break;
        }
    }
    Ok(out)
}

/// One VM: pre-copy when it fits its cap, else post-copy, else warm, as allowed.
fn one_vm(
    w: &World,
    unit: &Unit,
    vm: &Vm,
    l: usize,
    bw: f64,
) -> Result<(&'static str, memory::model::Prediction, f64), Refusal> {
    let policy = &w.fleet.policy;
    let memory = (vm.memory_mib as f64) * 1048576.0;
    let input = ModelInput {
        memory_bytes: memory as u64,
        total_pages: vm.memory_mib * 256,
        dirty_rate: vm.dirty_rate_mib_s * 256.0,
        bandwidth: bw,
        compression: 1.0 / policy.memory_wire_ratio.max(1e-3),
        hot_pages: 0,
        hot_fraction: 0.0,
        rtt: w.rtt_s(l),
        downtime_target: vm.max_downtime_ms / 1000.0,
        hold_hot: false,
    };
    let wire = |p: &memory::model::Prediction| {
        let rounds: f64 = p.rounds.iter().map(|r| r.bytes as f64).sum();
        let last = ((p.downtime_ms / 1000.0 - input.rtt / 2.0).max(0.0)) * bw;
        (rounds + last) * policy.memory_wire_ratio
    };
    let allowed = |m: &str| unit.modes.iter().any(|x| x == m);
    let live = input.predict();
    if allowed("live") && live.converges && live.downtime_ms <= vm.max_downtime_ms {
        let b = wire(&live);
        return Ok(("live", live, b));
    }
    let post = input.predict_postcopy(1.0);
    if allowed("postcopy") && post.downtime_ms <= vm.max_downtime_ms {
        // Pre-copy's first round, then the rest on demand: about the memory once more.
        let b = memory * policy.memory_wire_ratio;
        return Ok(("postcopy", post, b));
    }
    let warm = input.predict_warm();
    if allowed("warm") && warm.downtime_ms <= vm.max_downtime_ms {
        let b = memory * policy.memory_wire_ratio;
        return Ok(("warm", warm, b));
    }
    let least = [
        (allowed("live") && live.converges).then_some(live.downtime_ms),
        allowed("postcopy").then_some(post.downtime_ms),
        allowed("warm").then_some(warm.downtime_ms),
    ]
    .into_iter()
    .flatten()
    .fold(f64::INFINITY, f64::min);
    Err(Refusal::Downtime {
        vm: vm.name.clone(),
        predicted_ms: least,
    })
}
