//! `--plot FILE.svg`: a self-contained SVG of the run, one point per whole second, drawn
//! with `plotters` (SVG backend only: text is written as SVG `<text>`, no fonts needed).
//!
//! Top panel: delivery latency p50, p99 and max (milliseconds). Bottom panel: deliveries
//! per second (left axis) and open connections (right axis). Every axis carries its own
//! scale. A second without samples is a gap in the line, not a zero; the partial last
//! second is left out. Seconds with failed connection attempts and with server-side closes
//! are marked by vertical lines on both panels. Legends sit in a column right of the plots.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{Results, TimelinePoint};

const W: u32 = 980;
const H: u32 = 640;
/// Width of the legend column right of the plots.
const LEGEND_W: u32 = 190;

const P50: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const P99: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
const MAX: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const RATE: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const OPEN: RGBColor = RGBColor(0x94, 0x67, 0xbd);
const FAILED: RGBColor = RGBColor(0xe3, 0x1a, 0x1c);
const CLOSED: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);

/// Renders `results` as an SVG document.
pub fn svg(results: &Results) -> String {
    let mut out = String::new();
    if let Err(err) = draw(results, &mut out) {
        // Drawing into a String cannot fail for I/O; keep whatever was produced and say why.
        out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"60\"><text x=\"10\" y=\"30\">plot failed: {}</text></svg>\n",
            escape(&err.to_string())
        );
    }
    out
}

/// The whole seconds of a timeline covering `covered_secs`: a last point whose second
/// had not ended when the run did is dropped.
pub fn complete_seconds(points: &[TimelinePoint], covered_secs: f64) -> &[TimelinePoint] {
    let whole = points
        .iter()
        .take_while(|p| (p.t + 1) as f64 <= covered_secs)
        .count();
    &points[..whole]
}

