//! `slow`: a fraction of subscribers read slowly (or not at all); the rest must not notice.
//!
//! Slow subscribers get a small receive buffer and, after their handshake, either stop
//! reading (`--slow-mode stop`) or read `--slow-read-rate` bytes per second (`trickle`).
//! Healthy and slow subscribers are reported separately: healthy ones must lose nothing
//! and keep their latency; slow ones show what the server did about them (skipped offsets,
//! close codes such as 1013). Once the healthy deliveries are in, slow subscribers read
//! everything left so their deliveries and close frames are counted too.

use std::time::Duration;

use crate::cli::SlowArgs;
use crate::fleet::Live;
use crate::ipc::{unix_nanos, Command, SlowSpec};
use crate::publish::{PublishPlan, Publisher};
use crate::report::{DeliveryResults, PubResults, Results};

use super::{delivery_problems, delivery_window, merge_groups, Run, ScenarioError};

/// Runs the scenario.
///
/// # Errors
/// Setup failed, no connection could be made, or the publisher failed.
pub fn run(args: &SlowArgs) -> Result<Results, ScenarioError> {
    if !(0.0..=1.0).contains(&args.slow_fraction) || args.msg_rate < 0.0 {
        return Err(ScenarioError::Invalid(
            "--slow-fraction must be within 0-1 and --msg-rate >= 0".into(),
        ));
    }
    let mut run = Run::new("slow", &args.common, 200)?;
    let (endpoint, channel) = run.publish_target(&args.publish)?;
    let slow = SlowSpec {
        fraction: args.slow_fraction,
        mode: args.slow_mode,
        read_bytes_per_sec: args.slow_read_rate,
        rcvbuf: args.slow_rcvbuf,
    };
    let healthy_total = (0..run.conns).filter(|&i| !slow.is_slow(i)).count() as u64;
    let specs = run.specs(Some(slow), false, 0.0);
    let mut fleet = run.connect(&specs)?;
    run.idle(&mut fleet, args.publish.settle)?;
    run.probe.mark("publish");
    let start_ns = unix_nanos();
    let plan = PublishPlan {
        channels: vec![channel.clone()],
        messages: args.messages,
        rate: args.msg_rate,
        size: args.publish.size,
    };
    let publisher = Publisher::start(&endpoint, plan)?;
    run.await_publisher(&mut fleet, &publisher, args.messages)?;
    let sent = publisher.join()?;
    let expected = healthy_total * sent.sent;
    run.drain(
        &mut fleet,
        |l: &Live| l.deliveries,
        expected,
        Duration::from_secs(2),
        args.publish.drain,
    )?;
    run.probe.mark("drained");
    fleet.send(&Command::Resume);
    run.drain(
        &mut fleet,
        |l: &Live| l.slow_deliveries + l.closes,
        u64::MAX,
        Duration::from_secs(1),
        args.publish.drain,
    )?;
    let finals = fleet.finish(sent.sent, Duration::from_secs(30))?;
    let mut results = run.results(&fleet, &finals);
    let (healthy, slow) = merge_groups(&finals);
    let window = delivery_window(&finals, start_ns);
    let healthy = DeliveryResults::of(&healthy, sent.sent, window);
    delivery_problems(&mut run.problems, "healthy subscribers", &healthy);
    if !healthy.close_codes.is_empty() {
        run.problems.push(format!(
            "healthy subscribers were closed by the server: {:?}",
            healthy.close_codes
        ));
    }
    let slow = DeliveryResults::of(&slow, sent.sent, window);
    if slow.duplicates > 0 || slow.offset_regressions > 0 {
        run.problems.push(format!(
            "slow subscribers: {} duplicates, {} offset regressions",
            slow.duplicates, slow.offset_regressions
        ));
    }
    results.server = run.server_results(
        results.connections.connected,
        healthy.received + slow.received,
    );
    results.publishing = Some(PubResults::new(
        &args.publish.publish,
        channel,
        &sent,
        args.msg_rate,
        args.publish.size,
    ));
    results.delivery = Some(healthy);
    results.slow = Some(slow);
    run.emit(results)
}
