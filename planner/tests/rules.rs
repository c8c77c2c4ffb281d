//! Each hard rule with a fleet that would break it if the rule were ignored; explanations for
//! every move; the same plan for the same fleet; a fleet no plan can satisfy.

use helio_planner::{plan, Fleet, Plan, PlanError};

/// Paris and Tokyo, a link between them, users in Europe and in Asia. The Asian users' day is
/// Paris's night, so a VM serving both should spend Asia's day in Tokyo.
fn fleet(extra_vms: &str, tokyo_vcpus: u32, link_extra: &str) -> String {
    format!(
        r#"
[[sites]]
name = "paris"
tz = "Europe/Paris"
capacity = {{ vcpus = 64, memory_mib = 262144, disk_gib = 4096 }}

[[sites]]
name = "tokyo"
tz = "Asia/Tokyo"
capacity = {{ vcpus = {tokyo_vcpus}, memory_mib = 262144, disk_gib = 4096 }}

[[links]]
a = "paris"
b = "tokyo"
bandwidth = "1Gbit"
rtt_ms = 220
{link_extra}

[[regions]]
name = "eu"
tz = "Europe/Paris"
rtt_ms = {{ paris = 10, tokyo = 230 }}

[[regions]]
name = "asia"
tz = "Asia/Tokyo"
rtt_ms = {{ paris = 230, tokyo = 10 }}

{extra_vms}
"#
    )
}

fn vm(name: &str, extra: &str) -> String {
    format!(
        r#"
[[vms]]
name = "{name}"
memory_mib = 4096
disk_gib = 20
vcpus = 4
site = "paris"
dirty_rate_mib_s = 5
disk_write_mib_s = 0.05
users = {{ eu = 50, asia = 100 }}
{extra}
"#
    )
}

fn run(text: &str) -> Plan {
    run_from(text, "2026-12-03T00:00:00Z")
}

fn run_from(text: &str, from: &str) -> Plan {
    let f = Fleet::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let p = plan(&f, from.parse().unwrap(), 24).unwrap();
    assert!(p.violations.is_empty(), "{:?}", p.violations);
    p
}

fn moves_of<'a>(p: &'a Plan, unit: &str) -> Vec<&'a helio_planner::explain::PlannedMove> {
    p.moves.iter().filter(|m| m.unit == unit).collect()
}

#[test]
fn a_vm_follows_its_users_and_every_move_is_explained() {
    let p = run(&fleet(&vm("web", ""), 64, ""));
    let m = moves_of(&p, "web");
    assert_eq!(
        m.len(),
        2,
        "to Tokyo for Asia's day and back: {:#?}",
        p.moves
    );
    assert_eq!((m[0].to.as_str(), m[1].to.as_str()), ("tokyo", "paris"));
    for x in &m {
        assert!(x.gain.user_ms_h > x.cost.user_ms_h, "{x:#?}");
        assert!(
            x.why.contains("moves") && x.why.contains("gain"),
            "{}",
            x.why
        );
        assert_eq!(x.migration.deadline, x.arrive_by);
        assert!(x.migration.predicted_downtime_ms <= 300.0);
    }
    // The first trip seeds the whole disk; the way back only what it wrote in Tokyo.
    let first = m[0].seed.as_ref().expect("a seed before the first move");
    assert!(first.wan_bytes > 10e9, "{first:?}");
    let back = m[1].seed.as_ref().map_or(0.0, |s| s.wan_bytes);
    assert!(back < first.wan_bytes / 5.0, "way back seeds {back} bytes");
    assert!(p.totals.user_ms_h_planned < p.totals.user_ms_h_static);
}

#[test]
fn the_same_fleet_gives_the_same_plan() {
    let text = fleet(&format!("{}{}", vm("a", ""), vm("b", "")), 64, "");
    let one = serde_json::to_string(&run(&text)).unwrap();
    let two = serde_json::to_string(&run(&text)).unwrap();
    assert_eq!(one, two);
}

