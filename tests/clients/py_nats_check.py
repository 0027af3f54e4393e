"""Reads a ringcast channel's messages straight from the JetStream stream with nats-py,
an independent NATS client: prints one JSON line
{"offsets": [...], "epochs": [...], "markers": N} with the Ringcast-Offset and
Ringcast-Epoch headers of every stored message of the channel's subject, oldest first.
An epoch marker (offset 0, stored by a node that joined the channel before its first
publish: docs/cluster.md) is not a message: it is counted in "markers", its epoch listed.

python3 py_nats_check.py --servers nats://a,nats://b --stream RINGCAST --subject rc.ch.X
"""

import argparse
import asyncio
import json
import sys

import time

import nats
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--servers", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--subject", required=True)
    a = p.parse_args()
    nc = await nats.connect(servers=a.servers.split(","), connect_timeout=5)
    js = nc.jetstream()
    offsets, epochs, markers, seq = [], set(), 0, 1
    # A stream that just lost a server may answer "unavailable" for a few seconds while
    # its leader moves: retried for up to 30 s.
    give_up = time.monotonic() + 30
    while True:
        try:
            msg = await js.get_msg(a.stream, seq=seq, subject=a.subject, next=True)
        except NotFoundError:
            break
        except NatsError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.2)
            continue
        headers = msg.headers or {}
        offset = int(headers["Ringcast-Offset"])
        if offset == 0:
            markers += 1
        else:
            offsets.append(offset)
        epochs.add(headers["Ringcast-Epoch"])
        seq = msg.seq + 1
    await nc.close()
    print(json.dumps({"offsets": offsets, "epochs": sorted(epochs), "markers": markers}))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001 - reported to the test
        print(json.dumps({"error": repr(e)}))
        sys.exit(1)
