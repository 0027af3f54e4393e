#!/usr/bin/env python3
"""An independent client of ringcast's HTTP transports (docs/protocol.md, "SSE and
long-poll"), built on the `httpx` package: its own HTTP/1.1 client, its own streaming.

    python3 py_httpx.py transport --addr 127.0.0.1:8080 --tcp 127.0.0.1:9001
    python3 py_httpx.py positions --addr 127.0.0.1:8080 --admin 127.0.0.1:9090 --max-channels 8

`transport` (a server with a history large enough for every reconnect):
  sse_resume_header  GET /sse for two channels while a TCP publisher writes to both; the
                     stream is dropped every few events and reopened with the last `id:`
                     as Last-Event-ID (once with a contrary ?since=, which must lose);
                     every reopen recovers both channels, every offset arrives once.
  sse_resume_since   the same with the position in ?since= (a client that cannot set
                     headers).
  poll_loop          GET /poll: the first answer carries the subscribe replies, an idle
                     one answers empty with the same position at its timeout, then a
                     loop passing each answer's `position` as the next `since` gets
                     every message of both channels once, in order, and each position
                     names the last offset delivered.

`positions` (a server with --history-size 5 --max-recovery-messages 100):
  bad_params         400 with a one-line reason for a bad channel, a bad since token (in
                     ?since= and in Last-Event-ID), a bad timeout, too many channels.
  unknown_positions  a wrong epoch, an offset beyond the channel and one older than its
                     history get the subscribe reply with recovered:false and the reason
                     (epoch_changed, ahead, too_old), the current offset and epoch, on
                     SSE and on long-poll; live messages then continue at offset + 1.

Prints one JSON line per case ({"case": C, "ok": true|false, ...}); exit status 0 when
every case held, 1 otherwise, 2 when httpx is missing.
"""

import argparse
import json
import socket
import sys
import threading
import time
import urllib.parse

from rc_common import Fail, expect, require

require("py_httpx.py", {"httpx": "httpx"})
import httpx  # noqa: E402

# Every read waits at most this long (the servers these cases run against send a
# heartbeat every second or two, and publish continuously).
READ_TIMEOUT = 15.0
CASE_TIMEOUT = 90.0


def q(value):
    return urllib.parse.quote(value, safe="")


def channel_tag(name):
    """The 32-bit FNV-1a hash that names a channel in a compact token."""
    h = 0x811C9DC5
    for b in name.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def parse_token(token, channels=()):
    """{channel: (offset, epoch)} of a position token, full or compact (docs/protocol.md;
    a compact token's entries are found among the request's `channels`)."""
    out = {}
    if token.startswith("~"):
        reference, entries = token[1:].split("~")
        reference = int(reference, 36)
        by_tag = {channel_tag(c): c for c in channels}
        for entry in entries.split(","):
            parts = entry.split(".")
            channel = by_tag[int(parts[0], 36)]
            expect(channel not in out, f"channel {channel} twice in {token}")
            xor = int(parts[2], 36) if len(parts) == 3 else 0
            out[channel] = (int(parts[1], 36), str(reference ^ xor))
        return out
    for entry in filter(None, token.split(",")):
        channel, offset, epoch = entry.split("~")
        expect(channel not in out, f"channel {channel} twice in {token}")
        out[channel] = (int(offset), epoch)
    return out


class SseStream:
    """One open GET /sse response, read event by event."""

    def __init__(self, client, url, headers=None):
        self.cm = client.stream("GET", url, headers=headers or {})
        self.response = self.cm.__enter__()
        self.lines = None
        self.retry = None

    def check_head(self):
        r = self.response
        if r.status_code != 200:
            raise Fail(f"status {r.status_code}: {r.read()!r}")
        expect(r.headers.get("content-type", "").startswith("text/event-stream"), f"content type {r.headers}")
        expect(r.headers.get("cache-control") == "no-cache", f"cache-control {r.headers}")
        self.lines = r.iter_lines()

    def next_event(self, deadline):
        """The next event as a dict of its fields (comments and retry-only blocks are
        skipped); None at the end of the stream."""
        event = {}
        for line in self.lines:
            if time.monotonic() > deadline:
                raise Fail("timed out reading the event stream")
            if line == "":
                if "data" in event:
                    return event
                event = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "retry":
                self.retry = int(value)
                expect(1000 <= self.retry < 2000, f"retry: {value} is outside 1000-1999 ms")
            elif name == "data" and "data" in event:
                event["data"] += "\n" + value
            else:
                event[name] = value
        return None

    def close(self):
        self.cm.__exit__(None, None, None)


