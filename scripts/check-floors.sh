#!/usr/bin/env bash
# The bottom floors import nothing above them: src/proto uses only itself, src/fanout only
# itself and proto. Prints every `crate::` path in code (comments and doc links do not
# count) that reaches higher, and exits 1 if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
check() {
    local dir=$1 allowed=$2
    # Strip `//` comments, then list the first segment of every `crate::` path.
    local hits
    hits=$(grep -rn --include='*.rs' 'crate::' "$dir" |
        sed -E 's#^([^:]+:[0-9]+:)(.*)$#\1 \2#' |
        awk -v allowed="$allowed" '{
            loc = $1; $1 = ""; code = $0
            sub(/\/\/.*/, "", code)
            while (match(code, /crate::(\{|[a-z_]+)/)) {
                floor = substr(code, RSTART + 7, RLENGTH - 7)
                if (index(" " allowed " ", " " floor " ") == 0) print loc " crate::" floor
                code = substr(code, RSTART + RLENGTH)
            }
        }')
    if [ -n "$hits" ]; then
        echo "$dir reaches above its floor (allowed: $allowed):"
        echo "$hits"
        status=1
    fi
}

check src/proto "proto"
check src/fanout "fanout proto"
[ $status -eq 0 ] && echo "ok: src/proto and src/fanout import nothing above them"
exit $status