/// Splits `(x, value)` samples into runs without a missing value: each run is one line
/// segment, a `None` is a gap between segments.
pub fn segments(samples: impl IntoIterator<Item = (f64, Option<f64>)>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current = Vec::new();
    for (x, value) in samples {
        match value {
            Some(y) => current.push((x, y)),
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// An upper bound for an axis whose largest value is `max`: a little headroom, never 0.
fn axis_top(max: f64) -> f64 {
    if max > 0.0 && max.is_finite() {
        max * 1.08
    } else {
        1.0
    }
}

/// One plotted line: name, colour and value (None: no sample that second).
struct Series {
    name: &'static str,
    color: RGBColor,
    value: fn(&TimelinePoint) -> Option<f64>,
}

/// A marked kind of second: label, colour, line kind, and the seconds it happened in.
struct Event {
    label: String,
    color: RGBColor,
    dashed: bool,
    seconds: Vec<f64>,
}

/// One legend line: label, colour, dashed or solid.
type Entry = (String, RGBColor, bool);

type Fail = Box<dyn std::error::Error>;

fn draw(results: &Results, out: &mut String) -> Result<(), Fail> {
    let points = complete_seconds(&results.timeline, results.timeline_secs);
    // Points sit at the start of their second; the axis ends at the last one.
    let x_max = (points.len().saturating_sub(1) as f64).max(1.0);
    let latency = [
        Series {
            name: "p50",
            color: P50,
            value: |p| (p.latency_samples > 0).then_some(p.p50_us / 1000.0),
        },
        Series {
            name: "p99",
            color: P99,
            value: |p| (p.latency_samples > 0).then_some(p.p99_us / 1000.0),
        },
        Series {
            name: "max",
            color: MAX,
            value: |p| (p.latency_samples > 0).then_some(p.max_us / 1000.0),
        },
    ];
    let rate = Series {
        name: "deliveries/s (left)",
        color: RATE,
        value: |p| (p.reports > 0).then_some(p.deliveries as f64),
    };
    let open = Series {
        name: "open conns (right)",
        color: OPEN,
        value: |p| (p.reports > 0).then_some(p.open as f64),
    };
    let events = events(results, points);

    let root = SVGBackend::with_string(out, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("ringcast-load {} — {}", results.scenario, results.url);
    let root = root.titled(&title, ("sans-serif", 16))?;
    let (plots, legend) = root.split_horizontally(W - LEGEND_W);
    let panels = plots.split_evenly((2, 1));
    let legends = legend.split_evenly((2, 1));
    let (top, bottom) = (&panels[0], &panels[1]);

    // Top: latency, one scale.
    let lat_max = latency
        .iter()
        .flat_map(|s| points.iter().filter_map(s.value))
        .fold(0.0f64, f64::max);
    let mut chart = ChartBuilder::on(top)
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .right_y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..axis_top(lat_max))?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("latency (ms)")
        .y_label_formatter(&|v| fmt_num(*v))
        .draw()?;
    mark_events(&mut chart, &events, axis_top(lat_max))?;
    for s in &latency {
        draw_series(&mut chart, points, s)?;
    }

    // Bottom: deliveries per second (left) and open connections (right).
    let rate_max = points.iter().filter_map(rate.value).fold(0.0f64, f64::max);
    let open_max = points.iter().filter_map(open.value).fold(0.0f64, f64::max);
    let mut chart = ChartBuilder::on(bottom)
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .right_y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..axis_top(rate_max))?
        .set_secondary_coord(0.0..x_max, 0.0..axis_top(open_max));
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("deliveries per second")
        .y_label_formatter(&|v| fmt_num(*v))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("open connections")
        .y_labels(6)
        .y_label_formatter(&|v| fmt_num(*v))
        .draw()?;
    mark_events(&mut chart, &events, axis_top(rate_max))?;
    draw_series(&mut chart, points, &rate)?;
    for seg in segments(points.iter().map(|p| (p.t as f64, (open.value)(p)))) {
        if seg.len() == 1 {
            chart.draw_secondary_series(
                seg.iter().map(|&p| Circle::new(p, 2, open.color.filled())),
            )?;
        } else {
            chart.draw_secondary_series(LineSeries::new(seg, open.color.stroke_width(2)))?;
        }
    }

    let mut top_entries: Vec<Entry> = latency
        .iter()
        .map(|s| (s.name.to_string(), s.color, false))
        .collect();
    let mut bottom_entries: Vec<Entry> = vec![
        (rate.name.to_string(), rate.color, false),
        (open.name.to_string(), open.color, false),
    ];
    for e in &events {
        top_entries.push((e.label.clone(), e.color, e.dashed));
        bottom_entries.push((e.label.clone(), e.color, e.dashed));
    }
    if points.is_empty() {
        top_entries.push(("no whole second recorded".into(), CLOSED, false));
    }
    draw_legend(&legends[0], &top_entries)?;
    draw_legend(&legends[1], &bottom_entries)?;
    root.present()?;
    Ok(())
}

/// Seconds with failed connection attempts and with server-side closes; a
/// `server-restart` storm calls its closes what they are.
fn events(results: &Results, points: &[TimelinePoint]) -> Vec<Event> {
    let restart = results
        .storm
        .as_ref()
        .is_some_and(|s| s.mode == "server-restart");
    let failed: Vec<f64> = points
        .iter()
        .filter(|p| p.failures > 0)
        .map(|p| p.t as f64)
        .collect();
    let closed: Vec<f64> = points
        .iter()
        .filter(|p| p.closes > 0)
        .map(|p| p.t as f64)
        .collect();
    let mut out = Vec::new();
    if !closed.is_empty() {
        let total: u64 = points.iter().map(|p| p.closes).sum();
        let label = if restart {
            format!("server restart ({total} closed)")
        } else {
            format!("server closes ({total})")
        };
        out.push(Event {
            label,
            color: CLOSED,
            dashed: false,
            seconds: closed,
        });
    }
    if !failed.is_empty() {
        let total: u64 = points.iter().map(|p| p.failures).sum();
        out.push(Event {
            label: format!("failed connects ({total})"),
            color: FAILED,
            dashed: true,
            seconds: failed,
        });
    }
    out
}

type Chart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn mark_events(chart: &mut Chart<'_, '_>, events: &[Event], y_top: f64) -> Result<(), Fail> {
    for e in events {
        for &x in &e.seconds {
            let line = [(x, 0.0), (x, y_top)];
            if e.dashed {
                let style = e.color.mix(0.8).stroke_width(1);
                chart.draw_series(DashedLineSeries::new(line, 6, 4, style))?;
            } else {
                chart.draw_series(LineSeries::new(line, e.color.mix(0.3).stroke_width(4)))?;
            }
        }
    }
    Ok(())
}

fn draw_series(
    chart: &mut Chart<'_, '_>,
    points: &[TimelinePoint],
    s: &Series,
) -> Result<(), Fail> {
    for seg in segments(points.iter().map(|p| (p.t as f64, (s.value)(p)))) {
        if seg.len() == 1 {
            chart.draw_series(seg.iter().map(|&p| Circle::new(p, 2, s.color.filled())))?;
        } else {
            chart.draw_series(LineSeries::new(seg, s.color.stroke_width(2)))?;
        }
    }
    Ok(())
}

fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>, entries: &[Entry]) -> Result<(), Fail> {
    for (k, (label, color, dashed)) in entries.iter().enumerate() {
        let y = 24 + 20 * k as i32;
        let pieces: &[(i32, i32)] = if *dashed {
            &[(8, 14), (18, 24), (28, 30)]
        } else {
            &[(8, 30)]
        };
        for &(from, to) in pieces {
            area.draw(&PathElement::new(
                [(from, y), (to, y)],
                color.stroke_width(2),
            ))?;
        }
        area.draw(&Text::new(
            label.clone(),
            (36, y - 6),
            ("sans-serif", 12).into_font().color(color),
        ))?;
    }
    Ok(())
}

fn fmt_num(v: f64) -> String {
    if v >= 10_000.0 {
        crate::stats::human_count(v)
    } else if v >= 100.0 || v == 0.0 {
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
    use crate::report::StormResults;

    fn point(t: u64) -> TimelinePoint {
        TimelinePoint {
            t,
            open: 10,
            deliveries: t * 100,
            p50_us: 100.0,
            p99_us: 900.0,
            max_us: 2000.0,
            latency_samples: 5,
            reports: 2,
            ..TimelinePoint::default()
        }
    }

    #[test]
    fn segments_split_at_gaps() {
        let v = [
            (0.0, None),
            (1.0, Some(1.0)),
            (2.0, Some(2.0)),
            (3.0, None),
            (4.0, None),
            (5.0, Some(5.0)),
        ];
        assert_eq!(
            segments(v),
            vec![vec![(1.0, 1.0), (2.0, 2.0)], vec![(5.0, 5.0)]]
        );
        assert!(segments([(0.0, None), (1.0, None)]).is_empty());
        assert!(segments(std::iter::empty()).is_empty());
        assert_eq!(segments([(0.0, Some(0.0))]), vec![vec![(0.0, 0.0)]]);
    }

    #[test]
    fn the_partial_last_second_is_dropped() {
        let points: Vec<_> = (0..4).map(point).collect();
        assert_eq!(complete_seconds(&points, 3.6).len(), 3);
        assert_eq!(complete_seconds(&points, 4.0).len(), 4);
        assert_eq!(complete_seconds(&points, 9.0).len(), 4);
        assert_eq!(complete_seconds(&points, 0.5).len(), 0);
        assert_eq!(complete_seconds(&[], 3.0).len(), 0);
    }

    #[test]
    fn axis_tops_are_never_zero() {
        assert_eq!(axis_top(0.0), 1.0);
        assert_eq!(axis_top(f64::NAN), 1.0);
        assert!(axis_top(50.0) > 50.0);
    }

    #[test]
    fn renders_a_document_with_gaps_events_and_scales() {
        let mut timeline: Vec<_> = (0..6).map(point).collect();
        // Second 2: no latency sample; second 3: no report at all; second 4: a restart.
        timeline[2].latency_samples = 0;
        timeline[3].reports = 0;
        timeline[3].latency_samples = 0;
        timeline[4].closes = 7;
        timeline[4].failures = 3;
        let results = Results {
            scenario: "storm".into(),
            url: "ws://127.0.0.1:1/ws?channels=a&b".into(),
            timeline,
            timeline_secs: 5.5,
            storm: Some(StormResults {
                mode: "server-restart".into(),
                ..StormResults::default()
            }),
            ..Results::default()
        };
        let out = svg(&results);
        assert!(out.starts_with("<svg"), "{out}");
        assert!(out.trim_end().ends_with("</svg>"));
        assert!(out.contains("channels=a&amp;b"));
        for text in [
            "latency (ms)",
            "deliveries per second",
            "open connections",
            "seconds since start",
            "server restart (7 closed)",
            "failed connects (3)",
            "p99",
        ] {
            assert!(out.contains(text), "missing {text:?}");
        }
        assert!(!out.contains("plot failed"), "{out}");
    }

    #[test]
    fn an_empty_timeline_still_renders() {
        let out = svg(&Results::default());
        assert!(out.contains("no whole second recorded"), "{out}");
        assert!(!out.contains("plot failed"), "{out}");
    }
}
