#!/usr/bin/env python3
"""Presence cases for ringcast's end-to-end presence test, with real clients.

Tokens are signed here with PyJWT (never by ringcast's code); clients are the
`websockets` package, plus one raw socket that completes the upgrade and then goes
silent (stops reading, never answers a ping):

    python3 py_presence.py presence --ws 127.0.0.1:P --admin 127.0.0.1:Q --secret S

The server must run with 2 shards, `--allow-anonymous true`, `--presence-max-members 12`,
a short heartbeat (`--ping-interval 1 --pong-timeout 1`) and these namespaces:
`room` and `lobby` with presence and join_leave, `news` without presence.

Each case prints one JSON line {"case": NAME, "ok": true|false, "error": ...}; the exit
status is 0 when every case passed, 1 otherwise, 2 when a module is missing.
"""

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import time
import traceback
import urllib.request

from rc_common import Client, Fail, close_all, expect, member_key, poll_until, require, sign_token

require("py_presence.py", {"jwt": "PyJWT", "websockets": "websockets"})
from websockets.asyncio.client import connect  # noqa: E402

TIMEOUT = 5.0
MAX_MEMBERS = 12
# --ping-interval 1 --pong-timeout 1: nominally 2 s; room for per-shard jitter, the
# one-second sweep and a loaded machine.
DEAD_BOUND = 8.0


class Env:
    def __init__(self, args):
        self.ws = args.ws
        self.admin = args.admin
        self.secret = args.secret

    def url(self, channels="", token=None):
        url = f"ws://{self.ws}/ws?channels={channels}"
        if token is not None:
            url += f"&token={token}"
        return url

    def token(self, sub, **claims):
        return sign_token(self.secret, sub, **claims)

    def publish(self, channel, payload):
        req = urllib.request.Request(
            f"http://{self.admin}/publish?channel={channel}", data=payload.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read())

    def shard_connections(self):
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=TIMEOUT) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("ringcast_shard_connections{"):
                out[line.split('"')[1]] = int(float(line.rsplit(" ", 1)[1]))
        return out


async def open_client(env, subscribe, sub=None, name=None, **claims):
    """Connects subscribed to `subscribe` (upgrade URL), as `sub` (a token with `claims`)
    or anonymous."""
    token = env.token(sub, **claims) if sub else None
    c = Client(await connect(env.url(subscribe, token), open_timeout=TIMEOUT), name or sub or "anon", TIMEOUT)
    pong = await c.cmd({"cmd": "ping"})  # adopted: the upgrade's subscriptions are in
    expect(pong.get("reply") == "pong", f"ping answered {pong}")
    return c


async def wait_for(probe, what, timeout=TIMEOUT):
    return await poll_until(probe, what, timeout)


def members_of(reply):
    expect(reply.get("code") == 200, f"presence answered {reply}")
    return {member_key(m): m["connections"] for m in reply["members"]}


# ---- cases -------------------------------------------------------------------------------


async def join_leave_on_both_shards(env):
    """Anonymous watchers on both shards see alice join once (two connections), the
    channel's messages, and leave once, in that order; presence lists the watchers by
    their connection ids."""
    watchers = []
    try:
        shards = set()
        for _ in range(10):
            w = await open_client(env, "lobby:1", name=f"watcher{len(watchers)}")
            known = {x.conn_id for x in watchers}
            own = await wait_for(
                lambda: [
                    e for e in w.events("lobby:1")
                    if e["type"] == "join" and e["member"].get("conn") not in known
                ],
                f"{w.name}'s own join",
            )
            w.conn_id = own[0]["member"]["conn"]
            watchers.append(w)
            shards.add(w.conn_id.split("-")[0])
            if len(shards) >= 2 and len(watchers) >= 3:
                break
        expect(len(shards) >= 2, f"every watcher landed on one shard: {[w.conn_id for w in watchers]}")
        ids = {("conn", w.conn_id) for w in watchers}
        for w in watchers:
            listed = members_of(await w.cmd({"cmd": "presence", "channel": "lobby:1", "id": 1}))
            expect(set(listed) == ids, f"{w.name} ({w.conn_id}) sees lobby {listed}, expected {ids}")
            r = await w.cmd({"cmd": "subscribe", "channel": "room:1"})
            expect(r.get("code") == 200, f"subscribe room:1: {r}")

        alice1 = await open_client(env, "room:1", sub="alice")
        for w in watchers:
            await wait_for(
                lambda: [e for e in w.events("room:1") if e["member"] == {"user": "alice"}],
                f"alice's join at {w.name} ({w.conn_id})",
            )
        env.publish("room:1", '{"n":1}')
        alice2 = await open_client(env, "room:1", sub="alice")
        listed = members_of(await watchers[0].cmd({"cmd": "presence", "channel": "room:1"}))
        expect(listed.get(("user", "alice")) == 2, f"alice with two connections: {listed}")
        await alice1.close()
        deadline = time.monotonic() + TIMEOUT
        while True:
            listed = members_of(await watchers[-1].cmd({"cmd": "presence", "channel": "room:1"}))
            if listed.get(("user", "alice")) == 1:
                break
            expect(time.monotonic() < deadline, f"alice's first close not counted: {listed}")
            await asyncio.sleep(0.02)
        env.publish("room:1", '{"n":2}')
        await alice2.close()
        for w in watchers:
            await wait_for(
                lambda: [e for e in w.events("room:1") if e == {"type": "leave", "channel": "room:1", "member": {"user": "alice"}}],
                f"alice's leave at {w.name} ({w.conn_id})",
            )
            seen = [
                (m["type"] if "type" in m else m["offset"])
                for m in w.log
                if m.get("channel") == "room:1" and ("offset" in m or m.get("member") == {"user": "alice"})
            ]
            expect(seen == ["join", 1, 2, "leave"], f"{w.name} ({w.conn_id}) saw {seen}")
            for e in w.events("room:1"):
                expect("offset" not in e, f"an event carries an offset: {e}")
        listed = members_of(await watchers[0].cmd({"cmd": "presence", "channel": "room:1"}))
        expect(("user", "alice") not in listed and set(listed) == ids, f"after alice left: {listed}")
    finally:
        await close_all(watchers)


