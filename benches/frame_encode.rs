//! Encoding cost of the one frame every subscriber shares, and of decoding a client frame.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast::proto::frame::{encode_frame, opcode, FrameDecoder};
use ringcast::proto::mask::apply_mask;
use ringcast::proto::message::{encode_message, EncodedData};
use std::hint::black_box;

fn message_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_message");
    for size in [32usize, 1024, 16 * 1024] {
        let json = format!("{{\"pad\":\"{}\"}}", "x".repeat(size.saturating_sub(10)));
        let text = "y".repeat(size);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("json_payload", size), &json, |b, p| {
            b.iter(|| encode_message("news", 42, &EncodedData::new(black_box(p.as_bytes()))))
        });
        group.bench_with_input(BenchmarkId::new("text_payload", size), &text, |b, p| {
            b.iter(|| encode_message("news", 42, &EncodedData::new(black_box(p.as_bytes()))))
        });
    }
    group.finish();
}

fn client_frames(c: &mut Criterion) {
    let payload = br#"{"cmd":"subscribe","channel":"room:42","id":7}"#;
    let mut wire = encode_frame(opcode::TEXT, payload).to_vec();
    wire[1] |= 0x80;
    let mask = [1, 2, 3, 4];
    wire.splice(2..2, mask);
    apply_mask(&mut wire[6..], mask, 0);
    c.bench_function("decode_command_frame", |b| {
        let mut decoder = FrameDecoder::new(65536);
        b.iter(|| {
            let mut buf = wire.clone();
            let step = decoder
                .decode(black_box(&mut buf))
                .ok()
                .flatten()
                .map(|(n, _)| n);
            black_box(step)
        })
    });
    let mut big = vec![0u8; 64 * 1024];
    c.bench_function("unmask_64KiB", |b| {
        b.iter(|| apply_mask(black_box(&mut big), mask, 1))
    });
}

criterion_group!(benches, message_frames, client_frames);
criterion_main!(benches);
