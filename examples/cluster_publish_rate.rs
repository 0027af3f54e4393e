//! Publishes/s through a ringcast node's TCP ingest in ack mode: with `[cluster]` on, each
//! `OK <offset>` comes after the message is stored in JetStream, so this measures the
//! cluster's cost per publish (docs/cluster.md, "Cost per publish").
//!
//! `cargo run --release --example cluster_publish_rate -- ADDR MESSAGES CHANNELS`
//! writes MESSAGES lines round-robin over CHANNELS channels (`rate:0`..) on one
//! connection, a reader thread counting the acks, and prints the rate.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).map_or("127.0.0.1:9001", String::as_str);
    let messages: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let channels: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let stream = TcpStream::connect(addr).expect("connect to the TCP ingest port");
    stream.set_nodelay(true).expect("nodelay");
    let reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = std::io::BufWriter::new(stream);
    let started = Instant::now();
    let acks = std::thread::spawn(move || {
        let (mut ok, mut err) = (0usize, 0usize);
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if line.starts_with("OK") {
                ok += 1;
            } else {
                err += 1;
                if err < 5 {
                    eprintln!("{line}");
                }
            }
            if ok + err == messages {
                break;
            }
        }
        (ok, err)
    });
    writer.write_all(b"ACK ON\n").expect("write");
    for i in 0..messages {
        writeln!(writer, "rate:{} {{\"n\":{i}}}", i % channels).expect("write");
    }
    writer.flush().expect("flush");
    let (ok, err) = acks.join().expect("reader");
    let secs = started.elapsed().as_secs_f64();
    println!(
        "messages {messages} channels {channels} ok {ok} err {err} secs {secs:.3} publishes/s {:.0}",
        ok as f64 / secs
    );
}
