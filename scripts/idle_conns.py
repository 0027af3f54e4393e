#!/usr/bin/env python3
"""Holds N idle connections to ringcast over one transport and reports the server's RSS
growth per connection (docs/benchmarks.md, "Idle bytes per SSE connection").

    python3 scripts/idle_conns.py --addr 127.0.0.1:18080 --pid PID -n 10000 --transport sse

`--transport wss` upgrades over TLS (the `tls_listen` port; the certificate is not
checked).

Stdlib only. Each connection sends its request (a WebSocket upgrade or GET /sse) and
reads the answer's first bytes, then stays silent; RSS is read from /proc/PID/status
before the first connection and after the last answer (then after --settle seconds).
"""

import argparse
import base64
import json
import os
import socket
import ssl
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--transport", choices=["ws", "sse", "wss"], default="sse")
    ap.add_argument("--channel", default="idle")
    ap.add_argument("--settle", type=float, default=3)
    args = ap.parse_args()
    host, port = args.addr.rsplit(":", 1)
    before = rss_kib(args.pid)
    socks = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    for _ in range(args.n):
        s = socket.create_connection((host, int(port)), timeout=10)
        if args.transport == "wss":
            s = tls.wrap_socket(s, server_hostname=host)
        if args.transport == "sse":
            req = f"GET /sse?channels={args.channel} HTTP/1.1\r\nHost: {host}\r\n\r\n"
        else:
            key = base64.b64encode(os.urandom(16)).decode()
            req = (
                f"GET /ws?channels={args.channel} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
        s.sendall(req.encode())
        head = s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.1 101"), head[:80]
        socks.append(s)
    time.sleep(args.settle)
    after = rss_kib(args.pid)
    print(json.dumps({
        "transport": args.transport,
        "connections": len(socks),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_connection": round((after - before) * 1024 / len(socks)),
    }))
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
