#!/usr/bin/env bash
# Prints the libFuzzer options of fuzz target TARGET, one -NAME=VALUE per line,
# from the [libfuzzer] section of fuzz/options/TARGET.options (the
# ClusterFuzz/OSS-Fuzz format, which .clusterfuzzlite/build.sh ships to the
# service as $OUT/TARGET.options); nothing when the target has no such file.
#
#   fuzz/target_options.sh TARGET
set -euo pipefail
file="$(dirname "$0")/options/$1.options"
[ -f "$file" ] || exit 0
awk '
    /^[[:space:]]*(#|$)/ { next }
    /^\[/ { section = $0; next }
    section == "[libfuzzer]" && /=/ {
        split($0, kv, "=")
        gsub(/[[:space:]]/, "", kv[1]); gsub(/[[:space:]]/, "", kv[2])
        print "-" kv[1] "=" kv[2]
    }
' "$file"
