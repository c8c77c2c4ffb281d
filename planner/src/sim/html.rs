//! The simulation's report as one self-contained HTML page: SVG plots drawn with `plotters`
//! (text is left to the browser, so no system font is needed) and tables, nothing fetched.
//! Latency per hour for every strategy, each link's use against its budget, each site's vCPUs
//! against its capacity, the moves as they happened with their downtime, bytes in and out of
//! business hours, and every rule broken.

use super::report::SimReport;
use plotters::prelude::*;
use std::fmt::Write;

/// Plot size, pixels.
const SIZE: (u32, u32) = (960, 300);
/// Colours by strategy or series, in order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(90, 90, 90),
];

/// A line of a plot: its name, its points per hour, and whether it is a limit (a thin grey line).
struct Line<'a> {
    name: String,
    ys: &'a [f64],
    limit: bool,
}

/// The page for `reports` (one per strategy, on the same fleet and hours).
pub fn html(reports: &[SimReport]) -> Result<String, String> {
    let mut page = String::new();
    let from = reports.first().map_or("", |r| r.from.as_str());
    let days = reports.first().map_or(0, |r| r.days);
    let _ = write!(
        page,
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>heliotrope simulation</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}\
         th{{background:#eee}}td:first-child{{text-align:left}}</style></head><body>\n\
         <h1>Simulation from {} for {days} days</h1>\n",
        esc(from)
    );
    summary(&mut page, reports);
    let latency: Vec<Line> = reports
        .iter()
        .map(|r| Line {
            name: r.strategy.clone(),
            ys: &r.latency_ms,
            limit: false,
        })
        .collect();
    page += "<h2>User-weighted latency per hour</h2>\n";
    page += &plot("latency, ms", &latency)?;
    links(&mut page, reports)?;
    sites(&mut page, reports)?;
    for r in reports.iter().filter(|r| !r.moves.is_empty()) {
        moves(&mut page, r);
    }
    page += "</body></html>\n";
    Ok(page)
}

fn summary(page: &mut String, reports: &[SimReport]) {
    let by = |s: &str| {
        reports
            .iter()
            .find(|r| r.strategy == s)
            .map(|r| r.user_ms_h)
    };
    *page += "<table><tr><th>strategy</th><th>user-ms·h</th><th>share of the oracle's gain</th>\
              <th>moves</th><th>GB in business hours</th><th>GB outside</th><th>GB over budgets</th>\
              <th>violations</th></tr>\n";
    for r in reports {
        let share = match (by("static"), by("oracle")) {
            (Some(b), Some(o)) if b > o => format!("{:.0}%", 100.0 * (b - r.user_ms_h) / (b - o)),
            _ => "-".into(),
        };
        let over: f64 = r.links.iter().map(|l| l.over_budget_bytes).sum();
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{:.0}</td><td>{share}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td>\
             <td>{:.1}</td><td>{}</td></tr>",
            esc(&r.strategy),
            r.user_ms_h,
            r.moves.len(),
            r.business_hours_bytes / 1e9,
            r.off_hours_bytes / 1e9,
            over / 1e9,
            r.violations.len()
        );
    }
    *page += "</table>\n";
    for r in reports {
        for v in &r.violations {
            let _ = writeln!(page, "<p><b>{}</b>: {}</p>", esc(&r.strategy), esc(v));
        }
    }
}

/// Each link: bytes per hour of every strategy that moved something, against the budget.
fn links(page: &mut String, reports: &[SimReport]) -> Result<(), String> {
    let Some(first) = reports.first() else {
        return Ok(());
    };
    *page += "<h2>Link use against budget (GB per hour, busier direction)</h2>\n";
    for (i, l) in first.links.iter().enumerate() {
        let gb = |v: &[f64]| v.iter().map(|b| b / 1e9).collect::<Vec<f64>>();
        let budget = gb(&l.budget_bytes);
        let used: Vec<(String, Vec<f64>)> = reports
            .iter()
            .filter(|r| !r.moves.is_empty())
            .filter_map(|r| {
                r.links
                    .get(i)
                    .map(|x| (r.strategy.clone(), gb(&x.used_bytes)))
            })
            .collect();
        *page += &against(&l.link, "GB", &used, ("budget", &budget))?;
    }
    Ok(())
}

