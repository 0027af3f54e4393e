#!/usr/bin/env python3
"""Subscribers that fall behind during a burst, built on the `websockets` package: checks
that ringcast catches them up from history instead of dropping them (docs/protocol.md,
"Backpressure").

    python3 py_burst.py --ws 'ws://127.0.0.1:8080/ws?channels=burst' --tcp 127.0.0.1:9001 \\
                        --channel burst --messages 20000 --size 1024 --healthy 3 --pausing 1

A publisher writes MESSAGES lines of SIZE bytes to the TCP ingest port as fast as it can.
HEALTHY subscribers read as fast as they can; PAUSING ones stop reading for --pause
seconds at the start of the burst, then read as fast as they can. For every subscriber,
the messages (by offset) and `gap` notices it receives, in order, must account for every
offset from 1 to MESSAGES exactly once: a message n, or a gap notice covering n. With
--no-gaps, no subscriber may get a gap notice at all.

Prints one JSON summary line; exit status 0 when every check held, 1 otherwise, 2 when
the environment is wrong.
"""

import argparse
import asyncio
import json
import socket
import sys
import threading
import time

try:
    import websockets
except ImportError:
    sys.stderr.write(
        "py_burst.py: the python module 'websockets' is not installed; "
        "run `python3 -m pip install websockets` (scripts/test.sh does)\n"
    )
    sys.exit(2)


def publish(tcp, channel, messages, size):
    host, port = tcp.rsplit(":", 1)
    pad = "x" * max(0, size - 40)
    with socket.create_connection((host, int(port))) as s:
        start = time.monotonic()
        batch = 500
        for first in range(1, messages + 1, batch):
            lines = "".join(
                f'{channel} {{"n":{n},"pad":"{pad}"}}\n'
                for n in range(first, min(first + batch, messages + 1))
            )
            s.sendall(lines.encode())
        return time.monotonic() - start


async def subscriber(args, index, pause, ready, go, errors):
    """Reads until every offset is accounted for; returns (messages, gaps)."""
    where = f"subscriber {index} ({'pausing' if pause else 'healthy'})"
    nxt, messages, gaps = 1, 0, 0
    async with websockets.connect(args.ws, max_size=None) as ws:
        ready.release()
        await go.wait()
        if pause:
            await asyncio.sleep(pause)
        while nxt <= args.messages:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "gap":
                if frame["from"] != nxt or frame["to"] < frame["from"]:
                    errors.append(f"{where}: gap {frame} while expecting offset {nxt}")
                    return messages, gaps
                gaps += frame["to"] - frame["from"] + 1
                nxt = frame["to"] + 1
            elif "offset" in frame:
                if frame["offset"] != nxt:
                    errors.append(f"{where}: offset {frame['offset']} while expecting {nxt}")
                    return messages, gaps
                messages += 1
                nxt += 1
    return messages, gaps


async def main_async(args, errors):
    ready = asyncio.Semaphore(0)
    go = asyncio.Event()
    pauses = [0.0] * args.healthy + [args.pause] * args.pausing
    tasks = [
        asyncio.create_task(subscriber(args, i, p, ready, go, errors))
        for i, p in enumerate(pauses)
    ]
    for _ in pauses:
        await ready.acquire()
    await asyncio.sleep(0.2)
    go.set()
    took = await asyncio.to_thread(publish, args.tcp, args.channel, args.messages, args.size)
    results = await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
    return took, results, pauses


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ws", required=True, help="ws://host:port/ws?channels=CHANNEL")
    p.add_argument("--tcp", required=True, help="TCP ingest host:port")
    p.add_argument("--channel", required=True)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--size", type=int, default=1024, help="payload bytes")
    p.add_argument("--healthy", type=int, default=3)
    p.add_argument("--pausing", type=int, default=0)
    p.add_argument("--pause", type=float, default=2.0)
    p.add_argument("--no-gaps", action="store_true")
    p.add_argument("--timeout", type=float, default=90.0)
    args = p.parse_args()
    errors = []
    summary = {"event": "summary"}
    try:
        took, results, pauses = asyncio.run(main_async(args, errors))
        summary["publish_seconds"] = round(took, 3)
        summary["subscribers"] = [
            {"pause": pause, "messages": m, "gap_offsets": g}
            for pause, (m, g) in zip(pauses, results)
        ]
        if args.no_gaps:
            for i, (m, g) in enumerate(results):
                if g:
                    errors.append(f"subscriber {i}: {g} offsets reported as gaps")
    except asyncio.TimeoutError:
        errors.append(f"not done within {args.timeout} s")
    except Exception as e:  # a closed connection (1013 ...) is a failure here
        errors.append(f"{type(e).__name__}: {e}")
    summary["errors"] = errors[:20]
    summary["ok"] = not errors
    print(json.dumps(summary))
    sys.exit(0 if not errors else 1)


if __name__ == "__main__":
    main()
