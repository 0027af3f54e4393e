//! `fanout` and `latency`: subscribers on one channel, numbered messages published, every
//! delivery accounted for.
//!
//! `fanout` publishes `--messages` at `--msg-rate` (0: one burst) and reports deliveries
//! per second, latency percentiles and expected vs received deliveries (lost, duplicated,
//! out of order). `latency` is the same run at a fixed low rate for `--duration` seconds,
//! with fewer subscribers by default, so the percentiles describe an unloaded server.

use std::time::Duration;

use crate::cli::{Common, FanoutArgs, LatencyArgs, PublishArgs};
use crate::fleet::Live;
use crate::ipc::unix_nanos;
use crate::publish::{PublishPlan, Publisher};
use crate::report::{DeliveryResults, PubResults, Results};

use super::{delivery_problems, delivery_window, merge_groups, Run, ScenarioError};

/// Runs `fanout`.
///
/// # Errors
/// Setup failed, no connection could be made, or the publisher failed.
pub fn run_fanout(args: &FanoutArgs) -> Result<Results, ScenarioError> {
    deliver(
        "fanout",
        &args.common,
        &args.publish,
        args.messages,
        args.msg_rate,
        1000,
    )
}

/// Runs `latency`.
///
/// # Errors
/// As for `fanout`; also a rate that is not positive.
pub fn run_latency(args: &LatencyArgs) -> Result<Results, ScenarioError> {
    if !(args.msg_rate > 0.0 && args.duration > 0.0) {
        return Err(ScenarioError::Invalid(
            "latency needs --msg-rate > 0 and --duration > 0".into(),
        ));
    }
    let messages = (args.msg_rate * args.duration).ceil() as u64;
    deliver(
        "latency",
        &args.common,
        &args.publish,
        messages,
        args.msg_rate,
        100,
    )
}

fn deliver(
    name: &'static str,
    common: &Common,
    publish: &PublishArgs,
    messages: u64,
    rate: f64,
    default_conns: u64,
) -> Result<Results, ScenarioError> {
    if rate < 0.0 {
        return Err(ScenarioError::Invalid("--msg-rate must be >= 0".into()));
    }
    let mut run = Run::new(name, common, default_conns)?;
    let (endpoint, channel) = run.publish_target(publish)?;
    let specs = run.specs(None, false, 0.0);
    let mut fleet = run.connect(&specs)?;
    run.idle(&mut fleet, publish.settle)?;
    let subscribers = fleet.live.open();
    run.probe.mark("publish");
    let start_ns = unix_nanos();
    let plan = PublishPlan {
        channels: vec![channel.clone()],
        messages,
        rate,
        size: publish.size,
    };
    let publisher = Publisher::start(&endpoint, plan)?;
    run.await_publisher(&mut fleet, &publisher, messages)?;
    let sent = publisher.join()?;
    let expected = subscribers * sent.sent;
    let complete = run.drain(
        &mut fleet,
        |l: &Live| l.deliveries,
        expected,
        Duration::from_secs(2),
        publish.drain,
    )?;
    run.probe.mark("drained");
    let finals = fleet.finish(sent.sent, finish_wait(subscribers))?;
    let mut results = run.results(&fleet, &finals);
    let (healthy, _) = merge_groups(&finals);
    let delivery = DeliveryResults::of(&healthy, sent.sent, delivery_window(&finals, start_ns));
    if !complete && delivery.unique < delivery.expected {
        run.problems.push(format!(
            "deliveries stopped arriving before all were received (drain {}s)",
            publish.drain
        ));
    }
    delivery_problems(&mut run.problems, "subscribers", &delivery);
    if sent.errors > 0 {
        run.problems
            .push(format!("{} messages could not be published", sent.errors));
    }
    results.server = run
        .probe
        .results(results.connections.connected, delivery.received);
    results.publishing = Some(PubResults::new(
        &publish.publish,
        channel,
        &sent,
        rate,
        publish.size,
    ));
    results.delivery = Some(delivery);
    run.emit(results)
}

/// How long the workers get to report back after the drain: 30 s, plus 1 s per 5,000
/// connections they hold (a 1M run over 67 workers on a starved CPU took more than 30 s).
fn finish_wait(connections: u64) -> Duration {
    Duration::from_secs(30 + connections / 5_000)
}