#[test]
fn capacity_holds_only_one_of_two_vms_that_want_tokyo() {
    // Tokyo has 6 vCPUs: one 4-vCPU VM fits, two do not.
    let text = fleet(&format!("{}{}", vm("a", ""), vm("b", "")), 6, "");
    let p = run(&text);
    // Both want Tokyo for Asia's day (hours 1-8); only one is there then (the plan's audit
    // checked every hour), the other is told why.
    let in_tokyo_at_4: Vec<_> = ["a", "b"]
        .into_iter()
        .filter(|u| {
            moves_of(&p, u)
                .iter()
                .any(|m| m.to == "tokyo" && m.hour <= 4)
        })
        .collect();
    assert_eq!(in_tokyo_at_4.len(), 1, "{:#?}", p.moves);
    let other = if in_tokyo_at_4[0] == "a" { "b" } else { "a" };
    let why: Vec<_> = p.left_out.iter().filter(|l| l.unit == other).collect();
    assert!(
        why.iter()
            .any(|l| l.reason == "capacity" && l.why.contains("tokyo lacks vcpus")),
        "{why:#?}"
    );
    // Ignoring capacity both would have moved: with room for both, both do.
    let roomy = run(&fleet(&format!("{}{}", vm("a", ""), vm("b", "")), 64, ""));
    assert!(!moves_of(&roomy, "a").is_empty() && !moves_of(&roomy, "b").is_empty());
}

#[test]
fn a_link_budget_too_small_for_the_seed_keeps_the_vm_home() {
    // 1 Mbit/s all day carries ~10.8 GB; the disk needs ~12.9 GB on the wire.
    let tight = r#"budget = [ { from = "00:00", to = "00:00", bandwidth = "1Mbit" } ]"#;
    let p = run(&fleet(&vm("web", ""), 64, tight));
    assert!(moves_of(&p, "web").is_empty(), "{:#?}", p.moves);
    let why: Vec<_> = p.left_out.iter().filter(|l| l.unit == "web").collect();
    assert!(why.iter().any(|l| l.reason == "budget"), "{why:#?}");
}

#[test]
fn business_hour_windows_push_seeds_into_the_night() {
    let windows = r#"budget = [ { from = "08:00", to = "18:00", bandwidth = "50Mbit" } ]"#;
    // From 12:00 UTC Asia's next day begins at 23:00 UTC; both ends' business hours leave
    // 17:00-23:00 UTC free.
    let p = run_from(&fleet(&vm("web", ""), 64, windows), "2026-12-03T12:00:00Z");
    let m = moves_of(&p, "web");
    assert!(!m.is_empty(), "{:#?}", p.left_out);
    let seed = m[0].seed.as_ref().unwrap();
    assert!(
        seed.business_hours_bytes < 0.05 * seed.wan_bytes,
        "{seed:#?}"
    );
}

