//! Durable inbox throughput: TCP publishers in ack mode (`ACK ON`) against a running
//! ringcast with `inbox = true`, each keeping `window` messages in flight to `user:<n>`
//! channels, for `secs` seconds.
//!
//! ```sh
//! ringcast --inbox true --data-dir /tmp/rc-bench &
//! cargo run --release --example inbox_ack_load -- 127.0.0.1:9001 127.0.0.1:9090 [conns] [secs] [window] [payload_bytes]
//! ```
//!
//! Prints messages acknowledged per second (each one committed to disk before its
//! `OK <offset>`), commits (fsyncs) per second and messages per commit from the server's
//! `/metrics`, and the publish-to-ack latency distribution (a line's send to its `OK`).

use hdrhistogram::Histogram;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn metric(admin: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(admin).expect("connecting to the admin port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("writing the scrape");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("reading /metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn publisher(
    tcp: SocketAddr,
    id: usize,
    secs: u64,
    window: usize,
    payload: &str,
) -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds");
    let stream = TcpStream::connect(tcp).expect("connecting to TCP ingest");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let mut writer = stream.try_clone().expect("cloning the stream");
    let mut reader = BufReader::new(stream);
    writer.write_all(b"ACK ON\n").expect("ACK ON");
    let end = Instant::now() + Duration::from_secs(secs);
    let mut line = String::new();
    let mut n = 0usize;
    while Instant::now() < end {
        let mut batch = String::new();
        for _ in 0..window {
            // 100 users per publisher: many channels, as a real inbox load has.
            batch.push_str(&format!("user:{}-{} {payload}\n", id, n % 100));
            n += 1;
        }
        let sent = Instant::now();
        writer.write_all(batch.as_bytes()).expect("publishing");
        for _ in 0..window {
            line.clear();
            reader.read_line(&mut line).expect("reading an ack");
            assert!(line.starts_with("OK "), "unexpected reply {line:?}");
            let _ = h.record(sent.elapsed().as_micros() as u64);
        }
    }
    h
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let tcp: SocketAddr = arg(1, "127.0.0.1:9001")
        .parse()
        .expect("TCP ingest ADDR:PORT");
    let admin: SocketAddr = arg(2, "127.0.0.1:9090").parse().expect("admin ADDR:PORT");
    let conns: usize = arg(3, "8").parse().expect("connections");
    let secs: u64 = arg(4, "10").parse().expect("seconds");
    let window: usize = arg(5, "64").parse().expect("window");
    let size: usize = arg(6, "100").parse().expect("payload bytes");
    let payload = format!("\"{}\"", "x".repeat(size.saturating_sub(2)));
    let (commits0, stored0) = (
        metric(admin, "ringcast_inbox_commits_total"),
        metric(admin, "ringcast_inbox_stored_total"),
    );
    let started = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let payload = payload.clone();
            std::thread::spawn(move || publisher(tcp, i, secs, window, &payload))
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("constant bounds");
    for t in threads {
        all.add(t.join().expect("publisher thread"))
            .expect("same bounds");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let commits = metric(admin, "ringcast_inbox_commits_total") - commits0;
    let stored = metric(admin, "ringcast_inbox_stored_total") - stored0;
    println!(
        "conns={conns} window={window} payload={size}B secs={elapsed:.1}\n\
         acked messages/s: {:.0}\ncommits (fsyncs)/s: {:.0}\nmessages/commit: {:.1}\n\
         publish->ack latency us: p50 {} p90 {} p99 {} max {}",
        all.len() as f64 / elapsed,
        commits / elapsed,
        if commits > 0.0 { stored / commits } else { 0.0 },
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.9),
        all.value_at_quantile(0.99),
        all.max()
    );
}
