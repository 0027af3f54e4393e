#!/usr/bin/env python3
"""The identity features over SSE and long-poll (docs/protocol.md, "SSE and long-poll",
"Inbox", "Presence", "Identity"), read with `httpx`, tokens signed by PyJWT.

    python3 py_sse_identity.py --addr 127.0.0.1:8080 --admin 127.0.0.1:9090 --secret S

The server runs with the inbox on, `jwt_leeway = 0`, and `[namespaces.room]` with
presence and join_leave. Cases:

  inbox             unacked messages of user:<sub> follow the inbox subscribe reply on
                    /sse and /poll; the reply's id is the position before them, so a
                    stream cut right after the reply resumes with all of them; a live
                    one follows; Last-Event-ID skips what it names; another user's
                    token gets a 403 reply for the channel.
  presence          a member's SSE stream gets its own join, then others' joins and
                    leaves, each with the stream's id (presence moves no offset).
  admin_disconnect  POST /admin/disconnect?user=U ends U's SSE stream with the close
                    event 4403 and answers U's held long-poll at once.
  token_expiry      a token's expiry ends its SSE stream with the close event 4401 and
                    answers a held long-poll.

Prints one JSON line per case; exit status 0 when every case held, 1 otherwise, 2 when
a module is missing.
"""

import argparse
import json
import sys
import threading
import time
import urllib.parse

from rc_common import Fail, expect, require

require("py_sse_identity.py", {"httpx": "httpx", "jwt": "PyJWT"})
import httpx  # noqa: E402
import jwt  # noqa: E402  (PyJWT)

TIMEOUT = 15.0


def q(value):
    return urllib.parse.quote(value, safe="")


class Env:
    def __init__(self, args, client):
        self.addr, self.admin, self.secret, self.client = args.addr, args.admin, args.secret, client

    def token(self, sub, ttl=600):
        now = int(time.time())
        return jwt.encode({"sub": sub, "exp": now + ttl, "iat": now}, self.secret, algorithm="HS256")

    def publish(self, channel, body):
        r = self.client.post(f"http://{self.admin}/publish?channel={q(channel)}&ack=1", content=body)
        expect(r.status_code == 200, f"publish {channel}: {r.status_code} {r.text}")
        return r.json()["offset"]

    def sse(self, channels, token, last_id=None):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        return SseStream(self.client, f"http://{self.addr}/sse?channels={q(channels)}&token={q(token)}", headers)

    def poll(self, query, token, timeout=70.0):
        r = self.client.get(f"http://{self.addr}/poll?{query}&token={q(token)}", timeout=httpx.Timeout(timeout))
        expect(r.status_code == 200, f"poll {query}: {r.status_code} {r.text!r}")
        return r.json()


class SseStream:
    """One open GET /sse response, read event by event (a context manager)."""

    def __init__(self, client, url, headers):
        self.cm = client.stream("GET", url, headers=headers)

    def __enter__(self):
        self.response = self.cm.__enter__()
        if self.response.status_code != 200:
            raise Fail(f"SSE status {self.response.status_code}: {self.response.read()!r}")
        self.lines = self.response.iter_lines()
        return self

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)

    def next(self):
        """(id or None, data) of the next event; None at the end of the stream."""
        fields = {}
        deadline = time.monotonic() + TIMEOUT
        for line in self.lines:
            expect(time.monotonic() < deadline, "no event in time")
            if line == "":
                if "data" in fields:
                    return fields.get("id"), json.loads(fields["data"])
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
        return None

    def expect_end(self):
        """The stream ends (the server closed it) with nothing else."""
        rest = self.next()
        expect(rest is None, f"after the close event: {rest}")


def inbox(env):
    user = "user:ivy"
    for n in (1, 2, 3):
        expect(env.publish(user, json.dumps({"n": n})) == n, "inbox offsets start at 1")
    ivy = env.token("ivy")
    with env.sse(user, ivy) as s:
        rid, reply = s.next()
        epoch = reply["epoch"]
        want = {"reply": "subscribe", "code": 200, "channel": user, "offset": 3, "epoch": epoch, "inbox": {"unacked": 3, "more": 0}}
        expect(reply == want, f"inbox reply {reply}")
        expect(rid == f"{user}~0~{epoch}", f"the reply's id {rid} is not before the unacked messages")
    # Cut right after the reply: its id brings every unacked message.
    with env.sse(user, ivy, last_id=rid) as s:
        _, reply = s.next()
        expect(reply["inbox"] == {"unacked": 3, "more": 0}, f"resumed from the reply's id: {reply}")
        for n in (1, 2, 3):
            eid, msg = s.next()
            expect(msg == {"channel": user, "offset": n, "data": {"n": n}}, f"unacked {n}: {msg}")
            expect(eid == f"{user}~{n}~{epoch}", f"id {eid}")
        expect(env.publish(user, json.dumps({"n": 4})) == 4, "live offset")
        eid, msg = s.next()
        expect(msg == {"channel": user, "offset": 4, "data": {"n": 4}}, f"live: {msg}")
        expect(eid == f"{user}~4~{epoch}", f"id {eid}")
    # Last-Event-ID at 2: only 3 and 4 (nothing was acked: SSE cannot ack).
    with env.sse(user, ivy, last_id=f"{user}~2~{epoch}") as s:
        rid, reply = s.next()
        expect(reply["inbox"] == {"unacked": 2, "more": 0} and reply["offset"] == 4, f"{reply}")
        expect("recovered" not in reply, f"inbox replies carry no recovered: {reply}")
        expect(rid == f"{user}~2~{epoch}", f"id {rid}")
        got = [s.next()[1]["offset"] for _ in range(2)]
        expect(got == [3, 4], f"after Last-Event-ID 2: {got}")
    # Long-poll: the reply and every unacked message, at once.
    answer = env.poll(f"channels={q(user)}", ivy)
    offsets = [e.get("offset") for e in answer["events"][1:]]
    expect(answer["events"][0].get("inbox") == {"unacked": 4, "more": 0}, f"poll {answer}")
    expect(offsets == [1, 2, 3, 4], f"poll offsets {offsets}")
    expect(answer["position"] == f"{user}~4~{epoch}", f"poll position {answer}")
    # Another user's token: a 403 reply for the channel, the stream stays for the rest.
    with env.sse(f"{user},room:other", env.token("mallory")) as s:
        _, refused = s.next()
        expect(refused.get("code") == 403 and refused.get("channel") == user, f"another user's inbox: {refused}")
        _, ok = s.next()
        expect(ok.get("code") == 200 and ok.get("channel") == "room:other", f"{ok}")
    return {"epoch": epoch}


