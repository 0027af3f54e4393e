#!/usr/bin/env python3
"""TLS cost benchmarks against a running ringcast, per server-CPU-second (docs/benchmarks.md,
"TLS: handshakes and fan-out per server-CPU-second").

    python3 scripts/tls_bench.py handshake --addr 127.0.0.1:28444 --pid PID --transport wss -n 2000
    python3 scripts/tls_bench.py fanout --addr 127.0.0.1:28444 --udp 127.0.0.1:29000 --pid PID \
        --transport wss --subscribers 100 --messages 3000 --rate 300

Stdlib only. The server's CPU time (user + system, /proc/PID/stat) is read around the
measured phase, so a slow client does not change the figure it reports, only how long
the run takes. `handshake`: N connections one after another, each a full TLS handshake
(no session resumption) plus the WebSocket upgrade, read up to the 101, then closed.
`fanout`: S subscribers to one channel, M messages published over UDP at RATE per
second; every subscriber counts its frames; deliveries / server CPU seconds between the
first datagram and the last frame read.
"""

import argparse
import base64
import json
import os
import selectors
import socket
import ssl
import time

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def context():
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    return tls


def upgrade(host, port, transport, channel, tls):
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if transport == "wss":
        s = tls.wrap_socket(s, server_hostname=host)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws?channels={channel} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("closed before the 101")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head[:80])
    return s, head.split(b"\r\n\r\n", 1)[1]


def handshake(args, host, port):
    tls = context()
    before = cpu_seconds(args.pid)
    start = time.monotonic()
    for _ in range(args.n):
        s, _ = upgrade(host, port, args.transport, "hs", tls)
        s.close()
    wall = time.monotonic() - start
    time.sleep(0.5)  # the server finishes the closes
    cpu = cpu_seconds(args.pid) - before
    return {
        "mode": "handshake",
        "transport": args.transport,
        "connections": args.n,
        "server_cpu_s": round(cpu, 3),
        "wall_s": round(wall, 2),
        "per_server_cpu_s": round(args.n / cpu) if cpu else None,
    }


def fanout(args, host, port):
    tls = context()
    sel = selectors.DefaultSelector()
    counts = []
    marker = b'"offset":'
    for i in range(args.subscribers):
        s, rest = upgrade(host, port, args.transport, args.channel, tls)
        s.setblocking(False)
        counts.append([rest.count(marker), rest[-(len(marker) - 1):]])
        sel.register(s, selectors.EVENT_READ, i)
    time.sleep(0.5)
    uhost, uport = args.udp.rsplit(":", 1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = (args.channel + " " + json.dumps({"x": "y" * args.size})).encode()
    want = args.subscribers * args.messages
    before = cpu_seconds(args.pid)
    start = time.monotonic()
    sent = 0
    deadline = start + args.messages / args.rate + 30
    got = 0
    while got < want and time.monotonic() < deadline:
        due = min(args.messages, int((time.monotonic() - start) * args.rate) + 1)
        while sent < due:
            udp.sendto(payload, (uhost, int(uport)))
            sent += 1
        for key, _ in sel.select(timeout=0.005):
            s, i = key.fileobj, key.data
            while True:
                try:
                    chunk = s.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError):
                    break
                if not chunk:
                    sel.unregister(s)
                    break
                data = counts[i][1] + chunk
                counts[i][0] += data.count(marker)
                counts[i][1] = data[-(len(marker) - 1):]
        got = sum(c[0] for c in counts)
    wall = time.monotonic() - start
    cpu = cpu_seconds(args.pid) - before
    return {
        "mode": "fanout",
        "transport": args.transport,
        "subscribers": args.subscribers,
        "messages": args.messages,
        "deliveries": got,
        "expected": want,
        "server_cpu_s": round(cpu, 3),
        "wall_s": round(wall, 2),
        "per_server_cpu_s": round(got / cpu) if cpu else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["handshake", "fanout"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--transport", choices=["ws", "wss"], default="wss")
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--udp", default="127.0.0.1:9000")
    ap.add_argument("--channel", default="bench")
    ap.add_argument("--subscribers", type=int, default=100)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--size", type=int, default=100)
    args = ap.parse_args()
    host, port = args.addr.rsplit(":", 1)
    run = handshake if args.mode == "handshake" else fanout
    print(json.dumps(run(args, host, int(port))))


if __name__ == "__main__":
    main()
