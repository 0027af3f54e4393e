//! `floor-uring`: the floor a fan-out server's cost per delivery is measured against.
//!
//! It does the least any WebSocket broadcast server must do and nothing else: accept
//! upgrades (on a side thread, idle once everyone is connected), and for each UDP
//! datagram `<channel> <payload>` build one text frame (the payload, space-padded to a
//! 40-byte frame when shorter) and send it to every connected socket with one io_uring
//! submission of `send` requests. No subscriptions, offsets, backlogs, coalescing, reads
//! or liveness: a send that finds the socket full is counted and dropped. Every
//! connection receives every message, whatever its path or channel.
//!
//! Run it like the other servers in `scripts/bench-fanout.sh` (pinned to one CPU); the
//! harness's deliveries per server-CPU-second for it is the floor.

use clap::Parser;
use io_uring::{opcode, types, IoUring};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Command line of the floor server.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Fan-out floor: one frame to every socket, one io_uring submission"
)]
struct Args {
    /// WebSocket listen address; upgrades are accepted on any path. Default: 127.0.0.1:8082
    #[arg(long, default_value = "127.0.0.1:8082")]
    listen: SocketAddr,
    /// UDP ingest address; each datagram is `<channel> <payload>`. Default: 127.0.0.1:9200
    #[arg(long, default_value = "127.0.0.1:9200")]
    udp: SocketAddr,
}

/// Frames shorter than this are padded with spaces (valid JSON whitespace) up to it.
const FRAME_LEN: usize = 40;

fn main() {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .unwrap_or_else(|e| fail(&format!("binding {}: {e}", args.listen)));
    let udp =
        UdpSocket::bind(args.udp).unwrap_or_else(|e| fail(&format!("binding {}: {e}", args.udp)));
    let sockets: Arc<Mutex<Vec<RawFd>>> = Arc::default();
    {
        let sockets = sockets.clone();
        std::thread::spawn(move || accept_loop(listener, sockets));
    }
    eprintln!("floor-uring ready ws={} udp={}", args.listen, args.udp);
    let mut ring = Ring::new(1024);
    let mut fds: Vec<RawFd> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut frame = Vec::with_capacity(FRAME_LEN);
    let (mut sent, mut dropped, mut failed) = (0u64, 0u64, 0u64);
    let mut last_report = Instant::now();
    loop {
        let len = match udp.recv(&mut buf) {
            Ok(len) => len,
            Err(e) => {
                eprintln!("floor-uring: UDP receive failed: {e}");
                continue;
            }
        };
        let Some(payload) = payload_of(&buf[..len]) else {
            continue;
        };
        encode(payload, &mut frame);
        {
            let list = sockets.lock().unwrap_or_else(|e| e.into_inner());
            if list.len() != fds.len() {
                fds.clone_from(&list);
            }
        }
        let (ok, again, err) = ring.send_to_all(&fds, &frame);
        sent += ok;
        dropped += again;
        failed += err;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "floor-uring: {} sockets, {sent} sent, {dropped} dropped (socket full), {failed} failed",
                fds.len()
            );
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("floor-uring: {msg}");
    std::process::exit(1)
}

/// The payload of a `<channel> <payload>` datagram.
fn payload_of(datagram: &[u8]) -> Option<&[u8]> {
    let datagram = datagram.strip_suffix(b"\n").unwrap_or(datagram);
    let space = datagram.iter().position(|&b| b == b' ')?;
    Some(&datagram[space + 1..]).filter(|p| !p.is_empty())
}

/// One unmasked text frame carrying `payload`, padded to [`FRAME_LEN`].
fn encode(payload: &[u8], frame: &mut Vec<u8>) {
    frame.clear();
    let body = payload.len().max(FRAME_LEN - 2);
    frame.push(0x81);
    if body < 126 {
        frame.push(body as u8);
    } else if body <= 0xffff {
        frame.push(126);
        frame.extend_from_slice(&(body as u16).to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(body as u64).to_be_bytes());
    }
    frame.extend_from_slice(payload);
    frame.resize(frame.len() + body - payload.len(), b' ');
}

/// The send ring, grown to hold one submission per socket.
struct Ring {
    ring: IoUring,
    entries: u32,
}

impl Ring {
    fn new(entries: u32) -> Ring {
        let ring = IoUring::builder()
            .setup_cqsize(entries * 2)
            .build(entries)
            .unwrap_or_else(|e| fail(&format!("io_uring setup: {e}")));
        Ring { ring, entries }
    }

    /// Sends `frame` to every socket; returns (written, socket full, failed).
    fn send_to_all(&mut self, fds: &[RawFd], frame: &[u8]) -> (u64, u64, u64) {
        if fds.len() > self.entries as usize {
            *self = Ring::new((fds.len() as u32).next_power_of_two());
        }
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        {
            let mut sq = self.ring.submission();
            for &fd in fds {
                let sqe = opcode::Send::new(types::Fd(fd), frame.as_ptr(), frame.len() as u32)
                    .flags(flags)
                    .build();
                // SAFETY: `frame` outlives the submit_and_wait below, which waits for every
                // request (MSG_DONTWAIT requests complete inline), and the SQ has room for
                // every socket (grown above).
                if unsafe { sq.push(&sqe) }.is_err() {
                    fail("send ring full");
                }
            }
        }
        let mut done = 0;
        let (mut ok, mut again, mut err) = (0, 0, 0);
        while done < fds.len() {
            match self.ring.submit_and_wait(fds.len() - done) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => fail(&format!("io_uring_enter: {e}")),
            }
            for cqe in self.ring.completion() {
                done += 1;
                match cqe.result() {
                    r if r >= 0 => ok += 1,
                    r if r == -libc::EAGAIN => again += 1,
                    _ => err += 1,
                }
            }
        }
        (ok, again, err)
    }
}

fn accept_loop(listener: TcpListener, sockets: Arc<Mutex<Vec<RawFd>>>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some(fd) = upgrade(stream) {
                    sockets.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
                }
            }
            Err(e) => {
                eprintln!("floor-uring: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Answers the WebSocket upgrade on `stream`; the raw non-blocking socket on success.
fn upgrade(mut stream: TcpStream) -> Option<RawFd> {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).ok().filter(|&n| n > 0)?;
        req.extend_from_slice(&buf[..n]);
        if req.len() > 16 * 1024 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&req);
    let key = text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    })?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).ok()?;
    stream.set_nonblocking(true).ok()?;
    Some(stream.into_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_padded_to_forty_bytes() {
        let mut f = Vec::new();
        encode(br#"{"seq":1,"ts":2}"#, &mut f);
        assert_eq!(f.len(), FRAME_LEN);
        assert_eq!(&f[..2], &[0x81, 38]);
        encode(&[b'x'; 200], &mut f);
        assert_eq!(&f[..4], &[0x81, 126, 0, 200]);
        assert_eq!(f.len(), 204);
    }
}
