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

#[test]
fn each_days_plan_looks_past_its_end_so_the_next_morning_is_served_on_time() {
    // Users in Europe at every hour and (more) in Asia from 08:00 to 12:00 Tokyo time; the
    // simulation starts at 08:00 in Tokyo, so the second day's plan begins as Tokyo's next
    // morning does. A day's plan that ended there would not see that morning: the move would
    // wait for the second day's plan, and arrive an hour late at best.
    let text = r#"
[[sites]]
name = "paris"
tz = "Europe/Paris"
capacity = { vcpus = 64, memory_mib = 262144, disk_gib = 4096 }

[[sites]]
name = "tokyo"
tz = "Asia/Tokyo"
capacity = { vcpus = 64, memory_mib = 262144, disk_gib = 4096 }

[[links]]
a = "paris"
b = "tokyo"
bandwidth = "1Gbit"
rtt_ms = 220

[[regions]]
name = "eu"
tz = "Europe/Paris"
rtt_ms = { paris = 10, tokyo = 230 }
curve = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]

[[regions]]
name = "asia"
tz = "Asia/Tokyo"
rtt_ms = { paris = 230, tokyo = 10 }
curve = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]

[[vms]]
name = "web"
memory_mib = 4096
disk_gib = 20
vcpus = 4
site = "paris"
dirty_rate_mib_s = 5
users = { eu = 50, asia = 100 }
max_moves_per_day = 3
"#;
    let fleet = Fleet::parse(text).unwrap();
    let from = "2026-12-02T23:00:00Z".parse().unwrap();
    let r = simulate(&fleet, from, 2, Strategy::Planner, 1).unwrap();
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    // Where the VM runs when the second day's plan begins.
    let at_24 = r
        .moves
        .iter()
        .filter(|m| m.arrived_h.is_some_and(|h| h <= 24.0))
        .max_by(|a, b| {
            a.arrived_h
                .partial_cmp(&b.arrived_h)
                .expect("hours are numbers")
        })
        .map_or("paris", |m| m.to.as_str());
    let arrivals: Vec<(&str, Option<f64>)> = r
        .moves
        .iter()
        .map(|m| (m.to.as_str(), m.arrived_h))
        .collect();
    assert_eq!(
        at_24, "tokyo",
        "Tokyo's second morning finds the VM elsewhere: {arrivals:?}"
    );
}
