//! `storm`: every subscriber loses its connection at once and comes back.
//!
//! Mode `drop`: after `--hold` seconds the harness closes all connections itself and
//! reconnects them all (at `--reconnect-rate`, default all at once). Mode
//! `server-restart`: the harness waits up to `--restart-wait` seconds for the server to go
//! away (restart it by hand or from a script) and keeps reconnecting with backoff until
//! everyone is back. Messages are published throughout at `--msg-rate`, so the report
//! shows both the time until all N are back and the messages lost meanwhile.

use std::time::{Duration, Instant};

use crate::cli::{StormArgs, StormMode};
use crate::fleet::Live;
use crate::ipc::unix_nanos;
use crate::publish::{PublishPlan, Publisher};
use crate::report::{DeliveryResults, PubResults, Results, StormResults};
use crate::stats::{self, Percentiles};

use super::{delivery_window, merge_groups, Run, ScenarioError};

/// Runs the scenario.
///
/// # Errors
/// Setup failed, no connection could be made, or the publisher failed.
pub fn run(args: &StormArgs) -> Result<Results, ScenarioError> {
    if args.msg_rate <= 0.0 || args.msg_rate.is_nan() {
        return Err(ScenarioError::Invalid("storm needs --msg-rate > 0".into()));
    }
    let mut run = Run::new("storm", &args.common, 1000)?;
    run.failures_expected = args.mode == StormMode::ServerRestart;
    let (endpoint, channel) = run.publish_target(&args.publish)?;
    let specs = run.specs(None, true, args.reconnect_rate);
    let mut fleet = run.connect(&specs)?;
    let n = run.conns;
    let wait = Duration::from_secs_f64(args.restart_wait);
    // In reconnect mode failed attempts retry; give stragglers one connect timeout.
    let until =
        (Instant::now() + Duration::from_secs_f64(run.common.connect_timeout)).min(run.deadline);
    fleet.wait_until(until, |l| l.open() == n)?;
    run.idle(&mut fleet, args.publish.settle)?;
    run.probe.mark("publish");
    let start_ns = unix_nanos();
    let budget = (args.msg_rate * run.common.timeout).ceil() as u64;
    let plan = PublishPlan {
        channels: vec![channel.clone()],
        messages: budget,
        rate: args.msg_rate,
        size: args.publish.size,
    };
    let publisher = Publisher::start(&endpoint, plan)?;
    run.idle(&mut fleet, args.hold)?;

    let mut all_back = false;
    match args.mode {
        StormMode::Drop => fleet.send(&crate::ipc::Command::Drop),
        StormMode::ServerRestart => {
            eprintln!(
                "ringcast-load: waiting up to {}s for the server to go away (restart it now)",
                args.restart_wait
            );
            let until = (Instant::now() + wait).min(run.deadline);
            if !fleet.wait_until(until, |l| l.outage().0.is_some())? {
                run.problems.push(format!(
                    "no connection was lost within --restart-wait {}s",
                    args.restart_wait
                ));
            }
        }
    }
    if fleet.live.outage().0.is_some() || args.mode == StormMode::Drop {
        let until = (Instant::now() + wait).min(run.deadline);
        all_back = fleet.wait_until(until, |l| l.outage().1.is_some() && l.open() == n)?;
        if !all_back {
            run.problems.push(format!(
                "only {} of {n} subscribers were back after {}s",
                fleet.live.open(),
                args.restart_wait
            ));
        }
    }
    run.idle(&mut fleet, args.after)?;
    publisher.stop();
    let sent = publisher.join()?;
    run.drain(
        &mut fleet,
        |l: &Live| l.deliveries,
        u64::MAX,
        Duration::from_secs(1),
        args.publish.drain,
    )?;
    run.probe.mark("drained");
    let (down, back) = fleet.live.outage();
    let finals = fleet.finish(sent.sent, Duration::from_secs(30))?;
    let mut results = run.results(&fleet, &finals);
    let (healthy, _) = merge_groups(&finals);
    let delivery = DeliveryResults::of(&healthy, sent.sent, delivery_window(&finals, start_ns));
    let mut reconnect = stats::new_hist();
    finals
        .iter()
        .for_each(|f| stats::merge_pairs(&mut reconnect, &f.reconnect));
    let time_to_all_back_ms = match (down, back) {
        (Some(down), Some(back)) if all_back => Some(back.saturating_sub(down) as f64),
        _ => None,
    };
    if delivery.duplicates > 0 || delivery.offset_regressions > 0 {
        run.problems.push(format!(
            "{} duplicate deliveries, {} offset regressions",
            delivery.duplicates, delivery.offset_regressions
        ));
    }
    results.storm = Some(StormResults {
        mode: match args.mode {
            StormMode::Drop => "drop".into(),
            StormMode::ServerRestart => "server-restart".into(),
        },
        all_back,
        time_to_all_back_ms,
        reconnect_us: Percentiles::of(&reconnect),
        lost: delivery.lost,
    });
    results.server = run
        .probe
        .results(results.connections.connected, delivery.received);
    results.publishing = Some(PubResults::new(
        &args.publish.publish,
        channel,
        &sent,
        args.msg_rate,
        args.publish.size,
    ));
    results.delivery = Some(delivery);
    run.emit(results)
}