def tcp_publisher(tcp, channels, count, pace):
    """Writes `count` messages to each channel over TCP ingest, alternating, `pace` a
    second in all."""
    host, port = tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        sent = 0
        for i in range(1, count + 1):
            for c in channels:
                s.sendall(f'{c} {{"i":{i}}}\n'.encode())
                sent += 1
                if sent % 20 == 0:
                    time.sleep(20 / pace)


def sse_resume(args, client, mode):
    channels = ["ra", "rb"] if mode == "header" else ["qa", "qb"]
    count, every = args.messages, args.every
    base = f"http://{args.addr}/sse?channels={','.join(channels)}"
    deadline = time.monotonic() + CASE_TIMEOUT
    seen = {c: [] for c in channels}
    last_id = None
    opens = 0
    publisher = None
    contrary_since_tried = False
    while True:
        headers, url = {}, base
        if last_id is not None and mode == "header":
            headers["Last-Event-ID"] = last_id
            if not contrary_since_tried:
                # Last-Event-ID wins over ?since= (a browser's EventSource resends the
                # header with its original URL): an epoch no channel has must not count.
                url += "&since=" + q(",".join(f"{c}~1~1" for c in channels))
                contrary_since_tried = True
        elif last_id is not None:
            url += "&since=" + q(last_id)
        stream = SseStream(client, url, headers)
        opens += 1
        requested = last_id
        try:
            stream.check_head()
            # One reply per channel, in channels order. A channel's replayed messages
            # follow its own reply (before the next channel's reply, as the server
            # sends them) or all replies (as docs/protocol.md first had it): both are
            # accepted; a message before its channel's reply is not.
            replied = []
            here = 0
            while len(replied) < len(channels) or (
                here < every and any(len(seen[c]) < count for c in channels)
            ):
                ev = stream.next_event(deadline)
                expect(ev is not None, "the server ended the stream")
                expect("id" in ev, f"event without id: {ev}")
                msg = json.loads(ev["data"])
                if msg.get("reply") is not None:
                    expect(msg.get("reply") == "subscribe" and msg["code"] == 200, f"not a subscribe reply: {msg}")
                    c = msg["channel"]
                    expect(c == channels[len(replied)], f"replies out of channels order: {msg} after {replied}")
                    if requested is None:
                        expect("recovered" not in msg, f"a fresh subscribe says recovered: {msg}")
                    else:
                        expect(msg.get("recovered") is True, f"reopen #{opens} not recovered: {msg}")
                        # For a recovered reply the id is still the requested position.
                        expect(parse_token(ev["id"], channels)[c] == parse_token(requested, channels)[c], f"reply id {ev['id']} vs {requested}")
                    replied.append(c)
                    last_id = ev["id"]
                    if len(replied) == len(channels):
                        expect(stream.retry is not None, "no retry: line before the first event")
                        if publisher is None:
                            publisher = threading.Thread(
                                target=tcp_publisher, args=(args.tcp, channels, count, args.pace), daemon=True
                            )
                            publisher.start()
                    continue
                expect("offset" in msg and "type" not in msg, f"not a message: {msg}")
                c = msg["channel"]
                expect(c in seen, f"message of another channel: {msg}")
                expect(c in replied, f"message before its channel's subscribe reply: {msg}")
                expected = len(seen[c]) + 1
                expect(msg["offset"] == expected, f"{c}: offset {msg['offset']} where {expected} was due (open #{opens})")
                expect(msg["data"] == {"i": expected}, f"{c}: data {msg['data']}")
                seen[c].append(msg["offset"])
                pos = parse_token(ev["id"], channels)
                expect(set(pos) == set(channels), f"id {ev['id']} does not name every channel")
                expect(pos[c][0] == msg["offset"], f"id {ev['id']} does not match offset {msg['offset']}")
                for other in replied:
                    expect(pos[other][0] == len(seen[other]), f"id {ev['id']} vs delivered {other} {len(seen[other])}")
                last_id = ev["id"]
                here += 1
        finally:
            stream.close()
        if all(len(seen[c]) >= count for c in channels):
            break
        expect(time.monotonic() < deadline, "timed out")
    expect(opens >= 4, f"only {opens} streams: too few reopens to mean anything")
    return {"opens": opens, "messages": sum(len(v) for v in seen.values())}


