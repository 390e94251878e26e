//! SVG charts of a report, written by hand (plain SVG 1.1, no scripts, no fonts beyond
//! `sans-serif`):
//!
//! - `throughput.svg`: Gbit/s bars per scenario (tcp-throughput, large-body), one bar per
//!   path, with its ratio to direct;
//! - `rates.svg`: operations per second bars (tcp-rr round trips, conn-churn connections,
//!   http1-rps requests);
//! - `latency-<scenario>.svg`: latency percentile curves, one line per path: the medians over
//!   repetitions of p50, p90, p99, p99.9 and max, on a log latency axis, percentiles spaced
//!   as 1/(1−q) (the usual "nines" axis).

use std::fmt::Write as _;

use crate::report::Entry;

const COLORS: [&str; 8] = [
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn color(paths: &[String], p: &str) -> &'static str {
    COLORS[paths.iter().position(|x| x == p).unwrap_or(0) % COLORS.len()]
}

/// Horizontal bars grouped by scenario; `None` when no entry matches.
pub fn bars(
    entries: &[Entry],
    title: &str,
    unit: &str,
    pick: impl Fn(&Entry) -> bool,
) -> Option<String> {
    let sel: Vec<&Entry> = entries
        .iter()
        .filter(|e| pick(e) && e.figure.is_some())
        .collect();
    if sel.is_empty() {
        return None;
    }
    let mut ids: Vec<&str> = Vec::new();
    let mut paths: Vec<String> = Vec::new();
    for e in &sel {
        if !ids.contains(&e.id.as_str()) {
            ids.push(&e.id);
        }
        if !paths.contains(&e.path) {
            paths.push(e.path.clone());
        }
    }
    let (bar_h, gap, label_w, plot_w) = (18.0, 14.0, 260.0, 520.0);
    let rows: usize = ids
        .iter()
        .map(|id| sel.iter().filter(|e| e.id == *id).count())
        .sum();
    let height = 60.0 + rows as f64 * bar_h + ids.len() as f64 * (gap + 16.0) + 40.0;
    let width = label_w + plot_w + 170.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text><text x="10" y="40" fill="#555">median of the repetitions; whiskers: min–max; ratio to direct on the right</text>"##,
        esc(title)
    );
    let mut y = 60.0;
    for id in &ids {
        let group: Vec<&&Entry> = sel.iter().filter(|e| e.id == *id).collect();
        let max = group
            .iter()
            .filter_map(|e| e.figure.map(|a| a.max))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        let _ = writeln!(
            s,
            r#"<text x="10" y="{:.0}" font-weight="bold">{}</text>"#,
            y + 12.0,
            esc(id)
        );
        y += 16.0;
        for e in group {
            let a = e.figure.expect("filtered");
            let w = a.median / max * plot_w;
            let (x0, x1) = (
                label_w + a.min / max * plot_w,
                label_w + a.max / max * plot_w,
            );
            let c = color(&paths, &e.path);
            let _ = writeln!(
                s,
                r#"<text x="{:.0}" y="{:.0}" text-anchor="end">{}</text><rect x="{label_w}" y="{y:.0}" width="{w:.1}" height="{:.0}" fill="{c}"/><line x1="{x0:.1}" x2="{x1:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/><text x="{:.0}" y="{:.0}">{} {unit}{}</text>"#,
                label_w - 8.0,
                y + 13.0,
                esc(&e.path),
                bar_h - 3.0,
                y + (bar_h - 3.0) / 2.0,
                y + (bar_h - 3.0) / 2.0,
                label_w + plot_w + 8.0,
                y + 13.0,
                fmt_num(a.median),
                e.ratio
                    .filter(|_| e.path != "direct")
                    .map(|r| format!(" · {r:.2}×"))
                    .unwrap_or_default()
            );
            y += bar_h;
        }
        y += gap;
    }
    s.push_str("</svg>\n");
    Some(s)
}

