//! The simulator's bookkeeping on the shipped example fleet: under the planner no link carries
//! more than its budget in any hour and no site holds more than its capacity; naive copying
//! breaks the budgets; the oracle bounds everyone's latency; a seed replays the same run.

use helio_planner::sim::{simulate, SimReport, Strategy};
use helio_planner::Fleet;

fn run(strategy: Strategy, seed: u64) -> SimReport {
    let fleet = Fleet::parse(include_str!("../../examples/fleet-small.toml")).unwrap();
    simulate(
        &fleet,
        "2026-12-03T00:00:00Z".parse().unwrap(),
        3,
        strategy,
        seed,
    )
    .unwrap()
}

#[test]
fn under_the_planner_links_keep_their_budgets_and_sites_their_capacity() {
    let r = run(Strategy::Planner, 1);
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    assert!(!r.moves.is_empty());
    for l in &r.links {
        for (h, (used, budget)) in l.used_bytes.iter().zip(&l.budget_bytes).enumerate() {
            assert!(
                used <= &(budget + 1.0),
                "{} hour {h}: {used} of {budget}",
                l.link
            );
        }
    }
    for s in &r.sites {
        let (p, c) = (s.peak, s.capacity);
        assert!(
            p.vcpus <= c.vcpus && p.memory_mib <= c.memory_mib && p.disk_gib <= c.disk_gib,
            "{s:?}"
        );
    }
    // Every planned move landed, and by its hour give or take the noise.
    for m in &r.moves {
        let (arrived, planned) = (m.arrived_h.expect("landed"), m.planned_h.unwrap() as f64);
        assert!(arrived <= planned + 0.5, "{m:?}");
    }
}

#[test]
fn naive_copying_at_move_time_breaks_the_budgets() {
    let r = run(Strategy::Naive, 1);
    let over: f64 = r.links.iter().map(|l| l.over_budget_bytes).sum();
    assert!(over > 1e9, "naive stayed within budgets: {:?}", r.links);
    assert!(r.violations.iter().any(|v| v.contains("over its budget")));
}

#[test]
fn the_oracle_bounds_latency_and_the_planner_beats_standing_still() {
    let (o, p, s) = (
        run(Strategy::Oracle, 1),
        run(Strategy::Planner, 1),
        run(Strategy::Static, 1),
    );
    assert!(
        o.user_ms_h <= p.user_ms_h && p.user_ms_h < s.user_ms_h,
        "{} {} {}",
        o.user_ms_h,
        p.user_ms_h,
        s.user_ms_h
    );
    assert!(s.moves.is_empty());
}

#[test]
fn a_seed_replays_the_same_run() {
    let strip = |mut r: SimReport| {
        r.elapsed_s = 0.0;
        serde_json::to_string(&r).unwrap()
    };
    assert_eq!(
        strip(run(Strategy::Planner, 7)),
        strip(run(Strategy::Planner, 7))
    );
    assert_ne!(
        strip(run(Strategy::Planner, 7)),
        strip(run(Strategy::Planner, 8))
    );
}

#[test]
fn the_html_report_plots_every_strategy_link_and_site_and_lists_the_moves() {
    let reports: Vec<SimReport> = [Strategy::Planner, Strategy::Static, Strategy::Oracle]
        .into_iter()
        .map(|s| run(s, 1))
        .collect();
    let page = helio_planner::sim::html(&reports).unwrap();
    // One plot of latency, one per link, one per site.
    let plots = 1 + reports[0].links.len() + reports[0].sites.len();
    assert_eq!(page.matches("<svg").count(), plots);
    for name in [
        "planner",
        "static",
        "oracle",
        "frankfurt–virginia",
        "singapore",
        "budget",
    ] {
        assert!(page.contains(name), "the page does not name {name:?}");
    }
    // Every move of the planner is a row of its table.
    assert_eq!(
        page.matches("<tr><td>").count(),
        reports.len() + reports[0].moves.len(),
        "a summary row per strategy and a row per move"
    );
    assert!(!page.contains("<script"), "the page runs nothing");
}
