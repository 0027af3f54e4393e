//! The fan-out ring: publish cost, and publish -> consume across threads.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringcast::fanout::ring::{Poll, Ring, RingKind, RingMessage};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn message(frame: &Bytes, channel: &Arc<str>) -> RingMessage {
    RingMessage {
        channel: channel.clone(),
        offset: 1,
        frame: frame.clone(),
        published_at: Instant::now(),
        kind: RingKind::Message,
    }
}

fn ring(c: &mut Criterion) {
    let frame = Bytes::from(vec![0u8; 64]);
    let channel: Arc<str> = Arc::from("news");

    let ring = Ring::new(1 << 14);
    c.bench_function("ring_push_single_producer", |b| {
        b.iter(|| ring.push(message(&frame, &channel)))
    });

    let mut group = c.benchmark_group("ring_cross_thread");
    group.throughput(Throughput::Elements(1));
    for consumers in [1usize, 2] {
        group.bench_function(format!("push_with_{consumers}_consumers"), |b| {
            let ring = Arc::new(Ring::new(1 << 14));
            let stop = Arc::new(AtomicBool::new(false));
            let readers: Vec<_> = (0..consumers)
                .map(|_| {
                    let (ring, stop) = (ring.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut cursor = ring.head();
                        let mut seen = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            match ring.poll(&mut cursor) {
                                Poll::Message(_) => seen += 1,
                                Poll::Overrun { lost } => seen += lost,
                                Poll::Empty => std::hint::spin_loop(),
                            }
                        }
                        seen
                    })
                })
                .collect();
            b.iter(|| ring.push(message(&frame, &channel)));
            stop.store(true, Ordering::Relaxed);
            for r in readers {
                let _ = r.join();
            }
        });
    }
    group.finish();
}

criterion_group!(benches, ring);
criterion_main!(benches);
