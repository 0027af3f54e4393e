#!/usr/bin/env bash
# Builds ringcast's fuzz targets with cargo-afl (AFL++, stable Rust) and runs each for a
# bounded time from its seed corpus in fuzz/corpus/<target>/. Fails, naming the target and
# the input, when a seed or a fuzzed input crashes or hangs a target.
#
#   fuzz/run.sh                          # every target, FUZZ_SECONDS (default 15) each
#   fuzz/run.sh frame ingest             # only these targets
#   FUZZ_SECONDS=3600 fuzz/run.sh upgrade  # one target for an hour
#   fuzz/run.sh --install                # only install cargo-afl and AFL++ (scripts/test.sh)
#
# Environment:
#   FUZZ_SECONDS    seconds of fuzzing per target (default 15)
#   FUZZ_OUT        AFL++ output directories, one per target (default fuzz/out)
#   FUZZ_JOBS       targets fuzzed at once (default: the number of cores)
#   AFL_OPT_LEVEL   optimisation level of the instrumented build (default here 0: the
#                   build takes a third of the CPU time of cargo-afl's 3, for runs 2-4x
#                   slower; a long run may want 3)
#
# Installs what it needs on a Debian/Ubuntu machine that has only the Rust toolchain (as
# root, or with passwordless sudo; CI=true, no stdin): make and a C compiler, then
# cargo-afl, whose installation builds the AFL++ it bundles. See docs/fuzzing.md.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CALLER_DIR="$PWD"
cd "$FUZZ_DIR"

# Must match the `afl` dependency in fuzz/Cargo.toml.
CARGO_AFL_VERSION=0.18.2
ALL_TARGETS=(frame upgrade command position proxy ingest admin config)

