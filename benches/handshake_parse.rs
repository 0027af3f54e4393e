//! Cost of parsing a browser's upgrade request and rendering the 101 answer.

use criterion::{criterion_group, criterion_main, Criterion};
use ringcast::proto::upgrade::{accept_response, parse_upgrade};
use std::hint::black_box;

const CHROME: &[u8] = b"GET /ws?channels=news,room%3A42 HTTP/1.1\r\nHost: edge.example.com\r\n\
Connection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\r\n\
Upgrade: websocket\r\nOrigin: https://app.example.com\r\nSec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";

fn handshake(c: &mut Criterion) {
    c.bench_function("parse_upgrade_chrome", |b| {
        b.iter(|| parse_upgrade(black_box(CHROME), 64))
    });
    c.bench_function("parse_and_accept", |b| {
        b.iter(|| {
            let up = parse_upgrade(black_box(CHROME), 64).ok().flatten();
            up.map(|u| accept_response(&u.key))
        })
    });
}

criterion_group!(benches, handshake);
criterion_main!(benches);
