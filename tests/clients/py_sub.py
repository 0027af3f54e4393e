#!/usr/bin/env python3
"""A subscriber fleet for ringcast's end-to-end tests, built on the `websockets` package.

    python3 py_sub.py --url 'ws://127.0.0.1:8080/ws?channels=a,b' \\
                      --subscribers 100 --messages 60 --timeout 30

Opens K connections to URL, waits until each one has received M messages, and checks every
message against docs/protocol.md: a JSON text frame with `channel`, `offset`, `data`, the
channel one the URL subscribed to, offsets starting anywhere but then growing by exactly 1
per channel (no gap, no duplicate, no reordering).

stdout carries two JSON lines:
    {"event":"ready","client":"python","connected":K}    once every connection is open
    {"event":"summary","client":"python",...,"ok":true}   at the end (see summarize())
Exit status 0 when every subscriber got M messages with no error, 1 otherwise, 2 when the
arguments or the environment are wrong.
"""

import argparse
import asyncio
import json
import sys
from urllib.parse import parse_qs, urlparse

try:
    import websockets
except ImportError:
    sys.stderr.write(
        "py_sub.py: the python module 'websockets' is not installed; "
        "run `python3 -m pip install websockets` (scripts/test.sh does)\n"
    )
    sys.exit(2)

MAX_ERRORS = 20


class Subscriber:
    """What one connection has seen so far."""

    def __init__(self, index, expected_channels):
        self.index = index
        self.expected_channels = expected_channels
        self.received = 0
        self.per_channel = {}  # channel -> {"first", "last", "count"}

    def check(self, frame, errors):
        where = f"subscriber {self.index}"
        if isinstance(frame, bytes):
            errors.append(f"{where}: got a binary frame, expected text")
            return
        try:
            msg = json.loads(frame)
        except ValueError:
            errors.append(f"{where}: frame is not JSON: {frame[:120]!r}")
            return
        if not isinstance(msg, dict):
            errors.append(f"{where}: frame is not a JSON object: {frame[:120]!r}")
            return
        if "reply" in msg:
            return  # a command reply, not a message
        channel, offset = msg.get("channel"), msg.get("offset")
        if not isinstance(channel, str) or type(offset) is not int or "data" not in msg:
            errors.append(f"{where}: not a message frame: {frame[:120]!r}")
            return
        if self.expected_channels and channel not in self.expected_channels:
            errors.append(f"{where}: message for unsubscribed channel {channel}")
        seen = self.per_channel.get(channel)
        if seen is None:
            self.per_channel[channel] = {"first": offset, "last": offset, "count": 1}
        else:
            if offset != seen["last"] + 1:
                kind = "duplicate or reordered" if offset <= seen["last"] else "gap"
                errors.append(f"{where}: {channel} offset {offset} after {seen['last']} ({kind})")
            seen["last"] = max(seen["last"], offset)
            seen["count"] += 1
        self.received += 1


def summarize(args, subscribers, errors, connected):
    channels = {}
    for sub in subscribers:
        for name, s in sub.per_channel.items():
            c = channels.get(name)
            if c is None:
                channels[name] = {
                    "subscribers": 1,
                    "first_min": s["first"],
                    "first_max": s["first"],
                    "last_min": s["last"],
                    "last_max": s["last"],
                    "count_min": s["count"],
                    "count_max": s["count"],
                }
            else:
                c["subscribers"] += 1
                c["first_min"] = min(c["first_min"], s["first"])
                c["first_max"] = max(c["first_max"], s["first"])
                c["last_min"] = min(c["last_min"], s["last"])
                c["last_max"] = max(c["last_max"], s["last"])
                c["count_min"] = min(c["count_min"], s["count"])
                c["count_max"] = max(c["count_max"], s["count"])
    counts = [s.received for s in subscribers]
    complete = sum(1 for n in counts if n >= args.messages)
    return {
        "event": "summary",
        "client": "python",
        "subscribers": args.subscribers,
        "connected": connected,
        "complete": complete,
        "received_total": sum(counts),
        "received_min": min(counts, default=0),
        "received_max": max(counts, default=0),
        "first_offset": {name: c["first_min"] for name, c in channels.items()},
        "last_offset": {name: c["last_max"] for name, c in channels.items()},
        "channels": channels,
        "errors": errors[:MAX_ERRORS],
        "error_count": len(errors),
        "ok": not errors and complete == args.subscribers,
    }


async def run(args):
    query = parse_qs(urlparse(args.url).query).get("channels", [""])[0]
    expected = {c for c in query.split(",") if c}
    subscribers = [Subscriber(i, expected) for i in range(args.subscribers)]
    errors = []
    state = {"connected": 0}

    async def connect(sub):
        # No client-initiated pings: the test measures what the server sends, and the
        # library answers the server's pings by itself.
        return await websockets.connect(
            args.url, max_size=None, ping_interval=None, open_timeout=10, close_timeout=2, compression=None
        )

    async def consume(sub, ws):
        try:
            while sub.received < args.messages:
                sub.check(await ws.recv(), errors)
        except websockets.ConnectionClosed as err:
            errors.append(f"subscriber {sub.index}: closed early: {err}")
        except Exception as err:  # noqa: BLE001 - anything else is reported, not raised
            errors.append(f"subscriber {sub.index}: {type(err).__name__}: {err}")

    sockets = []
    try:
        opened = await asyncio.gather(
            *(connect(sub) for sub in subscribers), return_exceptions=True
        )
        for sub, ws in zip(subscribers, opened):
            if isinstance(ws, BaseException):
                errors.append(f"subscriber {sub.index}: connect failed: {type(ws).__name__}: {ws}")
            else:
                sockets.append((sub, ws))
        state["connected"] = len(sockets)
        if len(sockets) == args.subscribers:
            print(json.dumps({"event": "ready", "client": "python", "connected": len(sockets)}), flush=True)
        waiting = [asyncio.ensure_future(consume(sub, ws)) for sub, ws in sockets]
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=args.timeout)
            if pending:
                errors.insert(
                    0, f"timeout after {args.timeout}s: {len(pending)} subscriber(s) still waiting"
                )
                for task in pending:
                    task.cancel()
    finally:
        await asyncio.gather(*(ws.close() for _, ws in sockets), return_exceptions=True)
    return summarize(args, subscribers, errors, state["connected"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--messages", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    if args.subscribers <= 0 or args.messages <= 0 or args.timeout <= 0:
        parser.error("--subscribers, --messages and --timeout must be positive")
    summary = asyncio.run(run(args))
    print(json.dumps(summary), flush=True)
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
