//! `recover`: a recovery storm. Subscribers spread over K channels drop at once while
//! publishing goes on; each comes back with `subscribe` + `since` and must end the run
//! with every message of its channel exactly once, in order.
//!
//! Subscriber i connects without channels in the URL and sends
//! `{"cmd":"subscribe","channel":"<prefix>-<i mod K>"}`; the reply's `offset` and `epoch`
//! are its position. Once every subscriber has one, messages are published round-robin
//! over the K channels at `--msg-rate`; after `--hold` seconds the harness drops every
//! connection (as `storm --mode drop`) and each reconnects (at `--reconnect-rate`) and
//! subscribes with `"since":{"offset":<last received>,"epoch":"<epoch>"}`. Publishing
//! goes on `--after` seconds once every subscriber has its answer. Reported: recovered
//! true/false (with reasons), time from the drop to each `"recovered":true` reply and to
//! the last replayed message, messages replayed vs live, and per-subscriber offset
//! accounting (gaps, duplicates, reordering).

use std::time::{Duration, Instant};

use crate::cli::{RecoverArgs, DEFAULT_URL};
use crate::fleet::Live;
use crate::ipc::{unix_nanos, Command, RecoverFinal, RecoverSpec};
use crate::publish::{PublishPlan, Publisher};
use crate::recover::{published_to, RecoverCounts};
use crate::report::{DeliveryResults, PubResults, RecoverResults, Results};
use crate::stats::{self, Percentiles};
use crate::target::PublishTarget;

use super::{delivery_problems, delivery_window, merge_groups, Run, ScenarioError};

/// Runs the scenario.
///
/// # Errors
/// Bad options, setup failed, no connection could be made, or the publisher failed.
pub fn run(args: &RecoverArgs) -> Result<Results, ScenarioError> {
    let positive = |v: f64| v > 0.0 && v.is_finite();
    let non_negative = |v: f64| v >= 0.0 && v.is_finite();
    if args.channels == 0
        || !positive(args.msg_rate)
        || !positive(args.within)
        || ![
            args.hold,
            args.after,
            args.reconnect_rate,
            args.recover_wait,
        ]
        .into_iter()
        .all(non_negative)
    {
        return Err(ScenarioError::Invalid(
            "recover needs --channels >= 1, --msg-rate > 0, --within > 0, and --hold, \
             --after, --reconnect-rate, --recover-wait >= 0"
                .into(),
        ));
    }
    let mut run = Run::new("recover", &args.common, 10_000)?;
    if run.target.channel().is_some() {
        if args.common.url != DEFAULT_URL {
            return Err(ScenarioError::Invalid(format!(
                "recover subscribes by command: give a --url without channels= (e.g. ws://{}{})",
                run.target.host,
                run.target.without_channels().path
            )));
        }
        run.target = run.target.without_channels();
    }
    let (endpoint, _) = run.publish_target(&args.publish)?;
    if endpoint.iter().any(|e| matches!(e, PublishTarget::Ws(_))) {
        return Err(ScenarioError::Invalid(
            "recover publishes to K channels: use a udp://, tcp:// or http:// --publish endpoint"
                .into(),
        ));
    }
    let prefix = args
        .publish
        .channel
        .clone()
        .unwrap_or_else(|| "recover".into());
    let k = args.channels;
    let spec = RecoverSpec {
        prefix: prefix.clone(),
        channels: k,
    };
    let mut specs = run.specs(None, true, args.reconnect_rate);
    for s in &mut specs {
        s.recover = Some(spec.clone());
    }
    let mut fleet = run.connect(&specs)?;
    let n = run.conns;
    // Failed attempts retry; give stragglers one connect timeout to subscribe.
    let until = (Instant::now() + Duration::from_secs_f64(run.common.connect_timeout + 1.0))
        .min(run.deadline);
    if !fleet.wait_until(until, |l| l.subscribed() >= n)? {
        run.problems.push(format!(
            "only {} of {n} subscribers had their position before publishing started",
            fleet.live.subscribed()
        ));
    }
    run.idle(&mut fleet, args.publish.settle)?;
    run.probe.mark("publish");
    let start_ns = unix_nanos();
    let plan = PublishPlan {
        channels: (0..k).map(|j| format!("{prefix}-{j}")).collect(),
        messages: (args.msg_rate * run.common.timeout).ceil() as u64,
        rate: args.msg_rate,
        size: args.publish.size,
    };
    let publisher = Publisher::start(&endpoint, plan)?;
    fleet.status = "publishing".into();
    run.idle(&mut fleet, args.hold)?;

    run.probe.mark("drop");
    fleet.status = "dropped; recovering".into();
    fleet.send(&Command::Drop);
    let until = (Instant::now() + Duration::from_secs_f64(args.recover_wait)).min(run.deadline);
    let answered = fleet.wait_until(until, |l| l.resubscribed() >= n)?;
    run.probe.mark("answered");
    if !answered {
        run.problems.push(format!(
            "only {} of {n} subscribers had an answer to their recovery after {}s",
            fleet.live.resubscribed(),
            args.recover_wait
        ));
    }
    fleet.status = "all answered; publishing".into();
    run.idle(&mut fleet, args.after)?;
    publisher.stop();
    let sent = publisher.join()?;
    fleet.status = format!("published {}", sent.sent);
    let expected: u64 = (0..k)
        .map(|j| subscribers_of(n, k, j) * published_to(sent.sent, k, j))
        .sum();
    let complete = run.drain(
        &mut fleet,
        |l: &Live| l.deliveries,
        expected,
        Duration::from_secs(2),
        args.publish.drain,
    )?;
    run.probe.mark("drained");
    let finals = fleet.finish(sent.sent, Duration::from_secs(30))?;
    let mut results = run.results(&fleet, &finals);
    let (healthy, _) = merge_groups(&finals);
    let mut delivery = DeliveryResults::of(&healthy, sent.sent, delivery_window(&finals, start_ns));
    let rf = merge_recover(finals.iter().filter_map(|f| f.recover.as_ref()));
    delivery.expected = rf.expected;
    if !complete && delivery.unique < delivery.expected {
        run.problems.push(format!(
            "deliveries stopped arriving before all were received (drain {}s)",
            args.publish.drain
        ));
    }
    delivery_problems(&mut run.problems, "subscribers", &delivery);
    let mut recover = recover_results(&rf, n, k, args.within);
    recover.resubscribed = fleet.live.resubscribed();
    recover_problems(&mut run.problems, &recover, n);
    if sent.errors > 0 {
        run.problems
            .push(format!("{} messages could not be published", sent.errors));
    }
    results.recover = Some(RecoverResults {
        server_cpu_recovery_secs: run.probe.cpu_between("drop", "answered"),
        ..recover
    });
    results.server = run.server_results(results.connections.connected, delivery.received);
    results.publishing = Some(PubResults::new(
        &args.publish.publish,
        format!("{prefix}-0 … {prefix}-{}", k - 1),
        &sent,
        args.msg_rate,
        args.publish.size,
    ));
    results.delivery = Some(delivery);
    run.emit(results)
}

