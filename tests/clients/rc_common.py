"""What the Python test clients in this directory share: a loud check for the modules
they need, and the failure they raise.

Imported by the scripts next to it (a script's own directory is on sys.path).
"""

import asyncio
import importlib
import json
import sys
import time
import urllib.request


def require(script, modules):
    """Exits 2 with the pip command when a module is missing; `modules` maps an import
    name to its pip package (the test running the script fails, it never skips)."""
    missing = []
    for name, package in modules.items():
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(package)
    if missing:
        sys.stderr.write(
            f"{script}: missing python modules {', '.join(missing)}; run "
            f"`python3 -m pip install {' '.join(missing)}` (scripts/test.sh does)\n"
        )
        sys.exit(2)


class Fail(Exception):
    """A check that did not hold."""


def expect(cond, what):
    if not cond:
        raise Fail(what)


def print_summary(scenario):
    """Runs the coroutine `scenario` and prints the summary it returns as one JSON line;
    a failed check, a timeout or a socket error prints {"error": ...} and exits 1."""
    try:
        summary = asyncio.run(scenario)
    except (Fail, asyncio.TimeoutError, OSError) as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
    print(json.dumps(summary))


# ---- shared by the websockets + PyJWT clients ---------------------------------------------
# (`websockets` and `jwt` are imported where they are used: a script calls `require` for
# them first, so a missing module is reported by it, not by this import.)


def sign_token(secret, sub, ttl=300, **claims):
    """An HS256 token for `sub`, valid `ttl` seconds from now, with extra `claims`."""
    import jwt

    now = int(time.time())
    body = {"sub": sub, "exp": now + ttl, "iat": now}
    body.update(claims)
    return jwt.encode(body, secret, algorithm="HS256")


class Frames:
    """Reading a ringcast WebSocket's JSON frames (and publishing over HTTP), each wait
    bounded by `timeout` seconds; `quiet` is how long `nothing_more` listens."""

    def __init__(self, timeout, quiet):
        self.timeout = timeout
        self.quiet = quiet

    async def recv_json(self, ws):
        return json.loads(await asyncio.wait_for(ws.recv(), self.timeout))

    async def reply_to(self, ws, kind):
        """Next reply of `kind`; message frames before it are a failure."""
        msg = await self.recv_json(ws)
        expect(msg.get("reply") == kind, f"expected a {kind} reply, got {msg}")
        return msg

    async def messages(self, ws, n):
        """The next `n` frames, each a message (an offset, no reply)."""
        out = []
        for _ in range(n):
            msg = await self.recv_json(ws)
            expect("offset" in msg and "reply" not in msg, f"expected a message, got {msg}")
            out.append(msg)
        return out

    async def nothing_more(self, ws, wait=None):
        """No frame arrives within `wait` (default `quiet`) seconds."""
        try:
            msg = await asyncio.wait_for(ws.recv(), self.quiet if wait is None else wait)
        except asyncio.TimeoutError:
            return
        raise Fail(f"unexpected frame {msg}")

    def http_publish(self, admin, channel, payload):
        """POST /publish?ack=1 on the admin port: (status, answer)."""
        req = urllib.request.Request(
            f"http://{admin}/publish?channel={channel}&ack=1", data=payload.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return r.status, json.loads(r.read())


class Client:
    """A websockets connection read continuously (so pings are answered): replies go to
    a queue, everything else (messages, events) to `log` in arrival order. Each wait is
    bounded by `timeout` seconds."""

    def __init__(self, ws, name, timeout):
        self.ws = ws
        self.name = name
        self.timeout = timeout
        self.log = []
        self.replies = asyncio.Queue()
        self.conn_id = None
        self.task = asyncio.create_task(self._read())

    async def _read(self):
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if "reply" in msg:
                    await self.replies.put(msg)
                else:
                    self.log.append(msg)
        except ConnectionClosed:
            pass

    async def cmd(self, body):
        await self.ws.send(json.dumps(body))
        return await asyncio.wait_for(self.replies.get(), self.timeout)

    def events(self, channel):
        return [m for m in self.log if "type" in m and m.get("channel") == channel]

    async def close(self):
        await self.ws.close()
        await asyncio.wait_for(self.task, self.timeout)


async def poll_until(probe, what, timeout):
    """`probe()` polled until it returns something true, which is returned; Fail after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise Fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def member_key(m):
    """A presence member's identity: its user, or its connection when anonymous."""
    return ("user", m["user"]) if "user" in m else ("conn", m["conn"])


async def close_all(clients):
    """Closes every client, whatever state each is in (cleanup after a case)."""
    for c in clients:
        try:
            await c.close()
        except Exception:
            pass