def presence(env):
    room = "room:lobby"
    with env.sse(room, env.token("ann")) as ann:
        rid, reply = ann.next()
        expect(reply.get("reply") == "subscribe" and reply["code"] == 200, f"{reply}")
        eid, own = ann.next()
        expect(own == {"type": "join", "channel": room, "member": {"user": "ann"}}, f"own join {own}")
        expect(eid == rid, f"a presence event moved the position: {eid} after {rid}")
        with env.sse(room, env.token("bob")) as bob:
            bob.next()
            eid, join = ann.next()
            expect(join == {"type": "join", "channel": room, "member": {"user": "bob"}}, f"bob's join {join}")
            expect(eid == rid, f"id {eid}")
            # Bob's second stream is the same member: no event for it.
            with env.sse(room, env.token("bob")) as bob2:
                bob2.next()
        # Only Bob's last stream leaving makes him leave (both are closed now).
        eid, leave = ann.next()
        expect(leave == {"type": "leave", "channel": room, "member": {"user": "bob"}}, f"bob's leave {leave}")
        expect(eid == rid, f"id {eid}")
        r = env.client.post(f"http://{env.admin}/publish?channel={q(room)}", content=b'{"m":1}')
        expect(r.status_code == 200, f"publish {r.text}")
        eid, msg = ann.next()
        expect(msg.get("offset") == 1, f"the message after the leave: {msg}")
    return {}


def ends_with_close(stream, code, reason):
    while True:
        event = stream.next()
        expect(event is not None, "the stream ended without a close event")
        eid, data = event
        if data.get("type") == "close":
            expect(data == {"type": "close", "code": code, "reason": reason}, f"close event {data}")
            expect(eid is None, f"the close event has an id: {eid}")
            stream.expect_end()
            return


def held_poll(env, query, token, result):
    try:
        result["answer"] = env.poll(query, token)
    except Exception as e:  # noqa: BLE001  (reported by the case)
        result["error"] = f"{type(e).__name__}: {e}"


def admin_disconnect(env):
    kick = env.token("kick")
    with env.sse("news", kick) as s:
        _, reply = s.next()
        position = f"news~{reply['offset']}~{reply['epoch']}"
        result = {}
        poller = threading.Thread(target=held_poll, args=(env, f"channels=news&timeout=60&since={q(position)}", kick, result))
        poller.start()
        # Both connections registered before the disconnect (the held poll has no event
        # to wait for, so ask until the count says so).
        deadline = time.monotonic() + TIMEOUT
        while True:
            r = env.client.get(f"http://{env.admin}/metrics")
            held = [l for l in r.text.splitlines() if l.startswith("ringcast_connections ") or l.startswith("ringcast_connections{")]
            total = sum(float(l.rsplit(" ", 1)[1]) for l in held)
            if total >= 2:
                break
            expect(time.monotonic() < deadline, f"the held poll never registered: {held}")
            time.sleep(0.05)
        r = env.client.post(f"http://{env.admin}/admin/disconnect?user=kick")
        expect(r.status_code == 200 and r.json() == {"user": "kick", "closed": 2}, f"disconnect: {r.status_code} {r.text}")
        ends_with_close(s, 4403, "disconnected by an administrator")
        poller.join(TIMEOUT)
        expect(not poller.is_alive(), "the held poll was not answered")
        expect("answer" in result, f"held poll: {result}")
        expect(result["answer"] == {"events": [], "position": position}, f"held poll answer {result['answer']}")
    return {}


def token_expiry(env):
    with env.sse("news", env.token("brief", ttl=2)) as s:
        _, reply = s.next()
        position = f"news~{reply['offset']}~{reply['epoch']}"
        result = {}
        query = f"channels=news&timeout=60&since={q(position)}"
        poller = threading.Thread(target=held_poll, args=(env, query, env.token("brief", ttl=2), result))
        poller.start()
        ends_with_close(s, 4401, "token expired")
        poller.join(TIMEOUT)
        expect(not poller.is_alive(), "the held poll was not answered")
        expect(result.get("answer") == {"events": [], "position": position}, f"held poll: {result}")
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--admin", required=True)
    ap.add_argument("--secret", required=True)
    args = ap.parse_args()
    failed = False
    with httpx.Client(timeout=httpx.Timeout(TIMEOUT, connect=10.0)) as client:
        env = Env(args, client)
        for name, run in [("inbox", inbox), ("presence", presence), ("admin_disconnect", admin_disconnect), ("token_expiry", token_expiry)]:
            try:
                extra = run(env) or {}
                print(json.dumps({"case": name, "ok": True, **extra}), flush=True)
            except (Fail, httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                failed = True
                print(json.dumps({"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"}), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
