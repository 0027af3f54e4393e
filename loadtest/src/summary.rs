//! The summary table printed at the end of every run: one line per aspect (connections,
//! handshakes, publishing, deliveries per group, storm, recovery, server ratios), then warnings and
//! either `result OK` or one `PROBLEM` line per finding.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::report::Results;
use crate::stats::{human_count, human_us, Percentiles};

/// The human summary printed at the end of a run.
pub fn table(r: &Results) -> String {
    let mut s = String::new();
    let c = &r.connections;
    let _ = writeln!(
        s,
        "\n== ringcast-load {} {} ({:.1}s, {} worker process(es), {} source IP(s))",
        r.scenario, r.url, r.elapsed_secs, c.workers, c.source_ips
    );
    let _ = writeln!(
        s,
        "connections  requested {}  connected {}  open at end {}  failed attempts {}",
        c.requested, c.connected, c.open_at_end, c.failed
    );
    let _ = writeln!(
        s,
        "ramp         {:.2}s  {}/s",
        c.ramp_secs,
        human_count(c.connect_rate)
    );
    let _ = writeln!(s, "handshake    {}", pcts(&c.handshake_us));
    if !c.failures.is_empty() {
        let _ = writeln!(s, "failures     {}", counts(&c.failures));
    }
    if !c.close_codes.is_empty() {
        let _ = writeln!(s, "close codes  {}", counts(&c.close_codes));
    }
    if let Some(p) = &r.publishing {
        let rate = if p.target_rate > 0.0 {
            format!("{}/s", human_count(p.target_rate))
        } else {
            "burst".into()
        };
        let _ = writeln!(
            s,
            "publish      {} messages to {:?} via {} ({rate}, achieved {}/s), errors {}",
            p.messages,
            p.channel,
            p.endpoint,
            human_count(p.achieved_rate),
            p.errors
        );
    }
    for (name, d) in [("delivery", &r.delivery), ("slow subs", &r.slow)] {
        let Some(d) = d else { continue };
        let _ = writeln!(s, "{name:<12} subscribers {}  expected {}  received {}  lost {}  duplicates {}  out-of-order {}  ({}/s)",
            d.subscribers, d.expected, d.received, d.lost, d.duplicates, d.out_of_order, human_count(d.deliveries_per_sec));
        if d.offset_skipped + d.offset_regressions + d.unparsed > 0 {
            let _ = writeln!(
                s,
                "             offsets skipped {}  offset regressions {}  unparsed {}",
                d.offset_skipped, d.offset_regressions, d.unparsed
            );
        }
        let _ = writeln!(s, "  latency    {}", pcts(&d.latency_us));
        if !d.close_codes.is_empty() {
            let _ = writeln!(s, "  closes     {}", counts(&d.close_codes));
        }
    }
    if let Some(st) = &r.storm {
        let back = st
            .time_to_all_back_ms
            .map_or("never".into(), |ms| format!("{ms:.0} ms"));
        let _ = writeln!(
            s,
            "storm        mode {}  all back: {} ({back})  messages lost {}",
            st.mode, st.all_back, st.lost
        );
        let _ = writeln!(s, "  reconnect  {}", pcts(&st.reconnect_us));
    }
    if let Some(rc) = &r.recover {
        let ms = |v: Option<f64>| v.map_or("never".into(), |ms| format!("{ms:.0} ms"));
        let _ = writeln!(
            s,
            "recover      {} channels  subscribed {}  answered after drop {}  recovered true {}  false {}{}",
            rc.channels,
            rc.subscribed,
            rc.resubscribed,
            rc.recovered,
            rc.not_recovered,
            if rc.not_recovered_reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", counts(&rc.not_recovered_reasons))
            }
        );
        let _ = writeln!(
            s,
            "  all recovered: {} ({} after the drop, within {}s asked)  all caught up: {}",
            rc.all_recovered,
            ms(rc.time_to_all_recovered_ms),
            rc.within_secs,
            ms(rc.time_to_all_caught_up_ms)
        );
        let _ = writeln!(s, "  recovered  {}", pcts(&rc.time_to_recovered_us));
        let _ = writeln!(s, "  caught up  {}", pcts(&rc.time_to_caught_up_us));
        let _ = writeln!(
            s,
            "  messages   replayed {}  live {}  gap notices {}  subscribers with problems {}{}",
            rc.replayed,
            rc.live,
            rc.gap_notices,
            rc.subscribers_with_problems,
            rc.server_cpu_recovery_secs
                .map_or(String::new(), |c| format!(
                    "  server cpu drop→answered {c:.2}s"
                ))
        );
    }
    if let Some(sv) = &r.server {
        let per_cpu = sv.deliveries_per_cpu_sec.map_or("n/a".into(), human_count);
        let who = if sv.pids.len() > 1 {
            format!("pids {} (summed)", sv.pids.len())
        } else {
            format!("pid {}", sv.pid)
        };
        let _ = writeln!(s, "server {who}  rss {} -> {} MB ({:.0} B/conn)  cpu connect {:.2}s  delivery {:.2}s ({:.0}%)  {} deliveries/cpu-s",
            sv.rss_before_bytes >> 20, sv.rss_connected_bytes >> 20, sv.rss_per_connection_bytes,
            sv.cpu_connect_secs, sv.cpu_delivery_secs, sv.cpu_percent_during_delivery, per_cpu);
    }
    for t in r.targets.iter().flatten() {
        let _ = writeln!(
            s,
            "target       {}  requested {}  connected {}  open at end {}  failed {}  received {}  ({} worker(s))",
            t.url, t.requested, t.connected, t.open_at_end, t.failed, t.received, t.workers
        );
    }
    let _ = writeln!(
        s,
        "client       worker cpu {:.2}s",
        r.client.worker_cpu_secs
    );
    for w in &r.warnings {
        let _ = writeln!(s, "warning      {w}");
    }
    if r.problems.is_empty() {
        let _ = writeln!(s, "result       OK");
    } else {
        for p in &r.problems {
            let _ = writeln!(s, "PROBLEM      {p}");
        }
    }
    s
}

fn pcts(p: &Percentiles) -> String {
    if p.count == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
        human_us(p.p50),
        human_us(p.p90),
        human_us(p.p99),
        human_us(p.p999),
        human_us(p.max),
        p.count
    )
}

fn counts<K: std::fmt::Display>(map: &BTreeMap<K, u64>) -> String {
    map.iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