FUZZ_SECONDS="${FUZZ_SECONDS:-15}"
FUZZ_OUT="${FUZZ_OUT:-$FUZZ_DIR/out}"
case "$FUZZ_OUT" in /*) ;; *) FUZZ_OUT="$CALLER_DIR/$FUZZ_OUT" ;; esac
export AFL_OPT_LEVEL="${AFL_OPT_LEVEL:-0}"
# Always its own: the instrumented build shares nothing with the workspace's.
export CARGO_TARGET_DIR="$FUZZ_DIR/target"
export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log() { printf '\n==> %s\n' "$*" >&2; }
die() {
	printf '\nfuzz/run.sh: FAILED: %s\n' "$*" >&2
	exit 1
}

case "$FUZZ_SECONDS" in
'' | *[!0-9]*) die "FUZZ_SECONDS must be a whole number of seconds, got '$FUZZ_SECONDS'" ;;
esac
install_only=0
if [ "${1:-}" = --install ]; then
	install_only=1
	shift
fi
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
	[ -d "corpus/$t" ] || die "unknown target '$t' (targets: ${ALL_TARGETS[*]})"
done

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

# ---- cargo-afl and its AFL++ ---------------------------------------------------------
command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH; install the Rust toolchain (rustup) first"
# AFL++ is built from source (make, cc); glommio's build compiles liburing the same way.
if ! command -v cc >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1; then
	apt_install build-essential
fi
command -v cc >/dev/null 2>&1 || die "no C compiler (cc) after installing build-essential"

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
case ":$PATH:" in *":$CARGO_BIN:"*) ;; *) export PATH="$CARGO_BIN:$PATH" ;; esac

cargo_afl_ok() {
	local version
	version="$(cargo afl --version 2>/dev/null || true)"
	[[ $version == "cargo-afl $CARGO_AFL_VERSION "* ]]
}
if ! cargo_afl_ok; then
	log "cargo install cargo-afl $CARGO_AFL_VERSION (builds the AFL++ it bundles)"
	cargo install cargo-afl --locked --version "$CARGO_AFL_VERSION" </dev/null ||
		die "cargo install cargo-afl $CARGO_AFL_VERSION failed"
fi
cargo_afl_ok ||
	die "cargo afl --version does not say $CARGO_AFL_VERSION after installing it"
# AFL++ and its runtime are built per rustc version: a toolchain newer than the
# installation has none yet.
afl_ready() {
	local help
	help="$(cargo afl fuzz -h 2>&1 || true)" # afl-fuzz -h exits 1
	[[ $help == *afl-fuzz++* ]]
}
if ! afl_ready; then
	log "cargo afl config --build --force (AFL++ for $(rustc --version))"
	cargo afl config --build --force </dev/null || die "cargo afl config --build failed"
fi
afl_ready || die "cargo afl fuzz cannot run afl-fuzz after building AFL++"
if [ "$install_only" -eq 1 ]; then
	log "cargo-afl $CARGO_AFL_VERSION and AFL++ are installed"
	exit 0
fi

# ---- build ---------------------------------------------------------------------------
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
log "cargo afl build --release (AFL_OPT_LEVEL=$AFL_OPT_LEVEL): ${targets[*]}"
cargo afl build --release "${bins[@]}" </dev/null || die "cargo afl build failed"
BIN_DIR="$CARGO_TARGET_DIR/release"

# ---- runs ----------------------------------------------------------------------------
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
# Other builds may hold the cores: run on any of them rather than refuse to start.
export AFL_NO_AFFINITY=1
mkdir -p "$FUZZ_OUT"

# Runs one target: its seeds, then afl-fuzz; leaves in $FUZZ_OUT/<target>.failures the line
# saying what failed, or nothing once it finished cleanly.
fuzz_one() {
	local t="$1"
	local failed="$FUZZ_OUT/$t.failures"
	echo "$t: did not finish (killed, or a command in fuzz/run.sh failed)" >"$failed"
	run_one "$t" "$BIN_DIR/$t" "$FUZZ_OUT/$t" >"$failed.new" && mv "$failed.new" "$failed"
}

run_one() {
	local t="$1" bin="$2" out="$3" seed input summary
	# Outside afl-fuzz a target runs its input once: every seed first, so a regression in
	# a seed is named as such (afl-fuzz would only refuse to start).
	for seed in "corpus/$t"/*; do
		if ! timeout 10 "$bin" <"$seed" >/dev/null 2>"$out.seed.log"; then
			echo "$t: seed $FUZZ_DIR/$seed (reproduce: $bin < $FUZZ_DIR/$seed; log: $out.seed.log)"
			return
		fi
	done
	rm -rf "$out"
	# -t: a run over a second is a hang (one takes microseconds).
	if ! cargo afl fuzz -i "corpus/$t" -o "$out" -V "$FUZZ_SECONDS" -t 1000 -- "$bin" \
		</dev/null >"$out.log" 2>&1; then
		tail -n 30 "$out.log" >&2
		echo "$t: afl-fuzz did not run (log: $out.log)"
		return
	fi
	local found=() panic
	while IFS= read -r -d '' input; do found+=("$input"); done < <(
		find "$out/default/crashes" "$out/default/hangs" -type f -name 'id:*' -print0 2>/dev/null | sort -z
	)
	summary="$(awk -F' *: *' '$1 == "execs_done" || $1 == "corpus_count" || $1 == "bitmap_cvg" \
		{ printf "%s=%s ", $1, $2 }' "$out/default/fuzzer_stats" 2>/dev/null || true)"
	printf '%s: %s%s crashing or hanging input(s)\n' "$t" "$summary" "${#found[@]}" >&2
	if [ "${#found[@]}" -gt 0 ]; then
		# The first one's panic message (the line after "panicked at file:line:").
		panic="$(timeout 10 "$bin" <"${found[0]}" 2>&1 | grep -A1 -m1 'panicked at' | tr '\n' ' ' || true)"
		echo "$t: ${#found[@]} input(s) in $out/default/{crashes,hangs}; first: ${found[0]}" \
			"(reproduce: $bin < '${found[0]}') ${panic:-(no panic message: a hang or a signal)}"
	fi
}

# As many targets at once as there are cores (FUZZ_JOBS): each afl-fuzz is one process.
FUZZ_JOBS="${FUZZ_JOBS:-$(nproc 2>/dev/null || echo 1)}"
for t in "${targets[@]}"; do
	[ -x "$BIN_DIR/$t" ] || die "the build did not produce $BIN_DIR/$t"
done
log "afl-fuzz ${targets[*]}: ${FUZZ_SECONDS}s each, $FUZZ_JOBS at a time (output: $FUZZ_OUT)"
for t in "${targets[@]}"; do
	while [ "$(jobs -rp | wc -l)" -ge "$FUZZ_JOBS" ]; do wait -n || true; done
	fuzz_one "$t" &
done
wait

failures=()
for t in "${targets[@]}"; do
	while IFS= read -r line; do failures+=("$line"); done <"$FUZZ_OUT/$t.failures"
done
if [ "${#failures[@]}" -gt 0 ]; then
	printf '\nfuzz/run.sh: inputs that crash or hang a target:\n' >&2
	printf '  %s\n' "${failures[@]}" >&2
	die "${#failures[@]} target(s) crashed or hung: ${failures[*]%%:*}"
fi
log "fuzzing passed: ${targets[*]}, ${FUZZ_SECONDS}s each"
