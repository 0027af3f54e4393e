"""An independent SSE client (Python stdlib only: socket, no SSE library) that resumes
with Last-Event-ID while messages keep coming.

It subscribes to one channel over GET /sse, publishes --messages messages itself over TCP
ingest (one line each) from a thread, drops its connection every --every message
events and reconnects with the last `id:` it saw as Last-Event-ID, until it has seen
offsets up to the channel's last. It prints one JSON line per message event (its data,
verbatim) as {"data": "..."} and a summary line last: every offset after the first reply
exactly once and in order, every reconnect answered recovered:true.
"""

import argparse
import json
import socket
import sys
import threading
import time

from rc_common import Fail, expect


def read_events(sock, buf, deadline):
    """Yields (fields dict) per SSE event from sock; comments yield {'comment': True}."""
    while True:
        while b"\n\n" not in buf[0]:
            if time.monotonic() > deadline:
                raise Fail("timed out waiting for an event")
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf[0] += chunk
        raw, buf[0] = buf[0].split(b"\n\n", 1)
        event = {}
        for line in raw.decode().split("\n"):
            if line.startswith(":"):
                event["comment"] = True
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data" and "data" in event:
                event["data"] += "\n" + value
            else:
                event[name] = value
        yield event


def connect(host, port, channel, last_id):
    sock = socket.create_connection((host, port), timeout=10)
    headers = f"GET /sse?channels={channel} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
    if last_id is not None:
        headers += f"Last-Event-ID: {last_id}\r\n"
    sock.sendall((headers + "\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        expect(chunk, "connection closed before the response head")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    status = head.split(b"\r\n")[0]
    expect(b" 200 " in status, f"unexpected status {status!r}")
    expect(b"content-type: text/event-stream" in head.lower(), f"not an event stream: {head!r}")
    return sock, [rest]


def publisher(tcp, channel, count, rate):
    host, port = tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        for i in range(1, count + 1):
            s.sendall(f'{channel} {{"i":{i}}}\n'.encode())
            if rate and i % 100 == 0:
                time.sleep(100 / rate)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--tcp", required=True)
    ap.add_argument("--channel", required=True)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    host, port = args.addr.rsplit(":", 1)
    port = int(port)
    deadline = time.monotonic() + args.timeout

    last_id = None
    offsets = []
    reconnects = 0
    started = None
    while True:
        sock, buf = connect(host, port, args.channel, last_id)
        seen_here = 0
        try:
            for event in read_events(sock, buf, deadline):
                if event.get("comment") or "data" not in event:
                    continue
                data = json.loads(event["data"])
                if data.get("reply") == "subscribe":
                    expect(data["code"] == 200, f"subscribe refused: {data}")
                    if last_id is not None:
                        expect(data.get("recovered") is True, f"reconnect not recovered: {data}")
                    elif started is None:
                        started = threading.Thread(
                            target=publisher,
                            args=(args.tcp, args.channel, args.messages, args.rate),
                            daemon=True,
                        )
                        started.start()
                    last_id = event.get("id", last_id)
                    continue
                expect("channel" in data, f"unexpected event {data}")
                print(json.dumps({"data": event["data"]}))
                offsets.append(data["offset"])
                last_id = event["id"]
                expect(last_id.split("~")[1] == str(data["offset"]), f"id {last_id} does not match offset {data['offset']}")
                seen_here += 1
                if offsets[-1] >= args.messages:
                    break
                if seen_here >= args.every:
                    break
        finally:
            sock.close()
        if offsets and offsets[-1] >= args.messages:
            break
        reconnects += 1
        expect(time.monotonic() < deadline, "timed out")
    expected = list(range(1, args.messages + 1))
    expect(offsets == expected, f"offsets not gap- and duplicate-free: first bad at {next((i for i, (a, b) in enumerate(zip(offsets, expected)) if a != b), len(offsets))}, got {len(offsets)}")
    print(json.dumps({"case": "resume", "ok": True, "reconnects": reconnects, "messages": len(offsets)}))


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        print(json.dumps({"case": "resume", "ok": False, "error": str(e)}))
        sys.exit(1)
