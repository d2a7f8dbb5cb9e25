#!/usr/bin/env bash
# Prints the fuzz targets a script was asked for, one per line: its TARGET
# arguments, or every target of the fuzz crate (`cargo fuzz list`) when there
# are none.
#
#   fuzz/targets.sh [TARGET...]
set -euo pipefail
if [ $# -gt 0 ]; then
    printf '%s\n' "$@"
else
    cd "$(dirname "$0")" && RUSTC_BOOTSTRAP=1 cargo fuzz list
fi
