#!/usr/bin/env python3
"""A user's client of ringcast's durable inbox (docs/protocol.md, "Inbox"), built on the
`websockets` package with tokens signed by PyJWT (an independent signer).

    python3 py_inbox.py --ws 127.0.0.1:8080 --admin 127.0.0.1:9090 --secret S \\
                        --user alice --expect 35 --ack 30
    python3 py_inbox.py ... --user carol --churn 3000 --tcp 127.0.0.1:9001

1. Connects with `?channels=user:<user>` on the upgrade URL (with --auto: naming no
   channel, the server subscribes the token's own): the subscribe reply must say
   `inbox.unacked == EXPECT`, followed by offsets 1..EXPECT, each once, in order.
2. Another user's token may not ack the channel (403); an ack ahead of the channel's
   last offset answers 400.
3. Acks ACK (cumulative), reconnects, subscribes with a command: gets ACK+1..EXPECT only.
4. A message published now (HTTP POST /publish?ack=1) arrives live once, right after.
5. Acks everything, reconnects: nothing unacked.

With --resubscribes N: N times in a row, connects, subscribes to user:<user> (never
acking) and must get `inbox.unacked == EXPECT` and offsets 1..EXPECT (no gap notice), or
a 503 refusal that says to subscribe again. Run while a burst on other channels keeps the
server's ring follower behind: the regression where such a subscribe got a gap notice for
every unacked message (and a later ack would have removed them unread).

With --churn N: a TCP publisher writes N messages to user:<user> at a steady pace while
the client keeps subscribing, reading a few, acking what it read and reconnecting; each
subscription must continue at exactly the acked offset + 1 (unacked from the store, then
live, no gap, no duplicate), until offset N.

Prints one JSON summary line; exit status 0 when every check held, 1 otherwise, 2 when
the environment is wrong.
"""

import argparse
import asyncio
import json
import time

from rc_common import Frames, expect, print_summary, require, sign_token

require("py_inbox.py", {"jwt": "PyJWT", "websockets": "websockets"})
from websockets.asyncio.client import connect  # noqa: E402

TIMEOUT = 5.0


def token(secret, sub):
    return sign_token(secret, sub, ttl=120)


FRAMES = Frames(TIMEOUT, quiet=0.3)
recv_json, reply_to, messages = FRAMES.recv_json, FRAMES.reply_to, FRAMES.messages
nothing_more, http_publish = FRAMES.nothing_more, FRAMES.http_publish


async def run(args):
    channel = f"user:{args.user}"
    mine = token(args.secret, args.user)
    # With --auto the server subscribes every token to its own user channel
    # (subscribe_user_channel = true): nothing names it.
    named = "" if args.auto else f"channels={channel}&"
    url = f"ws://{args.ws}/ws?{named}token={mine}"
    # 1. Subscribed through the upgrade URL: every unacked message, oldest first.
    async with connect(url) as ws:
        sub = await reply_to(ws, "subscribe")
        expect(sub["code"] == 200, f"subscribe: {sub}")
        expect(sub["inbox"]["unacked"] == args.expect, f"unacked count: {sub}")
        epoch = sub["epoch"]
        got = await messages(ws, args.expect)
        offsets = [m["offset"] for m in got]
        expect(offsets == list(range(1, args.expect + 1)), f"offsets {offsets}")
        expect(sub["offset"] >= args.expect, f"position before the unacked end: {sub}")
        await nothing_more(ws)
        # 2. Acks beyond the channel are refused.
        await ws.send(json.dumps({"cmd": "ack", "channel": channel, "offset": 10**9, "id": 1}))
        ahead = await reply_to(ws, "ack")
        expect(ahead["code"] == 400, f"ack ahead: {ahead}")
        await ws.send(json.dumps({"cmd": "ack", "channel": channel, "offset": args.ack, "id": 2}))
        acked = await reply_to(ws, "ack")
        expect(acked["code"] == 200 and acked["removed"] == args.ack, f"ack: {acked}")
    other = token(args.secret, "mallory")
    async with connect(f"ws://{args.ws}/ws?token={other}") as ws:
        if args.auto:
            own = await reply_to(ws, "subscribe")
            expect(own["channel"] == "user:mallory", f"mallory's own channel: {own}")
        await ws.send(json.dumps({"cmd": "ack", "channel": channel, "offset": args.expect}))
        forbidden = await reply_to(ws, "ack")
        expect(forbidden["code"] == 403, f"another user's ack: {forbidden}")
    # 3. Reconnected: only what was not acked.
    async with connect(f"ws://{args.ws}/ws?token={mine}") as ws:
        if not args.auto:
            await ws.send(json.dumps({"cmd": "subscribe", "channel": channel, "id": 3}))
        sub = await reply_to(ws, "subscribe")
        left = args.expect - args.ack
        expect(sub["inbox"]["unacked"] == left and sub["epoch"] == epoch, f"resubscribe: {sub}")
        got = await messages(ws, left)
        offsets = [m["offset"] for m in got]
        expect(offsets == list(range(args.ack + 1, args.expect + 1)), f"after ack: {offsets}")
        # 4. Live after the unacked ones, once.
        status, body = http_publish(args.admin, channel, '{"live":true}')
        expect(status == 200 and body["offset"] == args.expect + 1, f"http ack: {status} {body}")
        live = await messages(ws, 1)
        expect(live[0]["offset"] == args.expect + 1 and live[0]["data"] == {"live": True}, f"live: {live}")
        await nothing_more(ws)
        await ws.send(json.dumps({"cmd": "ack", "channel": channel, "offset": args.expect + 1}))
        acked = await reply_to(ws, "ack")
        expect(acked["removed"] == left + 1, f"final ack: {acked}")
    # 5. Nothing comes back.
    async with connect(url) as ws:
        sub = await reply_to(ws, "subscribe")
        expect(sub["inbox"]["unacked"] == 0, f"after acking all: {sub}")
        expect(sub["offset"] == args.expect + 1, f"position: {sub}")
        await nothing_more(ws)
    return {"epoch": epoch, "delivered": args.expect, "acked": args.expect + 1}


