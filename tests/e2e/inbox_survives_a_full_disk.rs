//! The durable inbox on a full disk (its `data_dir` on a small tmpfs, filled by another
//! file): a publish that cannot be stored is refused with the reason (TCP `ERR inbox:
//! ...`, HTTP 503), never acknowledged; the server neither dies nor spins, logs the
//! cause and counts it (`ringcast_inbox_errors_total{kind="disk_full"}`,
//! `ringcast_inbox_up` 0); once space is freed it stores again without a restart; and
//! every acknowledged message reaches its user, in order and once, live, after `kill -9`
//! and after a SIGTERM restart.
//!
//! The tests mount tmpfs file systems, so they run as root (as the test suite does); a
//! mount that fails fails the test.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

/// A tmpfs of a fixed size mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    mount_point: PathBuf,
    // Removed after the unmount (fields drop after `Drop::drop` ran).
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a `kib` KiB tmpfs.
    ///
    /// # Panics
    /// When the mount fails (these tests need root): never skipped.
    fn mount(kib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let mount_point = dir.path().join("disk");
        std::fs::create_dir(&mount_point).expect("creating the mount point");
        let (ok, printed) = run_tool(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={kib}k,mode=0755"),
                    "tmpfs",
                ])
                .arg(&mount_point),
            "mount",
        );
        assert!(
            ok,
            "mounting a {kib} KiB tmpfs on {} failed (these tests need root): {printed}",
            mount_point.display()
        );
        Tmpfs {
            mount_point,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.mount_point
    }

    /// Writes a file until the file system has no space left; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.mount_point.join("filler");
        let mut file = std::fs::File::create(&filler).expect("creating the filler file");
        // Large writes first, then page-sized ones for the last pages.
        for chunk in [64 * 1024, 4096] {
            let block = vec![0x5a_u8; chunk];
            loop {
                match file.write(&block) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => panic!("filling {}: {e}", filler.display()),
                }
            }
        }
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = Command::new("umount").arg(&self.mount_point).status();
        if !matches!(status, Ok(s) if s.success()) {
            // Still busy (a process that outlived its test): detach it.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mount_point)
                .status();
        }
    }
}

/// A server with the inbox in `data`, anonymous clients allowed.
fn start(data: &Path) -> Server {
    Server::start(&[
        "--inbox",
        "true",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--drain-window",
        "1",
        "--drain-grace",
        "0",
    ])
}

/// What an acknowledged publish (TCP `ACK ON`, HTTP `ack=1`) was answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Ok(u64),
    Refused(String),
}

/// A payload of about 1 KB carrying `n`.
fn payload(n: u64) -> Vec<u8> {
    format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(1000)).into_bytes()
}

/// Acknowledged publishes of numbered messages to one user channel, over TCP and HTTP,
/// and what each was answered.
struct Publishes {
    channel: &'static str,
    tcp: TcpIngest,
    admin: SocketAddr,
    next: u64,
    /// offset -> number of every acknowledged message.
    acked: BTreeMap<u64, u64>,
    /// Every refusal, as its publisher saw it.
    refused: Vec<String>,
}

impl Publishes {
    fn new(server: &Server, channel: &'static str) -> Publishes {
        let mut tcp = server.tcp_ingest();
        tcp.send_raw(b"ACK ON\n");
        Publishes {
            channel,
            tcp,
            admin: server.admin_addr(),
            next: 0,
            acked: BTreeMap::new(),
            refused: Vec::new(),
        }
    }

    fn record(&mut self, n: u64, answer: Answer) -> Answer {
        match &answer {
            Answer::Ok(offset) => assert!(
                self.acked.insert(*offset, n).is_none(),
                "offset {offset} acknowledged twice"
            ),
            Answer::Refused(why) => self.refused.push(why.clone()),
        }
        answer
    }

    /// Publishes the next message over TCP: `OK <offset>` or `ERR inbox: <reason>`,
    /// anything else fails the test.
    fn tcp(&mut self) -> Answer {
        self.tcp_burst(1).remove(0)
    }

