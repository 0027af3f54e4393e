#!/usr/bin/env python3
"""Token cases for ringcast's end-to-end identity test, with an independent signer.

Tokens are made here with PyJWT (and keys with `cryptography`), never by ringcast's own
code, and driven over real connections with the `websockets` package:

    python3 py_auth.py keygen --dir DIR             # RSA key pair: DIR/rsa.pem, DIR/rsa.pub.pem
    python3 py_auth.py hs256 --ws 127.0.0.1:P --admin 127.0.0.1:Q --secret S --cookie NAME
    python3 py_auth.py rs256 --ws ... --admin ... --key-dir DIR
    python3 py_auth.py disconnect --ws ... --admin ... --secret S

Each case prints one JSON line {"case": NAME, "ok": true|false, "error": ...}; the exit
status is 0 when every case passed, 1 otherwise, 2 when a module is missing (a loud
failure: the test that runs this script never skips).
"""

import argparse
import asyncio
import json
import sys
import time
import traceback
import urllib.request

from rc_common import Fail, expect, require

require(
    "py_auth.py",
    {"jwt": "PyJWT", "websockets": "websockets", "cryptography": "cryptography"},
)
import jwt  # noqa: E402  (PyJWT)
import websockets  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

TIMEOUT = 5.0


class Env:
    def __init__(self, args):
        self.ws = args.ws
        self.admin = args.admin
        self.secret = getattr(args, "secret", None)
        self.cookie = getattr(args, "cookie", None)
        self.private_key = None
        self.other_key = None

    def url(self, channels="", token=None):
        url = f"ws://{self.ws}/ws?channels={channels}"
        if token is not None:
            url += f"&token={token}"
        return url

    def hs(self, sub="alice", ttl=60, secret=None, **claims):
        now = int(time.time())
        body = {"sub": sub, "exp": now + ttl, "iat": now}
        body.update(claims)
        return jwt.encode(body, secret or self.secret, algorithm="HS256")

    def publish(self, channel, payload):
        req = urllib.request.Request(
            f"http://{self.admin}/publish?channel={channel}", data=payload.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read())

    def post(self, path):
        req = urllib.request.Request(f"http://{self.admin}{path}", data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def shard_connections(self):
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=TIMEOUT) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("ringcast_shard_connections{"):
                shard = line.split('"')[1]
                out[shard] = int(float(line.rsplit(" ", 1)[1]))
        return out


async def recv_json(ws, timeout=TIMEOUT):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def command(ws, cmd):
    """Sends a command and returns its reply (messages in between are skipped)."""
    await ws.send(json.dumps(cmd))
    while True:
        msg = await recv_json(ws)
        if "reply" in msg:
            return msg


async def adopted(ws):
    """A reply proves the server finished adopting the connection (subscriptions in)."""
    reply = await command(ws, {"cmd": "ping", "id": "adopted"})
    expect(reply.get("reply") == "pong", f"ping answered with {reply}")


async def refused(env, url, needle, headers=None):
    try:
        async with connect(url, additional_headers=headers or {}, open_timeout=TIMEOUT):
            pass
    except InvalidStatus as e:
        status, body = e.response.status_code, (e.response.body or b"").decode()
        expect(status == 401, f"expected 401, got {status} {body!r}")
        expect(needle in body, f"401 body {body!r} does not mention {needle!r}")
        return body
    raise Fail("the upgrade succeeded; expected 401")


async def wait_close(ws, timeout):
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as e:
        expect(e.rcvd is not None, "closed without a close frame")
        return e.rcvd.code, e.rcvd.reason
    except asyncio.TimeoutError:
        raise Fail(f"still open after {timeout}s")


# ---- cases -------------------------------------------------------------------------------


async def valid_hs256(env):
    token = env.hs(channels=["news:*"])
    # Its own channel: the cases run at once, and forbidden_channel publishes to news:eu.
    async with connect(env.url("news:valid", token)) as ws:
        await adopted(ws)
        env.publish("news:valid", '{"n":1}')
        msg = await recv_json(ws)
        expect(msg.get("channel") == "news:valid" and msg.get("data") == {"n": 1}, f"got {msg}")


