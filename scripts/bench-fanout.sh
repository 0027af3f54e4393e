#!/usr/bin/env bash
# Fan-out benchmark: ringcast against the tokio-tungstenite baseline and the io_uring
# floor (benches/floor: one pre-encoded frame to every socket in one submission, nothing
# else), same harness, same run.
#
# Server pinned to CPU 0, load harness to CPU 1; 5k subscribers on one channel, 32-byte
# payloads; paced at 10 and 50 msg/s and a 2000-message burst; each cell RUNS times
# (default 3). Prints one line per run and the medians, with each server's cost per
# delivery as a ratio to the floor's; JSON lands in $OUT.
#
#   scripts/bench-fanout.sh            # needs: cargo build --release --workspace
#   RUNS=5 SUBS=5000 scripts/bench-fanout.sh
#   SERVERS="ringcast before floor" RINGCAST_BEFORE=path/to/old/ringcast scripts/bench-fanout.sh
#   SCENARIOS=burst RUNS=5 scripts/bench-fanout.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SUBS=${SUBS:-5000}
OUT=${OUT:-target/bench-fanout}
BIN=${BIN:-target/release}
RINGCAST=${RINGCAST:-$BIN/ringcast}
BASELINE=${BASELINE:-$BIN/baseline-tokio}
LOAD=${LOAD:-$BIN/ringcast-load}
FLOOR=${FLOOR:-$BIN/floor-uring}
# "before": another ringcast binary (e.g. an older commit) run exactly like ringcast.
RINGCAST_BEFORE=${RINGCAST_BEFORE:-}
# Which cells to run (a subset of: paced10 paced50 burst).
export SCENARIOS=${SCENARIOS:-paced10 paced50 burst}
SERVERS=${SERVERS:-ringcast baseline floor}
mkdir -p "$OUT"
for b in "$RINGCAST" "$BASELINE" "$LOAD" "$FLOOR"; do
  [ -x "$b" ] || { echo "missing $b: run cargo build --release --workspace" >&2; exit 1; }
done

start_server() { # name -> sets PID, URL, PUB
  case $1 in
    ringcast|before)
      local bin=$RINGCAST
      if [ "$1" = before ]; then bin=$RINGCAST_BEFORE; fi
      taskset -c 0 "$bin" --shards 1 --listen 127.0.0.1:18080 --udp-ingest 127.0.0.1:19000 \
        --tcp-ingest off --admin 127.0.0.1:19090 2>"$OUT/$1.log" &
      PID=$!; URL="ws://127.0.0.1:18080/ws?channels=bench"; PUB="udp://127.0.0.1:19000";;
    baseline)
      taskset -c 0 "$BASELINE" --listen 127.0.0.1:18081 --udp 127.0.0.1:19100 2>"$OUT/baseline.log" &
      PID=$!; URL="ws://127.0.0.1:18081/ws"; PUB="udp://127.0.0.1:19100";;
    floor)
      taskset -c 0 "$FLOOR" --listen 127.0.0.1:18082 --udp 127.0.0.1:19200 2>"$OUT/floor.log" &
      PID=$!; URL="ws://127.0.0.1:18082/ws"; PUB="udp://127.0.0.1:19200";;
  esac
  sleep 1
}

run_cell() { # server scenario run messages rate
  local server=$1 scenario=$2 run=$3 messages=$4 rate=$5
  start_server "$server"
  local json="$OUT/$server-$scenario-$run.json"
  taskset -c 1 "$LOAD" fanout --url "$URL" --publish "$PUB" --channel bench -n "$SUBS" --rate 5000 \
    --size 32 --messages "$messages" --msg-rate "$rate" --settle 1 --drain 20 --timeout 120 \
    --server-pid "$PID" --json "$json" >"$OUT/$server-$scenario-$run.txt" 2>&1 || true
  kill "$PID" 2>/dev/null; sleep 0.3; kill -9 "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
  python3 - "$json" "$server" "$scenario" "$run" <<'PY'
import json, sys
path, server, scenario, run = sys.argv[1:]
try:
    r = json.load(open(path))
except Exception as e:
    print(f"{scenario:8} {server:9} run {run}: no result ({e})"); sys.exit()
d, s = r["delivery"], r["server"] or {}
lat = d["latency_us"] or {}
print(f"{scenario:8} {server:9} run {run}: deliveries/cpu-s {s.get('deliveries_per_cpu_sec', 0):>12,.0f}"
      f"  p50 {lat.get('p50', 0):>8}us  p99 {lat.get('p99', 0):>8}us  received {d['received']}/{d['expected']}"
      f"  cpu {s.get('cpu_delivery_secs', 0):.2f}s")
PY
}

for scenario in $SCENARIOS; do
  case $scenario in
    paced10) messages=100; rate=10;;
    paced50) messages=250; rate=50;;
    burst) messages=2000; rate=0;;
  esac
  for run in $(seq 1 "$RUNS"); do
    for server in $SERVERS; do
      run_cell "$server" "$scenario" "$run" "$messages" "$rate"
    done
  done
done

python3 - "$OUT" "$RUNS" $SERVERS <<'PY'
import json, statistics, sys, os
out, runs, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("\nmedians (deliveries per server-CPU-second, latency p99; cost per delivery vs the floor):")
for scenario in os.environ.get("SCENARIOS", "paced10 paced50 burst").split():
    cells = []
    row = {}
    for server in servers:
        dps, p99 = [], []
        for run in range(1, runs + 1):
            p = f"{out}/{server}-{scenario}-{run}.json"
            if not os.path.exists(p): continue
            r = json.load(open(p))
            dps.append((r["server"] or {}).get("deliveries_per_cpu_sec", 0))
            p99.append(((r["delivery"] or {}).get("latency_us") or {}).get("p99", 0))
        row[server] = (statistics.median(dps) if dps else 0, statistics.median(p99) if p99 else 0)
    floor = row.get("floor", (0, 0))[0]
    for server in servers:
        d, p = row[server]
        vs = f" cost {floor / d:.2f}x floor" if floor and d and server != "floor" else ""
        cells.append(f"{server} {d:>12,.0f}/cpu-s p99 {p}us{vs}")
    print(f"{scenario:8} " + " | ".join(cells))
PY
