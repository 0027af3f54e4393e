"""TLS clients for tests/e2e/tls_listener_serves_wss_and_https.rs: `websockets` over `ssl`
(wss://) and the stdlib's `http.client` over `ssl` (https:// SSE), against a ringcast
started with `--tls-listen`. Prints one JSON line per case: {"case", "ok", "error"}.

usage: py_tls.py CASE TLS_PORT ADMIN_PORT CA_FILE [PID NEW_CERT NEW_KEY CERT KEY]
  CASE: wss | sse | reload | garbage
"""

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import time
import urllib.request

from rc_common import Fail, expect, require

require("py_tls.py", {"websockets": "websockets"})
import websockets  # noqa: E402

TIMEOUT = 10


def report(case, ok, error=None):
    print(json.dumps({"case": case, "ok": ok, "error": error}), flush=True)


def publish(admin, channel, payload):
    req = urllib.request.Request(
        f"http://127.0.0.1:{admin}/publish?channel={channel}",
        data=json.dumps(payload).encode(),
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        expect(r.status == 200, f"publish answered {r.status}")


def metric(admin, name, labels):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{" + labels + "}"):
            return float(line.split()[-1])
    return 0.0


def context(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx


def fingerprint_of_pem(path):
    with open(path) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.sha256(der).hexdigest()


def fingerprint_of(ws):
    der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


async def receive_payload(ws, key, value):
    """Reads frames until a message whose data[key] == value."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Fail(f"no message with {key}={value!r} within {TIMEOUT}s")
        frame = json.loads(await asyncio.wait_for(ws.recv(), left))
        data = frame.get("data")
        if isinstance(data, dict) and data.get(key) == value:
            return frame


async def subscribed(url, ctx, admin, channel):
    ws = await asyncio.wait_for(websockets.connect(url, ssl=ctx), TIMEOUT)
    # The subscription is in place once a probe published now arrives.
    probe = f"probe-{time.monotonic_ns()}"
    publish(admin, channel, {"probe": probe})
    await receive_payload(ws, "probe", probe)
    return ws


async def case_wss(port, admin, ca):
    ws = await subscribed(f"wss://localhost:{port}/ws?channels=tls", context(ca), admin, "tls")
    ssl_object = ws.transport.get_extra_info("ssl_object")
    expect(ssl_object.version() in ("TLSv1.3", "TLSv1.2"), f"version {ssl_object.version()}")
    for i in range(50):
        publish(admin, "tls", {"n": i, "pad": "x" * 3000})
    for i in range(50):
        frame = await receive_payload(ws, "n", i)
        expect(frame["channel"] == "tls", f"frame {frame}")
    # A command and its reply over the same encrypted stream.
    await ws.send(json.dumps({"cmd": "subscribe", "channel": "other", "id": 7}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    expect(reply.get("id") == 7 and reply.get("code") == 200, f"reply {reply}")
    await ws.close()
    expect(ws.close_code == 1000, f"close code {ws.close_code}")


def case_sse(port, admin, ca):
    conn = http.client.HTTPSConnection("localhost", port, context=context(ca), timeout=TIMEOUT)
    conn.request("GET", "/sse?channels=events", headers={"Accept": "text/event-stream"})
    resp = conn.getresponse()
    expect(resp.status == 200, f"status {resp.status}")
    expect(resp.getheader("Content-Type", "").startswith("text/event-stream"),
           f"content type {resp.getheader('Content-Type')}")
    deadline = time.monotonic() + TIMEOUT
    published = False
    while time.monotonic() < deadline:
        line = resp.fp.readline().decode()
        if not line:
            raise Fail("stream ended")
        if line.startswith("data:") and '"reply"' in line and not published:
            publish(admin, "events", {"over": "https"})
            published = True
        if line.startswith("data:") and '"over"' in line:
            data = json.loads(line[len("data:"):])
            expect(data["data"] == {"over": "https"}, f"event {data}")
            conn.close()
            return
    raise Fail("no event over https within the timeout")


async def case_reload(port, admin, ca, pid, new_cert, new_key, cert, key):
    old = fingerprint_of_pem(cert)
    url = f"wss://localhost:{port}/ws?channels=hup"
    first = await subscribed(url, context(ca), admin, "hup")
    expect(fingerprint_of(first) == old, "the first connection has the start's certificate")
    shutil.copyfile(new_cert, cert + ".tmp")
    shutil.copyfile(new_key, key + ".tmp")
    os.replace(cert + ".tmp", cert)
    os.replace(key + ".tmp", key)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while metric(admin, "ringcast_config_reloads_total", 'result="ok"') < 1:
        if time.monotonic() > deadline:
            raise Fail("the reload was not counted")
        await asyncio.sleep(0.05)
    publish(admin, "hup", {"step": "after"})
    await receive_payload(first, "step", "after")
    second = await subscribed(url, context(new_cert), admin, "hup")
    new = fingerprint_of(second)
    expect(new == fingerprint_of_pem(new_cert) and new != old,
           "a connection after the reload has the new certificate")
    publish(admin, "hup", {"step": "both"})
    await receive_payload(first, "step", "both")
    await receive_payload(second, "step", "both")
    await first.close()
    await second.close()


def closed_by_server(port, payload):
    """Sends `payload` on a raw TCP connection; True once the server closed it."""
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.sendall(payload)
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            data = s.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    finally:
        s.close()
    return False


async def case_garbage(port, admin, ca):
    ws = await subscribed(f"wss://localhost:{port}/ws?channels=calm", context(ca), admin, "calm")
    failed_before = metric(admin, "ringcast_tls_handshakes_total", 'result="failed"')
    expect(closed_by_server(port, b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"), "plain HTTP left open")
    hello = b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c\x03\x03" + os.urandom(42)
    expect(closed_by_server(port, hello), "garbage ClientHello left open")
    expect(closed_by_server(port, os.urandom(2000)), "random bytes left open")
    deadline = time.monotonic() + TIMEOUT
    while metric(admin, "ringcast_tls_handshakes_total", 'result="failed"') < failed_before + 3:
        if time.monotonic() > deadline:
            raise Fail("the failed handshakes were not counted")
        await asyncio.sleep(0.05)
    publish(admin, "calm", {"still": "here"})
    await receive_payload(ws, "still", "here")
    await ws.close()


def main():
    case, port, admin, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    try:
        if case == "wss":
            asyncio.run(case_wss(port, admin, ca))
        elif case == "sse":
            case_sse(port, admin, ca)
        elif case == "reload":
            pid, new_cert, new_key, cert, key = sys.argv[5:10]
            asyncio.run(case_reload(port, admin, ca, int(pid), new_cert, new_key, cert, key))
        elif case == "garbage":
            asyncio.run(case_garbage(port, admin, ca))
        else:
            raise Fail(f"unknown case {case}")
        report(case, True)
    except Exception as e:  # noqa: BLE001
        report(case, False, f"{type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
