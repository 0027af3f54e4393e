//! An SSE stream's recovery against its backlog bound, and an SSE client that does not
//! read, driven through the real shard core on socketpairs.

use super::*;
use crate::fanout::history::{HistoryStats, Limits};
use crate::fanout::publisher::Publisher;
use crate::fanout::ring::Ring;
use crate::fanout::wake::IdleFlags;
use crate::metrics::CloseCause;
use crate::proto::conn::Tick;
use crate::proto::sse::Mode;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

const BACKLOG: usize = 65536;
const STALL: u32 = 3;

/// A shard whose channels keep 10 000 messages, with a 64 KiB backlog bound.
fn shard_with_history() -> (Shard, Arc<Publisher>) {
    let mut settings =
        crate::config::resolve(Default::default(), Default::default()).expect("default settings");
    settings.live.max_backlog_bytes = BACKLOG;
    settings.max_recovery_messages = 10_000;
    settings.live.slow_consumer_timeout = std::time::Duration::from_secs(u64::from(STALL));
    let publisher = Arc::new(
        Publisher::new(Arc::new(Ring::new(4096)), Arc::new(IdleFlags::new(1))).with_history(
            |_| Limits {
                size: 10_000,
                ttl: 3600,
            },
            1 << 30,
            Arc::new(HistoryStats::default()),
        ),
    );
    let shard = Shard::for_tests_with(settings, publisher.clone(), None);
    (shard, publisher)
}

/// Publishes `n` messages of ~`size` bytes to `channel` and lets the shard's follower
/// position pass them (they are history, not live); returns the channel's epoch.
fn publish(shard: &Shard, publisher: &Publisher, channel: &str, n: u64, size: usize) -> u64 {
    let pad = "x".repeat(size);
    let mut epoch = 0;
    for i in 1..=n {
        epoch = publisher
            .publish(
                channel,
                format!("{{\"i\":{i},\"pad\":\"{pad}\"}}").as_bytes(),
            )
            .epoch;
    }
    shard.engine.ring_cursor.set(publisher.ring().head());
    epoch
}

/// An SSE stream resuming `channels` from `since`, on a socketpair whose kernel buffers
/// are as small as allowed; its peer end is returned, not read.
fn sse_from(shard: &Shard, channels: &[String], since: &str) -> (u32, UnixStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    setsockopt(&ours, sockopt::SndBuf, &4096).expect("SO_SNDBUF");
    setsockopt(&theirs, sockopt::RcvBuf, &4096).expect("SO_RCVBUF");
    theirs.set_nonblocking(true).expect("nonblocking peer");
    let since = Position::parse(since).expect("position");
    let key = shard.engine.conns.borrow().next_key();
    let stream = HttpStream::new(Mode::Sse, channels, Some(&since));
    adopt_stream(
        shard,
        OwnedFd::from(ours),
        channels,
        None,
        stream,
        Some(&since),
        Carried::default(),
    );
    (key, theirs)
}

/// Reads what the peer has, returns whether anything came.
fn read_peer(peer: &mut UnixStream, into: &mut Vec<u8>) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 65536];
    let mut any = false;
    loop {
        match peer.read(&mut buf) {
            Ok(0) => return any,
            Ok(n) => {
                any = true;
                into.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return any,
            Err(e) => panic!("reading the peer: {e}"),
        }
    }
}

/// Offsets of the message events of `channel` in an SSE stream's text.
fn offsets(text: &str, channel: &str) -> Vec<u64> {
    let prefix = format!("data: {{\"channel\":\"{channel}\",\"offset\":");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect()
}

