#!/usr/bin/env python3
"""A subscriber that keeps leaving and coming back while a channel is published, built on
the `websockets` package: checks ringcast's recovery (docs/protocol.md, "Recovery").

    python3 py_recover.py --ws ws://127.0.0.1:8080/ws --tcp 127.0.0.1:9001 \\
                          --channel rec:1 --messages 20000 --subscribers 4

A publisher thread writes MESSAGES lines to the TCP ingest port at a steady pace. Each
subscriber subscribes (the reply gives its offset and epoch), reads a random number of
messages, drops the connection, waits, reconnects (to whichever shard the kernel picks),
and subscribes again with `since` = the last offset it received. Every reply must say
`recovered: true`, and the offsets it receives over all its connections must be exactly
first+1 .. MESSAGES, each once, in order. It also checks the refusals: an unknown epoch
and an offset ahead of the channel answer `recovered: false` with their reason, and
`since` on a channel already subscribed answers 409.

Prints one JSON summary line; exit status 0 when every check held, 1 otherwise, 2 when
the environment is wrong.
"""

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time

try:
    import websockets
except ImportError:
    sys.stderr.write(
        "py_recover.py: the python module 'websockets' is not installed; "
        "run `python3 -m pip install websockets` (scripts/test.sh does)\n"
    )
    sys.exit(2)


def publish(tcp, channel, messages, rate, done):
    host, port = tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        start = time.monotonic()
        batch = 50
        for first in range(1, messages + 1, batch):
            lines = "".join(
                f'{channel} {{"n":{n}}}\n' for n in range(first, min(first + batch, messages + 1))
            )
            s.sendall(lines.encode())
            # Paced so the publishing spans every subscriber's comings and goings.
            ahead = (first + batch - 1) / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    done.set()


async def request(ws, cmd):
    """Sends a command and returns its reply, keeping the messages that came before it."""
    await ws.send(json.dumps(cmd))
    early = []
    while True:
        msg = json.loads(await ws.recv())
        if "reply" in msg:
            return msg, early
        early.append(msg)


class Run:
    def __init__(self, args):
        self.args = args
        self.errors = []
        self.reconnects = 0

    def fail(self, what):
        if len(self.errors) < 20:
            self.errors.append(what)


async def subscriber(run, index):
    args, rng = run.args, random.Random(index)
    url = args.ws
    offsets = []
    position = None  # (offset, epoch) of the last message received
    first = None
    while True:
        async with websockets.connect(url, max_queue=None) as ws:
            cmd = {"cmd": "subscribe", "channel": args.channel, "id": index}
            if position is not None:
                cmd["since"] = {"offset": position[0], "epoch": position[1]}
            reply, early = await request(ws, cmd)
            if reply.get("code") != 200:
                run.fail(f"subscriber {index}: subscribe answered {reply}")
                return offsets
            if position is None:
                first = reply["offset"]
                position = (reply["offset"], reply["epoch"])
            else:
                run.reconnects += 1
                if reply.get("recovered") is not True or reply.get("epoch") != position[1]:
                    run.fail(f"subscriber {index}: since {position} answered {reply}")
                    return offsets
            if early:
                run.fail(f"subscriber {index}: messages before the subscribe reply: {early[:2]}")
            take = rng.randint(50, 800)
            while take > 0 and position[0] < args.messages:
                msg = json.loads(await ws.recv())
                if msg.get("channel") != args.channel:
                    run.fail(f"subscriber {index}: unexpected frame {msg}")
                    continue
                offsets.append(msg["offset"])
                position = (msg["offset"], position[1])
                take -= 1
            if position[0] >= args.messages:
                return first, offsets
        # Away for a while: publishing goes on.
        await asyncio.sleep(rng.uniform(0.02, 0.3))


async def refusals(run):
    args = run.args
    async with websockets.connect(args.ws) as ws:
        reply, _ = await request(ws, {"cmd": "subscribe", "channel": args.channel})
        epoch, offset = reply["epoch"], reply["offset"]
        await request(ws, {"cmd": "unsubscribe", "channel": args.channel})
        cases = [
            ({"offset": 1, "epoch": str(int(epoch) + 1)}, "epoch_changed"),
            ({"offset": offset + 10**9, "epoch": epoch}, "ahead"),
        ]
        for since, reason in cases:
            reply, _ = await request(
                ws, {"cmd": "subscribe", "channel": args.channel, "since": since}
            )
            if reply.get("recovered") is not False or reply.get("reason") != reason:
                run.fail(f"since {since}: expected recovered false ({reason}), got {reply}")
            await request(ws, {"cmd": "unsubscribe", "channel": args.channel})
        await request(ws, {"cmd": "subscribe", "channel": args.channel})
        reply, _ = await request(
            ws,
            {"cmd": "subscribe", "channel": args.channel, "since": {"offset": 0, "epoch": epoch}},
        )
        if reply.get("code") != 409:
            run.fail(f"since on a subscribed channel: expected 409, got {reply}")


async def main_async(run):
    done = threading.Event()
    # Subscribers attach first, so every one of them starts before the first message.
    tasks = [asyncio.create_task(subscriber(run, i)) for i in range(run.args.subscribers)]
    await asyncio.sleep(0.3)
    pub = threading.Thread(
        target=publish,
        args=(run.args.tcp, run.args.channel, run.args.messages, run.args.rate, done),
        daemon=True,
    )
    pub.start()
    results = await asyncio.wait_for(asyncio.gather(*tasks), run.args.timeout)
    await refusals(run)
    for index, result in enumerate(results):
        if not isinstance(result, tuple):
            continue
        first, offsets = result
        want = list(range(first + 1, run.args.messages + 1))
        if offsets != want:
            missing = sorted(set(want) - set(offsets))[:10]
            dups = len(offsets) - len(set(offsets))
            run.fail(
                f"subscriber {index}: {len(offsets)} offsets, expected {len(want)} "
                f"({first + 1}..{run.args.messages}); missing {missing}, duplicates {dups}"
            )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ws", required=True, help="ws://host:port/ws")
    p.add_argument("--tcp", required=True, help="TCP ingest host:port")
    p.add_argument("--channel", required=True)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--rate", type=float, default=8000.0, help="messages per second")
    p.add_argument("--subscribers", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    run = Run(args)
    try:
        asyncio.run(main_async(run))
    except asyncio.TimeoutError:
        run.fail(f"not done within {args.timeout} s")
    print(
        json.dumps(
            {
                "event": "summary",
                "reconnects": run.reconnects,
                "errors": run.errors,
                "ok": not run.errors,
            }
        )
    )
    sys.exit(0 if not run.errors else 1)


if __name__ == "__main__":
    main()