def tcp_publisher(tcp, channel, n, rate):
    import socket
    import threading

    def run():
        host, port = tcp.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            start = time.monotonic()
            for first in range(1, n + 1, 20):
                lines = "".join(f'{channel} {{"n":{i}}}\n' for i in range(first, min(first + 20, n + 1)))
                s.sendall(lines.encode())
                ahead = first / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


async def churn(args):
    import random

    channel = f"user:{args.user}"
    mine = token(args.secret, args.user)
    publisher = tcp_publisher(args.tcp, channel, args.churn, args.rate)
    acked = 0
    sessions = 0
    started = time.monotonic()
    deadline = started + 60
    slow = []
    while acked < args.churn:
        expect(time.monotonic() < deadline, f"stuck at {acked} of {args.churn}")
        via_url = sessions % 2 == 0
        url = f"ws://{args.ws}/ws?token={mine}" + (f"&channels={channel}" if via_url else "")
        t0 = time.monotonic()
        # max_queue=None: live messages that arrive after the ack reply are never read, and
        # with a bounded queue websockets stops reading the socket once it is full, so the
        # server's close frame behind them would wait for the client's 10 s close timeout.
        async with connect(url, max_queue=None) as ws:
            t1 = time.monotonic()
            if not via_url:
                await ws.send(json.dumps({"cmd": "subscribe", "channel": channel}))
            sub = await reply_to(ws, "subscribe")
            expect(sub["code"] == 200, f"subscribe: {sub}")
            want = acked + 1
            for _ in range(random.randint(1, 200)):
                if want > args.churn:
                    break
                msg = await recv_json(ws)
                expect(msg.get("offset") == want, f"session {sessions}: expected {want}, got {msg}")
                expect(msg["data"]["n"] == want, f"payload {msg}")
                want += 1
            await ws.send(json.dumps({"cmd": "ack", "channel": channel, "offset": want - 1}))
            # Live messages may come before the ack reply: skip them (they stay unacked).
            while True:
                msg = await recv_json(ws)
                if msg.get("reply") == "ack":
                    expect(msg["code"] == 200, f"ack: {msg}")
                    break
                expect(msg.get("offset") == want, f"after the last read: {msg}")
                want += 1
            acked = msg["offset"]
            t2 = time.monotonic()
        t3 = time.monotonic()
        if t3 - t0 > 1:
            slow.append(f"session {sessions}: open {t1-t0:.2f} s, use {t2-t1:.2f} s, close {t3-t2:.2f} s")
        sessions += 1
        await asyncio.sleep(random.random() * 0.05)
    joined = time.monotonic()
    publisher.join(timeout=10)
    if time.monotonic() - joined > 1:
        slow.append(f"publisher join {time.monotonic() - joined:.2f} s")
    return {
        "sessions": sessions,
        "acked": acked,
        "secs": round(time.monotonic() - started, 2),
        "slow": slow,
    }


async def resubscribes(args):
    channel = f"user:{args.user}"
    url = f"ws://{args.ws}/ws?channels={channel}&token={token(args.secret, args.user)}"
    served = refused = 0
    for i in range(args.resubscribes):
        async with connect(url, max_queue=None) as ws:
            sub = await reply_to(ws, "subscribe")
            if sub["code"] == 503:
                expect("subscribe again" in sub.get("error", ""), f"session {i}: {sub}")
                refused += 1
                continue
            expect(sub["code"] == 200, f"session {i}: {sub}")
            expect(sub["inbox"]["unacked"] == args.expect, f"session {i}: unacked count: {sub}")
            got = await messages(ws, args.expect)
            offsets = [m["offset"] for m in got]
            expect(offsets == list(range(1, args.expect + 1)), f"session {i}: offsets {offsets}")
            served += 1
    expect(served > 0, f"every one of {args.resubscribes} subscribes was refused")
    return {"served": served, "refused": refused}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ws", required=True)
    p.add_argument("--admin", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--user", default="alice")
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--ack", type=int, default=0)
    p.add_argument("--churn", type=int, default=0)
    p.add_argument("--resubscribes", type=int, default=0)
    p.add_argument("--rate", type=float, default=1500.0)
    p.add_argument("--tcp")
    p.add_argument("--auto", action="store_true", help="the server subscribes tokens to user:<sub>")
    args = p.parse_args()
    if args.churn:
        print_summary(churn(args))
    elif args.resubscribes:
        print_summary(resubscribes(args))
    else:
        print_summary(run(args))


if __name__ == "__main__":
    main()