/// Each site: vCPUs used per hour under every strategy, against its capacity.
fn sites(page: &mut String, reports: &[SimReport]) -> Result<(), String> {
    let Some(first) = reports.first() else {
        return Ok(());
    };
    *page += "<h2>vCPUs used per site against capacity</h2>\n";
    for (i, s) in first.sites.iter().enumerate() {
        let hours = s.vcpus_used.len();
        let cap = vec![s.capacity.vcpus as f64; hours];
        let used: Vec<(String, Vec<f64>)> = reports
            .iter()
            .filter_map(|r| {
                let v = r
                    .sites
                    .get(i)?
                    .vcpus_used
                    .iter()
                    .map(|x| *x as f64)
                    .collect();
                Some((r.strategy.clone(), v))
            })
            .collect();
        *page += &against(&s.site, "vCPUs", &used, ("capacity", &cap))?;
    }
    Ok(())
}

/// A titled plot of each strategy's use against a limit (a thin grey line).
fn against(
    title: &str,
    y_desc: &str,
    used: &[(String, Vec<f64>)],
    (limit_name, limit): (&str, &[f64]),
) -> Result<String, String> {
    let mut lines: Vec<Line> = used
        .iter()
        .map(|(name, ys)| Line {
            name: name.clone(),
            ys,
            limit: false,
        })
        .collect();
    lines.push(Line {
        name: limit_name.into(),
        ys: limit,
        limit: true,
    });
    Ok(format!(
        "<h3>{}</h3>\n{}",
        esc(title),
        plot(y_desc, &lines)?
    ))
}

/// The moves of one strategy as they happened: a timeline table with downtime and bytes.
fn moves(page: &mut String, r: &SimReport) {
    let _ = writeln!(
        page,
        "<h2>Moves under {} ({})</h2>\n<table><tr><th>unit</th><th>from</th><th>to</th>\
         <th>started (h)</th><th>running there (h)</th><th>planned by (h)</th><th>downtime (ms)</th>\
         <th>GB</th><th>GB in business hours</th></tr>",
        esc(&r.strategy),
        r.moves.len()
    );
    for m in &r.moves {
        let hour = |x: Option<f64>| x.map_or("-".into(), |h| format!("{h:.2}"));
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td>\
             <td>{:.0}</td><td>{:.1}</td><td>{:.1}</td></tr>",
            esc(&m.unit),
            esc(&m.from),
            esc(&m.to),
            m.started_h,
            hour(m.arrived_h),
            hour(m.planned_h.map(|h| h as f64)),
            m.downtime_ms,
            m.wan_bytes / 1e9,
            m.business_hours_bytes / 1e9
        );
    }
    *page += "</table>\n";
}

/// One line plot over the hours as an inline `<svg>`.
fn plot(y_desc: &str, lines: &[Line]) -> Result<String, String> {
    let hours = lines.iter().map(|l| l.ys.len()).max().unwrap_or(0).max(1);
    let top = lines
        .iter()
        .flat_map(|l| l.ys.iter().copied())
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.1 } else { 1.0 };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..hours as f64, 0f64..top)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("hour")
            .y_desc(y_desc)
            .draw()
            .map_err(e)?;
        let mut colour = COLOURS.iter().cycle();
        for l in lines {
            let c = if l.limit {
                RGBColor(120, 120, 120)
            } else {
                // Invariant: `cycle` over a non-empty array never ends.
                *colour.next().unwrap_or(&BLACK)
            };
            let points = l.ys.iter().enumerate().map(|(h, y)| (h as f64, *y));
            let style = c.stroke_width(if l.limit { 1 } else { 2 });
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(e)?
                .label(l.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg + "\n")
}

fn e<E: std::fmt::Display>(err: E) -> String {
    format!("drawing a plot: {err}")
}

/// Text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