async def token_in_header_and_cookie(env):
    token = env.hs()
    async with connect(env.url("plain"), additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await adopted(ws)
    async with connect(env.url("plain"), additional_headers={"Cookie": f"x=1; {env.cookie}={token}"}) as ws:
        await adopted(ws)


async def expired(env):
    await refused(env, env.url("news:eu", env.hs(ttl=-30)), "expired")


async def not_yet_valid(env):
    await refused(env, env.url("x", env.hs(nbf=int(time.time()) + 120)), "not valid before")


async def forged_signature(env):
    header, _, signature = env.hs(sub="alice").split(".")
    payload = jwt.utils.base64url_encode(
        json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode()
    ).decode()
    await refused(env, env.url("x", f"{header}.{payload}.{signature}"), "signature")


async def wrong_key(env):
    other = env.hs(secret="an entirely different secret of 32+ bytes")
    await refused(env, env.url("x", other), "signature")


async def anonymous_refused(env):
    await refused(env, env.url("x"), "token is required")


async def garbage_token(env):
    await refused(env, env.url("x", "not-a-jwt"), "malformed")


async def forbidden_channel(env):
    token = env.hs(sub="carol", channels=["news:*"])
    async with connect(env.url("news:eu,secret:x", token)) as ws:
        first = await recv_json(ws)
        expect(
            first.get("code") == 403 and first.get("channel") == "secret:x",
            f"expected a 403 reply for secret:x first, got {first}",
        )
        await adopted(ws)
        reply = await command(ws, {"cmd": "subscribe", "channel": "secret:y", "id": 2})
        expect(reply.get("code") == 403 and reply.get("id") == 2, f"subscribe secret:y: {reply}")
        env.publish("secret:x", '"hidden"')
        env.publish("news:eu", '"visible"')
        msg = await recv_json(ws)
        expect(msg.get("channel") == "news:eu", f"expected the news:eu message only, got {msg}")


async def other_users_channel(env):
    async with connect(env.url("", env.hs(sub="alice"))) as ws:
        await adopted(ws)
        mine = await command(ws, {"cmd": "subscribe", "channel": "user:alice"})
        expect(mine.get("code") == 200, f"user:alice for alice: {mine}")
        theirs = await command(ws, {"cmd": "subscribe", "channel": "user:bob"})
        expect(theirs.get("code") == 403, f"user:bob for alice: {theirs}")
        env.publish("user:alice", '"for alice"')
        msg = await recv_json(ws)
        expect(msg.get("channel") == "user:alice", f"got {msg}")
    async with connect(env.url("user:bob", env.hs(sub="alice"))) as ws:
        first = await recv_json(ws)
        expect(first.get("code") == 403 and first.get("channel") == "user:bob", f"got {first}")


async def refresh_extends(env):
    async with connect(env.url("plain", env.hs(sub="dave", ttl=2))) as ws:
        await adopted(ws)
        other = await command(ws, {"cmd": "refresh", "token": env.hs(sub="eve", ttl=60)})
        expect(other.get("code") == 403, f"refresh as another user: {other}")
        bad = await command(ws, {"cmd": "refresh", "token": env.hs(sub="dave", ttl=-60)})
        expect(bad.get("code") == 401, f"refresh with an expired token: {bad}")
        new = env.hs(sub="dave", ttl=60)
        reply = await command(ws, {"cmd": "refresh", "token": new, "id": 1})
        expect(reply.get("code") == 200 and reply.get("exp", 0) > time.time() + 30, f"refresh: {reply}")
        await asyncio.sleep(3.5)
        pong = await command(ws, {"cmd": "ping"})
        expect(pong.get("reply") == "pong", f"after the old expiry: {pong}")


async def expiry_closes_4401(env):
    async with connect(env.url("plain", env.hs(sub="frank", ttl=1))) as ws:
        await adopted(ws)
        started = time.time()
        code, reason = await wait_close(ws, 6)
        expect(code == 4401, f"closed with {code} {reason!r}, expected 4401")
        expect(time.time() - started < 4, "expiry took longer than 4 s")


async def client_publish(env):
    token = env.hs(sub="gina", channels=["room:*", "news:*"])
    async with connect(env.url("room:1", token)) as pub, connect(env.url("room:1", env.hs(sub="hal"))) as sub:
        await adopted(pub)
        await adopted(sub)
        reply = await command(pub, {"cmd": "publish", "channel": "room:1", "data": {"t": "hi"}, "id": 9})
        expect(reply.get("code") == 200 and reply.get("offset", 0) >= 1, f"publish: {reply}")
        msg = await recv_json(sub)
        expect(msg.get("data") == {"t": "hi"} and msg.get("offset") == reply["offset"], f"got {msg}")
        no_ns = await command(pub, {"cmd": "publish", "channel": "news:eu", "data": 1})
        expect(no_ns.get("code") == 403, f"publish where the namespace forbids it: {no_ns}")
        not_granted = await command(pub, {"cmd": "publish", "channel": "room2:1", "data": 1})
        expect(not_granted.get("code") == 403, f"publish outside the grants: {not_granted}")


async def admin_disconnect(env):
    token = env.hs(sub="kick")
    conns = []
    try:
        for _ in range(16):
            ws = await connect(env.url("plain", token))
            await adopted(ws)
            conns.append(ws)
        stay = await connect(env.url("plain", env.hs(sub="stay")))
        await adopted(stay)
        per_shard = env.shard_connections()
        expect(len([n for n in per_shard.values() if n > 0]) >= 2, f"connections all on one shard: {per_shard}")
        status, body = env.post("/admin/disconnect?user=kick")
        expect(status == 200 and body.get("closed") == 16, f"disconnect answered {status} {body}")
        for ws in conns:
            code, reason = await wait_close(ws, TIMEOUT)
            expect(code == 4403, f"closed with {code} {reason!r}, expected 4403")
        pong = await command(stay, {"cmd": "ping"})
        expect(pong.get("reply") == "pong", "another user's connection was closed too")
        status, body = env.post("/admin/disconnect?user=kick")
        expect(status == 200 and body.get("closed") == 0, f"second disconnect: {status} {body}")
        status, _ = env.post("/admin/disconnect")
        expect(status == 400, f"disconnect without user: {status}")
        await stay.close()
    finally:
        for ws in conns:
            await ws.close()


async def valid_rs256(env):
    now = int(time.time())
    token = jwt.encode({"sub": "ruth", "exp": now + 60}, env.private_key, algorithm="RS256")
    async with connect(env.url("plain", token)) as ws:
        await adopted(ws)
        mine = await command(ws, {"cmd": "subscribe", "channel": "user:ruth"})
        expect(mine.get("code") == 200, f"user:ruth: {mine}")


async def rs256_wrong_key(env):
    now = int(time.time())
    token = jwt.encode({"sub": "ruth", "exp": now + 60}, env.other_key, algorithm="RS256")
    await refused(env, env.url("plain", token), "signature")


async def rs256_server_refuses_hs256(env):
    token = jwt.encode({"sub": "ruth", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    await refused(env, env.url("plain", token), "accepts only RS256")


SUITES = {
    "hs256": [
        valid_hs256,
        token_in_header_and_cookie,
        expired,
        not_yet_valid,
        forged_signature,
        wrong_key,
        anonymous_refused,
        garbage_token,
        forbidden_channel,
        other_users_channel,
        refresh_extends,
        expiry_closes_4401,
        client_publish,
    ],
    "disconnect": [admin_disconnect],
    "rs256": [valid_rs256, rs256_wrong_key, rs256_server_refuses_hs256],
}


async def run_case(case, env):
    try:
        await case(env)
        return {"case": case.__name__, "ok": True}
    except Exception as e:  # every failure is reported, never swallowed
        detail = str(e) if isinstance(e, Fail) else traceback.format_exc()
        return {"case": case.__name__, "ok": False, "error": detail}


async def run_suite(name, env):
    results = await asyncio.gather(*(run_case(c, env) for c in SUITES[name]))
    for r in results:
        print(json.dumps(r), flush=True)
    return all(r["ok"] for r in results)


def pem_private(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def keygen(directory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for name, data in [("rsa.pem", pem_private(key)), ("rsa.pub.pem", public), ("other.pem", pem_private(other))]:
        with open(f"{directory}/{name}", "wb") as f:
            f.write(data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("suite", choices=["keygen", *SUITES])
    parser.add_argument("--ws")
    parser.add_argument("--admin")
    parser.add_argument("--secret")
    parser.add_argument("--cookie")
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.suite == "keygen":
        keygen(args.dir)
        return 0
    env = Env(args)
    if args.suite == "rs256":
        with open(f"{args.dir}/rsa.pem", "rb") as f:
            env.private_key = f.read()
        with open(f"{args.dir}/other.pem", "rb") as f:
            env.other_key = f.read()
    return 0 if asyncio.run(run_suite(args.suite, env)) else 1


if __name__ == "__main__":
    sys.exit(main())