fn fmt_num(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Percentile curves of one scenario; `None` without latency data.
pub fn latency(entries: &[Entry], id: &str) -> Option<String> {
    let sel: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.id == id && e.latency.is_some())
        .collect();
    if sel.is_empty() {
        return None;
    }
    let paths: Vec<String> = sel.iter().map(|e| e.path.clone()).collect();
    // (label, x position as log10(1/(1-q))); "max" is drawn one step past p99.9.
    let xs: [(&str, usize, f64); 5] = [
        ("p50", 0, 2f64.log10()),
        ("p90", 1, 1.0),
        ("p99", 2, 2.0),
        ("p99.9", 3, 3.0),
        ("max", 4, 4.0),
    ];
    let vals: Vec<f64> = sel
        .iter()
        .flat_map(|e| {
            let l = e.latency.expect("filtered");
            xs.iter().map(move |(_, i, _)| l[*i].1.median)
        })
        .filter(|v| *v > 0.0)
        .collect();
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).max(0.1);
    let hi = vals.iter().copied().fold(0.0f64, f64::max).max(lo * 10.0);
    let (l0, l1) = (lo.log10().floor(), hi.log10().ceil());
    let (left, top, pw, ph) = (70.0, 50.0, 560.0, 320.0);
    let width = left + pw + 150.0;
    let height = top + ph + 50.0;
    let px = |x: f64| left + (x - xs[0].2) / (xs[4].2 - xs[0].2) * pw;
    let py = |v: f64| top + ph - (v.max(10f64.powf(l0)).log10() - l0) / (l1 - l0).max(1e-9) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{} — latency by percentile (µs, log scale; medians of the repetitions)</text>"#,
        esc(id)
    );
    // Grid: decades.
    let mut d = l0;
    while d <= l1 + 1e-9 {
        let y = py(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{:.0}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            y + 4.0,
            fmt_num(10f64.powf(d))
        );
        d += 1.0;
    }
    for (label, _, x) in xs {
        let xx = px(x);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{:.0}" stroke="#ddd"/><text x="{xx:.1}" y="{:.0}" text-anchor="middle">{label}</text>"##,
            top + ph,
            top + ph + 18.0
        );
    }
    for (k, e) in sel.iter().enumerate() {
        let l = e.latency.expect("filtered");
        let c = color(&paths, &e.path);
        let pts: Vec<String> = xs
            .iter()
            .map(|(_, i, x)| format!("{:.1},{:.1}", px(*x), py(l[*i].1.median)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').expect("x,y");
            let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{c}"/>"#);
        }
        let ly = top + 10.0 + k as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{:.0}" y="{:.0}" width="12" height="12" fill="{c}"/><text x="{:.0}" y="{:.0}">{} (p99 {})</text>"#,
            left + pw + 14.0,
            ly - 10.0,
            left + pw + 30.0,
            ly,
            esc(&e.path),
            fmt_num(l[2].1.median)
        );
    }
    s.push_str("</svg>\n");
    Some(s)
}

/// Write every chart that has data into `dir`; returns the file names.
pub fn write_all(dir: &std::path::Path, entries: &[Entry]) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut put = |name: String, body: Option<String>| -> std::io::Result<()> {
        if let Some(b) = body {
            std::fs::write(dir.join(&name), b)?;
            out.push(name);
        }
        Ok(())
    };
    put(
        "throughput.svg".into(),
        bars(entries, "Throughput", "Gbit/s", |e| {
            e.metric == "gbit_per_s"
        }),
    )?;
    put(
        "rates.svg".into(),
        bars(entries, "Operations per second", "/s", |e| {
            matches!(
                e.metric,
                "round_trips_per_s" | "connections_per_s" | "requests_per_s"
            )
        }),
    )?;
    put(
        "idle-memory.svg".into(),
        bars(
            entries,
            "Proxy memory per connection: idle, idle HTTP, slow reader (lower is better)",
            "B",
            |e| e.metric.starts_with("bytes_per_"),
        ),
    )?;
    let mut ids: Vec<String> = Vec::new();
    for e in entries {
        let memory = matches!(
            e.scenario.as_str(),
            "idle-connections" | "idle-http" | "slow-reader"
        );
        if e.latency.is_some() && !memory && !ids.contains(&e.id) {
            ids.push(e.id.clone());
        }
    }
    for id in ids {
        let name = format!(
            "latency-{}.svg",
            id.chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                })
                .collect::<String>()
        );
        put(name, latency(entries, &id))?;
    }
    Ok(out)
}
