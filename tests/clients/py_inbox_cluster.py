#!/usr/bin/env python3
"""A user's inbox client moving between ringcast nodes of one cluster (docs/cluster.md,
"Inbox"), on `websockets` with tokens signed by PyJWT.

    python3 py_inbox_cluster.py --nodes WS0,ADMIN0 WS1,ADMIN1 WS2,ADMIN2 --secret S \\
                                --user 42 moves
    python3 py_inbox_cluster.py --nodes WS1,ADMIN1 --secret S --user 42 \\
                                check --first 7 --last 17

`moves`: HTTP publishes (`ack=1`) on node 0 get offsets 1..5; the user subscribes on
node 1 and gets 1..5 (as unacked, or live right after the reply when that node's ring
follower had not passed them yet: the reply's offset says which), then a 6th published on node 0 arrives live; another
user's ack is refused (403); the user acks 4 on node 1, reconnects to node 2 and gets
only 5 and 6 with the same epoch; acks everything there, reconnects to node 0 and gets
nothing, with the position kept; a message published on node 2 then continues at 7 and
reaches the user live on node 0.

`check`: on the first node given, the user's unacked messages are exactly FIRST..LAST,
each once, in order (the epoch too, with --epoch).

Prints one JSON summary line; exit status 0 when every check held, 1 otherwise.
"""

import argparse
import json

from rc_common import Frames, expect, print_summary, require, sign_token

require("py_inbox_cluster.py", {"jwt": "PyJWT", "websockets": "websockets"})
from websockets.asyncio.client import connect  # noqa: E402

TIMEOUT = 10.0


def token(secret, sub):
    return sign_token(secret, sub)


FRAMES = Frames(TIMEOUT, quiet=0.5)
recv_json, reply_to, messages = FRAMES.recv_json, FRAMES.reply_to, FRAMES.messages
nothing_more, http_publish = FRAMES.nothing_more, FRAMES.http_publish


async def subscribe(ws_addr, secret, user, rid):
    ws = await connect(f"ws://{ws_addr}/ws?token={token(secret, user)}")
    await ws.send(json.dumps({"cmd": "subscribe", "channel": f"user:{user}", "id": rid}))
    sub = await reply_to(ws, "subscribe")
    expect(sub["code"] == 200, f"subscribe: {sub}")
    return ws, sub


async def ack(ws, channel, offset, rid):
    await ws.send(json.dumps({"cmd": "ack", "channel": channel, "offset": offset, "id": rid}))
    return await reply_to(ws, "ack")


async def moves(args, nodes):
    expect(len(nodes) >= 3, "moves needs three nodes")
    (ws0, admin0), (ws1, _), (ws2, admin2) = nodes[0], nodes[1], nodes[2]
    channel = f"user:{args.user}"
    for i in range(1, 6):
        status, body = http_publish(admin0, channel, json.dumps({"n": i}))
        expect(status == 200 and body["offset"] == i, f"publish {i} on node 0: {status} {body}")
    # On node 1: the unacked ones, then live from node 0.
    ws, sub = await subscribe(ws1, args.secret, args.user, 1)
    # Unacked from the store, or live when this node's ring follower had not passed
    # them yet when the answer came (the reply's offset says where live starts).
    expect(sub["inbox"]["unacked"] <= 5 and sub["offset"] == sub["inbox"]["unacked"], f"node 1 subscribe: {sub}")
    epoch = sub["epoch"]
    got = [m["offset"] for m in await messages(ws, 5)]
    expect(got == [1, 2, 3, 4, 5], f"node 1 unacked: {got}")
    status, body = http_publish(admin0, channel, json.dumps({"n": 6}))
    expect(status == 200 and body["offset"] == 6, f"publish 6: {status} {body}")
    live = await messages(ws, 1)
    expect(live[0]["offset"] == 6 and live[0]["data"] == {"n": 6}, f"live on node 1: {live}")
    await nothing_more(ws)
    ahead = await ack(ws, channel, 10**9, 2)
    expect(ahead["code"] == 400, f"ack ahead: {ahead}")
    acked = await ack(ws, channel, 4, 3)
    expect(acked["code"] == 200 and acked["removed"] == 4, f"ack 4 on node 1: {acked}")
    await ws.close()
    other = await connect(f"ws://{ws1}/ws?token={token(args.secret, 'mallory')}")
    forbidden = await ack(other, channel, 6, 4)
    expect(forbidden["code"] == 403, f"another user's ack: {forbidden}")
    await other.close()
    # On node 2: only what was not acked, same offsets and epoch.
    ws, sub = await subscribe(ws2, args.secret, args.user, 5)
    expect(sub["inbox"]["unacked"] <= 2 and sub["epoch"] == epoch, f"node 2 subscribe: {sub}")
    expect(sub["offset"] == 4 + sub["inbox"]["unacked"], f"node 2 position: {sub}")
    got = await messages(ws, 2)
    expect([m["offset"] for m in got] == [5, 6], f"node 2 unacked: {got}")
    expect([m["data"]["n"] for m in got] == [5, 6], f"node 2 payloads: {got}")
    await nothing_more(ws)
    acked = await ack(ws, channel, 6, 6)
    expect(acked["code"] == 200 and acked["removed"] == 2, f"ack 6 on node 2: {acked}")
    await ws.close()
    # Back on node 0: nothing unacked, the position kept; offsets continue.
    ws, sub = await subscribe(ws0, args.secret, args.user, 7)
    expect(sub["inbox"]["unacked"] == 0, f"node 0 after acking all: {sub}")
    expect(sub["offset"] == 6 and sub["epoch"] == epoch, f"node 0 position: {sub}")
    await nothing_more(ws)
    status, body = http_publish(admin2, channel, json.dumps({"n": 7}))
    expect(status == 200 and body["offset"] == 7, f"publish 7 on node 2: {status} {body}")
    live = await messages(ws, 1)
    expect(live[0]["offset"] == 7, f"live on node 0: {live}")
    await nothing_more(ws)
    await ws.close()
    return {"epoch": epoch, "moves": 3}


async def check(args, nodes):
    ws_addr = nodes[0][0]
    ws, sub = await subscribe(ws_addr, args.secret, args.user, 1)
    n = args.last - args.first + 1
    expect(sub["inbox"]["unacked"] <= n, f"unacked count: {sub}")
    if args.epoch:
        expect(sub["epoch"] == args.epoch, f"epoch: {sub}")
    got = [m["offset"] for m in await messages(ws, n)]
    expect(got == list(range(args.first, args.last + 1)), f"unacked offsets: {got}")
    await nothing_more(ws)
    await ws.close()
    return {"epoch": sub["epoch"], "unacked": n}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", nargs="+", required=True, help="WS,ADMIN per node")
    p.add_argument("--secret", required=True)
    p.add_argument("--user", default="42")
    sub = p.add_subparsers(dest="scenario", required=True)
    sub.add_parser("moves")
    c = sub.add_parser("check")
    c.add_argument("--first", type=int, required=True)
    c.add_argument("--last", type=int, required=True)
    c.add_argument("--epoch")
    args = p.parse_args()
    nodes = [tuple(n.split(",")) for n in args.nodes]
    scenario = moves if args.scenario == "moves" else check
    print_summary(scenario(args, nodes))


if __name__ == "__main__":
    main()
