//! Transfers sharing links: each link direction carries its physical bandwidth, split evenly
//! among the transfers active on it (a transfer may be capped lower, e.g. a planned seed at the
//! rate its budget allows; what it leaves goes to the others), minute by minute. Transfers an
//! agent runs for a plan keep, together, within the link's budget of the hour (the jobs carry
//! it as their bandwidth cap); the others (naive's copies) take what the link has.

/// One transfer: a seed or a move's stream.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Link and direction (0: a → b).
    pub link: usize,
    /// Direction.
    pub dir: usize,
    /// Bytes left.
    pub remaining: f64,
    /// The first hour it may run.
    pub start_h: usize,
    /// The last hour it may run (a planned seed keeps to its hours); `None`: until done.
    pub until_h: Option<usize>,
    /// Its own cap, bytes/s.
    pub cap_bps: Option<f64>,
    /// The move it belongs to, and whether it is that move's seed.
    pub mv: usize,
    /// Whether it is a seed (a move's stream waits for its seed).
    pub seed: bool,
    /// Whether it keeps within the link's budget (a planned job) or not (naive).
    pub budgeted: bool,
}

/// Minutes per simulated hour.
pub const STEPS: usize = 60;

/// Runs minute `step` of hour `h`: moves bytes on every link direction. `ready(t)` says whether
/// a transfer may run now (a move's stream waits for its seed). Returns the bytes each
/// transfer moved and the transfers that finished.
pub fn run_minute(
    transfers: &mut [Transfer],
    bandwidth: &[f64],
    budget: &[Vec<f64>],
    h: usize,
    ready: impl Fn(&Transfer) -> bool,
) -> (Vec<(usize, f64)>, Vec<usize>) {
    let mut carried = Vec::new();
    let mut done = Vec::new();
    let secs = 3600.0 / STEPS as f64;
    let mut buckets: std::collections::BTreeMap<(usize, usize), Vec<usize>> = Default::default();
    for (i, t) in transfers.iter().enumerate() {
        let open = t.remaining > 0.0 && t.start_h <= h && t.until_h.map_or(true, |u| h <= u);
        if open && t.link < bandwidth.len() && ready(t) {
            buckets.entry((t.link, t.dir)).or_default().push(i);
        }
    }
    for ((l, _), active) in buckets {
        let (kept, free): (Vec<usize>, Vec<usize>) =
            active.iter().partition(|i| transfers[**i].budgeted);
        let allowed = budget
            .get(l)
            .and_then(|b| b.get(h))
            .map_or(bandwidth[l], |b| b.min(bandwidth[l]));
        let mut shares = water_fill(transfers, &kept, allowed * secs, secs);
        let used: f64 = shares.iter().sum();
        shares.extend(water_fill(
            transfers,
            &free,
            (bandwidth[l] * secs - used).max(0.0),
            secs,
        ));
        for (i, bytes) in kept.iter().chain(&free).zip(shares) {
            let t = &mut transfers[*i];
            let b = bytes.min(t.remaining);
            t.remaining -= b;
            carried.push((*i, b));
            if t.remaining <= 0.5 {
                t.remaining = 0.0;
                done.push(*i);
            }
        }
    }
    (carried, done)
}

/// Splits `capacity` bytes among `active` evenly, respecting each one's cap and need.
fn water_fill(transfers: &[Transfer], active: &[usize], capacity: f64, secs: f64) -> Vec<f64> {
    let want: Vec<f64> = active
        .iter()
        .map(|i| {
            let t = &transfers[*i];
            t.cap_bps
                .map_or(t.remaining, |c| (c * secs).min(t.remaining))
        })
        .collect();
    let mut give = vec![0.0; active.len()];
    let mut left = capacity;
    let mut open: Vec<usize> = (0..active.len()).collect();
    while left > 1e-6 && !open.is_empty() {
        let share = left / open.len() as f64;
        let mut next = Vec::new();
        for k in open {
            let take = (want[k] - give[k]).min(share);
            give[k] += take;
            left -= take;
            if want[k] - give[k] > 1e-6 {
                next.push(k);
            }
        }
        if next.iter().all(|k| want[*k] - give[*k] <= 1e-6) {
            break;
        }
        open = next;
    }
    give
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(remaining: f64, cap: Option<f64>) -> Transfer {
        Transfer {
            link: 0,
            dir: 0,
            remaining,
            start_h: 0,
            until_h: None,
            cap_bps: cap,
            mv: 0,
            seed: false,
            budgeted: false,
        }
    }

    #[test]
    fn a_capped_transfer_leaves_its_share_to_the_others() {
        // 1 MB/s for a minute: 60 MB; one capped at 10 kB/s (0.6 MB), the other takes the rest.
        let mut ts = vec![t(1e9, Some(1e4)), t(1e9, None)];
        let (carried, done) = run_minute(&mut ts, &[1e6], &[], 0, |_| true);
        assert!(done.is_empty());
        assert!((1e9 - ts[0].remaining - 0.6e6).abs() < 1.0);
        let total: f64 = carried.iter().map(|x| x.1).sum();
        assert!((total - 60e6).abs() < 1.0, "{carried:?}");
    }

    #[test]
    fn the_link_never_carries_more_than_its_bandwidth() {
        let mut ts: Vec<Transfer> = (0..7).map(|_| t(1e12, None)).collect();
        let (carried, _) = run_minute(&mut ts, &[2.5e7], &[], 0, |_| true);
        assert!(carried.iter().map(|x| x.1).sum::<f64>() <= 2.5e7 * 60.0 + 1.0);
    }

    #[test]
    fn planned_transfers_keep_within_the_budget_and_the_others_take_the_rest() {
        // 10 MB/s of link, 2 MB/s of budget: two planned transfers share 120 MB a minute, the
        // unbudgeted one takes the other 480 MB.
        let planned = Transfer {
            budgeted: true,
            ..t(1e12, None)
        };
        let mut ts = vec![planned.clone(), planned, t(1e12, None)];
        let (carried, _) = run_minute(&mut ts, &[1e7], &[vec![2e6]], 0, |_| true);
        let by = |i: usize| carried.iter().find(|c| c.0 == i).map_or(0.0, |c| c.1);
        assert!((by(0) + by(1) - 120e6).abs() < 1.0, "{carried:?}");
        assert!((by(2) - 480e6).abs() < 1.0, "{carried:?}");
    }
}
