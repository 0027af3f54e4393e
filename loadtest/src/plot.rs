//! `--plot FILE.svg`: a self-contained SVG of the run, one point per second.
//!
//! Top panel: delivery latency p50, p99 and max (milliseconds). Bottom panel: deliveries
//! per second and open connections, each scaled to its own maximum (labelled on the
//! axis). Hand-written SVG, no dependencies; any browser shows it.

use std::fmt::Write as _;

use crate::report::{Results, TimelinePoint};

const W: f64 = 900.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;

/// Renders `results` as an SVG document.
pub fn svg(results: &Results) -> String {
    let points = &results.timeline;
    let mut s = String::new();
    let h = 2.0 * PANEL_H + 110.0;
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = format!(
        "ringcast-load {} — {}",
        results.scenario,
        escape(&results.url)
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14">{title}</text>"#
    );
    let top = 40.0;
    let latency: [Series<'_>; 3] = [
        ("p50", "#1f77b4", |p| p.p50_us / 1000.0),
        ("p99", "#ff7f0e", |p| p.p99_us / 1000.0),
        ("max", "#d62728", |p| p.max_us / 1000.0),
    ];
    panel(&mut s, points, top, "latency (ms)", &latency);
    let rate: [Series<'_>; 2] = [
        ("deliveries/s", "#2ca02c", |p| p.deliveries as f64),
        ("open connections", "#9467bd", |p| p.open as f64),
    ];
    panel(
        &mut s,
        points,
        top + PANEL_H + 40.0,
        "per second / open",
        &rate,
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since start</text>"#,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        h - 8.0
    );
    s.push_str("</svg>\n");
    s
}

/// Name, colour and value of one plotted line.
type Series<'a> = (&'a str, &'a str, fn(&TimelinePoint) -> f64);

fn panel(s: &mut String, points: &[TimelinePoint], top: f64, label: &str, series: &[Series<'_>]) {
    let width = W - LEFT - RIGHT;
    let n = points.len().max(2) as f64 - 1.0;
    let x = |i: usize| LEFT + width * i as f64 / n;
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top}" width="{width}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{label}</text>"#,
        top + PANEL_H / 2.0,
        top + PANEL_H / 2.0
    );
    for tick in 0..=4 {
        let i = (n as usize * tick) / 4;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{i}</text>"#,
            x(i),
            top + PANEL_H + 14.0
        );
    }
    // Latencies share one scale; rates and counts are each scaled to their own maximum.
    let shared = series.len() == 3;
    let shared_max = series
        .iter()
        .flat_map(|(_, _, f)| points.iter().map(f))
        .fold(0.0f64, f64::max);
    if shared {
        // One scale for all lines: label the axis itself.
        let top_label = fmt_num(if shared_max > 0.0 { shared_max } else { 1.0 });
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{top_label}</text>"#,
            LEFT - 4.0,
            top + 10.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">0</text>"#,
            LEFT - 4.0,
            top + PANEL_H
        );
    }
    for (k, (name, color, f)) in series.iter().enumerate() {
        let max = if shared {
            shared_max
        } else {
            points.iter().map(f).fold(0.0f64, f64::max)
        };
        let max = if max > 0.0 { max } else { 1.0 };
        let path: Vec<String> = points
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{:.1},{:.1}", x(i), top + PANEL_H - PANEL_H * f(p) / max))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            path.join(" ")
        );
        let legend_y = top + 16.0 + 16.0 * k as f64;
        let scale = if shared {
            String::new()
        } else {
            format!(" (top = {})", fmt_num(max))
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{legend_y}" fill="{color}">{name}{scale}</text>"#,
            LEFT + 8.0
        );
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 10_000.0 {
        crate::stats::human_count(v)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_document() {
        let results = Results {
            scenario: "fanout".into(),
            url: "ws://127.0.0.1:1/ws?channels=a&b".into(),
            timeline: (0..5)
                .map(|t| TimelinePoint {
                    t,
                    open: 10,
                    deliveries: t * 100,
                    p50_us: 100.0,
                    p99_us: 900.0,
                    max_us: 2000.0,
                    ..TimelinePoint::default()
                })
                .collect(),
            ..Results::default()
        };
        let out = svg(&results);
        assert!(out.starts_with("<svg") && out.trim_end().ends_with("</svg>"));
        assert_eq!(out.matches("<polyline").count(), 5);
        assert!(out.contains("channels=a&amp;b"));
    }
}