async def presence_is_exact_across_shards(env):
    """Users with connections on both shards are one member each with the right count,
    seen identically from every connection; closes update it; 403, 404 and the
    count-only reply past presence_max_members."""
    clients = []
    try:
        for u in range(4):
            for _ in range(2):
                clients.append(await open_client(env, "room:7", sub=f"u{u}"))
        for _ in range(2):
            clients.append(await open_client(env, "room:7"))
        per_shard = env.shard_connections()
        expect(len([n for n in per_shard.values() if n > 0]) >= 2, f"connections all on one shard: {per_shard}")
        anon = []
        for c in clients[8:]:
            # An anonymous connection's id: from its own join (room has join_leave).
            own = await wait_for(lambda: [e for e in c.events("room:7") if "conn" in e["member"] and e["member"]["conn"] not in anon], "own join")
            anon.append(own[0]["member"]["conn"])
        want = {("user", f"u{u}"): 2 for u in range(4)}
        want.update({("conn", a): 1 for a in anon})
        for c in clients:
            reply = await c.cmd({"cmd": "presence", "channel": "room:7", "id": "q"})
            expect(reply.get("id") == "q" and reply.get("count") == 6 and reply.get("connections") == 10, f"{reply}")
            expect(members_of(reply) == want, f"{c.name} sees {members_of(reply)}, expected {want}")
        await clients[0].close()
        await clients[1].close()
        await clients[8].close()
        del want[("user", "u0")]
        del want[("conn", anon[0])]
        rest = clients[2:8] + clients[9:]
        deadline = time.monotonic() + TIMEOUT
        while True:
            got = members_of(await rest[-1].cmd({"cmd": "presence", "channel": "room:7"}))
            if got == want:
                break
            expect(time.monotonic() < deadline, f"after closes: {got}, expected {want}")
            await asyncio.sleep(0.02)
        for c in rest:
            expect(members_of(await c.cmd({"cmd": "presence", "channel": "room:7"})) == want, "stale view")

        refused = await rest[0].cmd({"cmd": "presence", "channel": "news:1", "id": 2})
        expect(refused.get("code") == 404 and "presence = true" in refused.get("error", ""), f"no presence: {refused}")
        limited = await open_client(env, "", sub="lim", channels=["room:9"])
        rest.append(limited)
        forbidden = await limited.cmd({"cmd": "presence", "channel": "room:7"})
        expect(forbidden.get("code") == 403 and forbidden.get("channel") == "room:7", f"not granted: {forbidden}")
        empty = await limited.cmd({"cmd": "presence", "channel": "room:9"})
        expect(empty.get("count") == 0 and empty.get("members") == [], f"empty channel: {empty}")
        bad = await limited.cmd({"cmd": "presence", "id": 3})
        expect(bad.get("code") == 400, f"no channel: {bad}")

        while len(want) <= MAX_MEMBERS:
            c = await open_client(env, "room:7")
            rest.append(c)
            want[("conn", f"new{len(want)}")] = 1
        many = await rest[0].cmd({"cmd": "presence", "channel": "room:7"})
        expect(many.get("count") == len(want) and "members" not in many, f"past presence_max_members: {many}")
        clients = rest
    finally:
        await close_all(clients)


def raw_upgrade(env, channels, token):
    """A TCP socket that completes the upgrade, then never reads or answers again."""
    host, port = env.ws.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws?channels={channels}&token={token} HTTP/1.1\r\nHost: {env.ws}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        expect(chunk, "closed during the upgrade")
        head += chunk
    expect(head.startswith(b"HTTP/1.1 101"), f"upgrade answered {head[:40]!r}")
    return s


async def dead_peer_leaves_within_the_heartbeat(env):
    watcher = await open_client(env, "room:2", name="watcher")
    ghost = None
    try:
        ghost = raw_upgrade(env, "room:2", env.token("ghost"))
        await wait_for(lambda: [e for e in watcher.events("room:2") if e["member"] == {"user": "ghost"}], "ghost's join")
        silent_since = time.monotonic()
        await wait_for(
            lambda: [e for e in watcher.events("room:2") if e == {"type": "leave", "channel": "room:2", "member": {"user": "ghost"}}],
            "ghost's leave",
            timeout=DEAD_BOUND,
        )
        after = time.monotonic() - silent_since
        listed = members_of(await watcher.cmd({"cmd": "presence", "channel": "room:2"}))
        expect(("user", "ghost") not in listed, f"ghost still present: {listed}")
        print(json.dumps({"measure": "dead_peer_leave_seconds", "value": round(after, 2)}), flush=True)
    finally:
        if ghost is not None:
            ghost.close()
        await close_all([watcher])


SUITES = {
    "presence": [
        join_leave_on_both_shards,
        presence_is_exact_across_shards,
        dead_peer_leaves_within_the_heartbeat,
    ],
}


async def run_case(case, env):
    try:
        await case(env)
        return {"case": case.__name__, "ok": True}
    except Exception as e:  # every failure is reported, never swallowed
        detail = str(e) if isinstance(e, Fail) else traceback.format_exc()
        return {"case": case.__name__, "ok": False, "error": detail}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--ws", required=True)
    parser.add_argument("--admin", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    env = Env(args)
    failed = 0
    for case in SUITES[args.suite]:
        result = await run_case(case, env)
        failed += not result["ok"]
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
