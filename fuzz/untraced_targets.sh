#!/usr/bin/env bash
# Prints the fuzz targets built without comparison tracing, one per line:
# [package.metadata.no-trace-compares] targets in fuzz/Cargo.toml, the one
# list fuzz/build.sh and .clusterfuzzlite/build.sh both read.
#
#   fuzz/untraced_targets.sh
set -euo pipefail
cd "$(dirname "$0")"
cargo metadata --no-deps --format-version 1 |
    jq -r '.packages[] | select(.manifest_path | endswith("/fuzz/Cargo.toml"))
        | .metadata["no-trace-compares"].targets // [] | .[]'
