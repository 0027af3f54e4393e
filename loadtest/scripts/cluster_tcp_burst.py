#!/usr/bin/env python3
"""A burst of TCP ingest lines into one cluster node: peak RSS and ringcast_cluster_publish_queued.

    python3 loadtest/scripts/cluster_tcp_burst.py target/release/ringcast 200000

Starts a nats-server (JetStream, on PATH) and one ringcast node (1 shard) on free loopback
ports, writes LINES lines of ~120 bytes to channel `m` over one TCP ingest connection as
fast as the socket takes them, samples the server's VmRSS and the queue gauge every
100 ms, and waits until every line is stored. Prints one line of results.
"""

import os, re, socket, subprocess, sys, tempfile, threading, time, urllib.request

binary = sys.argv[1]; lines = int(sys.argv[2])
def free():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
d = tempfile.mkdtemp()
np = free()
nats = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(np), "-sd", d + "/js"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1)
ws, tcp, adm = free(), free(), free()
open(d + "/c.toml", "w").write(f'history_size = 100\n[cluster]\nnats_url = "nats://127.0.0.1:{np}"\n')
srv = subprocess.Popen([binary, "--config", d + "/c.toml", "--listen", f"127.0.0.1:{ws}", "--tcp-ingest", f"127.0.0.1:{tcp}", "--admin", f"127.0.0.1:{adm}", "--shards", "1"], stdout=subprocess.DEVNULL, stderr=open(d + "/log", "w"))
def metric(name):
    try:
        t = urllib.request.urlopen(f"http://127.0.0.1:{adm}/metrics", timeout=5).read().decode()
    except Exception:
        return None
    m = re.search(rf"^{name} (\S+)$", t, re.M)
    return float(m.group(1)) if m else None
for _ in range(100):
    if metric("ringcast_cluster_up") == 1.0: break
    time.sleep(0.2)
def rss():
    for l in open(f"/proc/{srv.pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
base = rss(); peak = base; peak_q = 0
stop = False
def sample():
    global peak, peak_q
    while not stop:
        peak = max(peak, rss()); q = metric("ringcast_cluster_publish_queued") or 0; peak_q = max(peak_q, q)
        time.sleep(0.1)
t = threading.Thread(target=sample); t.start()
s = socket.create_connection(("127.0.0.1", tcp))
payload = b'{"n":1,"pad":"' + b"x" * 100 + b'"}'
t0 = time.time()
buf = b"".join(b"m " + payload + b"\n" for _ in range(1000))
for i in range(lines // 1000):
    s.sendall(buf)
sent = time.time() - t0
# wait until all published
while (metric("ringcast_cluster_published_total") or 0) < lines and time.time() - t0 < 300:
    time.sleep(0.5)
done = time.time() - t0
stop = True; t.join()
print(f"binary={binary} lines={lines} send_s={sent:.1f} all_stored_s={done:.1f} base_rss_kib={base} peak_rss_kib={peak} peak_publish_queued={peak_q} published={metric('ringcast_cluster_published_total')}")
srv.kill(); nats.kill()
