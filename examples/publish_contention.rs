//! Stripe-lock contention in the publisher: N producer threads publishing as fast as they
//! can, to one shared channel or to one channel each.
//!
//! ```sh
//! cargo run --release --example publish_contention -- [threads] [secs] [payload_bytes]
//! ```
//!
//! Prints, for each scenario, publishes per second over all threads and the lock wait and
//! whole-publish latency distributions (nanoseconds). The ring has no consumers: this
//! measures the producer side only.

use hdrhistogram::Histogram;
use ringcast::fanout::publisher::Publisher;
use ringcast::fanout::ring::Ring;
use ringcast::fanout::wake::IdleFlags;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

struct Run {
    publishes: u64,
    lock_wait: Histogram<u64>,
    latency: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("constant bounds are valid")
}

fn run(threads: usize, secs: u64, payload: &[u8], shared: bool) -> (Run, Duration) {
    let publisher = Arc::new(Publisher::new(
        Arc::new(Ring::new(1 << 16)),
        Arc::new(IdleFlags::new(1)),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (publisher, stop, start) = (publisher.clone(), stop.clone(), start.clone());
            let payload = payload.to_vec();
            std::thread::spawn(move || {
                let channel = if shared {
                    "shared".to_string()
                } else {
                    format!("own-{t}")
                };
                let mut run = Run {
                    publishes: 0,
                    lock_wait: histogram(),
                    latency: histogram(),
                };
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let (_, wait) = publisher.publish_timed(&channel, &payload);
                    let took = t0.elapsed();
                    run.publishes += 1;
                    run.lock_wait.saturating_record(wait.as_nanos() as u64);
                    run.latency.saturating_record(took.as_nanos() as u64);
                }
                run
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut total = Run {
        publishes: 0,
        lock_wait: histogram(),
        latency: histogram(),
    };
    for h in handles {
        let r = h.join().expect("producer thread panicked");
        total.publishes += r.publishes;
        let _ = total.lock_wait.add(&r.lock_wait);
        let _ = total.latency.add(&r.latency);
    }
    (total, t0.elapsed())
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are numbers"))
        .collect();
    let threads = args.first().copied().unwrap_or(3) as usize;
    let secs = args.get(1).copied().unwrap_or(3);
    let size = args.get(2).copied().unwrap_or(1024) as usize;
    // A JSON string payload, so it is embedded verbatim (the common ingest case).
    let mut payload = vec![b'x'; size.max(2)];
    payload[0] = b'"';
    let last = payload.len() - 1;
    payload[last] = b'"';
    println!(
        "threads={threads} secs={secs} payload={}B cpus={}",
        payload.len(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("scenario  publishes/s  wait_p50  wait_p99  wait_max  pub_p50  pub_p99  pub_max (ns)");
    for (name, shared) in [("same", true), ("distinct", false)] {
        let (r, elapsed) = run(threads, secs, &payload, shared);
        println!(
            "{name:<9} {:>11.0} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8}",
            r.publishes as f64 / elapsed.as_secs_f64(),
            r.lock_wait.value_at_quantile(0.5),
            r.lock_wait.value_at_quantile(0.99),
            r.lock_wait.max(),
            r.latency.value_at_quantile(0.5),
            r.latency.value_at_quantile(0.99),
            r.latency.max(),
        );
    }
}