def poll_once(client, addr, query, timeout=70.0):
    r = client.get(f"http://{addr}/poll?{query}", timeout=httpx.Timeout(timeout))
    expect(r.status_code == 200, f"poll {query}: {r.status_code} {r.text!r}")
    expect(r.headers.get("content-type", "").startswith("application/json"), f"poll content type {r.headers}")
    length = r.headers.get("content-length")
    # Either no Content-Length (the body ends at close) or an exact one.
    expect(length is None or int(length) == len(r.content), f"Content-Length {length} vs {len(r.content)}")
    body = r.json()
    expect(isinstance(body.get("events"), list) and isinstance(body.get("position"), str), f"poll answer {body}")
    return body


def poll_loop(args, client):
    channels = ["pa", "pb"]
    count = args.messages
    names = ",".join(channels)
    deadline = time.monotonic() + CASE_TIMEOUT
    first = poll_once(client, args.addr, f"channels={names}&timeout=5")
    replies = first["events"]
    expect([e.get("reply") for e in replies] == ["subscribe", "subscribe"], f"first answer {first}")
    expect([e["channel"] for e in replies] == channels, f"replies out of order {first}")
    position = first["position"]
    expect(parse_token(position) == {e["channel"]: (e["offset"], e["epoch"]) for e in replies}, f"position {position} vs {replies}")
    # Nothing published: held to its timeout, answered empty with the same position.
    idle = poll_once(client, args.addr, f"channels={names}&timeout=1&since={q(position)}")
    expect(idle == {"events": [], "position": position}, f"idle answer {idle}")
    publisher = threading.Thread(target=tcp_publisher, args=(args.tcp, channels, count, args.pace), daemon=True)
    publisher.start()
    seen = {c: 0 for c in channels}
    answers = 0
    largest = 0
    while any(seen[c] < count for c in channels):
        expect(time.monotonic() < deadline, f"timed out with {seen} after {answers} answers")
        answer = poll_once(client, args.addr, f"channels={names}&timeout=10&since={q(position)}")
        answers += 1
        events = answer["events"]
        if not events:
            # Held to its timeout (a publisher slowed down by a busy machine): nothing
            # moved.
            expect(answer["position"] == position, f"an empty answer moved the position: {answer}")
            continue
        largest = max(largest, len(events))
        for e in events:
            expect("reply" not in e, f"a recovered position gave a reply: {e}")
            c = e["channel"]
            expect(e["offset"] == seen[c] + 1, f"{c}: offset {e['offset']} where {seen[c] + 1} was due")
            expect(e["data"] == {"i": e["offset"]}, f"{c}: data {e}")
            seen[c] = e["offset"]
        pos = parse_token(answer["position"])
        expect({c: p[0] for c, p in pos.items()} == seen, f"position {answer['position']} vs delivered {seen}")
        expect({p[1] for p in pos.values()} == {p[1] for p in parse_token(position).values()}, "epochs changed")
        position = answer["position"]
    tail = poll_once(client, args.addr, f"channels={names}&timeout=1&since={q(position)}")
    expect(tail == {"events": [], "position": position}, f"after the last message: {tail}")
    return {"answers": answers, "largest_answer": largest, "messages": sum(seen.values())}


def expect_400(client, url, headers, why):
    r = client.get(url, headers=headers)
    text = r.text
    expect(r.status_code == 400, f"{url} {headers}: {r.status_code} {text!r}")
    expect(r.headers.get("content-type", "").startswith("text/plain"), f"{url}: {r.headers}")
    expect(why in text, f"{url}: reason {text!r} lacks {why!r}")
    expect(text.endswith("\n") and text.count("\n") == 1, f"{url}: not one line: {text!r}")


def bad_params(args, client):
    base = f"http://{args.addr}"
    too_many = ",".join(f"c{i}" for i in range(args.max_channels + 1))
    common = [
        ("channels=bad%20name", "invalid channel name"),
        ("channels=ok,bad%20name", "invalid channel name"),
        (f"channels={q('x' * 129)}", "invalid channel name"),
        (f"channels={too_many}", f"more than {args.max_channels} channels"),
        ("channels=a&since=a~1", "bad position"),
        ("channels=a&since=a~x~1", "bad position: malformed offset"),
        ("channels=a&since=a~1~abc", "bad position: malformed epoch"),
        (f"channels=a&since={q('a~1~1,a~2~1')}", "named twice"),
        ("channels=a&since=bad%20name~1~1", "bad position: invalid channel name"),
    ]
    checked = 0
    for path in ["sse", "poll"]:
        for query, why in common:
            expect_400(client, f"{base}/{path}?{query}&timeout=1", {}, why)
            checked += 1
    for t in ["0", "61", "-1", "abc", "1.5", ""]:
        expect_400(client, f"{base}/poll?channels=a&timeout={t}", {}, "timeout must be")
        checked += 1
    for header, why in [("a~1", "bad position"), ("a~1~1,a~1~1", "named twice"), ("a~~1", "bad position")]:
        expect_400(client, f"{base}/sse?channels=a", {"Last-Event-ID": header}, why)
        checked += 1
    return {"checked": checked}


