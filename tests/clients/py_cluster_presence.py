#!/usr/bin/env python3
"""Presence across ringcast nodes joined by NATS, with real clients.

Tokens are signed here with PyJWT; clients are the `websockets` package:

    python3 py_cluster_presence.py --ws A,B,C --admin A,B,C --pids PA,PB,PC --secret S

Three nodes share one nats-server; each runs with `--allow-anonymous true`, the `room`
namespace with presence and join_leave. The last case kills node C with SIGKILL (its pid
is given), so it runs last.

Each case prints one JSON line {"case": NAME, "ok": true|false, "error": ...}; the exit
status is 0 when every case passed, 1 otherwise, 2 when a module is missing.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import traceback
import urllib.request

from rc_common import Client, Fail, close_all, expect, member_key, poll_until, require, sign_token

require("py_cluster_presence.py", {"jwt": "PyJWT", "websockets": "websockets"})
from websockets.asyncio.client import connect  # noqa: E402

TIMEOUT = 10.0


class Env:
    def __init__(self, args):
        self.ws = args.ws.split(",")
        self.admin = args.admin.split(",")
        self.pids = [int(p) for p in args.pids.split(",")]
        self.secret = args.secret

    def url(self, node, channels, token=None):
        url = f"ws://{self.ws[node]}/ws?channels={channels}"
        if token is not None:
            url += f"&token={token}"
        return url

    def token(self, sub):
        return sign_token(self.secret, sub)

    def metric(self, node, name):
        with urllib.request.urlopen(f"http://{self.admin[node]}/metrics", timeout=TIMEOUT) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


async def wait_for(probe, what, timeout=TIMEOUT):
    return await poll_until(probe, what, timeout)


async def open_client(env, node, channel, sub=None):
    token = env.token(sub) if sub else None
    c = Client(await connect(env.url(node, channel, token), open_timeout=TIMEOUT), sub or f"anon@{node}", TIMEOUT)
    pong = await c.cmd({"cmd": "ping"})
    expect(pong.get("reply") == "pong", f"ping answered {pong}")
    if sub is None:
        # Its own join names it (the channels of these tests send join/leave events).
        own = await wait_for(
            lambda: [e for e in c.events(channel) if e["type"] == "join" and "conn" in e["member"]
                     and e["member"]["conn"] not in SEEN_IDS],
            f"{c.name}'s own join",
        )
        c.conn_id = own[-1]["member"]["conn"]
        SEEN_IDS.add(c.conn_id)
    return c


SEEN_IDS = set()


async def presence(client, channel):
    r = await client.cmd({"cmd": "presence", "channel": channel, "id": 1})
    expect(r.get("code") == 200, f"presence answered {r}")
    expect("partial" not in r, f"NATS is up, yet the answer is partial: {r}")
    listed = {member_key(m): m["connections"] for m in r["members"]}
    expect(r["count"] == len(listed), f"count disagrees with members: {r}")
    expect(r["connections"] == sum(listed.values()), f"connections disagree: {r}")
    return listed


async def settle(askers, channel, want, what):
    """Asks every asker until each lists exactly `want` (a leave on another node reaches
    its registry when that node has processed the close)."""
    for a in askers:
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = await presence(a, channel)
            if got == want:
                break
            if time.monotonic() > deadline:
                raise Fail(f"{what}: {a.name} lists {got}, expected {want}")
            await asyncio.sleep(0.05)


# ---- cases -------------------------------------------------------------------------------


async def query_merges_every_node(env):
    """Members on three nodes: every node's query lists them all, alice (one connection on
    node A, one on node B) once with two connections; anonymous ids differ across nodes.
    After alice's close on B, an anonymous unsubscribe on C and bob's close, queries on
    every node stop listing them."""
    ch = "room:q"
    clients = []
    try:
        anon_a = await open_client(env, 0, ch)
        anon_c = await open_client(env, 2, ch)
        clients += [anon_a, anon_c]
        expect(anon_a.conn_id.split("-")[0] != anon_c.conn_id.split("-")[0],
               f"anonymous ids carry the node: {anon_a.conn_id} vs {anon_c.conn_id}")
        alice_a = await open_client(env, 0, ch, "alice")
        alice_b = await open_client(env, 1, ch, "alice")
        bob_c = await open_client(env, 2, ch, "bob")
        clients += [alice_a, alice_b, bob_c]
        # Askers on every node, not members (not subscribed).
        askers = []
        for node in range(3):
            a = Client(await connect(env.url(node, ""), open_timeout=TIMEOUT), f"asker@{node}", TIMEOUT)
            askers.append(a)
        clients += askers
        want = {
            ("user", "alice"): 2,
            ("user", "bob"): 1,
            ("conn", anon_a.conn_id): 1,
            ("conn", anon_c.conn_id): 1,
        }
        await settle(askers, ch, want, "all members")

        await alice_b.close()
        want[("user", "alice")] = 1
        await settle(askers, ch, want, "after alice's close on B")

        r = await anon_c.cmd({"cmd": "unsubscribe", "channel": ch})
        expect(r.get("code") == 200, f"unsubscribe: {r}")
        del want[("conn", anon_c.conn_id)]
        await settle(askers, ch, want, "after the anonymous unsubscribe on C")

        await bob_c.close()
        del want[("user", "bob")]
        await settle(askers, ch, want, "after bob's close on C")
    finally:
        await close_all(clients)


async def saw(watcher, ch, kind, member, what):
    """Waits until `watcher` has a `kind` event ("join" or "leave") of `member` on `ch`."""
    await wait_for(
        lambda: [e for e in watcher.events(ch) if e["type"] == kind and e["member"] == member],
        what,
    )


async def join_leave_cross_nodes(env):
    """A watcher on node B sees carol (on node A) join and leave, and an anonymous
    connection on node C join and leave."""
    ch = "room:ev"
    clients = []
    try:
        watcher = await open_client(env, 1, ch)
        clients.append(watcher)
        await wait_for(lambda: env.metric(1, "ringcast_cluster_presence_followed_channels") >= 1,
                       "node B following room:ev's events")
        carol = await open_client(env, 0, ch, "carol")
        clients.append(carol)
        await saw(watcher, ch, "join", {"user": "carol"}, "carol's join at the watcher on node B")
        anon = await open_client(env, 2, ch)
        clients.append(anon)
        await saw(watcher, ch, "join", {"conn": anon.conn_id}, "the anonymous join from node C at node B")
        await carol.close()
        await anon.close()
        await saw(watcher, ch, "leave", {"user": "carol"}, "carol's leave at node B")
        await saw(watcher, ch, "leave", {"conn": anon.conn_id}, "the anonymous leave from node C at node B")
        # Each arrived once, join before leave.
        seq = [(e["type"], member_key(e["member"])) for e in watcher.events(ch)
               if e["member"] in ({"user": "carol"}, {"conn": anon.conn_id})]
        expect(seq.count(("join", ("user", "carol"))) == 1 and seq.count(("leave", ("user", "carol"))) == 1,
               f"carol's events: {seq}")
        expect(seq.index(("join", ("user", "carol"))) < seq.index(("leave", ("user", "carol"))),
               f"carol's leave before her join: {seq}")
    finally:
        await close_all(clients)


async def killed_node_drops_out(env):
    """Dave and an anonymous connection on node C; node C is killed with SIGKILL: queries
    on A and B stop listing them."""
    ch = "room:kill"
    clients = []
    try:
        erin = await open_client(env, 0, ch, "erin")
        dave = await open_client(env, 2, ch, "dave")
        anon = await open_client(env, 2, ch)
        clients += [erin]
        askers = [Client(await connect(env.url(n, ""), open_timeout=TIMEOUT), f"asker@{n}", TIMEOUT) for n in (0, 1)]
        clients += askers
        want = {("user", "erin"): 1, ("user", "dave"): 1, ("conn", anon.conn_id): 1}
        await settle(askers, ch, want, "before the kill")
        os.kill(env.pids[2], signal.SIGKILL)
        del want[("user", "dave")]
        del want[("conn", anon.conn_id)]
        await settle(askers, ch, want, "after node C was killed")
        for c in (dave, anon):
            c.task.cancel()
    finally:
        await close_all(clients)


CASES = [query_merges_every_node, join_leave_cross_nodes, killed_node_drops_out]


async def main(env):
    ok = True
    for case in CASES:
        try:
            await asyncio.wait_for(case(env), 60)
            print(json.dumps({"case": case.__name__, "ok": True}), flush=True)
        except Exception as e:
            ok = False
            detail = str(e) if isinstance(e, Fail) else traceback.format_exc()
            print(json.dumps({"case": case.__name__, "ok": False, "error": detail}), flush=True)
    return ok


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ws", required=True)
    p.add_argument("--admin", required=True)
    p.add_argument("--pids", required=True)
    p.add_argument("--secret", required=True)
    sys.exit(0 if asyncio.run(main(Env(p.parse_args()))) else 1)