#[test]
fn residency_keeps_a_vm_out_of_a_better_site() {
    let p = run(&fleet(&vm("web", r#"allowed_sites = ["paris"]"#), 64, ""));
    assert!(moves_of(&p, "web").is_empty());
    let why: Vec<_> = p.left_out.iter().filter(|l| l.unit == "web").collect();
    assert!(
        why.iter()
            .any(|l| l.reason == "residency" && l.to == "tokyo"),
        "{why:#?}"
    );
}

#[test]
fn a_group_moves_together_and_a_split_group_is_refused() {
    let text = fleet(
        &format!(
            "{}{}",
            vm("db", r#"group = "shop""#),
            vm("app", r#"group = "shop""#)
        ),
        64,
        "",
    );
    let p = run(&text);
    let m = moves_of(&p, "shop");
    assert!(!m.is_empty());
    assert!(m.iter().all(|x| x.vms == ["app", "db"]), "{m:#?}");
    let app_in_tokyo =
        vm("app", r#"group = "shop""#).replace("site = \"paris\"", "site = \"tokyo\"");
    let split = fleet(
        &format!("{}{}", vm("db", r#"group = "shop""#), app_in_tokyo),
        64,
        "",
    );
    let f = Fleet::parse(&split).unwrap();
    match plan(&f, "2026-12-03T00:00:00Z".parse().unwrap(), 24) {
        Err(PlanError::Unsatisfiable(m)) => assert!(m.contains("group \"shop\" is split"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_downtime_cap_refuses_live_moves_and_post_copy_meets_it() {
    // 4 GiB dirtied at 200 MiB/s over 1 Gbit/s never converges; post-copy's downtime is half
    // the RTT (110 ms), within 150.
    let hot = r#"dirty_rate_mib_s = 200
max_downtime_ms = 150"#;
    let text = fleet(
        &vm("web", hot).replace("dirty_rate_mib_s = 5\n", ""),
        64,
        "",
    );
    let p = run(&text);
    assert!(moves_of(&p, "web").is_empty(), "{:#?}", p.moves);
    assert!(
        p.left_out
            .iter()
            .any(|l| l.unit == "web" && l.reason == "downtime"),
        "{:#?}",
        p.left_out
    );
    let post = text.replace(
        "max_downtime_ms = 150",
        "max_downtime_ms = 150\nmodes = [\"live\", \"postcopy\"]",
    );
    let p = run(&post);
    let m = moves_of(&p, "web");
    assert!(!m.is_empty(), "{:#?}", p.left_out);
    assert!(m.iter().all(|x| x.migration.mode == "postcopy"), "{m:#?}");
}

#[test]
fn the_move_limit_holds_a_round_trip_to_one_move() {
    let p = run(&fleet(&vm("web", "max_moves_per_day = 1"), 64, ""));
    assert!(moves_of(&p, "web").len() <= 1, "{:#?}", p.moves);
    let free = run(&fleet(&vm("web", ""), 64, ""));
    assert_eq!(moves_of(&free, "web").len(), 2);
}

#[test]
fn a_fleet_over_capacity_now_is_refused_by_name() {
    let text = fleet(&format!("{}{}", vm("a", ""), vm("b", "")), 64, "").replacen(
        "vcpus = 64",
        "vcpus = 6",
        1,
    );
    let f = Fleet::parse(&text).unwrap();
    match plan(&f, "2026-12-03T00:00:00Z".parse().unwrap(), 24) {
        Err(PlanError::Unsatisfiable(m)) => {
            assert!(
                m.contains("\"paris\"") && m.contains("vcpus") && m.contains("a, b"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_fleets_name_what_is_wrong() {
    let cases = [
        (
            fleet(&vm("web", ""), 64, "").replace("tz = \"Asia/Tokyo\"", "tz = \"Asia/Nowhere\""),
            "Asia/Nowhere",
        ),
        (fleet(&vm("web", "colour = \"red\""), 64, ""), "colour"),
        (
            fleet(
                &vm("web", "").replace("site = \"paris\"", "site = \"lyon\""),
                64,
                "",
            ),
            "lyon",
        ),
        (
            fleet(&vm("web", "").replace("asia = 100", "mars = 1"), 64, ""),
            "mars",
        ),
        (
            fleet(&vm("web", r#"allowed_sites = ["berlin"]"#), 64, ""),
            "berlin",
        ),
    ];
    for (text, needle) in cases {
        match Fleet::parse(&text) {
            Err(PlanError::Fleet(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{needle}: {other:?}"),
        }
    }
}

#[test]
fn a_replica_kept_at_the_destination_makes_the_move_seed_only_what_was_written_since() {
    // A 2 TB disk over a link whose whole day carries less than it: without a copy in Tokyo
    // the VM stays home; with one an hour old, only that hour's writes cross.
    let big = |extra: &str| {
        vm("db", extra)
            .replace("disk_gib = 20", "disk_gib = 2000")
            .replace(
                "site = \"paris\"",
                "site = \"paris\"\nmax_moves_per_day = 1",
            )
    };
    let slow = "budget = [ { from = \"00:00\", to = \"00:00\", bandwidth = \"100Mbit\" } ]";
    let none = run(&fleet(&big(""), 64, slow));
    assert!(moves_of(&none, "db").is_empty(), "{:#?}", none.moves);
    let kept = run(&fleet(&big("replicas = { tokyo = 1 }"), 64, slow));
    let m = moves_of(&kept, "db");
    assert_eq!(m.len(), 1, "{:#?}", kept.moves);
    let seeded = m[0].seed.as_ref().map_or(0.0, |s| s.wan_bytes);
    assert!(
        seeded < 1e9,
        "the move seeds {seeded} bytes over a kept replica"
    );
}

#[test]
fn a_replica_at_an_undeclared_or_its_own_site_is_refused() {
    for bad in [
        "replicas = { mars = 1 }",
        "replicas = { paris = 1 }",
        "replicas = { tokyo = -1 }",
    ] {
        let text = fleet(&vm("web", bad), 64, "");
        let e = Fleet::parse(&text)
            .and_then(|f| f.check().map(|_| f))
            .expect_err(bad);
        assert!(e.to_string().contains("replica"), "{bad}: {e}");
    }
}

#[test]
fn a_seed_that_needs_the_hours_before_the_move_leaves_the_move_its_own_hour() {
    // 1.4 TiB of disk (about 900 GB to seed, two hours of the link) for users who are all in
    // Asia: the seed takes the first hours and the move the hour after it. A seed laid into
    // the latest hours first would take the move's hour and leave it no bandwidth.
    let big = vm("db", "")
        .replace("disk_gib = 20", "disk_gib = 1400")
        .replace("users = { eu = 50, asia = 100 }", "users = { asia = 100 }");
    let text = format!(
        "[policy]\nbusiness_cost_per_gb = 0\n{}",
        fleet(&big, 64, "")
    );
    let p = run(&text);
    let m = moves_of(&p, "db");
    assert_eq!(m.len(), 1, "{:#?}", p.left_out);
    let seed = m[0].seed.as_ref().expect("the disk is seeded ahead");
    assert!(
        seed.hours.iter().all(|h| *h + 1 < m[0].hour),
        "the seed ({:?}) runs into the migration's hour (the one before {})",
        seed.hours,
        m[0].hour
    );
}

#[test]
fn business_hours_bytes_cost_what_the_policy_says() {
    let bytes = |price: &str| {
        let text = format!(
            "[policy]\nbusiness_cost_per_gb = {price}\n{}",
            fleet(&vm("web", ""), 64, "")
        );
        let p = run(&text);
        (p.totals.business_hours_bytes, p.moves.len())
    };
    let (free, moves) = bytes("0");
    let (dear, _) = bytes("1e9");
    assert!(moves > 0);
    assert!(
        dear < free,
        "business-hours bytes {dear} at a high price, {free} at none"
    );
}

#[test]
fn a_move_in_the_first_hour_to_a_fresh_replica_with_nothing_to_seed_is_planned() {
    // Nothing written (no disk_write_mib_s) and a copy in Tokyo as fresh as can be: the move
    // arriving in hour 1 seeds nothing, and its delta is the hour it runs in.
    let text = fleet(
        &vm("web", "replicas = { tokyo = 0 }")
            .replace("disk_write_mib_s = 0.05\n", "")
            .replace("users = { eu = 50, asia = 100 }", "users = { asia = 100 }"),
        64,
        "",
    );
    let p = run(&text);
    let m = moves_of(&p, "web");
    assert_eq!(m.len(), 1, "{:#?}", p.left_out);
    assert_eq!(m[0].hour, 1, "{:#?}", m[0]);
    assert!(m[0].seed.is_none(), "{:#?}", m[0].seed);
}