def admin_publish(client, admin, channel, body):
    r = client.post(f"http://{admin}/publish?channel={q(channel)}", content=body)
    expect(r.status_code == 200, f"publish: {r.status_code} {r.text}")
    return r.json()["offset"]


def unknown_positions(args, client):
    channel = "u"
    deadline = time.monotonic() + CASE_TIMEOUT
    for i in range(1, 11):
        expect(admin_publish(client, args.admin, channel, json.dumps({"i": i})) == i, "offsets start at 1")
    fresh = poll_once(client, args.addr, f"channels={channel}&timeout=1")
    epoch = fresh["events"][0]["epoch"]
    expect(fresh["position"] == f"u~10~{epoch}", f"{fresh}")
    other_epoch = "1" if epoch != "1" else "2"
    cases = [
        ("epoch_changed", lambda live: f"u~3~{other_epoch}"),
        ("ahead", lambda live: f"u~{live + 1}~{epoch}"),
        ("too_old", lambda live: f"u~2~{epoch}"),
    ]
    live = 10
    for reason, position in cases:
        token = position(live)
        answer = poll_once(client, args.addr, f"channels={channel}&timeout=30&since={q(token)}")
        expect(len(answer["events"]) == 1, f"{reason} poll: {answer}")
        reply = answer["events"][0]
        want = {"reply": "subscribe", "code": 200, "channel": channel, "offset": live, "epoch": epoch, "recovered": False, "reason": reason}
        expect(reply == want, f"{reason} poll reply {reply}, want {want}")
        expect(answer["position"] == f"u~{live}~{epoch}", f"{reason} poll position {answer}")
        stream = SseStream(client, f"http://{args.addr}/sse?channels={channel}", {"Last-Event-ID": token})
        try:
            stream.check_head()
            ev = stream.next_event(deadline)
            expect(ev is not None, "stream ended")
            expect(json.loads(ev["data"]) == want, f"{reason} SSE reply {ev}")
            expect(ev["id"] == f"u~{live}~{epoch}", f"{reason} SSE id {ev}")
            # Nothing is replayed; live messages continue at offset + 1.
            live += 1
            expect(admin_publish(client, args.admin, channel, json.dumps({"i": live})) == live, "publish")
            ev = stream.next_event(deadline)
            expect(ev is not None, "stream ended")
            msg = json.loads(ev["data"])
            expect(msg == {"channel": channel, "offset": live, "data": {"i": live}}, f"{reason}: after the reply {msg}")
            expect(ev["id"] == f"u~{live}~{epoch}", f"{reason} SSE id {ev}")
        finally:
            stream.close()
    # A position within the history still recovers exactly.
    answer = poll_once(client, args.addr, f"channels={channel}&since={q(f'u~{live - 2}~{epoch}')}")
    expect([e.get("offset") for e in answer["events"]] == [live - 1, live], f"recovered poll {answer}")
    return {"epoch": epoch}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("suite", choices=["transport", "positions"])
    ap.add_argument("--addr", required=True)
    ap.add_argument("--tcp")
    ap.add_argument("--admin")
    ap.add_argument("--messages", type=int, default=600)
    ap.add_argument("--every", type=int, default=90)
    ap.add_argument("--pace", type=int, default=3000)
    ap.add_argument("--max-channels", type=int, default=8)
    args = ap.parse_args()
    cases = {
        "transport": [
            ("sse_resume_header", lambda c: sse_resume(args, c, "header")),
            ("sse_resume_since", lambda c: sse_resume(args, c, "since")),
            ("poll_loop", lambda c: poll_loop(args, c)),
        ],
        "positions": [
            ("bad_params", lambda c: bad_params(args, c)),
            ("unknown_positions", lambda c: unknown_positions(args, c)),
        ],
    }[args.suite]
    failed = False
    timeout = httpx.Timeout(READ_TIMEOUT, connect=10.0)
    with httpx.Client(timeout=timeout, http2=False) as client:
        for name, run in cases:
            try:
                extra = run(client) or {}
                print(json.dumps({"case": name, "ok": True, **extra}), flush=True)
            except (Fail, httpx.HTTPError, ValueError, KeyError) as e:
                failed = True
                print(json.dumps({"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