/// Regression: a recovery's replay was queued whole whatever the backlog held, so one
/// request for channels with long histories made the server hold megabytes for it.
#[test]
fn an_sse_replay_past_the_backlog_lags_then_catches_up_exactly() {
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    ex.run(async {
        let (shard, publisher) = shard_with_history();
        let channels = vec!["h".to_string(), "k".to_string()];
        let epoch_h = publish(&shard, &publisher, "h", 400, 1000);
        let epoch_k = publish(&shard, &publisher, "k", 50, 1000);
        let since = format!("h~1~{epoch_h},k~0~{epoch_k}");
        let (key, mut peer) = sse_from(&shard, &channels, &since);
        {
            let mut conns = shard.engine.conns.borrow_mut();
            let conn = conns.get_mut(key).expect("open stream");
            let queued = conn.machine.backlog().bytes();
            // One event over the bound at most: the last admitted one is queued whole.
            assert!(
                queued <= BACKLOG + 2048,
                "{queued} bytes queued for a {BACKLOG}-byte backlog"
            );
            assert!(conn.machine.is_lagging(), "the rest comes from history");
            // The backlog gauge counts what is queued (the gauge is process-wide: tests
            // running at once share it, so this connection's share is checked).
            assert_eq!(conn.machine.backlog_gauge_delta(), 0);
        }
        // The client reads: every writable edge writes and takes the next part.
        let mut wire = Vec::new();
        for _ in 0..10_000 {
            read_peer(&mut peer, &mut wire);
            let mut conns = shard.engine.conns.borrow_mut();
            let conn = conns.get_mut(key).expect("open stream");
            if !conn.machine.is_lagging() && conn.machine.backlog().is_empty() {
                break;
            }
            shard.flush_or_close(key, conn);
            shard.engine.catch_up(&shard, key, conn);
        }
        read_peer(&mut peer, &mut wire);
        let text = String::from_utf8(wire).expect("UTF-8");
        assert_eq!(offsets(&text, "h"), (2..=400).collect::<Vec<u64>>());
        assert_eq!(offsets(&text, "k"), (1..=50).collect::<Vec<u64>>());
        // The last id resumes where the stream is on both channels.
        let last = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("id: "))
            .expect("ids");
        assert_eq!(
            Position::parse_for(last, &channels).map(|p| p.encode()),
            Ok(format!("h~400~{epoch_h},k~50~{epoch_k}"))
        );
        let mut conns = shard.engine.conns.borrow_mut();
        let conn = conns.get_mut(key).expect("open stream");
        assert_eq!(conn.machine.backlog_gauge_delta(), 0);
    });
}

/// Ticks `key` at shard seconds `from..to`; the close decided, if any.
fn tick(shard: &Shard, key: u32, from: u32, to: u32) -> Option<CloseCause> {
    let mut conns = shard.engine.conns.borrow_mut();
    let conn = conns.get_mut(key).expect("open stream");
    (from..to).find_map(
        |now| match conn.machine.on_tick(now, &shard.engine.conn_config.get()) {
            Tick::Close(close) => Some(close.cause),
            _ => None,
        },
    )
}

/// An SSE client that reads nothing is closed as a slow consumer after
/// `slow_consumer_timeout`, whether its replay made it lag or fit in its backlog.
#[test]
fn an_sse_client_that_does_not_read_is_closed_as_a_slow_consumer() {
    let ex = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    ex.run(async {
        let (shard, publisher) = shard_with_history();
        let channels = vec!["h".to_string()];
        let epoch = publish(&shard, &publisher, "h", 400, 1000);
        let now = shard.now_secs();
        // Lagging: more history than the backlog holds.
        let (lagging, _peer) = sse_from(&shard, &channels, &format!("h~0~{epoch}"));
        assert_eq!(
            tick(&shard, lagging, now, now + STALL + 3),
            Some(CloseCause::SlowConsumer)
        );
        // Not lagging: what it missed fits in the backlog, but the socket takes none
        // of it after the kernel's buffers.
        let (stuck, _peer) = sse_from(&shard, &channels, &format!("h~360~{epoch}"));
        {
            let conns = shard.engine.conns.borrow();
            let conn = conns.get(stuck).expect("open stream");
            assert!(!conn.machine.is_lagging());
            assert!(!conn.machine.backlog().is_empty(), "the kernel took it all");
        }
        assert_eq!(
            tick(&shard, stuck, now, now + STALL + 3),
            Some(CloseCause::SlowConsumer)
        );
    });
}