/// How many of subscribers `0..n` use channel `j` of `k` (subscriber i uses `i mod k`).
fn subscribers_of(n: u64, k: u64, j: u64) -> u64 {
    published_to(n, k, j)
}

/// Sums the workers' `recover` reports (histograms merged, latest times kept).
fn merge_recover<'a>(finals: impl Iterator<Item = &'a RecoverFinal>) -> RecoverFinal {
    let mut out = RecoverFinal::default();
    let (mut recovered, mut caught_up) = (stats::new_hist(), stats::new_hist());
    for f in finals {
        out.counts.add(&f.counts);
        out.expected += f.expected;
        out.subscribers_with_problems += f.subscribers_with_problems;
        out.drop_ms = min_some(out.drop_ms, f.drop_ms);
        out.last_recovered_ms = out.last_recovered_ms.max(f.last_recovered_ms);
        out.last_caught_up_ms = out.last_caught_up_ms.max(f.last_caught_up_ms);
        stats::merge_pairs(&mut recovered, &f.recovered);
        stats::merge_pairs(&mut caught_up, &f.caught_up);
    }
    out.recovered = stats::to_pairs(&recovered);
    out.caught_up = stats::to_pairs(&caught_up);
    out
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The report section from the merged worker numbers (`resubscribed` is the caller's).
fn recover_results(rf: &RecoverFinal, n: u64, k: u64, within: f64) -> RecoverResults {
    let hist = |pairs: &[(u64, u64)]| {
        let mut h = stats::new_hist();
        stats::merge_pairs(&mut h, pairs);
        Percentiles::of(&h)
    };
    let c: &RecoverCounts = &rf.counts;
    let all_recovered = n > 0 && c.recovered >= n && rf.counts.failed_recoveries() == 0;
    let since_drop = |at: Option<u64>| match (rf.drop_ms, at) {
        (Some(drop), Some(at)) => Some(at.saturating_sub(drop) as f64),
        _ => None,
    };
    let time_to_recovered_us = hist(&rf.recovered);
    let time_to_caught_up_us = hist(&rf.caught_up);
    RecoverResults {
        channels: k,
        subscribed: c.subscribed,
        resubscribed: 0,
        recovered: c.recovered,
        not_recovered: c.not_recovered.values().sum(),
        not_recovered_reasons: c.not_recovered.clone(),
        reply_errors: c.reply_errors.clone(),
        all_recovered,
        time_to_all_recovered_ms: since_drop(rf.last_recovered_ms).filter(|_| all_recovered),
        time_to_recovered_us,
        time_to_all_caught_up_ms: since_drop(rf.last_caught_up_ms)
            .filter(|_| all_recovered && time_to_caught_up_us.count >= n),
        time_to_caught_up_us,
        within_secs: within,
        replayed: c.replayed,
        live: c.live,
        gap_notices: c.gap_notices,
        below_position: c.below_position,
        before_subscribe: c.before_subscribe,
        epoch_changes: c.epoch_changes,
        subscribers_with_problems: rf.subscribers_with_problems,
        server_cpu_recovery_secs: None,
    }
}

/// Everything in the recovery section that is not as promised.
fn recover_problems(problems: &mut Vec<String>, r: &RecoverResults, n: u64) {
    if r.not_recovered > 0 {
        problems.push(format!(
            "{} subscribers were told \"recovered\":false: {:?}",
            r.not_recovered, r.not_recovered_reasons
        ));
    }
    if !r.reply_errors.is_empty() {
        problems.push(format!("subscribe replies failed: {:?}", r.reply_errors));
    }
    if r.recovered < n {
        problems.push(format!(
            "only {} of {n} subscribers recovered after the drop",
            r.recovered
        ));
    }
    match r.time_to_all_recovered_ms {
        Some(ms) if ms > r.within_secs * 1000.0 => problems.push(format!(
            "the last subscriber recovered {:.1}s after the drop, later than --within {}s",
            ms / 1000.0,
            r.within_secs
        )),
        _ => {}
    }
    for (what, count) in [
        (
            "gap notices (offsets skipped for a subscriber)",
            r.gap_notices,
        ),
        (
            "messages at or below a subscriber's position",
            r.below_position,
        ),
        ("messages before any subscribe reply", r.before_subscribe),
        ("replies with a changed epoch", r.epoch_changes),
    ] {
        if count > 0 {
            problems.push(format!("{count} {what}"));
        }
    }
    if r.subscribers_with_problems > 0 {
        problems.push(format!(
            "{} of {n} subscribers did not get every message of their channel exactly once, in order",
            r.subscribers_with_problems
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_spread_like_messages() {
        assert_eq!(subscribers_of(10_000, 100, 7), 100);
        assert_eq!(subscribers_of(5, 3, 0) + subscribers_of(5, 3, 1), 4);
    }

    #[test]
    fn clean_numbers_have_no_problem_and_late_ones_do() {
        let mut rf = RecoverFinal {
            drop_ms: Some(1_000),
            last_recovered_ms: Some(3_000),
            last_caught_up_ms: Some(3_100),
            ..RecoverFinal::default()
        };
        rf.counts.subscribed = 2;
        rf.counts.recovered = 2;
        let mut h = stats::new_hist();
        stats::record(&mut h, 1_500_000_000);
        stats::record(&mut h, 2_000_000_000);
        rf.recovered = stats::to_pairs(&h);
        rf.caught_up = stats::to_pairs(&h);
        let r = recover_results(&rf, 2, 1, 10.0);
        assert!(r.all_recovered);
        assert_eq!(r.time_to_all_recovered_ms, Some(2_000.0));
        assert_eq!(r.time_to_all_caught_up_ms, Some(2_100.0));
        let mut problems = Vec::new();
        recover_problems(&mut problems, &r, 2);
        assert!(problems.is_empty(), "{problems:?}");
        let late = recover_results(&rf, 2, 1, 1.0);
        recover_problems(&mut problems, &late, 2);
        assert_eq!(problems.len(), 1, "{problems:?}");
        rf.counts.not_recovered.insert("too_old".into(), 1);
        let refused = recover_results(&rf, 2, 1, 10.0);
        assert!(!refused.all_recovered);
        assert_eq!(refused.time_to_all_recovered_ms, None);
    }
}