    /// Publishes the next `k` messages in one write over TCP (they share the store's
    /// commits) and reads their answers.
    fn tcp_burst(&mut self, k: usize) -> Vec<Answer> {
        let first = self.next + 1;
        let mut lines = Vec::new();
        for _ in 0..k {
            self.next += 1;
            lines.extend_from_slice(self.channel.as_bytes());
            lines.push(b' ');
            lines.extend_from_slice(&payload(self.next));
            lines.push(b'\n');
        }
        self.tcp.send_raw(&lines);
        (first..first + k as u64)
            .map(|n| {
                let answer = self.tcp_answer();
                self.record(n, answer)
            })
            .collect()
    }

    fn tcp_answer(&mut self) -> Answer {
        let line = self
            .tcp
            .read_line(Duration::from_secs(10))
            .expect("an answer to every ack-mode publish within 10 s");
        match line.strip_prefix("OK ") {
            Some(offset) => Answer::Ok(offset.parse().expect("OK <offset>")),
            None => {
                assert!(
                    line.starts_with("ERR inbox: "),
                    "expected OK <offset> or ERR inbox: <reason>, got {line:?}"
                );
                Answer::Refused(line)
            }
        }
    }

    /// Publishes the next message with `POST /publish?ack=1`: 200 with the offset, or
    /// 503/507 with `{"error":"inbox: <reason>"}`; anything else fails the test.
    fn http(&mut self) -> Answer {
        self.next += 1;
        let n = self.next;
        let body = payload(n);
        let mut request = format!(
            "POST /publish?channel={}&ack=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            self.channel,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let response = http::send_raw(self.admin, &request).expect("HTTP publish");
        let answer = match response.status {
            200 => {
                let json = response.json();
                assert_eq!(json["durable"], true, "{json}");
                Answer::Ok(json["offset"].as_u64().expect("an offset"))
            }
            503 | 507 => {
                let why = response.json()["error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(why.starts_with("inbox: "), "a refusal says why: {why:?}");
                Answer::Refused(format!("HTTP {}: {why}", response.status))
            }
            other => panic!(
                "an acknowledged HTTP publish is answered 200 or 503/507, got {other} {}",
                response.text()
            ),
        };
        self.record(n, answer)
    }
}

/// A subscriber's messages must be exactly offsets `first..=last`, in order, each once;
/// every acknowledged one carries the message it was acknowledged for. (Offsets without
/// an acknowledgement are messages of a commit reported failed that the file held
/// anyway: delivered at least once.)
fn assert_exactly(who: &str, got: &[Delivery], first: u64, last: u64, acked: &BTreeMap<u64, u64>) {
    let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
    assert_eq!(
        offsets,
        (first..=last).collect::<Vec<_>>(),
        "{who}: offsets not exactly {first}..={last} in order"
    );
    for d in got {
        if let Some(&n) = acked.get(&d.offset) {
            assert_eq!(
                d.data["n"], n,
                "{who}: offset {} carries another message than the one acknowledged",
                d.offset
            );
        }
    }
}

/// The user and system CPU seconds process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/pid/stat");
    // The fields after the command name (in parentheses, and it may hold spaces).
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are the line's fields 14 and 15: 12 and 13 after the name.
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// Subscribes to `channel` on a new connection; returns the client and the subscribe
/// reply's `inbox.unacked`.
fn subscribe_inbox(server: &Server, channel: &str) -> (Subscriber, u64) {
    let mut client = server.subscribe(&[channel]);
    let reply = client.next_reply(Duration::from_secs(10));
    assert_eq!(reply["code"], 200, "subscribe to {channel}: {reply}");
    let unacked = reply["inbox"]["unacked"]
        .as_u64()
        .unwrap_or_else(|| panic!("an inbox reply: {reply}"));
    (client, unacked)
}

#[test]
fn acked_messages_survive_a_full_disk_and_publishing_resumes_when_space_is_freed() {
    let _deadline = Deadline::new(
        "acked_messages_survive_a_full_disk_and_publishing_resumes_when_space_is_freed",
        Duration::from_secs(120),
    );
    let disk = Tmpfs::mount(2048);
    let data = disk.path().join("data");
    let mut server = start(&data);
    const USER: &str = "user:dora";
    let (mut live, unacked) = subscribe_inbox(&server, USER);
    assert_eq!(unacked, 0);
    let mut news = server.subscribe(&["news"]);
    let mut publishes = Publishes::new(&server, USER);
    for _ in 0..30 {
        assert!(matches!(publishes.tcp(), Answer::Ok(_)));
    }

    // Another file takes the rest of the disk: the inbox cannot grow any more.
    let filler = disk.fill();
    let mut tries = 0;
    while publishes.refused.is_empty() {
        tries += 1;
        assert!(
            tries <= 2000,
            "2000 publishes of 1 KB were all acknowledged on a full 2 MiB disk:\n{}",
            server.describe()
        );
        publishes.tcp();
    }
    // Full: publishes are refused with the reason. (A commit can still fit in pages
    // freed inside the file, mostly right after the store reopened it: that message is
    // acknowledged, and then kept like any other.)
    let cpu_before = cpu_seconds(server.pid());
    let window = Instant::now();
    for _ in 0..20 {
        publishes.tcp();
        publishes.http();
        std::thread::sleep(Duration::from_millis(100));
    }
    // Publishes that arrive together are refused together (one commit), and each is
    // counted.
    publishes.tcp_burst(10);
    let spent = cpu_seconds(server.pid()) - cpu_before;
    let elapsed = window.elapsed().as_secs_f64();
    println!(
        "while full: {} acknowledged in all, {} refused: {:?}",
        publishes.acked.len(),
        publishes.refused.len(),
        publishes.refused
    );
    for why in &publishes.refused {
        assert!(
            why.contains("No space left on device"),
            "every refusal says the disk is full: {why:?}"
        );
    }
    assert!(
        publishes
            .refused
            .iter()
            .any(|why| why.starts_with("HTTP 50")),
        "no HTTP publish was refused on a full disk"
    );
    assert!(
        spent < 0.25 * elapsed,
        "the server spent {spent:.2} s of CPU in {elapsed:.1} s of a full disk: it spins"
    );
    assert!(server.is_running(), "the server died on a full disk");
    // Other channels are not affected.
    server.udp_publish("news", b"{\"still\":\"here\"}");
    let other = news.collect(1, Duration::from_secs(5));
    assert_eq!(other[0].data["still"], "here");
    // The operator's view: a log line with the cause, and the metrics.
    let log = server.log();
    assert!(
        log.contains("inbox store: committing a batch failed")
            && log.contains("kind=\"disk_full\"")
            && log.contains("No space left on device"),
        "no log line names the full disk:\n{log}"
    );
    // After a refusal the gauge stays 0 until a write succeeds (a reopened file is not
    // yet a writable one).
    let mut tries = 0;
    while !matches!(publishes.tcp(), Answer::Refused(_)) {
        tries += 1;
        assert!(tries < 100, "no refusal in 100 publishes on a full disk");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.metrics().sum("ringcast_inbox_up"), 0.0);
    let metrics = server.metrics();
    // Every refused publish is counted once, under its cause.
    assert_eq!(
        metrics.sum_where("ringcast_inbox_errors_total", &[("kind", "disk_full")]),
        publishes.refused.len() as f64,
        "{}",
        metrics.describe("ringcast_inbox_errors_total")
    );
    assert_eq!(
        metrics.sum("ringcast_inbox_errors_total"),
        publishes.refused.len() as f64
    );

    // Space freed: the gauge says so by itself, and publishes are acknowledged again
    // without a restart.
    std::fs::remove_file(&filler).expect("removing the filler");
    let freed = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "ringcast_inbox_up is 1 again after space was freed, with no publish",
        || (server.metrics().sum("ringcast_inbox_up") == 1.0).then_some(()),
    );
    println!(
        "ringcast_inbox_up 1 {:?} after space was freed",
        freed.elapsed()
    );
    wait_until(
        Duration::from_secs(10),
        "a publish is acknowledged again after space was freed",
        || matches!(publishes.tcp(), Answer::Ok(_)).then_some(()),
    );
    assert!(
        server
            .log()
            .contains("inbox store: writes succeed again; publishes to user channels are stored"),
        "no log line says the store recovered:\n{}",
        server.log()
    );
    for _ in 0..10 {
        assert!(matches!(publishes.tcp(), Answer::Ok(_)));
        assert!(matches!(publishes.http(), Answer::Ok(_)));
    }
    let acked = publishes.acked;
    let last = *acked.keys().last().expect("acknowledged messages");

    // Live: every stored offset once, in order (the subscriber was there all along).
    let got = live.collect(last as usize, Duration::from_secs(10));
    assert_exactly("live subscriber", &got, 1, last, &acked);
    assert!(
        live.next_delivery(Duration::from_millis(300)).is_none(),
        "a message after the last offset"
    );

    // kill -9, then a restart on the same disk: everything stored is unacked.
    drop(live);
    server.kill9();
    let mut server = start(&data);
    let (mut client, unacked) = subscribe_inbox(&server, USER);
    assert_eq!(unacked, last, "unacked after kill -9");
    let got = client.collect(last as usize, Duration::from_secs(10));
    assert_exactly("after kill -9", &got, 1, last, &acked);
    let half = last / 2;
    let reply = client.request(
        &serde_json::json!({"cmd": "ack", "channel": USER, "offset": half, "id": 1}),
        Duration::from_secs(10),
    );
    assert_eq!(reply["code"], 200, "{reply}");
    assert_eq!(reply["removed"], half, "{reply}");
    drop(client);

    // SIGTERM, then a restart: exactly the messages after the ack.
    server.sigterm();
    assert!(
        server.wait_exit(Duration::from_secs(30)).is_some(),
        "no exit within 30 s of SIGTERM\n{}",
        server.describe()
    );
    let server = start(&data);
    assert!(
        !server.log().contains("inbox store repaired"),
        "a clean SIGTERM left the store to repair:\n{}",
        server.log()
    );
    let (mut client, unacked) = subscribe_inbox(&server, USER);
    assert_eq!(
        unacked,
        last - half,
        "unacked after the ack and a SIGTERM restart"
    );
    let got = client.collect((last - half) as usize, Duration::from_secs(10));
    assert_exactly("after SIGTERM", &got, half + 1, last, &acked);
    assert!(
        client.next_delivery(Duration::from_millis(300)).is_none(),
        "an acked message delivered again"
    );
}

/// Subscribes to `channel` on a new connection until the store answers (a subscribe
/// right after a failed write may be refused for a second while the store reopens; the
/// refusal must say why). Returns the client and `inbox.unacked`.
fn subscribe_inbox_retrying(server: &Server, channel: &str) -> (Subscriber, u64) {
    wait_until(
        Duration::from_secs(10),
        "a subscribe to the inbox is answered 200",
        || {
            let mut client = server.subscribe(&[channel]);
            let reply = client.next_reply(Duration::from_secs(10));
            if reply["code"] == 503 {
                let why = reply["error"].as_str().unwrap_or_default();
                assert!(
                    why.starts_with("inbox: ") && why.contains("No space left on device"),
                    "a refused subscribe says why: {reply}"
                );
                std::thread::sleep(Duration::from_millis(200));
                return None;
            }
            assert_eq!(reply["code"], 200, "subscribe to {channel}: {reply}");
            let unacked = reply["inbox"]["unacked"]
                .as_u64()
                .unwrap_or_else(|| panic!("an inbox reply: {reply}"));
            Some((client, unacked))
        },
    )
}

/// Acks `channel` up to `offset` on `client`: 200, or 503 with the reason (an ack is a
/// write too). Returns whether it was applied.
fn ack(client: &mut Subscriber, channel: &str, offset: u64) -> bool {
    let reply = client.request(
        &serde_json::json!({"cmd": "ack", "channel": channel, "offset": offset}),
        Duration::from_secs(10),
    );
    match reply["code"].as_u64() {
        Some(200) => true,
        Some(503) => {
            let why = reply["error"].as_str().unwrap_or_default();
            assert!(
                why.starts_with("inbox: ") && why.contains("No space left on device"),
                "a refused ack says why: {reply}"
            );
            false
        }
        _ => panic!("an ack is answered 200 or 503: {reply}"),
    }
}

#[test]
fn kill_and_restart_on_a_full_disk_lose_no_acked_message() {
    let _deadline = Deadline::new(
        "kill_and_restart_on_a_full_disk_lose_no_acked_message",
        Duration::from_secs(150),
    );
    let disk = Tmpfs::mount(2048);
    let data = disk.path().join("data");
    let mut server = start(&data);
    const USER: &str = "user:ed";
    let mut publishes = Publishes::new(&server, USER);
    for _ in 0..30 {
        assert!(matches!(publishes.tcp(), Answer::Ok(_)));
    }
    let filler = disk.fill();
    for _ in 0..2000 {
        if publishes.refused.len() >= 10 {
            break;
        }
        publishes.tcp();
    }
    assert!(
        publishes.refused.len() >= 10,
        "publishes kept being acknowledged on a full disk"
    );
    let mut acked = publishes.acked;
    let mut last = *acked.keys().last().expect("acknowledged messages");

    // kill -9 while the disk is full, and a start on the still full disk (its repair
    // needs no space): what was acknowledged is there.
    server.kill9();
    let mut server = start(&data);
    let (mut client, unacked) = subscribe_inbox_retrying(&server, USER);
    let got = client.collect(unacked as usize, Duration::from_secs(10));
    // The kill may have hit a commit reported failed that reached the file: its
    // message is there, unacknowledged, at the next offset.
    assert!(unacked >= last, "{unacked} unacked, {last} acknowledged");
    last = unacked;
    assert_exactly("restarted on a full disk", &got, 1, last, &acked);
    // Still full: refused with the reason, or stored.
    let mut publishes = Publishes::new(&server, USER);
    publishes.next = 10_000;
    for _ in 0..5 {
        if let Answer::Ok(offset) = publishes.tcp() {
            assert_eq!(offset, last + 1, "offsets continue");
            last = offset;
        }
    }
    for why in &publishes.refused {
        assert!(why.contains("No space left on device"), "{why}");
    }
    acked.extend(publishes.acked);
    // An ack on a full disk is applied or refused with the reason.
    let acked_while_full = ack(&mut client, USER, 5);
    drop(client);
    println!(
        "on the full disk after kill -9: {} stored, {} refused, ack {}",
        last,
        publishes.refused.len(),
        if acked_while_full {
            "applied"
        } else {
            "refused"
        }
    );

    // SIGTERM while full: a clean exit, and a start on the full disk again.
    server.sigterm();
    let status = server
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no exit within 30 s of SIGTERM\n{}", server.describe()));
    assert!(status.success(), "{status}\n{}", server.describe());
    let server = start(&data);
    let (mut client, unacked) = subscribe_inbox_retrying(&server, USER);
    let first = if acked_while_full { 6 } else { 1 };
    let got = client.collect(unacked as usize, Duration::from_secs(10));
    assert_exactly("after SIGTERM on a full disk", &got, first, last, &acked);

    // Space freed: the ack of everything is applied (after a retry at most, while the
    // store reopens), and nothing is delivered again.
    std::fs::remove_file(&filler).expect("removing the filler");
    wait_until(
        Duration::from_secs(10),
        "an ack is applied after space was freed",
        || ack(&mut client, USER, last).then_some(()),
    );
    drop(client);
    let (mut client, unacked) = subscribe_inbox_retrying(&server, USER);
    assert_eq!(unacked, 0, "unacked after acking everything");
    assert!(
        client.next_delivery(Duration::from_millis(300)).is_none(),
        "an acked message delivered again"
    );
}
